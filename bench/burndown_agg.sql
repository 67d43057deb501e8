-- The burndown aggregate against sum(numeric): 1,000,000 usage rows over
-- June 2024 burnt through 20 grants (priorities 0..9, expiries, one refilled
-- daily: about 50 cuts; times in RFC 3339, ids given), timed alternately
-- with sum over the same rows in this session, median of several runs.
-- Target: burndown at no less than half the speed of sum (time ratio <= 2).
-- Two cases:
--   pre-ordered input: the rows come from a table loaded in time order, read
--     by a plain sequential scan (synchronized scans off, so it starts at the
--     first block); burndown checks the order itself and would fail;
--   sorted input: the rows sorted in a subquery, against sum(amount ORDER BY
--     at), which sorts the same rows.  (burndown(at, amount, grants ORDER BY
--     at) is not timed: PostgreSQL 15 sorts every argument of an ordered
--     aggregate, the grant list too, once per row; on these rows that writes
--     about 10 GB of temporary files.  The README says to sort in a subquery.)
-- Single process (no parallel workers: the aggregate has no combine
-- function), the server's work_mem.
--   psql -X -d metering_bench -f bench/burndown_agg.sql          (make bench runs it)
\set ON_ERROR_STOP 1
-- it empties metering tables: only in a database made for it
SELECT current_database() LIKE 'metering_bench%' AS bench_db \gset
\if :bench_db
\else
\echo 'bench: run me in a database named metering_bench* (I replace the data of metering tables); make bench does'
\quit
\endif
\pset footer off
SET client_min_messages = warning;
SELECT setseed(0.5);
SET max_parallel_workers_per_gather = 0;
SET synchronize_seqscans = off;
TRUNCATE metering.events, metering.meters, metering.meter_rollups, metering.meter_rollup_state CASCADE;

DROP TABLE IF EXISTS bench_usage;
-- 1,000,000 rows in time order, one every 2.592 s on average: integer
-- amounts (tokens) and, for the numeric path, amounts in hundredths
CREATE TABLE bench_usage AS
SELECT timestamptz '2024-06-01 00:00:00+00' + (n + random()) * interval '2592 milliseconds' AS at,
       (1 + floor(random() * 100))::numeric AS amount,
       round((1 + floor(random() * 10000))::numeric / 100, 2) AS cents
  FROM generate_series(0, 999999) n;
VACUUM ANALYZE bench_usage;

SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
         'id', '00000000-0000-4000-8000-' || lpad(i::text, 12, '0'), 'amount', amount, 'priority', priority,
         'effective_at', effective_at, 'expires_at', expires_at, 'recurrence', recurrence)) ORDER BY i) AS grants
  FROM (VALUES
      (1, 1500000, 0, '2024-06-01T00:00:00Z', NULL, '1 day'),
      (2, 2000000, 1, '2024-06-01T00:00:00Z', '2024-06-04T00:00:00Z', NULL),
      (3, 3000000, 1, '2024-06-01T00:00:00Z', '2024-07-01T00:00:00Z', NULL),
      (4, 5000000, 2, '2024-06-01T00:00:00Z', NULL, NULL),
      (5, 1000000, 2, '2024-06-02T07:13:00Z', '2024-06-07T07:13:00Z', NULL),
      (6, 4000000, 3, '2024-06-03T06:15:00Z', '2024-08-03T06:15:00Z', NULL),
      (7, 2500000, 3, '2024-06-04T18:41:00Z', '2024-06-14T18:41:00Z', NULL),
      (8, 1200000, 4, '2024-06-05T09:00:00Z', '2024-06-06T09:00:00Z', NULL),
      (9, 3300000, 4, '2024-06-06T22:30:00Z', NULL, NULL),
      (10, 2700000, 5, '2024-06-08T11:11:00Z', '2024-06-22T11:11:00Z', NULL),
      (11, 1800000, 5, '2024-06-10T14:45:00Z', '2024-09-10T14:45:00Z', NULL),
      (12, 6000000, 6, '2024-06-11T03:27:00Z', NULL, NULL),
      (13, 900000, 6, '2024-06-12T16:05:00Z', '2024-06-14T16:05:00Z', NULL),
      (14, 2200000, 7, '2024-06-13T00:00:00Z', '2024-07-13T00:00:00Z', NULL),
      (15, 3100000, 7, '2024-06-14T12:34:00Z', '2024-07-04T12:34:00Z', NULL),
      (16, 1600000, 8, '2024-06-15T08:20:00Z', NULL, NULL),
      (17, 2400000, 8, '2024-06-16T19:55:00Z', '2024-07-28T19:55:00Z', NULL),
      (18, 5500000, 9, '2024-06-18T05:05:00Z', '2025-06-18T05:05:00Z', NULL),
      (19, 4200000, 9, '2024-06-19T23:59:00Z', NULL, NULL),
      (20, 1000000, 0, '2024-06-25T00:00:00Z', '2024-07-02T00:00:00Z', NULL)) g(i, amount, priority, effective_at, expires_at, recurrence) \gset

