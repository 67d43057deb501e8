-- Who may see what: the three roles, subjects assigned to roles, row
-- security through every table, view and function.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
TRUNCATE metering.subject_access;
SET metering.now = '2024-06-01 00:00:00+00';

-- data for four subjects: an organization with an account group, another
-- organization, and a subject nobody registered
INSERT INTO metering.subjects (key, name) VALUES ('org-eu', 'Org EU'), ('org-us', 'Org US');
INSERT INTO metering.subjects (key, name, parent_key) VALUES ('org-eu-dev', 'Org EU dev', 'org-eu');
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('calls', 'api', 'SUM', '$.n');
SELECT count(*) AS ingested FROM (
  SELECT metering.ingest(regress.ev('e' || n, s, 'api', '2024-06-01T10:00:00Z', jsonb_build_object('n', n)))
    FROM (VALUES (1, 'org-eu'), (2, 'org-eu-dev'), (3, 'org-us'), (4, 'stranger')) v(n, s)) x;
SELECT metering.create_feature('calls', 'API calls', 'calls') IS NOT NULL AS feature;
SELECT metering.create_entitlement(s, 'calls', usage_period => '1 month', issue_after_reset => 100) IS NOT NULL AS entitlement
  FROM unnest(ARRAY['org-eu', 'org-us']) s;
SELECT metering.refresh_rollups() > 0 AS refreshed;
INSERT INTO metering.hashmap_services (name) VALUES ('api');
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type) SELECT id, 0.5, 'flat' FROM metering.hashmap_services;

-- the roles
SELECT metering.setup_roles();
SELECT metering.setup_roles();      -- again: nothing breaks
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'metering\_%' ORDER BY 1;
CREATE ROLE regress_alice;          -- a reader of org-eu (and so of org-eu-dev)
CREATE ROLE regress_bob;            -- a writer
CREATE ROLE regress_nobody;         -- no role at all
CREATE ROLE regress_team;           -- a group: its members see what it is assigned
GRANT metering_reader TO regress_alice;
GRANT regress_team TO regress_alice;
GRANT metering_writer TO regress_bob;
GRANT USAGE ON SCHEMA metering, regress TO regress_nobody, regress_alice, regress_bob;
SET metering.now = '2024-06-02 00:00:00+00';
INSERT INTO metering.subject_access (role_name, subject) VALUES ('regress_team', 'org-eu');

SET ROLE regress_alice;
-- every table that names a subject shows only org-eu and its children
SELECT 'events' AS source, string_agg(DISTINCT subject, ',' ORDER BY subject) AS subjects FROM metering.events
UNION ALL SELECT 'meter_rollups', string_agg(DISTINCT subject, ',' ORDER BY subject) FROM metering.meter_rollups
UNION ALL SELECT 'usage_periods', string_agg(DISTINCT subject, ',' ORDER BY subject) FROM metering.usage_periods
UNION ALL SELECT 'entitlements', string_agg(DISTINCT subject, ',' ORDER BY subject) FROM metering.entitlements
UNION ALL SELECT 'grants', string_agg(DISTINCT e.subject, ',' ORDER BY e.subject) FROM metering.grants g JOIN metering.entitlements e ON e.id = g.entitlement_id
UNION ALL SELECT 'grants (count)', count(*)::text FROM metering.grants
UNION ALL SELECT 'entitlement_snapshots (count)', count(*)::text FROM metering.entitlement_snapshots
UNION ALL SELECT 'subjects', string_agg(key, ',' ORDER BY key) FROM metering.subjects
UNION ALL SELECT 'subject_access', string_agg(role_name || ':' || subject, ',') FROM metering.subject_access
-- and every view and function that reads them
UNION ALL SELECT 'query_meter', string_agg(subject, ',' ORDER BY subject) FROM metering.query_meter('calls')
UNION ALL SELECT 'daily_usage', string_agg(subject, ',' ORDER BY subject) FROM metering.daily_usage
UNION ALL SELECT 'unknown_subjects', coalesce(string_agg(subject, ','), '(none)') FROM metering.unknown_subjects
UNION ALL SELECT 'meter_rejected_values', coalesce(string_agg(meter || ':' || events, ','), '(none)') FROM metering.meter_rejected_values
UNION ALL SELECT 'entitlement_status', string_agg(subject, ',' ORDER BY subject) FROM metering.entitlement_status
UNION ALL SELECT 'search_usage', string_agg(DISTINCT x ->> 'tenantId', ',' ORDER BY x ->> 'tenantId')
  FROM jsonb_array_elements(metering.search_usage('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}]}') -> 'results') x
