-- HashMap rules: services, fields, groups, mappings and thresholds, their
-- validation, uniqueness, validity periods, audit columns and soft deletes.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SET metering.now = '2024-06-01 00:00:00+00';
SELECT * FROM metering.hashmap_types();

-- services, fields and groups
INSERT INTO metering.hashmap_services (name) VALUES ('compute'), ('volume.size');
INSERT INTO metering.hashmap_fields (service_id, name)
SELECT id, f FROM metering.hashmap_services, unnest(ARRAY['flavor', 'image']) f WHERE name = 'compute';
INSERT INTO metering.hashmap_groups (name) VALUES ('instance'), ('premium');
SELECT name, created_at, created_by = current_user AS by_me, deleted_at FROM metering.hashmap_services ORDER BY name;
CREATE FUNCTION pg_temp.sid(n text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM metering.hashmap_services WHERE name = n AND deleted_at IS NULL $$;
CREATE FUNCTION pg_temp.fid(n text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM metering.hashmap_fields WHERE name = n AND deleted_at IS NULL $$;
CREATE FUNCTION pg_temp.gid(n text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM metering.hashmap_groups WHERE name = n AND deleted_at IS NULL $$;
SELECT regress.err($$INSERT INTO metering.hashmap_services (name) VALUES ('compute')$$);
SELECT regress.err($$INSERT INTO metering.hashmap_services (name) VALUES ('')$$);
SELECT regress.err($$INSERT INTO metering.hashmap_fields (service_id, name) VALUES (pg_temp.sid('compute'), 'flavor')$$);
SELECT regress.err($$INSERT INTO metering.hashmap_fields (service_id, name) VALUES ('01a2138f-fb08-7164-94b7-f9375b039482', 'x')$$);
SELECT regress.err($$INSERT INTO metering.hashmap_groups (name) VALUES ('premium')$$);
SELECT regress.err($$UPDATE metering.hashmap_services SET name = 'cpu' WHERE name = 'compute'$$);
SELECT regress.err($$UPDATE metering.hashmap_groups SET name = 'x' WHERE name = 'premium'$$);

-- mappings: exactly one parent; a value on field mappings only
SELECT regress.err(format('INSERT INTO metering.hashmap_mappings (%s) VALUES (%s)', c, v)) FROM (VALUES
  ('cost', '1'),
  ('service_id, field_id, value, cost', format('%L, %L, ''a'', 1', pg_temp.sid('compute'), pg_temp.fid('flavor'))),
  ('service_id, value, cost', format('%L, ''a'', 1', pg_temp.sid('compute'))),
  ('field_id, cost', format('%L, 1', pg_temp.fid('flavor'))),
  ('service_id, cost, map_type', format('%L, 1, ''percent''', pg_temp.sid('compute'))),
  ('service_id, cost', format('%L, ''NaN''', pg_temp.sid('compute'))),
  ('service_id, cost', format('%L, NULL', pg_temp.sid('compute'))),
  ('service_id, cost', '''01a2138f-fb08-7164-94b7-f9375b039482'', 1'),
  ('service_id, cost, group_id', format('%L, 1, ''01a2138f-fb08-7164-94b7-f9375b039482''', pg_temp.sid('compute'))),
  ('service_id, cost, tenant_id', format('%L, 1, ''''', pg_temp.sid('compute'))),
  ('service_id, cost, start', format('%L, 1, ''2024-05-31''', pg_temp.sid('compute'))),
  ('service_id, cost, "end"', format('%L, 1, ''2024-06-01''', pg_temp.sid('compute'))),
  ('service_id, cost, start, "end"', format('%L, 1, ''2024-07-01'', ''2024-06-15''', pg_temp.sid('compute')))
) x(c, v);

-- the first rules; start defaults to now, the audit columns fill themselves
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type, name)
VALUES (pg_temp.sid('compute'), pg_temp.gid('instance'), 0.5, 'flat', 'base');
INSERT INTO metering.hashmap_mappings (field_id, value, group_id, cost, map_type)
VALUES (pg_temp.fid('flavor'), 'm1.small', pg_temp.gid('instance'), 1.2, 'rate'),
       (pg_temp.fid('flavor'), 'm1.large', pg_temp.gid('instance'), 2.0, 'rate');
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type)
VALUES (pg_temp.sid('compute'), pg_temp.gid('instance'), 100, 0.9, 'rate');
SELECT coalesce(value, '(service)') AS value, cost, map_type, tenant_id, start, "end", created_at,
       created_by = current_user AS by_me, updated_at, deleted_at
  FROM metering.hashmap_mappings ORDER BY value NULLS FIRST;

-- one rule per key, tenant and instant (23505), also for a tenant
SELECT regress.err(format('INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type) VALUES (%L, %L, 0.7, %L)',
                          pg_temp.sid('compute'), pg_temp.gid('instance'), 'flat'));
SELECT regress.err(format('INSERT INTO metering.hashmap_mappings (field_id, value, group_id, cost) VALUES (%L, %L, %L, 3)',
                          pg_temp.fid('flavor'), 'm1.small', pg_temp.gid('instance')));
