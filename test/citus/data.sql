-- The same data for one node and for a Citus cluster (test/citus.sh): meters,
-- features, 40 subjects with entitlements and grants, and 6,000 events over
-- three days, stored by ingest_batch, ingest and plain INSERT, with
-- duplicates, and alert rules; then a refresh and more events above the
-- watermark.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET citus.max_cached_conns_per_worker = 0;
SELECT set_config('metering.now', '2026-03-01 00:00:00+00', false) IS NOT NULL AS clock;
-- the clock of every node: a Citus cluster's workers run the triggers of the
-- rows on their shards, and a moved clock is set on each node (Citus carries
-- ALTER DATABASE to the workers; new sessions read it, and the coordinator
-- caches no connection to them here)
DO $$
BEGIN
  EXECUTE format('ALTER DATABASE %I SET metering.now = %L', current_database(), current_setting('metering.now'));
END $$;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('tokens', 'llm.tokens', 'SUM', '$.tokens', '{"model": "$.model"}'),
  ('calls', 'api.call', 'COUNT', NULL, '{"route": "$.route"}'),
  ('peak', 'llm.tokens', 'MAX', '$.tokens', '{}'),
  ('users', 'api.call', 'UNIQUE_COUNT', '$.user', '{}'),
  -- every aggregation, so that the rollups the workers make are checked for each
  ('last', 'llm.tokens', 'LATEST', '$.tokens', '{"model": "$.model"}'),
  ('least', 'llm.tokens', 'MIN', '$.tokens', '{}'),
  ('mean', 'llm.tokens', 'AVG', '$.tokens', '{}');
SELECT metering.create_feature('gpt', 'GPT tokens', 'tokens') IS NOT NULL AS f1,
       metering.create_feature('gpt-big', 'big model', 'tokens', '{"model": "big"}') IS NOT NULL AS f2,
       metering.create_feature('api', 'API calls', 'calls') IS NOT NULL AS f3;
SELECT count(metering.create_entitlement('s' || n, 'gpt', usage_period => '1 day',
                                         usage_period_anchor => '2026-03-01', is_soft_limit => n % 4 = 0))
  FROM generate_series(1, 40) n;
SELECT count(metering.create_entitlement('s' || n, 'api', usage_period => '1 month', usage_period_anchor => '2026-03-01'))
  FROM generate_series(1, 40, 3) n;
SELECT count(metering.create_grant(e.id, 5000 + 100 * right(e.subject, -1)::int, '2026-03-01', priority => 1,
                                   recurrence => '1 day', expiration => '7 days'))
  FROM (SELECT id, subject FROM metering.entitlements WHERE feature_key = 'gpt' OFFSET 0) e;
SELECT count(metering.create_grant(e.id, 900, '2026-03-02', priority => 5, expiration => '30 days'))
  FROM (SELECT id, subject FROM metering.entitlements WHERE feature_key = 'gpt' OFFSET 0) e WHERE right(e.subject, -1)::int % 5 = 0;
SELECT count(metering.create_grant(e.id, 400, '2026-03-01', priority => 1))
  FROM (SELECT id, subject FROM metering.entitlements WHERE feature_key = 'api' OFFSET 0) e;
-- alerts of the token entitlements (what stores events evaluates them)
INSERT INTO metering.notification_rules (name, feature_key, thresholds)
VALUES ('gpt', 'gpt', '[{"type": "USAGE_PERCENT", "value": 50}, {"type": "USAGE_PERCENT", "value": 90}, {"type": "BALANCE_VALUE", "value": 0}]');
SELECT set_config('metering.now', '2026-03-04 12:00:00+00', false) IS NOT NULL AS clock;
-- the clock of every node: a Citus cluster's workers run the triggers of the
-- rows on their shards, and a moved clock is set on each node (Citus carries
-- ALTER DATABASE to the workers; new sessions read it, and the coordinator
-- caches no connection to them here)
DO $$
BEGIN
  EXECUTE format('ALTER DATABASE %I SET metering.now = %L', current_database(), current_setting('metering.now'));
