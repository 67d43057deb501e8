-- Rating points with the HashMap rules: the CloudKitty examples, then each
-- rule of the engine on its own.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 00:00:00+00';
CREATE FUNCTION pg_temp.sid(n text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM metering.hashmap_services WHERE name = n AND deleted_at IS NULL $$;
CREATE FUNCTION pg_temp.fid(s text, n text) RETURNS uuid LANGUAGE sql AS $$
  SELECT f.id FROM metering.hashmap_fields f JOIN metering.hashmap_services v ON v.id = f.service_id
   WHERE v.name = s AND f.name = n AND f.deleted_at IS NULL $$;
CREATE FUNCTION pg_temp.gid(n text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM metering.hashmap_groups WHERE name = n AND deleted_at IS NULL $$;

-- The examples: service volume.size; a service flat mapping 0.001 in group g;
-- service thresholds in g at 50 (rate 0.98) and 200 (rate 0.95); for tenant T
-- only, 50 at rate 0.97
INSERT INTO metering.hashmap_services (name) VALUES ('volume.size');
INSERT INTO metering.hashmap_groups (name) VALUES ('g');
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type) VALUES (pg_temp.sid('volume.size'), pg_temp.gid('g'), 0.001, 'flat');
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type, tenant_id) VALUES
  (pg_temp.sid('volume.size'), pg_temp.gid('g'), 50, 0.98, 'rate', NULL),
  (pg_temp.sid('volume.size'), pg_temp.gid('g'), 200, 0.95, 'rate', NULL),
  (pg_temp.sid('volume.size'), pg_temp.gid('g'), 50, 0.97, 'rate', 'T');
SELECT qty, metering.rate('volume.size', qty) AS other_tenant, metering.rate('volume.size', qty, tenant => 'U') AS tenant_u,
       metering.rate('volume.size', qty, tenant => 'T') AS tenant_t
  FROM unnest(ARRAY[20, 50, 80, 250]::numeric[]) qty;
SELECT * FROM metering.rate_explain('volume.size', 80, tenant => 'T');
-- a field with flat mappings in the default group adds its own price
INSERT INTO metering.hashmap_fields (service_id, name) VALUES (pg_temp.sid('volume.size'), 'volume_type');
INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type)
SELECT pg_temp.fid('volume.size', 'volume_type'), v, c, 'flat' FROM (VALUES ('SSD_gold', 0.03), ('SSD_silver', 0.02), ('HDD_bronze', 0.01)) x(v, c);
SELECT metering.rate('volume.size', 10, '{"volume_type": "SSD_gold"}') AS price,
       metering.rate('volume.size', 10) AS without_the_field;
SELECT * FROM metering.rate_explain('volume.size', 10, '{"volume_type": "SSD_gold"}');

-- flat is the largest matching flat cost (never below 0); rates multiply;
-- a rate alone prices to 0 because flat starts at 0
INSERT INTO metering.hashmap_services (name) VALUES ('compute');
INSERT INTO metering.hashmap_fields (service_id, name)
SELECT pg_temp.sid('compute'), f FROM unnest(ARRAY['flavor', 'cores', 'region', 'os', 'ssd']) f;
INSERT INTO metering.hashmap_groups (name) VALUES ('rates-only'), ('neg');
INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type, group_id) VALUES
  (pg_temp.fid('compute', 'flavor'), 'small', 2, 'flat', NULL),
  (pg_temp.fid('compute', 'region'), 'eu', 3, 'flat', NULL),
  (pg_temp.fid('compute', 'os'), 'windows', 1.5, 'rate', NULL),
  (pg_temp.fid('compute', 'region'), 'us', 1.1, 'rate', NULL),
  (pg_temp.fid('compute', 'flavor'), 'large', 1.25, 'rate', pg_temp.gid('rates-only')),
  (pg_temp.fid('compute', 'flavor'), 'tiny', -4, 'flat', pg_temp.gid('neg'));
