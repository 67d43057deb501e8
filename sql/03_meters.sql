-- Meters: defined by inserting a row; they cover every stored event of
-- their type, earlier events included.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-01-02 00:00:00+00';

-- events first, meters after: the meters still see them
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('1', 'acme', 'llm', '2024-01-01T10:05:00Z', '{"tokens": 10, "model": "small", "user": "ann"}'),
  regress.ev('2', 'acme', 'llm', '2024-01-01T10:20:00Z', '{"tokens": 30, "model": "large", "user": "bob"}'),
  regress.ev('3', 'acme', 'llm', '2024-01-01T10:40:00Z', '{"tokens": "2.5", "model": "small", "user": "ann"}'),
  regress.ev('4', 'acme', 'llm', '2024-01-01T11:10:00Z', '{"model": "small", "user": "cyd"}'),
  regress.ev('5', 'acme', 'llm', '2024-01-01T11:10:00Z', '{"tokens": "lots", "model": "large"}'),
  regress.ev('6', 'acme', 'llm', '2024-01-01T11:50:00Z', '{"tokens": 5, "model": "small", "user": "ann"}'),
  regress.ev('7', 'beta', 'llm', '2024-01-01T10:00:00Z', '{"tokens": 7, "model": 8, "user": "dee"}'),
  regress.ev('8', 'beta', 'other', '2024-01-01T10:00:00Z', '{"tokens": 1000}')));

INSERT INTO metering.meters (slug, description, event_type, aggregation, value_property, group_by) VALUES
  ('tokens', 'tokens used', 'llm', 'SUM', '$.tokens', '{"model": "$.model"}'),
  ('requests', 'requests made', 'llm', 'COUNT', NULL, '{}'),
  ('avg-tokens', NULL, 'llm', 'AVG', '$.tokens', '{}'),
  ('min_tokens', NULL, 'llm', 'MIN', '$.tokens', '{}'),
  ('max_tokens', NULL, 'llm', 'MAX', '$.tokens', '{}'),
  ('users', NULL, 'llm', 'UNIQUE_COUNT', '$.user', '{}'),
  ('last-tokens', NULL, 'llm', 'LATEST', '$.tokens', '{}');
SELECT slug, event_type, aggregation, value_property, group_by, window_size, created_at, deleted_at
  FROM metering.meters ORDER BY slug;

-- one value per subject for the whole range; events without a usable value
-- are ignored (a missing value, or for numbers a non-numeric one), never an error
SELECT m.slug, q.subject, q.value
  FROM metering.meters m, metering.query_meter(m.slug) q
 ORDER BY 1, 2;
SELECT * FROM metering.meter_rejected_values ORDER BY meter;

-- groups: values as text, missing as null; a number matches its JSON spelling
SELECT subject, group_by, value FROM metering.query_meter('tokens', group_by => '{model}') ORDER BY 1, 2;
SELECT subject, group_by, value FROM metering.query_meter('tokens', filter_group_by => '{"model": "8"}');
SELECT subject, group_by, value FROM metering.query_meter('tokens', filter_group_by => '{"model": 8}');

-- a new event reaches every meter of its type at once
SELECT metering.ingest(regress.ev('9', 'acme', 'llm', '2024-01-01T11:55:00Z', '{"tokens": 1, "model": "small", "user": "eve"}'));
SELECT m.slug, q.value
  FROM metering.meters m, metering.query_meter(m.slug, subjects => '{acme}') q
 ORDER BY 1;

-- LATEST: the last value by event time; at equal instants the largest value wins,
-- whatever the order of arrival
INSERT INTO metering.meters (slug, event_type, aggregation, value_property)
VALUES ('gauge', 'gauge', 'LATEST', '$.v');
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('g1', 'acme', 'gauge', '2024-01-01T10:00:00Z', '{"v": 5}'),
  regress.ev('g2', 'acme', 'gauge', '2024-01-01T10:00:00Z', '{"v": 9}'),
  regress.ev('g3', 'acme', 'gauge', '2024-01-01T10:00:00Z', '{"v": 7}'),
  regress.ev('g4', 'beta', 'gauge', '2024-01-01T10:00:00Z', '{"v": 7}'),
  regress.ev('g5', 'beta', 'gauge', '2024-01-01T09:00:00Z', '{"v": 100}')));