END $$;
-- 5,000 events in 50 batches
SELECT sum(b.accepted) AS accepted, sum(b.duplicates) AS duplicates FROM generate_series(0, 49) k,
  LATERAL metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object(
    'specversion', '1.0', 'id', 'e' || i, 'source', 'gw',
    'type', CASE WHEN i % 3 = 0 THEN 'api.call' ELSE 'llm.tokens' END,
    'subject', 's' || (1 + (i * 7) % 40),
    'time', '2026-03-01 00:00:00+00'::timestamptz + (i * interval '47 seconds'),
    'data', CASE WHEN i % 3 = 0 THEN jsonb_build_object('route', '/r' || i % 4, 'user', 'u' || i % 13)
                 ELSE jsonb_build_object('tokens', (i * 37) % 500, 'model', CASE WHEN i % 2 = 0 THEN 'big' ELSE 'small' END) END))
    FROM generate_series(k * 100, k * 100 + 99) i)) b;
-- repeats: stored once
SELECT metering.ingest('{"specversion": "1.0", "id": "e7", "source": "gw", "type": "llm.tokens", "subject": "s10",
                         "time": "2026-03-01T00:05:29Z", "data": {"tokens": 259, "model": "small"}}') AS repeat_stored;
SELECT * FROM metering.ingest_batch('[{"specversion": "1.0", "id": "e8", "source": "gw", "type": "llm.tokens", "subject": "s17", "data": {"tokens": 1}},
                                      {"specversion": "1.0", "id": "x1", "source": "gw", "type": "llm.tokens", "subject": "s3", "time": "2026-03-03T10:00:00Z", "data": {"tokens": 77, "model": "big"}}]');
SELECT metering.refresh_rollups() > 0 AS refreshed;
-- 1,000 more above the watermark: by ingest, and by plain INSERT
SELECT count(*) FILTER (WHERE metering.ingest(jsonb_build_object(
    'specversion', '1.0', 'id', 'f' || i, 'source', 'app',
    'type', 'llm.tokens', 'subject', 's' || (1 + (i * 11) % 40),
    'time', '2026-03-04 00:00:00+00'::timestamptz + (i * interval '41 seconds'),
    'data', jsonb_build_object('tokens', (i * 13) % 300, 'model', 'big')))) AS ingested
  FROM generate_series(1, 500) i;
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'g' || i, 'app', 's' || (1 + i % 40), 'api.call', '2026-03-02 00:00:00+00'::timestamptz + (i * interval '97 seconds'),
       jsonb_build_object('route', '/r' || i % 3, 'user', 'u' || i % 17)
  FROM generate_series(1, 500) i;
INSERT INTO metering.subjects (key, name) SELECT 's' || n, 'Subject ' || n FROM generate_series(1, 40) n;
-- rating rules, a price, an AWS product with a customer
INSERT INTO metering.hashmap_services (name) VALUES ('llm.tokens');
INSERT INTO metering.hashmap_groups (name) VALUES ('g');
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type)
SELECT s.id, g.id, 0.001, 'flat' FROM metering.hashmap_services s, metering.hashmap_groups g;
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type)
SELECT s.id, g.id, 100, 0.9, 'rate' FROM metering.hashmap_services s, metering.hashmap_groups g;
INSERT INTO metering.prices (meter_slug, model, tiers, minimum_amount) VALUES
  ('tokens', 'graduated', '[{"up_to": 5000, "unit_amount": 0}, {"up_to": null, "unit_amount": 0.002, "flat_amount": 1}]', 2);
INSERT INTO metering.products (product_code, name) VALUES ('prod-1', 'Product');
INSERT INTO metering.product_dimensions (product_code, dimension) VALUES ('prod-1', 'api-calls');
INSERT INTO metering.customers (customer_identifier, product_code, customer_aws_account_id, subscribed_at, registration_token)
VALUES ('s2', 'prod-1', '123456789012', '2026-02-01', 'token-s2'), ('s3', 'prod-1', '210987654321', '2026-02-01', 'token-s3');
SELECT metering.meter_usage('prod-1', 's2', '2026-03-04 10:30:00+00', 'api-calls', 40) IS NOT NULL AS metered;
SELECT metering.meter_usage('prod-1', 's3', '2026-03-04 11:30:00+00', 'api-calls', 3) IS NOT NULL AS metered;
-- a repeat is the same record; another quantity a duplicate
SELECT metering.meter_usage('prod-1', 's3', '2026-03-04 11:10:00+00', 'api-calls', 3) AS again \gset
SELECT metering_record_id = :'again' AS same_record FROM metering.usage_records WHERE customer_identifier = 's3';
SELECT * FROM metering.resolve_customer('token-s2');
SELECT signature IS NOT NULL AS signed, public_key_rotation_timestamp FROM metering.register_usage('prod-1', 's2', 1, 'pod-1');
SELECT signature IS NOT NULL AS signed FROM metering.register_usage('prod-1', 's2', 1, 'pod-1');
SELECT signature IS NOT NULL AS signed FROM metering.register_usage('prod-1', 's3', 1);
SELECT metering.batch_meter_usage('{"ProductCode": "prod-1", "UsageRecords": [
  {"CustomerIdentifier": "s2", "Dimension": "api-calls", "Quantity": 7, "Timestamp": "2026-03-04T09:05:00Z"},
  {"CustomerIdentifier": "nobody", "Dimension": "api-calls", "Quantity": 5, "Timestamp": "2026-03-04T09:05:00Z"}]}')
  -> 'Results' -> 1 ->> 'Status' AS second;
