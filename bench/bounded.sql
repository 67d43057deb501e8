-- Bounded work (README "Bounded work"): the inputs that ran unbounded before
-- the work budget of src/burndown.h, each timed once, with the ratio to a
-- trivial baseline call (an entitlement_value a day after the start) in the
-- same session.  Each one either answers or is refused with 54000.
--   createdb metering_bench_bounded && psql -X -d metering_bench_bounded -c 'CREATE EXTENSION metering'
--   psql -X -d metering_bench_bounded -f bench/bounded.sql
\set ON_ERROR_STOP 1
SELECT current_database() LIKE 'metering_bench%' AS bench_db \gset
\if :bench_db
\else
\echo 'bench: run me in a database named metering_bench* (I replace the data of metering tables)'
\quit
\endif
\pset footer off
SET client_min_messages = warning;
SET timezone = 'UTC';
SET statement_timeout = '120s';
TRUNCATE metering.events, metering.meters, metering.meter_rollups, metering.meter_rollup_state,
         metering.features, metering.entitlements CASCADE;
SET metering.now = '2024-06-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('u', 'use', 'SUM', '$.n');
SELECT metering.create_feature('w', 'Weekly', 'u') IS NOT NULL AS feature \gset
SELECT metering.create_feature('h', 'Hourly', 'u') IS NOT NULL AS feature \gset
SELECT metering.create_feature('g', 'Grants', 'u') IS NOT NULL AS feature \gset
SELECT metering.create_entitlement('acme', 'w', usage_period => '1 week', usage_period_anchor => '2024-06-01') AS weekly \gset
SELECT metering.create_entitlement('acme', 'h', usage_period => '1 hour', usage_period_anchor => '2024-06-01') AS hourly \gset
SELECT metering.create_entitlement('acme', 'g', usage_period => '1000 years', usage_period_anchor => '2024-06-01') AS grants \gset
SELECT metering.create_grant(:'weekly', 100, '2024-06-01') IS NOT NULL AS g \gset
SELECT metering.create_grant(:'hourly', 100, '2024-06-01') IS NOT NULL AS g \gset
SELECT count(metering.create_grant(:'grants', 5, '2024-06-01', recurrence => '1 hour',
                                   recurrence_anchor => timestamptz '2024-06-01' + n * interval '7 seconds')) AS g
  FROM generate_series(0, 399) n \gset
-- near the limits: 60 hourly grants on the 60 minute grids (anchors are kept to the minute)
SELECT metering.create_feature('m', 'Minutes', 'u') IS NOT NULL AS feature \gset
SELECT metering.create_entitlement('acme', 'm', usage_period => '1000 years', usage_period_anchor => '2024-06-01') AS minutes \gset
SELECT count(metering.create_grant(:'minutes', 5, '2024-06-01', recurrence => '1 hour',
                                   recurrence_anchor => timestamptz '2024-06-01' + n * interval '1 minute')) AS g
  FROM generate_series(0, 59) n \gset