SELECT regress.err(format('INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost) VALUES (%L, %L, 100, 0.5)',
                          pg_temp.sid('compute'), pg_temp.gid('instance')));
-- other groups, values, levels and tenants are other keys
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type, "end")
VALUES (pg_temp.sid('compute'), pg_temp.gid('premium'), 0.1, 'flat', '2024-08-01');
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type, tenant_id)
VALUES (pg_temp.sid('compute'), pg_temp.gid('instance'), 0.4, 'flat', 'acme');
SELECT regress.err(format('INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type, tenant_id) VALUES (%L, %L, 0.3, %L, %L)',
                          pg_temp.sid('compute'), pg_temp.gid('instance'), 'flat', 'acme'));
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type)
VALUES (pg_temp.sid('compute'), pg_temp.gid('instance'), 1000, 0.8, 'rate');
-- a rule that starts after another ends is another period of the same key
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type, start)
VALUES (pg_temp.sid('compute'), pg_temp.gid('premium'), 0.2, 'flat', '2024-09-01');
SELECT regress.err(format('INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type, start) VALUES (%L, %L, 0.2, %L, %L)',
                          pg_temp.sid('compute'), pg_temp.gid('premium'), 'flat', '2024-10-01'));
-- negative costs and levels are accepted, as in the reference
INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type) VALUES (pg_temp.fid('image'), 'promo', -0.05, 'flat');
INSERT INTO metering.hashmap_thresholds (field_id, level, cost, map_type) VALUES (pg_temp.fid('image'), -3, 1, 'flat');

-- before its start a rule may change freely...
UPDATE metering.hashmap_mappings SET cost = 0.25, start = '2024-08-01' WHERE start = '2024-09-01';
SELECT cost, start, updated_at, updated_by = current_user AS by_me FROM metering.hashmap_mappings WHERE start = '2024-08-01';
-- ...but not into an overlap, nor into the past
SELECT regress.err($$UPDATE metering.hashmap_mappings SET start = '2024-07-15' WHERE cost = 0.25$$);
SELECT regress.err($$UPDATE metering.hashmap_mappings SET start = '2024-05-01' WHERE cost = 0.25$$);
-- once started only its end may change, to a future instant
SET metering.now = '2024-06-10 00:00:00+00';
SELECT c AS column, regress.err(format('UPDATE metering.hashmap_mappings SET %I = %s WHERE name = %L', c, v, 'base'))
  FROM (VALUES ('cost', '9'), ('map_type', '''rate'''), ('group_id', 'NULL'), ('tenant_id', '''x'''), ('start', 'now()'),
               ('service_id', 'NULL'), ('value', '''x'''), ('name', '''x'''), ('created_at', 'now()'), ('created_by', '''x'''),
               ('id', 'metering.uuid_v7()'), ('deleted_by', '''x'''), ('end', '''2024-06-09''')) v(c, v);
UPDATE metering.hashmap_mappings SET "end" = '2024-12-31' WHERE name = 'base';
SELECT name, "end", updated_at FROM metering.hashmap_mappings WHERE name = 'base';
-- backdating is a deliberate act: the session setting (CloudKitty's force)
SHOW metering.allow_backdated_rules;
SET metering.allow_backdated_rules = on;
INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type, start, "end")
VALUES (pg_temp.fid('image'), 'legacy', 0.01, 'flat', '2024-01-01', '2024-02-01');
RESET metering.allow_backdated_rules;

-- DELETE is a soft delete, stamped with the time and the user; deleted rules are immutable
DELETE FROM metering.hashmap_mappings WHERE value = 'm1.large';
SELECT value, deleted_at, deleted_by = current_user AS by_me FROM metering.hashmap_mappings WHERE value = 'm1.large';
SELECT regress.err($$UPDATE metering.hashmap_mappings SET "end" = '2025-01-01' WHERE value = 'm1.large'$$);
-- the key is free again from the deletion on
INSERT INTO metering.hashmap_mappings (field_id, value, group_id, cost) VALUES (pg_temp.fid('flavor'), 'm1.large', pg_temp.gid('instance'), 2.5);

-- deleting a group: without recursive its rules go on in the default group:
-- a running one ends now and a copy starts now (the past keeps its group),
-- one not started yet moves...
SELECT metering.delete_hashmap_group(pg_temp.gid('premium'));
SELECT g.name AS group_name, g.deleted_at, m.cost, m.start, m."end", m.group_id IS NULL AS in_default,
       m.deleted_at IS NOT NULL AS deleted
  FROM metering.hashmap_mappings m JOIN metering.hashmap_groups g ON g.name = 'premium'
 WHERE m.cost IN (0.1, 0.25) ORDER BY m.cost, m.start;
