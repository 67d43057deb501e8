-- Ingest speed: metering.ingest_batch against a plain INSERT ... ON CONFLICT
-- DO NOTHING of the same JSON into a table with the events' columns and only
-- the (source, id) unique index.  Both run in this session, alternating batch
-- by batch, so the machine's noise falls on both alike.
--   psql -X -d metering_bench -f bench/ingest.sql          (make bench runs it)
\set ON_ERROR_STOP 1
-- it empties metering tables: only in a database made for it
SELECT current_database() LIKE 'metering_bench%' AS bench_db \gset
\if :bench_db
\else
\echo 'bench: run me in a database named metering_bench* (I replace the data of metering tables); make bench does'
\quit
\endif
\pset footer off
SET client_min_messages = notice;
SELECT setseed(0.5);

DROP TABLE IF EXISTS bench_plain, bench_batches;
-- the events' columns (same types and collations), only the (source, id) unique index
CREATE TABLE bench_plain (LIKE metering.events);
ALTER TABLE bench_plain DROP COLUMN seq, ADD UNIQUE (source, id);
SET client_min_messages = warning;
TRUNCATE metering.events, metering.meters, metering.meter_rollups, metering.meter_rollup_state CASCADE;
SET client_min_messages = notice;
-- what a deployment has: meters on the event type, so rollups are kept too
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('bench-tokens', 'llm.tokens', 'SUM', '$.tokens', '{"model": "$.model"}'),
  ('bench-requests', 'llm.tokens', 'COUNT', NULL, '{}');

-- 2 x 200 batches of 1,000 events: 1,000 subjects, two hours, a few models
CREATE TABLE bench_batches AS
SELECT b, jsonb_agg(jsonb_build_object(
         'specversion', '1.0', 'id', 'evt-' || b || '-' || n, 'source', 'bench',
         'type', 'llm.tokens', 'subject', 'customer-' || floor(random() * 1000)::int,
         'time', to_char(timestamptz '2024-06-01 10:00:00+00' + random() * interval '2 hours',
                         'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
         'data', jsonb_build_object('tokens', floor(random() * 5000)::int,
                                    'model', (ARRAY['small', 'medium', 'large'])[1 + floor(random() * 3)::int],
                                    'request_id', md5(random()::text)))) AS events
  FROM generate_series(1, 400) b, generate_series(1, 1000) n
 GROUP BY b;

CREATE TEMP TABLE timings (kind text, seconds float8);
DO $$
DECLARE
  batch jsonb;
  t0 timestamptz;
BEGIN
  FOR i IN 1 .. 400 LOOP
    SELECT events INTO batch FROM bench_batches WHERE b = i;
    IF i % 2 = 0 THEN
      t0 := clock_timestamp();
      INSERT INTO bench_plain
      SELECT e ->> 'id', e ->> 'source', e ->> 'subject', e ->> 'type', (e ->> 'time')::timestamptz,
             coalesce(e -> 'data', '{}'), now()
        FROM jsonb_array_elements(batch) e
      ON CONFLICT (source, id) DO NOTHING;
      INSERT INTO timings VALUES ('plain INSERT ... ON CONFLICT', extract(epoch FROM clock_timestamp() - t0));
    ELSE
      t0 := clock_timestamp();
      PERFORM metering.ingest_batch(batch);
      INSERT INTO timings VALUES ('metering.ingest_batch', extract(epoch FROM clock_timestamp() - t0));
    END IF;
  END LOOP;
END $$;

SELECT kind, count(*) AS batches, round((count(*) * 1000 / sum(seconds))::numeric) AS events_per_second
  FROM timings GROUP BY kind ORDER BY kind;
SELECT round(((SELECT count(*) / sum(seconds) FROM timings WHERE kind = 'metering.ingest_batch')
            / (SELECT count(*) / sum(seconds) FROM timings WHERE kind <> 'metering.ingest_batch'))::numeric, 2)
       AS ingest_ratio_vs_plain_insert;
SELECT (SELECT count(*) FROM metering.events) AS events_stored, (SELECT count(*) FROM bench_plain) AS plain_rows,
       (SELECT count(*) FROM metering.meter_rollups WHERE meter LIKE 'bench-%') AS rollup_rows_before_refresh;
-- the rollup work ingestion did not do is done later by refresh_rollups(),
-- outside the writers' path; its rate, for the two meters
DO $$
DECLARE
  t0 timestamptz := clock_timestamp();
  n bigint;
BEGIN
  n := metering.refresh_rollups();
  RAISE NOTICE 'refresh_rollups: % (meter, event) pairs in % s, % events/s for two meters',
    n, round(extract(epoch FROM clock_timestamp() - t0)::numeric, 2),
    round((SELECT count(*) FROM metering.events) / extract(epoch FROM clock_timestamp() - t0));
END $$;
DROP TABLE bench_plain, bench_batches;