CREATE TEMP TABLE timings (input text, seconds numeric, outcome text);
CREATE FUNCTION pg_temp.timed(input text, q text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz := clock_timestamp();
  n bigint;
  outcome text;
BEGIN
  BEGIN
    EXECUTE 'SELECT count(*) FROM (' || q || ') s WHERE s::text IS NOT NULL' INTO n;
    outcome := n || ' rows';
  EXCEPTION WHEN program_limit_exceeded THEN
    outcome := '54000: ' || SQLERRM;
  END;
  INSERT INTO timings VALUES (input, extract(epoch FROM clock_timestamp() - t0), outcome);
END $$;

SELECT pg_temp.timed('baseline: entitlement_value a day in',
  format($$SELECT * FROM metering.entitlement_value('acme', 'w', '2024-06-02')$$));
SELECT pg_temp.timed('burndown_history weekly to 9999',
  format($$SELECT * FROM metering.burndown_history(%L, '2024-06-01', '9999-12-31')$$, :'weekly'));
SELECT pg_temp.timed('burndown_history hourly, 100 years',
  format($$SELECT * FROM metering.burndown_history(%L, '2024-06-01', '2124-06-01')$$, :'hourly'));
SELECT pg_temp.timed('entitlement_value hourly, 100 years',
  format($$SELECT * FROM metering.entitlement_value('acme', 'h', '2124-06-01')$$));
SELECT pg_temp.timed('balance_history HOUR windows, 100 years',
  format($$SELECT * FROM metering.balance_history(%L, '2024-06-01', '2124-06-01', 'HOUR')$$, :'hourly'));
SELECT pg_temp.timed('aggregate 1e131071 overage, hourly refill, 10 years',
  $$SELECT metering.burndown(t, 1e131071, '[{"amount": 5, "effective_at": "2024-06-01T00:00:00Z", "recurrence": "1 hour"}]', '2034-06-01')
      FROM (VALUES (timestamptz '2024-06-01 00:30+00')) v(t)$$);
SELECT pg_temp.timed('aggregate amount 1, hourly refill, 10 years',
  $$SELECT metering.burndown(t, 1, '[{"amount": 5, "effective_at": "2024-06-01T00:00:00Z", "recurrence": "1 hour"}]', '2034-06-01')
      FROM (VALUES (timestamptz '2024-06-01 00:30+00')) v(t)$$);
SELECT pg_temp.timed('aggregate 400 hourly grants (distinct anchors), 100 days',
  $$SELECT metering.burndown(t, 1, (SELECT jsonb_agg(jsonb_build_object('amount', 5, 'effective_at', '2024-06-01T00:00:00Z',
            'recurrence', '1 hour', 'recurrence_anchor', to_char(timestamptz '2024-06-01' + n * interval '7 seconds', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
            FROM generate_series(0, 399) n), '2024-09-09')
      FROM (VALUES (timestamptz '2024-06-01 00:30+00')) v(t)$$);
SELECT pg_temp.timed('entitlement_value 400 hourly grants, 100 days',
  format($$SELECT * FROM metering.entitlement_value('acme', 'g', '2024-09-09')$$));
-- the slowest accepted: just inside 50,000,000 steps
SELECT pg_temp.timed('near the limit: aggregate 100 grants on distinct grids, 194 days',
  $$SELECT metering.burndown(t, 1, (SELECT jsonb_agg(jsonb_build_object('amount', 5, 'effective_at', '2024-06-01T00:00:00Z',
            'recurrence', '1 hour', 'recurrence_anchor', to_char(timestamptz '2024-06-01' + n * interval '7 seconds', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
            FROM generate_series(0, 99) n), '2024-12-12')
      FROM (VALUES (timestamptz '2024-06-01 00:30+00')) v(t)$$);
SELECT pg_temp.timed('near the limit: aggregate 1e131071 overage, hourly refill, 530 days',
  $$SELECT metering.burndown(t, 1e131071, '[{"amount": 5, "effective_at": "2024-06-01T00:00:00Z", "recurrence": "1 hour"}]', timestamptz '2024-06-01' + interval '530 days')
      FROM (VALUES (timestamptz '2024-06-01 00:30+00')) v(t)$$);
SELECT pg_temp.timed('near the limit: entitlement_value 60 minute grids, 264 days',
  format($$SELECT * FROM metering.entitlement_value('acme', 'm', '2025-02-20')$$));
SELECT pg_temp.timed('near the limit: balance_history 60 minute grids, 6,096 HOUR windows',
  format($$SELECT * FROM metering.balance_history(%L, '2024-06-01', '2025-02-10', 'HOUR')$$, :'minutes'));
SELECT pg_temp.timed('near the limit: burndown_history 60 minute grids, 22 days',
  format($$SELECT * FROM metering.burndown_history(%L, '2024-06-01', '2024-06-23')$$, :'minutes'));
SELECT pg_temp.timed('near the limit: balance_history 99,000 HOUR windows',
  format($$SELECT * FROM metering.balance_history(%L, '2024-06-01', timestamptz '2024-06-01' + interval '99000 hours', 'HOUR')$$, :'hourly'));

SELECT input, round(seconds, 3) AS seconds,
       round(seconds / nullif((SELECT seconds FROM timings WHERE input LIKE 'baseline%'), 0)) AS ratio, outcome
  FROM timings;