UNION ALL SELECT 'units_usage', string_agg(x ->> 'accountGroup', ',' ORDER BY x ->> 'accountGroup')
  FROM jsonb_array_elements(metering.units_usage('calls', '2024-06-01', '2024-06-02') -> 'breakdowns') x
UNION ALL SELECT 'rated_total', metering.rated_total('api', (data ->> 'n')::numeric, data, subject, time)::text FROM metering.events;
-- which subjects another role may see is not alice's business
SELECT regress.err($$SELECT metering._visible_subjects('regress_bob')$$);
SELECT metering._visible_subjects(current_user) AS alice_sees;
-- another subject's entitlement is not there at all
SELECT * FROM metering.entitlement_value('org-us', 'calls');
SELECT has_access, usage FROM metering.entitlement_value('org-eu', 'calls');
-- a function that takes a subject refuses one you are not assigned to
SELECT regress.err($$SELECT * FROM metering.usage_overview('org-us', 'calls')$$);
SELECT regress.err($$SELECT * FROM metering.usage_overview('stranger', 'calls')$$);
SELECT regress.err($$SELECT metering.search_usage('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-01-01T00:00:00"}, {"name": "tenantId", "operator": "IN", "value": ["org-eu", "org-us"]}]}')$$);
SELECT regress.err($$SELECT metering.units_usage('calls', '2024-06-01', '2024-06-02', 'org-us')$$);
SELECT used FROM metering.usage_overview('org-eu', 'calls');
SELECT used FROM metering.usage_overview('org-eu-dev', 'calls');
-- readers change nothing, and never see the signing secret
SELECT regress.err($$SELECT * FROM metering.signing_keys$$);
SELECT regress.err($$SELECT metering.ingest(regress.ev('x', 'org-eu', 'api', '2024-06-01T10:00:00Z'))$$);
SELECT regress.err($$SELECT metering.create_feature('x', 'X')$$);
SELECT regress.err($$INSERT INTO metering.subject_access VALUES ('regress_alice', 'org-us')$$);
SELECT regress.err($$UPDATE metering.events SET subject = 'x'$$);
-- prices are not secret
SELECT metering.rate('api', 2) AS price;
RESET ROLE;

-- a writer sends usage for any subject, but configures nothing
SET ROLE regress_bob;
SELECT metering.ingest(regress.ev('b1', 'org-us', 'api', '2024-06-01T11:00:00Z', '{"n": 5}')) AS ingested;
SELECT regress.err($$SELECT metering.create_entitlement('x', 'calls', usage_period => '1 month')$$);
SELECT regress.err($$SELECT metering.refresh_rollups()$$);
SELECT count(*) AS events_bob_sees FROM metering.events;   -- bob is assigned nothing
RESET ROLE;

-- PUBLIC may call no function that changes data
SET ROLE regress_nobody;
SELECT f, regress.err(format('SELECT %s', f)) FROM unnest(ARRAY[
  'metering.ingest(''{}'')', 'metering.ingest_batch(''[]'')', 'metering.refresh_rollups()',
  'metering.create_feature(''x'', ''x'')', 'metering.void_grant(NULL)', 'metering.rotate_signing_key()',
  'metering.setup_roles()', 'metering._current_signing_key()']) f;
RESET ROLE;

-- admins see everything
CREATE ROLE regress_carol;
GRANT metering_admin TO regress_carol;
GRANT USAGE ON SCHEMA regress TO regress_carol;
SET ROLE regress_carol;
SELECT count(DISTINCT subject) AS subjects_carol_sees FROM metering.events;
SELECT used FROM metering.usage_overview('org-us', 'calls');
-- an admin cannot pass a new rule off as a restored one (made earlier)
SELECT regress.err($$INSERT INTO metering.hashmap_mappings (service_id, cost, map_type, created_at)
                     SELECT id, 9, 'flat', '2020-01-01' FROM metering.hashmap_services LIMIT 1$$);
RESET ROLE;

REVOKE metering_reader FROM regress_alice;
REVOKE metering_writer FROM regress_bob;
REVOKE metering_admin FROM regress_carol;
REVOKE USAGE ON SCHEMA metering, regress FROM regress_nobody, regress_alice, regress_bob, regress_carol;
DROP ROLE regress_alice, regress_bob, regress_nobody, regress_carol, regress_team;
DELETE FROM metering.subject_access;