-- Times each statement in turn, `runs` rounds (after one warm-up round when
-- `warm`); the median per statement.
CREATE FUNCTION pg_temp.alternate(sqls text[], runs integer, warm boolean DEFAULT true)
  RETURNS TABLE (i integer, median_ms numeric)
LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz;
  times float8[] := array_fill(NULL::float8, ARRAY[array_length(sqls, 1), runs]);
BEGIN
  FOR k IN 1 .. array_length(sqls, 1) LOOP
    CONTINUE WHEN NOT warm;
    EXECUTE sqls[k];                    -- warm the cache
  END LOOP;
  FOR r IN 1 .. runs LOOP
    FOR k IN 1 .. array_length(sqls, 1) LOOP
      t0 := clock_timestamp();
      EXECUTE sqls[k];
      times[k][r] := extract(epoch FROM clock_timestamp() - t0) * 1000;
    END LOOP;
  END LOOP;
  RETURN QUERY
  SELECT k, round((SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY times[k][r])
                     FROM generate_series(1, runs) r)::numeric, 1)
    FROM generate_series(1, array_length(sqls, 1)) k;
END $$;

\set sum 'SELECT sum(amount) FROM bench_usage'
\set burn 'SELECT metering.burndown(at, amount, ' :'grants' '::jsonb) FROM bench_usage'
\set sum_cents 'SELECT sum(cents) FROM bench_usage'
\set burn_cents 'SELECT metering.burndown(at, cents, ' :'grants' '::jsonb) FROM bench_usage'
\set sum_ordered 'SELECT sum(amount ORDER BY at) FROM bench_usage'
\set burn_subquery 'SELECT metering.burndown(at, amount, ' :'grants' '::jsonb) FROM (SELECT at, amount FROM bench_usage ORDER BY at) s'

-- the same usage, or the comparison means nothing
SELECT (SELECT count(*) FROM bench_usage) AS usage_rows,
       (:burn) ->> 'usage' AS burndown_usage, (:sum) AS sum,
       (:burn) ->> 'overage' AS burndown_overage,
       (:burn_cents) ->> 'usage' AS burndown_usage_cents, (:sum_cents) AS sum_cents;
CREATE FUNCTION pg_temp.check(ok boolean, message text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  IF ok IS NOT TRUE THEN
    RAISE EXCEPTION '%', message;
  END IF;
  RETURN true;
END $$;
SELECT pg_temp.check(((:burn) ->> 'usage')::numeric = (:sum) AND ((:burn_cents) ->> 'usage')::numeric = (:sum_cents)
                     AND (:burn) = (:burn_subquery),
                     'burndown usage differs from the sum') AS same_usage;

CREATE TEMP TABLE figures (what text, median_ms numeric);
\echo pre-ordered input: 4 statements x 7 runs...
INSERT INTO figures
SELECT (ARRAY['sum(amount), integer amounts',
              'burndown(at, amount, grants), pre-ordered, integer amounts',
              'sum(cents), amounts in hundredths',
              'burndown(at, cents, grants), pre-ordered, amounts in hundredths'])[i], median_ms
  FROM pg_temp.alternate(ARRAY[:'sum', :'burn', :'sum_cents', :'burn_cents'], 7);
\echo sorted input: 2 statements x 3 runs (the table is warm)...
INSERT INTO figures
SELECT (ARRAY['sum(amount ORDER BY at)',
              'burndown(at, amount, grants) over (SELECT ... ORDER BY at)'])[i], median_ms
  FROM pg_temp.alternate(ARRAY[:'sum_ordered', :'burn_subquery'], 3, warm => false);

SELECT what, median_ms FROM figures;
SELECT round((SELECT median_ms FROM figures WHERE what LIKE 'burndown(at, amount, grants), pre-ordered%')
             / (SELECT median_ms FROM figures WHERE what LIKE 'sum(amount),%'), 2) AS pre_ordered_ratio_vs_sum,
       round((SELECT median_ms FROM figures WHERE what LIKE 'burndown(at, cents, grants), pre-ordered%')
             / (SELECT median_ms FROM figures WHERE what LIKE 'sum(cents)%'), 2) AS pre_ordered_ratio_vs_sum_hundredths,
       round((SELECT median_ms FROM figures WHERE what LIKE 'burndown(at, amount, grants) over%')
             / (SELECT median_ms FROM figures WHERE what = 'sum(amount ORDER BY at)'), 2) AS sorted_ratio_vs_sum_order_by;
DROP TABLE bench_usage;
