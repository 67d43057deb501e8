-- price_usage speed: 1,000 subjects x 3 priced meters (graduated calls,
-- volume tokens, package storage, each with a minimum) over a month of
-- events, rollups refreshed; one subject's invoice draft, and every
-- subject's, against the same question in plain SQL over the events (the
-- tiers read from the same price rows), in the same session.
-- Targets: all subjects under 2 s, one subject under 5 ms.
--   psql -X -d metering_bench -f bench/prices.sql                       (3,000,000 events)
--   psql -X -d metering_bench -v events=10000000 -f bench/prices.sql    (the issue's 10 M)
\set ON_ERROR_STOP 1
-- it empties metering tables: only in a database made for it
SELECT current_database() LIKE 'metering_bench%' AS bench_db \gset
\if :bench_db
\else
\echo 'bench: run me in a database named metering_bench* (I replace the data of metering tables); make bench does'
\quit
\endif
\if :{?events}
\else
\set events 3000000
\endif
\pset footer off
SET client_min_messages = warning;
SELECT setseed(0.5);
SET metering.now = '2024-06-01 00:00:00+00';
TRUNCATE metering.events, metering.meters, metering.meter_rollups, metering.meter_rollup_state, metering.prices CASCADE;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('bench-tokens', 'llm.tokens', 'SUM', '$.tokens', '{}'),
  ('bench-storage', 'storage.gb', 'SUM', '$.gb', '{}');
INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('bench-calls', 'api.call', 'COUNT');
INSERT INTO metering.prices (meter_slug, model, tiers, minimum_amount) VALUES
  ('bench-calls', 'graduated', '[{"up_to": 1000, "unit_amount": 0}, {"up_to": 2000, "unit_amount": 0.002}, {"up_to": null, "unit_amount": 0.001, "flat_amount": 5}]', 1),
  ('bench-tokens', 'volume', '[{"up_to": 1000000, "unit_amount": 0.00002}, {"up_to": 5000000, "unit_amount": 0.000015, "flat_amount": 10}, {"up_to": null, "unit_amount": 0.00001, "flat_amount": 20}]', 25);
INSERT INTO metering.prices (meter_slug, model, package_size, package_amount, free_units, minimum_amount) VALUES
  ('bench-storage', 'package', 100, 0.5, 1000, 2);

-- the events: a month (2024-06-01 .. 2024-07-01), 1,000 subjects, a third per meter, in time order
\echo loading :events events...
SET bench.n = :events;
CREATE TEMP TABLE load_time AS SELECT clock_timestamp() AS t0;
DO $$
DECLARE
  total bigint := current_setting('bench.n')::bigint;
  step bigint := 1000000;
BEGIN
  FOR chunk IN 0 .. (total - 1) / step LOOP
    INSERT INTO metering.events (id, source, subject, type, time, data)
    SELECT 'e' || n, 'bench', 'customer-' || floor(random() * 1000)::int,
           (ARRAY['api.call', 'llm.tokens', 'storage.gb'])[1 + n % 3],
           timestamptz '2024-06-01 00:00:00+00' + (n + random()) * (interval '30 days' / total),
           CASE n % 3 WHEN 0 THEN '{}'::jsonb
                      WHEN 1 THEN jsonb_build_object('tokens', floor(random() * 5000)::int)
                      ELSE jsonb_build_object('gb', round((random() * 10)::numeric, 2)) END
      FROM generate_series(chunk * step, least(total, (chunk + 1) * step) - 1) n;
    COMMIT;
  END LOOP;
END $$;
SELECT round(extract(epoch FROM clock_timestamp() - t0)::numeric, 1) AS load_s FROM load_time;
VACUUM ANALYZE metering.events;
CREATE TEMP TABLE refresh_time AS SELECT clock_timestamp() AS t0;
SELECT metering.refresh_rollups() AS rolled_up;
SELECT round(extract(epoch FROM clock_timestamp() - t0)::numeric, 1) AS refresh_rollups_s FROM refresh_time;
VACUUM ANALYZE metering.meter_rollups;
SET metering.now = '2024-07-02 00:00:00+00';

-- the baseline: the same lines in plain SQL over the events, the tiers read
-- from the price rows (graduated: the units within each tier; volume: the
-- tier of the whole quantity; package: whole packages above the free units)
CREATE FUNCTION pg_temp.plain(subjects text[]) RETURNS TABLE(subject text, meter text, quantity numeric, amount numeric)
LANGUAGE sql STABLE AS $$
  WITH q AS (
    SELECT e.subject, m.slug AS meter,
           CASE WHEN m.aggregation = 'COUNT' THEN count(*)::numeric ELSE coalesce(sum(metering._meter_number(e.data, m.value_property)), 0) END AS q
      FROM metering.events e JOIN metering.meters m ON m.event_type = e.type
     WHERE e.time >= '2024-06-01' AND e.time < '2024-07-01' AND (subjects IS NULL OR e.subject = ANY (subjects))
     GROUP BY 1, 2)
  SELECT q.subject, q.meter, q.q,
         CASE p.model
           WHEN 'graduated' THEN (SELECT sum(greatest(0, least(q.q, coalesce((t->>'up_to')::numeric, q.q)) - coalesce((p.tiers->(i::int - 2)->>'up_to')::numeric, 0))
                                             * coalesce((t->>'unit_amount')::numeric, 0)
                                         + CASE WHEN q.q > coalesce((p.tiers->(i::int - 2)->>'up_to')::numeric, 0) THEN coalesce((t->>'flat_amount')::numeric, 0) ELSE 0 END)
                                    FROM jsonb_array_elements(p.tiers) WITH ORDINALITY x(t, i))
           WHEN 'volume' THEN (SELECT q.q * coalesce((t->>'unit_amount')::numeric, 0) + coalesce((t->>'flat_amount')::numeric, 0)
                                 FROM jsonb_array_elements(p.tiers) WITH ORDINALITY x(t, i)
                                WHERE t->'up_to' = 'null' OR (t->>'up_to')::numeric >= q.q ORDER BY i LIMIT 1)
           WHEN 'package' THEN ceil(greatest(0, q.q - p.free_units) / p.package_size) * p.package_amount
         END
    FROM q JOIN metering.prices p ON p.meter_slug = q.meter
$$;

-- the same answers, or the comparison means nothing
SELECT count(*) AS lines, count(*) FILTER (WHERE u.quantity = b.quantity AND u.amount = b.amount) AS agreeing
  FROM generate_series(0, 999, 37) s CROSS JOIN LATERAL metering.price_usage('customer-' || s, '2024-06-01', '2024-07-01') u
  JOIN pg_temp.plain(NULL) b ON b.subject = 'customer-' || s AND b.meter = u.meter
 WHERE u.model <> 'minimum';

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
INSERT INTO figures SELECT 'price_usage, one subject (median of 50)',
  pg_temp.median_ms($q$SELECT * FROM metering.price_usage('customer-42', '2024-06-01', '2024-07-01')$q$, 50);
INSERT INTO figures SELECT 'plain SQL over the events, one subject (median of 5)',
  pg_temp.median_ms($q$SELECT * FROM pg_temp.plain(ARRAY['customer-42'])$q$, 5);
INSERT INTO figures SELECT 'price_usage, all 1,000 subjects (median of 3)',
  pg_temp.median_ms($q$SELECT count(*) FROM generate_series(0, 999) s, metering.price_usage('customer-' || s, '2024-06-01', '2024-07-01')$q$, 3);
INSERT INTO figures SELECT 'plain SQL over the events, all 1,000 subjects (median of 3)',
  pg_temp.median_ms($q$SELECT count(*) FROM pg_temp.plain(NULL)$q$, 3);
SELECT what, ms FROM figures;
SELECT (SELECT ms FROM figures WHERE what LIKE 'plain SQL%one%') / (SELECT ms FROM figures WHERE what LIKE 'price_usage, one%') AS one_subject_speedup,
       (SELECT ms FROM figures WHERE what LIKE 'plain SQL%all%') / (SELECT ms FROM figures WHERE what LIKE 'price_usage, all%') AS all_subjects_speedup,
       (SELECT ms FROM figures WHERE what LIKE 'price_usage, one%') < 5 AS one_subject_under_5ms,
       (SELECT ms FROM figures WHERE what LIKE 'price_usage, all%') < 2000 AS all_subjects_under_2s;