SELECT subject, value FROM metering.query_meter('gauge') ORDER BY 1;
SELECT metering.ingest(regress.ev('g6', 'beta', 'gauge', '2024-01-01T10:00:00Z', '{"v": 8}'));
SELECT subject, value FROM metering.query_meter('gauge') ORDER BY 1;
-- equal numbers spelled differently: the one with more decimals, whichever came
-- first, from the events, from the rollups, and after a later refresh merges them
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('g7', 'gam', 'gauge', '2024-01-01T10:00:00Z', '{"v": 5}'),
  regress.ev('g8', 'gam', 'gauge', '2024-01-01T10:00:00Z', '{"v": 5.00}'),
  regress.ev('g9', 'del', 'gauge', '2024-01-01T10:00:00Z', '{"v": 5.00}'),
  regress.ev('g10', 'del', 'gauge', '2024-01-01T10:00:00Z', '{"v": 5}')));
SELECT subject, value::text FROM metering.query_meter('gauge', subjects => '{gam,del}') ORDER BY 1;
SELECT metering.refresh_rollups('gauge') > 0 AS refreshed;
SELECT subject, value::text FROM metering.query_meter('gauge', subjects => '{gam,del}') ORDER BY 1;
SELECT metering.ingest(regress.ev('g11', 'eps', 'gauge', '2024-01-01T10:00:00Z', '{"v": 5.00}'));
SELECT metering.refresh_rollups('gauge') > 0 AS refreshed;
SELECT metering.ingest(regress.ev('g12', 'eps', 'gauge', '2024-01-01T10:00:00Z', '{"v": 5}'));
SELECT subject, value::text FROM metering.query_meter('gauge', subjects => '{eps}') ORDER BY 1;
SELECT metering.refresh_rollups('gauge') > 0 AS refreshed;
SELECT q.subject, q.value::text, r.latest_value::text FROM metering.query_meter('gauge', subjects => '{eps}') q,
       metering.meter_rollups r WHERE r.meter = 'gauge' AND r.subject = 'eps' ORDER BY 1;
-- events without a value, rolled up after the valued ones, leave the latest value as it is
SELECT metering.ingest(regress.ev('g13', 'eps', 'gauge', '2024-01-01T10:30:00Z', '{"w": 1}'));
SELECT metering.refresh_rollups('gauge') > 0 AS refreshed;
SELECT q.subject, q.value::text, r.latest_value::text, r.events FROM metering.query_meter('gauge', subjects => '{eps}') q,
       metering.meter_rollups r WHERE r.meter = 'gauge' AND r.subject = 'eps' ORDER BY 1;
-- and search_usage, from the usage periods the refreshes kept
SELECT x ->> 'tenantId' AS tenant, x ->> 'aggregationPeriod' AS period, x ->> 'count' AS value
  FROM jsonb_array_elements(metering.search_usage('{"searchByAttributes": [
         {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-01-01T00:00:00"},
         {"name": "usageType", "operator": "EQUALS", "value": "gauge"},
         {"name": "tenantId", "operator": "IN", "value": ["gam", "del", "eps"]}]}') -> 'results') x
 ORDER BY 1, 2;

-- JSONPath: nested values, arrays (the first item), and numeric strings
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('bytes', 'io', 'SUM', '$.io.bytes', '{"disk": "$.io.disks[0]", "kind": "$.kind"}');
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('i1', 'acme', 'io', '2024-01-01T10:00:00Z', '{"io": {"bytes": 100, "disks": ["sda", "sdb"]}, "kind": "read"}'),
  regress.ev('i2', 'acme', 'io', '2024-01-01T10:00:00Z', '{"io": {"bytes": "1e3"}, "kind": true}'),
  regress.ev('i3', 'acme', 'io', '2024-01-01T10:00:00Z', '{"io": {"bytes": "0x10"}}'),
  regress.ev('i4', 'acme', 'io', '2024-01-01T10:00:00Z', '{"io": {"bytes": 0.1}, "kind": {"a": 1}}'),
  regress.ev('i5', 'acme', 'io', '2024-01-01T10:00:00Z', '{"io": {"bytes": 0.2}, "kind": {"a": 1}}'),
  regress.ev('i6', 'acme', 'io', '2024-01-01T10:00:00Z', '{"io": {"bytes": null}}'),
  regress.ev('i7', 'acme', 'io', '2024-01-01T10:00:00Z', '{"io": {"bytes": [5]}}')));