SELECT md, metering.rate('compute', 10, md::jsonb) AS price FROM unnest(ARRAY[
  '{"flavor": "small"}',                                -- 2 * 10
  '{"flavor": "small", "region": "eu"}',                -- max(2, 3) * 10
  '{"flavor": "small", "os": "windows"}',               -- 2 * 1.5 * 10
  '{"flavor": "small", "os": "windows", "region": "us"}', -- 2 * 1.5 * 1.1 * 10
  '{"flavor": "large"}',                                -- rates-only group: 1.25 * 0 * 10
  '{"flavor": "tiny"}',                                 -- a negative flat never wins over 0
  '{"os": "linux"}',                                    -- nothing matches
  '{}']) md;

-- metadata values match as text: strings as they are, numbers, true, false
-- and null in their JSON spelling
INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type) VALUES
  (pg_temp.fid('compute', 'cores'), '8', 100, 'flat'),
  (pg_temp.fid('compute', 'cores'), '4', 40, 'flat'),
  (pg_temp.fid('compute', 'ssd'), 'true', 7, 'flat'),
  (pg_temp.fid('compute', 'ssd'), 'null', 9, 'flat');
SELECT md, metering.rate('compute', 1, md::jsonb) AS price FROM unnest(ARRAY[
  '{"cores": 8}', '{"cores": "8"}', '{"cores": 8.0}', '{"cores": "04"}', '{"cores": 4}', '{"cores": 4e0}',
  '{"ssd": true}', '{"ssd": "true"}', '{"ssd": false}', '{"ssd": null}', '{"ssd": [true]}', '{"ssd": {"a": 1}}']) md;

-- thresholds: per group only the highest level reached applies
INSERT INTO metering.hashmap_services (name) VALUES ('storage');
INSERT INTO metering.hashmap_fields (service_id, name) SELECT pg_temp.sid('storage'), f FROM unnest(ARRAY['iops', 'replicas', 'tier']) f;
INSERT INTO metering.hashmap_groups (name) VALUES ('s');
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type) VALUES (pg_temp.sid('storage'), pg_temp.gid('s'), 2, 'flat');
-- a field threshold applies before pricing: flat adds to flat, rate multiplies rate
INSERT INTO metering.hashmap_thresholds (field_id, group_id, level, cost, map_type) VALUES
  (pg_temp.fid('storage', 'iops'), pg_temp.gid('s'), 1000, 1, 'flat'),
  (pg_temp.fid('storage', 'iops'), pg_temp.gid('s'), 5000, 3, 'flat'),
  (pg_temp.fid('storage', 'replicas'), pg_temp.gid('s'), 3, 1.5, 'rate');
SELECT md, metering.rate('storage', 10, md::jsonb) AS price FROM unnest(ARRAY[
  '{"iops": 999}',                    -- below: 2 * 10
  '{"iops": 1000}',                   -- (2 + 1) * 10
  '{"iops": "7000"}',                 -- a numeric string counts: (2 + 3) * 10
  '{"replicas": 3}',                  -- 2 * 1.5 * 10
  '{"iops": 5000, "replicas": 3}']) md; -- one threshold per group: the highest level (5000)
-- a non-numeric value of a field with thresholds is an error naming service, field and value
SELECT regress.err($$SELECT metering.rate('storage', 10, '{"iops": "fast"}')$$);
SELECT regress.err($$SELECT metering.rate('storage', 10, '{"replicas": true}')$$);
SELECT regress.err($$SELECT metering.rate('storage', 10, '{"iops": [1]}')$$);
-- numeric strings as for meters: no surrounding whitespace
SELECT regress.err($$SELECT metering.rate('storage', 10, '{"iops": " 7000"}')$$);
-- a number too large for numeric is not a number either; long values are clipped on a character boundary
SELECT regress.err($$SELECT metering.rate('storage', 10, '{"iops": "1e1001"}')$$);
SELECT length(regress.err(format('SELECT metering.rate(%L, 10, %L)', 'storage',
                                 jsonb_build_object('iops', repeat('aé', 100))))) AS clipped_error_length;
