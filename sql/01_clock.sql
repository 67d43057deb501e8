-- metering.now() is the only clock.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SET metering.now = '2024-03-10 12:00:00+00';
SELECT metering.now();
-- it is a timestamp with time zone, read in the time zone of the setting
SET metering.now = '2024-03-10 12:00:00-05';
SELECT metering.now() AT TIME ZONE 'UTC' AS utc;
-- unset: the start of the transaction
RESET metering.now;
BEGIN;
SELECT metering.now() = transaction_timestamp() AS is_transaction_start;
COMMIT;
SET metering.now = '';
SELECT metering.now() = transaction_timestamp() AS empty_is_unset;

-- only a concrete instant is a clock
SELECT regress.err($$SET metering.now = 'not a time'$$);
SELECT regress.err($$SET metering.now = 'infinity'$$);
SELECT regress.err($$SET metering.now = 'epoch'$$);
SELECT regress.err($$SET metering.now = '2024-01-01 00:00 Foo/Bar'$$);
SELECT metering.now() = transaction_timestamp() AS still_unset;
-- set before the library is loaded, a bad value is dropped with a warning,
-- never an error later (with metering in shared_preload_libraries the library
-- is always loaded and the SET itself fails: either way the clock is untouched)
\c -
SET client_min_messages = error;
DO $$ BEGIN PERFORM set_config('metering.now', '2024-01-01 00:00 Foo/Bar', false);
          EXCEPTION WHEN invalid_parameter_value THEN NULL; END $$;
SELECT metering.now() = transaction_timestamp() AS dropped;
RESET client_min_messages;
SELECT metering.now() = transaction_timestamp() AS still_fine;
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';

-- only a superuser, or a role granted SET on the setting, may move the clock
CREATE ROLE regress_clock_user;
GRANT USAGE ON SCHEMA metering, regress TO regress_clock_user;
SET ROLE regress_clock_user;
SELECT regress.err($$SET metering.now = '2024-01-01 00:00:00+00'$$);
SELECT regress.err($$SET LOCAL metering.now = '2024-01-01 00:00:00+00'$$);
SELECT regress.err($$SELECT set_config('metering.now', '2024-01-01 00:00:00+00', false)$$);
SELECT regress.err($$RESET metering.now$$);  -- nor clear it (RESET sets it)
SELECT metering.now() = transaction_timestamp() AS reads_the_real_clock;
-- nor may the setting that lets rows be restored and rules be backdated
SELECT regress.err($$SET metering.allow_backdated_rules = on$$);
RESET ROLE;
-- a role granted SET on it may
GRANT SET ON PARAMETER metering.now TO regress_clock_user;
SET ROLE regress_clock_user;
SELECT regress.err($$SET metering.now = '2024-01-01 00:00:00+00'$$);
SELECT metering.now();
RESET metering.now;
RESET ROLE;
REVOKE SET ON PARAMETER metering.now FROM regress_clock_user;
REVOKE USAGE ON SCHEMA metering, regress FROM regress_clock_user;
DROP ROLE regress_clock_user;

-- the clock is kept in one spelling (UTC, numeric offset), whatever the
-- input's, so parallel workers read their leader's value without the
-- session's time zone or zone abbreviations (this once crashed them)
SET force_parallel_mode = on;
SET metering.now = '2024-06-20T12:30:00Z';
SHOW metering.now;
SELECT metering.now();
SET metering.now = '2024-06-20 12:30 PST';
SHOW metering.now;
SELECT metering.now();
SET metering.now = '2024-06-20 12:30:00.123456 Europe/Paris';
SELECT metering.now();
SELECT regress.err($$SET metering.now = '0044-03-15 12:00 BC'$$);
SELECT regress.err($$SET metering.now = '10000-01-01 00:00+00'$$);
SELECT metering.now();
RESET force_parallel_mode;
RESET metering.now;

-- other settings of the extension
SHOW metering.meter_usage_max_age;
SHOW metering.batch_meter_usage_max_age;
SELECT regress.err($$SET metering.no_such_setting = 1$$);

-- uuid_v7: version 7, variant 10, time-ordered and strictly increasing in a backend
SELECT substr(u::text, 15, 1) AS version, substr(u::text, 20, 1) IN ('8', '9', 'a', 'b') AS variant
  FROM (SELECT metering.uuid_v7() AS u) s;
WITH ids AS (SELECT n, metering.uuid_v7() AS u FROM generate_series(1, 20000) n)
SELECT count(*) AS ids,
       count(DISTINCT u) AS distinct_ids,
       bool_and(u > prev) AS strictly_increasing
  FROM (SELECT u, lag(u) OVER (ORDER BY n) AS prev FROM ids) s;
SELECT abs(extract(epoch FROM metering.uuid_v7_time(metering.uuid_v7()) - clock_timestamp())) < 5 AS carries_the_real_time;
SELECT regress.err($$SELECT metering.uuid_v7_time('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')$$);
