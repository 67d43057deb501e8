-- Fuzzing the rating rules and the rating functions: random rule rows
-- (parents, values, costs, levels, types, tenants, validity), random
-- metadata documents and quantities.  Every input is accepted or rejected
-- with a documented SQLSTATE; nothing crashes; rate, rate_explain and
-- rated_total agree with each other whatever the input.
BEGIN;
SELECT plan(8);
SELECT setseed(0.77);
SET LOCAL metering.now = '2024-06-01 00:00:00+00';

CREATE FUNCTION pg_temp.junk() RETURNS boolean LANGUAGE sql VOLATILE AS $$ SELECT random() < 0.3 $$;
CREATE FUNCTION pg_temp.rand_num() RETURNS numeric LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT pg_temp.junk() THEN round((random() * 20 - 2)::numeric, floor(random() * 4)::int)
    ELSE (ARRAY[NULL, 'NaN', 'Infinity', '-Infinity', 0, -1, 1e30, 1e-30])[1 + floor(random() * 8)::int] END
$$;
CREATE FUNCTION pg_temp.rand_text() RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT pg_temp.junk() THEN (ARRAY['a', 'b', 'c', '8', '8.0', 'true', 'null', '04'])[1 + floor(random() * 8)::int]
    ELSE (ARRAY[NULL, '', repeat('x', 300), 'é', E'a\nb', '{"x": 1}'])[1 + floor(random() * 6)::int] END
$$;
CREATE FUNCTION pg_temp.rand_time() RETURNS timestamptz LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT pg_temp.junk() THEN '2024-06-01'::timestamptz + (random() * 60 - 5) * interval '1 day'
    ELSE (ARRAY[NULL, 'infinity', '-infinity', '2024-06-01'])[1 + floor(random() * 4)::int]::timestamptz END
$$;
CREATE FUNCTION pg_temp.rand_json(depth int) RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT CASE floor(random() * 9)::int
    WHEN 0 THEN 'null' WHEN 1 THEN to_jsonb(random() < 0.5) WHEN 2 THEN to_jsonb(floor(random() * 10)::int)
    WHEN 3 THEN to_jsonb(round((random() * 10)::numeric, 1)) WHEN 4 THEN to_jsonb(pg_temp.rand_text())
    WHEN 5 THEN CASE WHEN depth > 0 THEN jsonb_build_array(pg_temp.rand_json(depth - 1)) ELSE '[]' END
    WHEN 6 THEN CASE WHEN depth > 0 THEN jsonb_build_object('x', pg_temp.rand_json(depth - 1)) ELSE '{}' END
    WHEN 7 THEN '"1e5"' ELSE to_jsonb(floor(random() * 10)::text) END
$$;

CREATE TEMP TABLE outcomes (kind text, sqlstate text, message text);
CREATE FUNCTION pg_temp.try(kind text, sql text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE sql;
  INSERT INTO outcomes VALUES (kind, NULL, NULL);
EXCEPTION WHEN OTHERS THEN
  INSERT INTO outcomes VALUES (kind, SQLSTATE, SQLERRM);
END $$;

-- a few services, fields and groups, then random rules
INSERT INTO metering.hashmap_services (name) VALUES ('s1'), ('s2');
INSERT INTO metering.hashmap_fields (service_id, name)
SELECT s.id, f FROM metering.hashmap_services s, unnest(ARRAY['f1', 'f2', 'f3']) f;
INSERT INTO metering.hashmap_groups (name) VALUES ('g1'), ('g2');
CREATE TEMP TABLE parents AS
SELECT id AS service_id, NULL::uuid AS field_id FROM metering.hashmap_services
UNION ALL SELECT NULL, id FROM metering.hashmap_fields
UNION ALL (SELECT id, (SELECT id FROM metering.hashmap_fields LIMIT 1) FROM metering.hashmap_services LIMIT 1)
UNION ALL SELECT NULL, NULL
UNION ALL SELECT '01a2138f-fb08-7164-94b7-f9375b039482', NULL;
SET LOCAL metering.allow_backdated_rules = on;
DO $$
DECLARE
  par record;
BEGIN
  FOR i IN 1 .. 1500 LOOP
    SELECT * INTO par FROM parents ORDER BY random() LIMIT 1;
    IF random() < 0.6 THEN
      PERFORM pg_temp.try('mapping', format(
        'INSERT INTO metering.hashmap_mappings (service_id, field_id, group_id, value, cost, map_type, tenant_id, start, "end") '
        'VALUES (%L, %L, %L, %L, %L, %L, %L, coalesce(%L, metering.now()), %L)',
        par.service_id, par.field_id,
        (SELECT id FROM metering.hashmap_groups ORDER BY random() LIMIT 1 OFFSET floor(random() * 2)::int),
        CASE WHEN par.field_id IS NOT NULL OR random() < 0.1 THEN pg_temp.rand_text() END,
        pg_temp.rand_num(), (ARRAY['flat', 'rate', 'rate', 'percent', NULL])[1 + floor(random() * 5)::int],
        (ARRAY[NULL, NULL, 't1', 't2', ''])[1 + floor(random() * 5)::int],
        pg_temp.rand_time(), CASE WHEN random() < 0.3 THEN pg_temp.rand_time() END));
    ELSE
      PERFORM pg_temp.try('threshold', format(
        'INSERT INTO metering.hashmap_thresholds (service_id, field_id, group_id, level, cost, map_type, tenant_id, start, "end") '
        'VALUES (%L, %L, %L, %L, %L, %L, %L, coalesce(%L, metering.now()), %L)',
        par.service_id, par.field_id,
        (SELECT id FROM metering.hashmap_groups ORDER BY random() LIMIT 1 OFFSET floor(random() * 2)::int),
        pg_temp.rand_num(), pg_temp.rand_num(), (ARRAY['flat', 'rate', 'rate', NULL])[1 + floor(random() * 4)::int],
        (ARRAY[NULL, NULL, 't1', 't2'])[1 + floor(random() * 4)::int],
        pg_temp.rand_time(), CASE WHEN random() < 0.3 THEN pg_temp.rand_time() END));
    END IF;
  END LOOP;
END $$;
RESET metering.allow_backdated_rules;
SELECT ok((SELECT array_agg(DISTINCT kind || ':' || coalesce(sqlstate, 'ok')) FROM outcomes)
          <@ ARRAY['mapping:22023', 'mapping:23503', 'mapping:23505', 'mapping:ok',
                   'threshold:22023', 'threshold:23503', 'threshold:23505', 'threshold:ok'],
          'random rules are stored or rejected as invalid (22023), unknown (23503) or duplicate (23505)');
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE sqlstate IS NULL), '>', 100::bigint, 'many random rules were valid');