-- a service threshold compares qty and applies after pricing: flat adds once, rate multiplies the price
INSERT INTO metering.hashmap_groups (name) VALUES ('t');
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type) VALUES (pg_temp.sid('storage'), pg_temp.gid('t'), 1, 'flat');
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type) VALUES
  (pg_temp.sid('storage'), pg_temp.gid('t'), 100, 50, 'flat'),
  (pg_temp.sid('storage'), pg_temp.gid('t'), 1000, 0.5, 'rate');
SELECT qty, metering.rate('storage', qty) - 2 * qty AS group_t FROM unnest(ARRAY[99, 100, 999, 1000]::numeric[]) qty;
-- equal levels: the service threshold first, then fields in name order
INSERT INTO metering.hashmap_groups (name) VALUES ('ties');
INSERT INTO metering.hashmap_thresholds (service_id, field_id, group_id, level, cost, map_type) VALUES
  (pg_temp.sid('storage'), NULL, pg_temp.gid('ties'), 10, 100, 'flat'),
  (NULL, pg_temp.fid('storage', 'tier'), pg_temp.gid('ties'), 10, 200, 'flat'),
  (NULL, pg_temp.fid('storage', 'replicas'), pg_temp.gid('ties'), 10, 300, 'flat');
SELECT group_name, threshold_level, threshold_cost, threshold_scope, price
  FROM metering.rate_explain('storage', 10, '{"tier": 10, "replicas": 10}') WHERE group_name = 'ties';
SELECT group_name, threshold_level, threshold_cost, threshold_scope
  FROM metering.rate_explain('storage', 1, '{"tier": 10, "replicas": 10}') WHERE group_name = 'ties';
-- levels of -1 and below never apply
INSERT INTO metering.hashmap_groups (name) VALUES ('low');
INSERT INTO metering.hashmap_thresholds (field_id, group_id, level, cost, map_type) VALUES
  (pg_temp.fid('storage', 'tier'), pg_temp.gid('low'), -1, 5, 'flat'),
  (pg_temp.fid('storage', 'tier'), pg_temp.gid('low'), -0.5, 7, 'flat');
SELECT md, (SELECT threshold_level FROM metering.rate_explain('storage', 1, md::jsonb) WHERE group_name = 'low') AS level
  FROM unnest(ARRAY['{"tier": -1}', '{"tier": -0.5}', '{"tier": 0}']) md;

-- an unknown service, or one without rules, leaves the incoming price alone
INSERT INTO metering.hashmap_services (name) VALUES ('empty');
SELECT metering.rate('nope', 5) AS unknown, metering.rate('empty', 5, price => 1.5) AS no_rules,
       metering.rate('volume.size', 10, price => 1.5) AS plus_incoming;
SELECT metering.rate(NULL, 5) AS no_service, metering.rate('volume.size', NULL) AS no_qty;
SELECT regress.err($$SELECT metering.rate('volume.size', 'NaN')$$);
SELECT regress.err($$SELECT metering.rate('volume.size', 1, price => 'Infinity')$$);
SELECT * FROM metering.rate_explain('nope', 5);

-- tenants: a tenant's rule replaces the global rule of the same key for that
-- tenant only; a tenant rule without a global twin adds to the global rules
INSERT INTO metering.hashmap_services (name) VALUES ('gpu');
INSERT INTO metering.hashmap_fields (service_id, name) VALUES (pg_temp.sid('gpu'), 'model');
INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type, tenant_id) VALUES
  (pg_temp.fid('gpu', 'model'), 'a100', 10, 'flat', NULL),
  (pg_temp.fid('gpu', 'model'), 'a100', 8, 'flat', 'big-customer'),
  (pg_temp.fid('gpu', 'model'), 'a100', 0.9, 'rate', 'loyal');
SELECT t AS tenant, metering.rate('gpu', 1, '{"model": "a100"}', t) AS price
  FROM unnest(ARRAY[NULL, 'big-customer', 'loyal', 'someone']) t;

