-- HashMap rating speed: 1,000,000 points of one service with 5 metadata
-- fields, priced by rules in 3 groups (50 mappings, 10 thresholds):
--   rated_total on one core (max_parallel_workers_per_gather = 0);
--   the best pure-SQL query over the same rule tables, on one core;
--   rated_total with parallel workers;
--   CloudKitty 17's HashMap module on the same rules, for a sample of the
--   points (tools/cloudkitty_rate.py --bench), as points per second.
-- Targets: at least 10x CloudKitty and at least 5x the pure-SQL query.
-- All three must agree on the total before anything is timed.
--   psql -X -d metering_bench -f bench/rating.sql          (make bench runs it)
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
SELECT setseed(0.33);
SET metering.now = '2024-06-01 00:00:00+00';
TRUNCATE metering.hashmap_mappings, metering.hashmap_thresholds, metering.hashmap_fields,
         metering.hashmap_services, metering.hashmap_groups;

-- the rules
INSERT INTO metering.hashmap_services (name) VALUES ('compute');
INSERT INTO metering.hashmap_fields (service_id, name)
SELECT s.id, f FROM metering.hashmap_services s, unnest(ARRAY['flavor', 'image', 'region', 'cores', 'tier']) f;
INSERT INTO metering.hashmap_groups (name) VALUES ('instance'), ('license'), ('network');
CREATE TEMP TABLE rule_spec (field text, value text, grp text, cost numeric, map_type text);
INSERT INTO rule_spec VALUES
  (NULL, NULL, 'instance', 0.01, 'flat'), (NULL, NULL, 'network', 0.002, 'flat'), (NULL, NULL, NULL, 0.001, 'flat');
INSERT INTO rule_spec
SELECT f, v, g, round((0.001 + random() * 0.05)::numeric, 4), CASE WHEN random() < 0.7 THEN 'flat' ELSE 'rate' END
  FROM (VALUES ('flavor', ARRAY['m1.tiny', 'm1.small', 'm1.medium', 'm1.large', 'm1.xlarge', 'g1.gpu'], 'instance'),
               ('image', ARRAY['ubuntu', 'debian', 'windows', 'rhel', 'suse', 'custom'], 'license'),
               ('region', ARRAY['eu-1', 'eu-2', 'us-1', 'us-2', 'ap-1'], 'network'),
               ('cores', ARRAY['1', '2', '4', '8', '16', '32', '64'], 'instance'),
               ('tier', ARRAY['bronze', 'silver', 'gold', 'platinum'], NULL),
               ('region', ARRAY['eu-1', 'us-1', 'ap-1', 'eu-2', 'us-2', 'sa-1', 'af-1', 'me-1', 'ca-1', 'au-1', 'in-1', 'jp-1', 'kr-1', 'br-1', 'mx-1'], 'license')) x(f, vs, g),
       unnest(vs) v;
SELECT count(*) AS mappings FROM rule_spec;
INSERT INTO metering.hashmap_mappings (service_id, field_id, value, group_id, cost, map_type)
SELECT CASE WHEN r.field IS NULL THEN s.id END, f.id, r.value, g.id, r.cost, r.map_type
  FROM rule_spec r CROSS JOIN metering.hashmap_services s
  LEFT JOIN metering.hashmap_fields f ON f.name = r.field
  LEFT JOIN metering.hashmap_groups g ON g.name = r.grp;
INSERT INTO metering.hashmap_thresholds (service_id, field_id, group_id, level, cost, map_type)
SELECT CASE WHEN fld IS NULL THEN s.id END, f.id, g.id, lvl, c, t
  FROM (VALUES (NULL, 'instance', 100, 0.95, 'rate'), (NULL, 'instance', 500, 0.9, 'rate'), (NULL, 'instance', 1000, 0.85, 'rate'),
               (NULL, 'network', 200, 5, 'flat'), (NULL, 'license', 50, 0.98, 'rate'), (NULL, 'license', 800, 0.9, 'rate'),
               ('cores', 'instance', 8, 0.002, 'flat'), ('cores', 'instance', 32, 0.005, 'flat'),
               ('cores', 'license', 16, 1.2, 'rate'), ('cores', 'network', 64, 0.01, 'flat')) x(fld, grp, lvl, c, t)
  CROSS JOIN metering.hashmap_services s
  LEFT JOIN metering.hashmap_fields f ON f.name = x.fld
  LEFT JOIN metering.hashmap_groups g ON g.name = x.grp;
SELECT (SELECT count(*) FROM metering.hashmap_mappings) AS mappings, (SELECT count(*) FROM metering.hashmap_thresholds) AS thresholds;