-- holds and consumption
SELECT granted, available FROM metering.reserve('s3', 'gpt', 2000, idempotency_key => 'k1');
SELECT r.stored, r.amount, r.balance, r.available
  FROM (SELECT id, idempotency_key FROM metering.reservations OFFSET 0) x, metering.commit_reservation(x.id, '{"specversion": "1.0", "id": "c1", "source": "app",
    "type": "llm.tokens", "subject": "s3", "data": {"tokens": 1234, "model": "big"}}') r
 WHERE x.idempotency_key = 'k1';
SELECT granted, stored, amount, available FROM metering.consume('{"specversion": "1.0", "id": "c2", "source": "app",
    "type": "llm.tokens", "subject": "s4", "data": {"tokens": 99999, "model": "big"}}', 'gpt');
SELECT granted, stored, amount, available FROM metering.consume('{"specversion": "1.0", "id": "c3", "source": "app",
    "type": "llm.tokens", "subject": "s4", "data": {"tokens": 10, "model": "big"}}', 'gpt');
SELECT granted, stored, amount, available FROM metering.consume('{"specversion": "1.0", "id": "c3", "source": "app",
    "type": "llm.tokens", "subject": "s4", "data": {"tokens": 10, "model": "big"}}', 'gpt');
-- a grant takes s3 back under its 50% threshold (resolved), its void over it
-- again: distributed, their writers evaluate the alerts on the coordinator
SELECT id AS s3_gpt FROM metering.entitlements WHERE subject = 's3' AND feature_key = 'gpt' \gset
SELECT metering.create_grant(:'s3_gpt', 10000, '2026-03-04 12:00') AS s3_grant \gset
SELECT metering.void_grant(:'s3_grant') IS NULL AS voided;
SELECT kind, threshold->>'value' AS value FROM metering.notification_events WHERE subject = 's3' ORDER BY seq;
-- the other writers: a released hold, a voided grant, a reset, a deleted
-- entitlement, a subject tree, snapshots
SELECT metering.release_reservation(h.reservation_id) AS released FROM metering.reserve('s5', 'gpt', 100) h;
-- (distributed, a function that reads other rows is called with values read
-- first: called in a query of the table, Citus sends it to the shard)
SELECT g.id AS void_me FROM metering.grants g JOIN metering.entitlements e ON e.id = g.entitlement_id AND e.subject = g.subject
 WHERE e.subject = 's10' AND e.feature_key = 'gpt' AND g.priority = 5 \gset
SELECT metering.void_grant(:'void_me') IS NULL AS voided;
SELECT id AS reset_me FROM metering.entitlements WHERE subject = 's7' AND feature_key = 'api' \gset
SELECT metering.reset_entitlement(:'reset_me', '2026-03-04 06:00:00+00') IS NULL AS reset;
SELECT id AS delete_me FROM metering.entitlements WHERE subject = 's13' AND feature_key = 'api' \gset
SELECT metering.delete_entitlement(:'delete_me') IS NULL AS deleted;
INSERT INTO metering.subjects (key, name, parent_key) VALUES ('s1-team', 'Team of s1', 's1'), ('s1-team-a', 'A', 's1-team');
SELECT metering.refresh_snapshots() >= 0 AS snapshots;
-- the database's clock again (the sessions that follow set their own)
DO $$
BEGIN
  EXECUTE format('ALTER DATABASE %I RESET metering.now', current_database());
END $$;