-- validity: a rule applies on [start, end) and before its deletion; re-rating
-- the past uses the rules of then, tenant overrides included
SET metering.allow_backdated_rules = on;
INSERT INTO metering.hashmap_services (name) VALUES ('api');
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type, start, "end") VALUES
  (pg_temp.sid('api'), 0.01, 'flat', '2024-01-01', '2024-04-01'),
  (pg_temp.sid('api'), 0.02, 'flat', '2024-04-01', NULL);
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type, tenant_id, start, "end") VALUES
  (pg_temp.sid('api'), 0.005, 'flat', 'early', '2024-01-01', '2024-02-01');
RESET metering.allow_backdated_rules;
SELECT at, metering.rate('api', 100, at => at) AS price, metering.rate('api', 100, tenant => 'early', at => at) AS early
  FROM unnest(ARRAY['2023-12-31 23:59', '2024-01-15', '2024-03-31 23:59:59', '2024-04-01', '2024-06-01']::timestamptz[]) at;
SET metering.now = '2024-06-15 00:00:00+00';
DELETE FROM metering.hashmap_mappings WHERE service_id = pg_temp.sid('api') AND cost = 0.02;
SELECT at, metering.rate('api', 100, at => at) AS price
  FROM unnest(ARRAY['2024-06-14 23:59', '2024-06-15']::timestamptz[]) at;
-- in the same transaction the change is seen at once, and a rollback undoes it
BEGIN;
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type) VALUES (pg_temp.sid('api'), 0.03, 'flat');
SELECT metering.rate('api', 100) AS inside;
ROLLBACK;
SELECT metering.rate('api', 100) AS after_rollback;

-- exact: no rounding, however many digits
INSERT INTO metering.hashmap_services (name) VALUES ('exact');
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type) VALUES (pg_temp.sid('exact'), 0.333333333333333333333333333333333, 'flat');
INSERT INTO metering.hashmap_groups (name) VALUES ('e2');
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type) VALUES (pg_temp.sid('exact'), pg_temp.gid('e2'), 0.1, 'flat');
SELECT metering.rate('exact', 3.000000000000000000000000000000001) AS price;
SELECT metering.rate('exact', 1) - 0.433333333333333333333333333333333 AS exactly_zero;

-- the aggregate: a month of points priced in one query, each at its instant,
-- the same with parallel workers
CREATE TABLE regress_points AS
SELECT 'tenant-' || (n % 3) AS tenant, '2024-06-01'::timestamptz + n * interval '37 minutes' AS at,
       (n % 97)::numeric AS qty,
       jsonb_build_object('volume_type', (ARRAY['SSD_gold', 'SSD_silver', 'HDD_bronze', 'tape'])[1 + n % 4]) AS md
  FROM generate_series(1, 20000) n;
SELECT tenant, metering.rated_total('volume.size', qty, md, tenant, at) AS total,
       sum(metering.rate('volume.size', qty, md, tenant, at)) AS sum_of_rates
  FROM regress_points GROUP BY tenant ORDER BY tenant;
SELECT metering.rated_total('volume.size', qty, md, tenant) = sum(metering.rate('volume.size', qty, md, tenant)) AS at_now
  FROM regress_points;
SET max_parallel_workers_per_gather = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
ANALYZE regress_points;
EXPLAIN (COSTS OFF) SELECT metering.rated_total('volume.size', qty, md, tenant, at) FROM regress_points;
SELECT metering.rated_total('volume.size', qty, md, tenant, at) AS parallel_total FROM regress_points;
RESET max_parallel_workers_per_gather;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
SELECT metering.rated_total('volume.size', qty, md, tenant, at) AS serial_total FROM regress_points;
SELECT metering.rated_total('volume.size', qty, md, tenant, at) AS no_rows FROM regress_points WHERE false;
SELECT metering.rated_total(s, q, NULL, NULL) AS nulls_skipped
  FROM (VALUES ('volume.size', 10::numeric), (NULL, 5), ('volume.size', NULL)) v(s, q);
DROP TABLE regress_points;