-- 1,000,000 points: quantities and 5 metadata values each
DROP TABLE IF EXISTS bench_points;
CREATE TABLE bench_points AS
SELECT n, (1 + floor(random() * 1200))::numeric AS qty,
       jsonb_build_object(
         'flavor', (ARRAY['m1.tiny', 'm1.small', 'm1.medium', 'm1.large', 'm1.xlarge', 'g1.gpu', 'm2.new'])[1 + floor(random() * 7)::int],
         'image', (ARRAY['ubuntu', 'debian', 'windows', 'rhel', 'suse', 'custom'])[1 + floor(random() * 6)::int],
         'region', (ARRAY['eu-1', 'eu-2', 'us-1', 'us-2', 'ap-1', 'sa-1'])[1 + floor(random() * 6)::int],
         'cores', (ARRAY['1', '2', '4', '8', '16', '32', '64'])[1 + floor(random() * 7)::int],
         'tier', (ARRAY['bronze', 'silver', 'gold', 'platinum'])[1 + floor(random() * 4)::int]) AS md
  FROM generate_series(1, 1000000) n;
VACUUM ANALYZE bench_points;

-- the best pure-SQL equivalent: every match per point and group, the highest
-- threshold reached per group, then the HashMap formula; exact products by
-- an aggregate over numeric multiplication
CREATE OR REPLACE AGGREGATE pg_temp.product(numeric) (SFUNC = numeric_mul, STYPE = numeric, INITCOND = '1');
CREATE TEMP VIEW rules AS
SELECT m.service_id, f.name AS field, m.value, m.group_id, m.cost, m.map_type
  FROM metering.hashmap_mappings m LEFT JOIN metering.hashmap_fields f ON f.id = m.field_id
 WHERE m.tenant_id IS NULL AND m.start <= metering.now() AND metering.now() < coalesce(least(m."end", m.deleted_at), 'infinity');
CREATE TEMP VIEW thresholds AS
SELECT t.service_id, f.name AS field, t.group_id, t.level, t.cost, t.map_type
  FROM metering.hashmap_thresholds t LEFT JOIN metering.hashmap_fields f ON f.id = t.field_id
 WHERE t.tenant_id IS NULL AND t.level > -1 AND t.start <= metering.now()
   AND metering.now() < coalesce(least(t."end", t.deleted_at), 'infinity');
\set sql_total 'SELECT sum(price) FROM bench_points p, LATERAL (SELECT sum(CASE WHEN thr.field IS NULL THEN CASE thr.map_type WHEN ''flat'' THEN g.rate * g.flat * p.qty + thr.cost WHEN ''rate'' THEN g.rate * g.flat * p.qty * thr.cost ELSE g.rate * g.flat * p.qty END ELSE CASE thr.map_type WHEN ''flat'' THEN g.rate * (g.flat + thr.cost) * p.qty ELSE g.rate * thr.cost * g.flat * p.qty END END) AS price FROM (SELECT r.group_id, greatest(coalesce(max(r.cost) FILTER (WHERE r.map_type = ''flat''), 0), 0) AS flat, coalesce(pg_temp.product(r.cost) FILTER (WHERE r.map_type = ''rate''), 1) AS rate FROM rules r WHERE r.field IS NULL OR p.md ->> r.field = r.value GROUP BY r.group_id) g LEFT JOIN LATERAL (SELECT t.field, t.cost, t.map_type FROM thresholds t WHERE t.group_id IS NOT DISTINCT FROM g.group_id AND ((t.field IS NULL AND p.qty >= t.level) OR (p.md ? t.field AND (p.md ->> t.field)::numeric >= t.level)) ORDER BY t.level DESC, t.field NULLS FIRST LIMIT 1) thr ON true) x'
\set ours_total 'SELECT metering.rated_total(''compute'', qty, md, NULL) FROM bench_points'

-- the same total three ways, or the comparison means nothing
SET max_parallel_workers_per_gather = 0;
SELECT (:ours_total) AS rated_total,
       (SELECT sum(metering.rate('compute', qty, md)) FROM bench_points WHERE n <= 20000)
         = (SELECT metering.rated_total('compute', qty, md, NULL) FROM bench_points WHERE n <= 20000) AS rate_agrees;