-- random points through every function
CREATE TEMP TABLE points AS
SELECT n, (ARRAY['s1', 's2', 'nope', NULL])[1 + floor(random() * 4)::int] AS service,
       CASE WHEN random() < 0.05 THEN NULL ELSE round((random() * 30 - 3)::numeric, floor(random() * 3)::int) END AS qty,
       CASE WHEN random() < 0.1 THEN pg_temp.rand_json(1)
            ELSE jsonb_build_object('f1', pg_temp.rand_json(1), 'f2', pg_temp.rand_json(0), 'f3', pg_temp.rand_json(0)) END AS md,
       (ARRAY[NULL, 't1', 't2', 't3'])[1 + floor(random() * 4)::int] AS tenant,
       '2024-06-01'::timestamptz + (random() * 60 - 5) * interval '1 day' AS at
  FROM generate_series(1, 3000) n;
SELECT pg_temp.try('rate', format('SELECT metering.rate(%L, %L, %L, %L, %L)', service, qty, md, tenant, at)) FROM points;
SELECT pg_temp.try('explain', format('SELECT * FROM metering.rate_explain(%L, %L, %L, %L, %L)', service, qty, md, tenant, at))
  FROM points WHERE n <= 1000;
SELECT ok((SELECT array_agg(DISTINCT kind || ':' || coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind IN ('rate', 'explain'))
          <@ ARRAY['rate:22023', 'rate:ok', 'explain:22023', 'explain:ok'],
          'rate and rate_explain answer, or say a threshold field''s value is not a number (22023)');
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE kind = 'rate' AND sqlstate IS NULL), '>', 1000::bigint, 'most points were priced');
SELECT is((SELECT count(*) FROM outcomes WHERE kind = 'rate' AND sqlstate = '22023' AND message NOT LIKE 'rating service "%": field "%" has thresholds, and its value % is not a number'),
          0::bigint, 'every rating error names the service, the field and the value');

-- on the points that price, the three functions agree
CREATE FUNCTION pg_temp.safe_rate(s text, q numeric, m jsonb, t text, a timestamptz) RETURNS numeric LANGUAGE plpgsql AS $$
BEGIN
  RETURN metering.rate(s, q, m, t, a);
EXCEPTION WHEN invalid_parameter_value THEN
  RETURN NULL;
END $$;
CREATE TEMP TABLE ok_points AS SELECT * FROM points WHERE pg_temp.safe_rate(service, qty, md, tenant, at) IS NOT NULL;
SELECT is((SELECT metering.rated_total(service, qty, md, tenant, at) FROM ok_points),
          (SELECT sum(metering.rate(service, qty, md, tenant, at)) FROM ok_points),
          'rated_total is the sum of rate');
SELECT is((SELECT count(*) FROM ok_points p
            WHERE metering.rate(service, qty, md, tenant, at)
                  <> coalesce((SELECT sum(price) FROM metering.rate_explain(service, qty, md, tenant, at)), 0)),
          0::bigint, 'rate is the sum of rate_explain''s group prices');
SELECT is((SELECT count(*) FROM outcomes WHERE sqlstate LIKE 'XX%' OR sqlstate LIKE '42%'), 0::bigint, 'no internal error anywhere');
ROLLBACK;
