-- query_meter speed: an hourly SUM for one subject over 30 days among 10
-- million events, against the equivalent hand-written GROUP BY, in the same
-- session.  The hand-written query runs twice: on the events table as the
-- extension ships it, and with a btree on (subject, type, time) added, the
-- best a hand-written query can have.
--   psql -X -d metering_bench -f bench/query_meter.sql          (make bench runs it)
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
SELECT setseed(0.25);
TRUNCATE metering.events, metering.meters, metering.meter_rollups, metering.meter_rollup_state CASCADE;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('bench-tokens', 'llm.tokens', 'SUM', '$.tokens', '{"model": "$.model"}');

-- 10,000,000 events over 30 days (2024-06-01 .. 2024-07-01), 1,000 subjects,
-- loaded in time order the way they would arrive
\echo loading 10,000,000 events...
DO $$
BEGIN
  FOR chunk IN 0 .. 9 LOOP
    INSERT INTO metering.events (id, source, subject, type, time, data)
    SELECT 'e' || n, 'bench', 'customer-' || floor(random() * 1000)::int, 'llm.tokens',
           timestamptz '2024-06-01 00:00:00+00' + (n + random()) * interval '259.2 milliseconds',
           jsonb_build_object('tokens', floor(random() * 5000)::int,
                              'model', (ARRAY['small', 'medium', 'large'])[1 + floor(random() * 3)::int])
      FROM generate_series(chunk * 1000000, chunk * 1000000 + 999999) n;
    COMMIT;
  END LOOP;
END $$;
VACUUM ANALYZE metering.events;

CREATE FUNCTION pg_temp.median_ms(sql text, runs integer) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz;
  times float8[] := '{}';
BEGIN
  EXECUTE sql;                          -- warm the cache
  FOR i IN 1 .. runs LOOP
    t0 := clock_timestamp();
    EXECUTE sql;
    times := times || extract(epoch FROM clock_timestamp() - t0) * 1000;
  END LOOP;
  RETURN round((SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM unnest(times) x)::numeric, 2);
END $$;

CREATE TEMP TABLE figures (what text, ms numeric);
\set ours 'SELECT * FROM metering.query_meter(''bench-tokens'', ''2024-06-01T00:00:00Z'', ''2024-07-01T00:00:00Z'', ''HOUR'', ''UTC'', ARRAY[''customer-42''])'
\set hand 'SELECT date_trunc(''hour'', time, ''UTC''), sum((data ->> ''tokens'')::numeric) FROM metering.events WHERE subject = ''customer-42'' AND type = ''llm.tokens'' AND time >= ''2024-06-01T00:00:00Z'' AND time < ''2024-07-01T00:00:00Z'' GROUP BY 1 ORDER BY 1'

-- the same rows, or the comparison means nothing
SELECT count(*) AS hourly_rows,
       (SELECT count(*) FROM (:ours) o JOIN (:hand) h(w, v) ON h.w = o.window_start AND h.v = o.value) AS matching_rows
  FROM (:hand) h;

INSERT INTO figures VALUES ('query_meter, never refreshed (reads events)', pg_temp.median_ms(:'ours', 5));
INSERT INTO figures VALUES ('hand-written GROUP BY, shipped indexes', pg_temp.median_ms(:'hand', 5));
\echo refreshing rollups...
SELECT metering.refresh_rollups() AS rolled_up \gset
SELECT :rolled_up AS rolled_up_events, pg_size_pretty(pg_total_relation_size('metering.meter_rollups')) AS rollup_size;
INSERT INTO figures VALUES ('query_meter, refreshed', pg_temp.median_ms(:'ours', 21));
-- an hour of new events since the refresh (the usual state between refreshes)
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'late' || n, 'bench', 'customer-' || floor(random() * 1000)::int, 'llm.tokens',
       timestamptz '2024-06-30 23:00:00+00' + random() * interval '1 hour',
       jsonb_build_object('tokens', floor(random() * 5000)::int, 'model', 'small')
  FROM generate_series(1, 14000) n;
INSERT INTO figures VALUES ('query_meter, refreshed an hour ago', pg_temp.median_ms(:'ours', 21));
\echo adding a btree on (subject, type, time) for the hand-written query...
CREATE INDEX bench_subject_idx ON metering.events (subject, type, time);
ANALYZE metering.events;
INSERT INTO figures VALUES ('hand-written GROUP BY, with a (subject, type, time) btree', pg_temp.median_ms(:'hand', 21));
INSERT INTO figures VALUES ('query_meter, refreshed an hour ago, with that btree', pg_temp.median_ms(:'ours', 21));
DROP INDEX metering.bench_subject_idx;

SELECT what, ms AS median_ms FROM figures;
SELECT round((SELECT ms FROM figures WHERE what = 'query_meter, refreshed an hour ago')
             / (SELECT ms FROM figures WHERE what = 'hand-written GROUP BY, shipped indexes'), 3) AS ratio_vs_hand_written,
       round((SELECT ms FROM figures WHERE what = 'query_meter, refreshed an hour ago')
             / (SELECT ms FROM figures WHERE what = 'hand-written GROUP BY, with a (subject, type, time) btree'), 3) AS ratio_vs_hand_written_with_btree;