CREATE FUNCTION pg_temp.check(ok boolean, message text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  IF ok IS NOT TRUE THEN
    RAISE EXCEPTION '%', message;
  END IF;
  RETURN true;
END $$;
-- (the pure-SQL query on a sample: it is too slow to check on all points twice)
CREATE TEMP TABLE sample AS SELECT * FROM bench_points WHERE n <= 20000;
SELECT pg_temp.check((SELECT metering.rated_total('compute', qty, md, NULL) FROM sample)
                     = (SELECT sum(price) FROM sample p, LATERAL (SELECT sum(CASE WHEN thr.field IS NULL THEN CASE thr.map_type WHEN 'flat' THEN g.rate * g.flat * p.qty + thr.cost WHEN 'rate' THEN g.rate * g.flat * p.qty * thr.cost ELSE g.rate * g.flat * p.qty END ELSE CASE thr.map_type WHEN 'flat' THEN g.rate * (g.flat + thr.cost) * p.qty ELSE g.rate * thr.cost * g.flat * p.qty END END) AS price FROM (SELECT r.group_id, greatest(coalesce(max(r.cost) FILTER (WHERE r.map_type = 'flat'), 0), 0) AS flat, coalesce(pg_temp.product(r.cost) FILTER (WHERE r.map_type = 'rate'), 1) AS rate FROM rules r WHERE r.field IS NULL OR p.md ->> r.field = r.value GROUP BY r.group_id) g LEFT JOIN LATERAL (SELECT t.field, t.cost, t.map_type FROM thresholds t WHERE t.group_id IS NOT DISTINCT FROM g.group_id AND ((t.field IS NULL AND p.qty >= t.level) OR (p.md ? t.field AND (p.md ->> t.field)::numeric >= t.level)) ORDER BY t.level DESC, t.field NULLS FIRST LIMIT 1) thr ON true) x),
                     'the pure-SQL query prices differently') AS same_prices;

CREATE FUNCTION pg_temp.timed_ms(sql text) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz := clock_timestamp();
BEGIN
  EXECUTE sql;
  RETURN round((extract(epoch FROM clock_timestamp() - t0) * 1000)::numeric, 1);
END $$;
CREATE TEMP TABLE figures (what text, ms numeric, points bigint);
\echo timing: rated_total and the pure-SQL query on one core, alternating...
INSERT INTO figures SELECT 'rated_total, one core', pg_temp.timed_ms(:'ours_total'), 1000000;
INSERT INTO figures SELECT 'pure SQL, one core', pg_temp.timed_ms(:'sql_total'), 1000000;
INSERT INTO figures SELECT 'rated_total, one core', pg_temp.timed_ms(:'ours_total'), 1000000;
INSERT INTO figures SELECT 'pure SQL, one core', pg_temp.timed_ms(:'sql_total'), 1000000;
RESET max_parallel_workers_per_gather;
SET max_parallel_workers_per_gather = 4;
SET parallel_setup_cost = 0;
INSERT INTO figures SELECT 'rated_total, parallel workers', pg_temp.timed_ms(:'ours_total'), 1000000;
INSERT INTO figures SELECT 'rated_total, parallel workers', pg_temp.timed_ms(:'ours_total'), 1000000;
RESET max_parallel_workers_per_gather;
RESET parallel_setup_cost;

-- CloudKitty: the same rules and a sample of the points, rated by its own module
\echo timing: CloudKitty 17 HashMap on 20,000 of the points...
\pset tuples_only on
\pset format unaligned
\o /tmp/metering_bench_ck.json
SELECT jsonb_build_object(
  'services', jsonb_build_array('compute'),
  'fields', (SELECT jsonb_agg(jsonb_build_object('service', 'compute', 'name', name)) FROM metering.hashmap_fields),
  'groups', (SELECT jsonb_agg(name) FROM metering.hashmap_groups),
  'mappings', (SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                 'service', CASE WHEN m.service_id IS NOT NULL THEN 'compute' END,
                 'field', CASE WHEN f.name IS NOT NULL THEN jsonb_build_array('compute', f.name) END,
                 'value', m.value, 'group', g.name, 'cost', m.cost, 'type', m.map_type)))
                 FROM metering.hashmap_mappings m LEFT JOIN metering.hashmap_fields f ON f.id = m.field_id
                 LEFT JOIN metering.hashmap_groups g ON g.id = m.group_id),
  'thresholds', (SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                 'service', CASE WHEN t.service_id IS NOT NULL THEN 'compute' END,
                 'field', CASE WHEN f.name IS NOT NULL THEN jsonb_build_array('compute', f.name) END,
                 'level', t.level, 'group', g.name, 'cost', t.cost, 'type', t.map_type)))
                 FROM metering.hashmap_thresholds t LEFT JOIN metering.hashmap_fields f ON f.id = t.field_id
                 LEFT JOIN metering.hashmap_groups g ON g.id = t.group_id),
  'points', (SELECT jsonb_agg(jsonb_build_object('service', 'compute', 'qty', qty, 'metadata', md)) FROM sample))::text;
\o
\pset tuples_only off
\pset format aligned
\set ck_cmd '/usr/bin/python3 tools/cloudkitty_rate.py --bench 1 < /tmp/metering_bench_ck.json'
\set ck_out `/usr/bin/python3 tools/cloudkitty_rate.py --bench 1 < /tmp/metering_bench_ck.json`
INSERT INTO figures SELECT 'CloudKitty 17 HashMap (points/s measured on 20,000)', round(1000000 * 1000.0 / :ck_out, 1), 1000000;

SELECT what, round(avg(ms), 1) AS ms, round(max(points) * 1000.0 / avg(ms)) AS points_per_second
  FROM figures GROUP BY what ORDER BY 3 DESC;
SELECT round((SELECT avg(ms) FROM figures WHERE what = 'pure SQL, one core')
             / (SELECT avg(ms) FROM figures WHERE what = 'rated_total, one core'), 1) AS times_pure_sql,
       round((SELECT avg(ms) FROM figures WHERE what LIKE 'CloudKitty%')
             / (SELECT avg(ms) FROM figures WHERE what = 'rated_total, one core'), 1) AS times_cloudkitty;
DROP TABLE bench_points;