SELECT group_by, value FROM metering.query_meter('bytes', group_by => '{disk,kind}') ORDER BY 1;
SELECT * FROM metering.meter_rejected_values WHERE meter = 'bytes';
-- a number is a usage value below 10^100 with at most 100 decimals: no sum can overflow
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('huge1', 'acme', 'io', '2024-01-01T11:00:00Z', '{"io": {"bytes": 9e131071}}'),
  regress.ev('huge2', 'acme', 'io', '2024-01-01T11:00:00Z', '{"io": {"bytes": 9e131071}}'),
  regress.ev('huge3', 'acme', 'io', '2024-01-01T11:00:00Z', jsonb_build_object('io', jsonb_build_object('bytes', ('0.' || repeat('0', 100) || '1')::numeric))),
  regress.ev('big', 'acme', 'io', '2024-01-01T11:00:00Z', jsonb_build_object('io', jsonb_build_object('bytes', ('9' || repeat('9', 98))::numeric)))));
SELECT value > 1e98 AS counted_the_big_one FROM metering.query_meter('bytes', '2024-01-01T11:00:00Z', '2024-01-01T12:00:00Z');
SELECT metering.refresh_rollups('bytes') AS rolled_up;
SELECT value > 1e98 AS still_counted FROM metering.query_meter('bytes', '2024-01-01T11:00:00Z', '2024-01-01T12:00:00Z');
SELECT * FROM metering.meter_rejected_values WHERE meter = 'bytes';

-- definitions are checked
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('Bad Slug', 't', 'COUNT')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('', 't', 'COUNT')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('m', '', 'COUNT')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('m', 't', 'SUM')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('m', 't', 'MEDIAN')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('m', 't', 'SUM', '$.[')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, group_by) VALUES ('m', 't', 'COUNT', '["a"]')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, group_by) VALUES ('m', 't', 'COUNT', '{"a": 1}')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, group_by) VALUES ('m', 't', 'COUNT', '{"a": "$.["}')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, group_by) VALUES ('m', 't', 'COUNT', '{"": "$.a"}')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('tokens', 't', 'COUNT')$$);
-- paths that could fail at ingest time, or depend on the session, are refused up front
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('m', 't', 'SUM', '$.a ? (@ > $min)')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('m', 't', 'MAX', '$.t.datetime()')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, group_by) VALUES ('m', 't', 'COUNT', '{"a": "$.x ? (@ == $y)"}')$$);
SELECT regress.err($$INSERT INTO metering.meters (slug, event_type, aggregation, group_by) VALUES ('m', 't', 'COUNT', '{"a": "$.x ? (@ like_regex \"(\")"}')$$);
-- but a string that merely looks like one is fine
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('lookalike', 't', 'SUM', '$.a ? (@.name == "$\"x .datetime(")', '{"k": "$.\"$y\""}');
DELETE FROM metering.meters WHERE slug = 'lookalike';

-- meters are immutable but for their description; DELETE is a soft delete
UPDATE metering.meters SET description = 'tokens billed' WHERE slug = 'tokens';
SELECT regress.err($$UPDATE metering.meters SET value_property = '$.other' WHERE slug = 'tokens'$$);
SELECT regress.err($$UPDATE metering.meters SET group_by = '{}' WHERE slug = 'tokens'$$);
SELECT regress.err($$UPDATE metering.meters SET event_type = 'x' WHERE slug = 'tokens'$$);
SELECT regress.err($$UPDATE metering.meters SET aggregation = 'MAX' WHERE slug = 'tokens'$$);
SELECT regress.err($$UPDATE metering.meters SET window_size = 'DAY' WHERE slug = 'tokens'$$);
SELECT regress.err($$UPDATE metering.meters SET created_at = now() WHERE slug = 'tokens'$$);
SELECT regress.err($$UPDATE metering.meters SET slug = 'tokens2' WHERE slug = 'tokens'$$);
DELETE FROM metering.meters WHERE slug = 'requests';
SELECT slug, deleted_at FROM metering.meters WHERE slug = 'requests';
SELECT regress.err($$SELECT * FROM metering.query_meter('requests')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('nope')$$);
SELECT regress.err($$UPDATE metering.meters SET deleted_at = NULL WHERE slug = 'requests'$$);
SELECT count(*) AS rollups_left FROM metering.meter_rollups WHERE meter = 'requests';
SELECT meter FROM metering.meter_rejected_values WHERE meter = 'requests';
-- a deleted meter's events keep counting for the other meters
SELECT value FROM metering.query_meter('avg-tokens', subjects => '{acme}');