SELECT regress.err(format('SELECT metering.delete_hashmap_group(%L)', (SELECT id FROM metering.hashmap_groups WHERE name = 'premium')));
SELECT regress.err($$SELECT metering.delete_hashmap_group('01a2138f-fb08-7164-94b7-f9375b039482')$$);
-- ...with it they are deleted; a plain DELETE is the non-recursive kind
INSERT INTO metering.hashmap_groups (name) VALUES ('temp'), ('temp2');
INSERT INTO metering.hashmap_mappings (field_id, value, group_id, cost, map_type) VALUES (pg_temp.fid('image'), 'win', pg_temp.gid('temp'), 0.2, 'flat');
INSERT INTO metering.hashmap_mappings (field_id, value, group_id, cost, map_type) VALUES (pg_temp.fid('image'), 'bsd', pg_temp.gid('temp2'), 0.3, 'flat');
SELECT metering.delete_hashmap_group(pg_temp.gid('temp'), recursive => true);
DELETE FROM metering.hashmap_groups WHERE name = 'temp2';
SELECT value, group_id IS NULL AS in_default, deleted_at IS NOT NULL AS deleted FROM metering.hashmap_mappings WHERE value IN ('win', 'bsd') ORDER BY value;
-- moving rules into the default group must not make two rules of one key
INSERT INTO metering.hashmap_groups (name) VALUES ('clash');
INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type) VALUES (pg_temp.fid('image'), 'linux', 0.1, 'flat');
INSERT INTO metering.hashmap_mappings (field_id, value, group_id, cost, map_type) VALUES (pg_temp.fid('image'), 'linux', pg_temp.gid('clash'), 0.2, 'flat');
SELECT regress.err(format('SELECT metering.delete_hashmap_group(%L)', pg_temp.gid('clash')));
SELECT count(*) AS clash_still_there FROM metering.hashmap_groups WHERE name = 'clash' AND deleted_at IS NULL;

-- deleting a service deletes its fields and their rules, and its own
DELETE FROM metering.hashmap_services WHERE name = 'compute';
SELECT (SELECT count(*) FROM metering.hashmap_fields WHERE deleted_at IS NULL) AS live_fields,
       (SELECT count(*) FROM metering.hashmap_mappings WHERE deleted_at IS NULL) AS live_mappings,
       (SELECT count(*) FROM metering.hashmap_thresholds WHERE deleted_at IS NULL) AS live_thresholds,
       (SELECT count(*) FROM metering.hashmap_mappings) AS kept_mappings;
SELECT regexp_replace(regress.err($$INSERT INTO metering.hashmap_fields (service_id, name) SELECT id, 'x' FROM metering.hashmap_services WHERE name = 'compute'$$),
                      '[0-9a-f-]{36}', '<id>') AS err;
-- the name can be used again
INSERT INTO metering.hashmap_services (name) VALUES ('compute');
SELECT count(*) AS services_named_compute FROM metering.hashmap_services WHERE name = 'compute';

-- an ended rule stays ended: reopening it would price the gap since its end
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type, name, "end")
VALUES (pg_temp.sid('compute'), 1, 'flat', 'short', '2024-06-11');
SET metering.now = '2024-06-12 00:00:00+00';
SELECT regress.err($$UPDATE metering.hashmap_mappings SET "end" = NULL WHERE name = 'short'$$);
SELECT regress.err($$UPDATE metering.hashmap_mappings SET "end" = '2024-07-01' WHERE name = 'short'$$);
-- a rule deleted before its start never applied: it does not clash
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type, name, start)
VALUES (pg_temp.sid('compute'), 2, 'flat', 'never', '2024-07-01');
DELETE FROM metering.hashmap_mappings WHERE name = 'never';
SET metering.allow_backdated_rules = on;
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type, name, start, "end")
VALUES (pg_temp.sid('compute'), 3, 'flat', 'instead', '2024-06-11 12:00', '2024-07-02');
RESET metering.allow_backdated_rules;
SELECT name, cost, start, "end", deleted_at IS NOT NULL AS deleted FROM metering.hashmap_mappings
 WHERE name IN ('never', 'instead') ORDER BY name;
-- a plain UPDATE that deletes a group hands its rules over as delete_hashmap_group does
INSERT INTO metering.hashmap_groups (name) VALUES ('plain');
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type, name)
VALUES (pg_temp.sid('compute'), pg_temp.gid('plain'), 5, 0.5, 'rate', 'plain-rule');
SET metering.now = '2024-06-13 00:00:00+00';
UPDATE metering.hashmap_groups SET deleted_at = now() WHERE name = 'plain';
SELECT t.level, t.start, t."end", t.group_id IS NULL AS in_default FROM metering.hashmap_thresholds t
 WHERE name = 'plain-rule' ORDER BY t.start;
-- a rule of a deleted group, a field or service that is gone: 23503, also for restored rows
SELECT regexp_replace(regress.err(format(
  'INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, created_at) VALUES (%L, %L, 1, 1, %L)',
  pg_temp.sid('compute'), (SELECT id FROM metering.hashmap_groups WHERE name = 'plain'), '2024-01-01')), '[0-9a-f-]{36}', '<id>') AS err;
SELECT regexp_replace(regress.err(format(
  'INSERT INTO metering.hashmap_mappings (field_id, value, cost, created_at) VALUES (%L, %L, 1, %L)',
  (SELECT id FROM metering.hashmap_fields WHERE name = 'flavor' LIMIT 1), 'x', '2024-01-01')), '[0-9a-f-]{36}', '<id>') AS err;
