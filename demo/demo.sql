-- A short tour of metering, run by `make demo` against a throwaway cluster.
\set ON_ERROR_STOP 1
\pset footer off
SET client_min_messages = warning;
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
CREATE EXTENSION metering;
-- the clock is pinned, so the tour reads the same every time
SET metering.now = '2024-06-01 12:00:00+00';

\echo
\echo '== 1. Meters: an LLM product counts tokens per model'
INSERT INTO metering.meters (slug, description, event_type, aggregation, value_property, group_by)
VALUES ('tokens', 'LLM tokens', 'llm.completion', 'SUM', '$.tokens', '{"model": "$.model"}'),
       ('users', 'distinct end users', 'llm.completion', 'UNIQUE_COUNT', '$.user', '{}');
SELECT slug, event_type, aggregation, value_property, group_by FROM metering.meters;

\echo
\echo '== 2. Events go in as CloudEvents; a repeat of (source, id) is a duplicate, not an error'
SELECT metering.ingest('{"specversion": "1.0", "id": "req-1", "source": "api-gw", "type": "llm.completion",
                         "subject": "acme", "time": "2024-06-01T09:14:00Z",
                         "data": {"tokens": 1200, "model": "large", "user": "ann"}}') AS stored;
SELECT metering.ingest('{"specversion": "1.0", "id": "req-1", "source": "api-gw", "type": "llm.completion",
                         "subject": "acme", "time": "2024-06-01T09:14:00Z",
                         "data": {"tokens": 1200, "model": "large", "user": "ann"}}') AS stored_again;
SELECT * FROM metering.ingest_batch(
  (SELECT jsonb_agg(jsonb_build_object(
            'specversion', '1.0', 'id', 'req-' || n, 'source', 'api-gw', 'type', 'llm.completion',
            'subject', (ARRAY['acme', 'globex'])[1 + n % 2],
            'time', to_char(timestamptz '2024-06-01 09:00:00+00' + n * interval '97 seconds', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
            'data', jsonb_build_object('tokens', 100 + n * 7 % 900, 'model', (ARRAY['small', 'large'])[1 + n % 3 / 2],
                                       'user', 'user' || n % 5)))
     FROM generate_series(1, 120) n));
\echo 'a malformed event rejects its whole batch, naming the index and the field:'
\set VERBOSITY terse
\set ON_ERROR_STOP 0
SELECT * FROM metering.ingest_batch('[{"specversion": "1.0", "id": "x1", "source": "s", "type": "t", "subject": "u"},
                                      {"specversion": "1.0", "id": "x2", "source": "s", "type": "t", "subject": "u", "time": "tomorrow"}]');
\set ON_ERROR_STOP 1
\set VERBOSITY default

\echo
\echo '== 3. Usage per subject and model, in hourly windows'
SELECT window_start, subject, group_by ->> 'model' AS model, value AS tokens
  FROM metering.query_meter('tokens', '2024-06-01T09:00:00Z', '2024-06-01T12:00:00Z', 'HOUR',
                            group_by => '{model}')
 ORDER BY 1, 2, 3;
SELECT subject, value AS distinct_users FROM metering.query_meter('users');

\echo
\echo '== 4. Rollups: refresh_rollups() moves the work from query time to a maintenance call; answers do not change'
SELECT metering.refresh_rollups() AS events_rolled_up;
SELECT window_start, subject, value AS tokens
  FROM metering.query_meter('tokens', '2024-06-01T09:00:00Z', '2024-06-01T12:00:00Z', 'HOUR')
 ORDER BY 1, 2;

\echo
\echo '== 5. AWS Marketplace: BatchMeterUsage in the AWS JSON shape'
INSERT INTO metering.products (product_code, name) VALUES ('prod-7x2k', 'Acme AI');
INSERT INTO metering.product_dimensions (product_code, dimension) VALUES ('prod-7x2k', 'ai-requests');
INSERT INTO metering.meters (slug, event_type, aggregation, value_property)
VALUES ('aws-requests', 'ai-requests', 'SUM', '$.quantity');
INSERT INTO metering.customers (customer_identifier, product_code, customer_aws_account_id, subscribed_at,
                                registration_token, registration_token_expires_at)
VALUES ('cust-acme', 'prod-7x2k', '111122223333', '2024-01-01', 'tok-acme', '2024-06-02');
SELECT * FROM metering.resolve_customer('tok-acme');
SELECT jsonb_pretty(metering.batch_meter_usage('{
  "ProductCode": "prod-7x2k",
  "UsageRecords": [
    {"CustomerIdentifier": "cust-acme", "Dimension": "ai-requests", "Quantity": 40, "Timestamp": "2024-06-01T10:05:00Z"},
    {"CustomerIdentifier": "cust-unknown", "Dimension": "ai-requests", "Quantity": 5, "Timestamp": 1717236000},
    {"CustomerIdentifier": "cust-acme", "Dimension": "ai-requests", "Quantity": 41, "Timestamp": "2024-06-01T10:30:00Z"}
  ]}') #- '{Results,0,MeteringRecordId}') AS response;
\echo 'an identical retry returns the same MeteringRecordId and stores nothing new:'
SELECT r #>> '{Results,0,Status}' AS status,
       (r #>> '{Results,0,MeteringRecordId}')::uuid = (SELECT metering_record_id FROM metering.usage_records) AS same_id,
       (SELECT count(*) FROM metering.usage_records) AS records
  FROM metering.batch_meter_usage('{"ProductCode": "prod-7x2k", "UsageRecords": [
    {"CustomerIdentifier": "cust-acme", "Dimension": "ai-requests", "Quantity": 40, "Timestamp": "2024-06-01T10:05:00Z"}]}') r;
\echo 'accepted records are events too, so meters see them:'
SELECT source, subject, type, time, data FROM metering.events WHERE source LIKE 'aws-marketplace/%';
SELECT window_start, subject, value FROM metering.query_meter('aws-requests', window_size => 'HOUR');
\echo 'RegisterUsage signs an HS256 JWT with the database''s secret:'
SELECT convert_from(decode(translate(c, '-_', '+/') || repeat('=', (4 - length(c) % 4) % 4), 'base64'), 'UTF8') AS jwt_claims,
       public_key_rotation_timestamp
  FROM metering.register_usage('prod-7x2k', 'cust-acme', 1, 'task-42') r,
       split_part(r.signature, '.', 2) c;

\echo
\echo '== 6. Entitlements and credit grants: may acme use GPT tokens, and what is left?'
SET metering.now = '2024-06-01 00:00:00+00';
SELECT metering.create_feature('llm-tokens', 'LLM tokens', 'tokens') IS NOT NULL AS feature_created;
-- a monthly allowance of 100,000 tokens, renewed every period, plus a one-off top-up
SELECT metering.create_entitlement('acme', 'llm-tokens', usage_period => '1 month',
                                   usage_period_anchor => '2024-06-01', issue_after_reset => 100000) AS acme_tokens \gset
SELECT metering.create_grant(:'acme_tokens', 5000, '2024-06-01 00:00+00', priority => 5,
                             expiration => '14 days') IS NOT NULL AS top_up_granted;
SET metering.now = '2024-06-01 12:00:00+00';
\echo 'the access check, in the same transaction as the application''s own writes:'
SELECT has_access, balance, usage, overage, start_of_period FROM metering.entitlement_value('acme', 'llm-tokens');
\echo 'each grant''s balance (the allowance, priority 1, burns before the top-up, priority 5):'
SELECT g.priority, g.amount, b.balance, g.expires_at
  FROM metering.grant_balances(:'acme_tokens') b JOIN metering.grants g ON g.id = b.grant_id ORDER BY g.priority;
\echo 'the balance hour by hour, exact at each window''s start:'
SELECT window_start, usage, balance_at_start FROM metering.balance_history(:'acme_tokens', '2024-06-01 08:00+00', '2024-06-01 12:00+00', 'HOUR');
\echo 'the same engine as an aggregate over any rows: what if the top-up had been 50 tokens, burnt first?'
\echo '(grants without an id are named by their position: ...0000 is the first)'
SELECT metering.burndown(time, (data ->> 'tokens')::numeric,
         '[{"amount": 100000, "priority": 1, "effective_at": "2024-06-01T00:00:00Z"},
           {"amount": 50, "priority": 0, "effective_at": "2024-06-01T00:00:00Z"}]' ORDER BY time) AS what_if
  FROM metering.events WHERE subject = 'acme' AND type = 'llm.completion' AND time < '2024-06-01 12:00+00';

\echo
\echo '== 7. Rating: price usage with CloudKitty-style HashMap rules, exactly, at each event''s own instant'
SET metering.now = '2024-05-01 00:00:00+00';
INSERT INTO metering.hashmap_services (name) VALUES ('llm.completion');
INSERT INTO metering.hashmap_fields (service_id, name) SELECT id, 'model' FROM metering.hashmap_services;
INSERT INTO metering.hashmap_groups (name) VALUES ('tokens'), ('volume');
-- per model: a price per token (flat) in group "tokens"
INSERT INTO metering.hashmap_mappings (field_id, group_id, value, cost, map_type)
SELECT f.id, g.id, m, c, 'flat' FROM metering.hashmap_fields f, metering.hashmap_groups g,
       (VALUES ('small', 0.000002), ('large', 0.00001)) x(m, c) WHERE g.name = 'tokens';
-- big requests get 10% off (a service threshold on the quantity, in the same group)
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type)
SELECT s.id, g.id, 900, 0.9, 'rate' FROM metering.hashmap_services s, metering.hashmap_groups g WHERE g.name = 'tokens';
-- and acme has negotiated its own large-model price
INSERT INTO metering.hashmap_mappings (field_id, group_id, value, cost, map_type, tenant_id)
SELECT f.id, g.id, 'large', 0.000008, 'flat', 'acme' FROM metering.hashmap_fields f, metering.hashmap_groups g WHERE g.name = 'tokens';
SET metering.now = '2024-06-01 12:00:00+00';
\echo 'one price, with the reasoning:'
SELECT metering.rate('llm.completion', 1200, '{"model": "large"}', 'acme') AS price;
SELECT group_name, flat, rate, threshold_level, price FROM metering.rate_explain('llm.completion', 1200, '{"model": "large"}', 'acme');
\echo 'the month of usage priced per subject, each event at its own instant (one query, parallel safe):'
SELECT subject, count(*) AS events, sum((data ->> 'tokens')::numeric) AS tokens,
       metering.rated_total('llm.completion', (data ->> 'tokens')::numeric, data, subject, time) AS price
  FROM metering.events WHERE type = 'llm.completion'
 GROUP BY subject ORDER BY subject;

\echo
\echo '== 8. Usage reports: who used what, for people, portals and analysts'
-- subjects name the metered parties; events need not wait for them (usage is never lost)
INSERT INTO metering.subjects (key, name) VALUES ('acme', 'Acme Corp');
INSERT INTO metering.subjects (key, name, is_trial) VALUES ('globex', 'Globex', true);
\echo 'events for a subject nobody registered are kept, and listed for the operator:'
SELECT * FROM metering.unknown_subjects;
\echo 'acme''s billing cycle so far: what its grants include, what it used, where it is heading:'
SELECT * FROM metering.usage_overview('acme', 'tokens');
\echo 'an Entrust-style usage search, three rows to a page, largest first:'
SELECT metering.search_usage('{"searchByAttributes": [
         {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"},
         {"name": "usageType", "operator": "EQUALS", "value": "tokens"}],
       "orderByAttribute": {"name": "count", "ascending": false}, "limit": 3}') AS page \gset
SELECT x ->> 'tenantId' AS tenant, x ->> 'trial' AS trial, x ->> 'aggregationPeriod' AS period,
       x ->> 'startTime' AS start_time, x ->> 'endTime' AS end_time, x -> 'count' AS count
  FROM jsonb_array_elements(:'page'::jsonb -> 'results') x;
SELECT :'page'::jsonb -> 'paging' ->> 'nextCursor' AS cursor \gset
\echo 'the next page: the signed cursor alone carries the query and the position'
SELECT metering.search_usage(jsonb_build_object('cursor', :'cursor')) AS page \gset
SELECT x ->> 'tenantId' AS tenant, x ->> 'trial' AS trial, x ->> 'aggregationPeriod' AS period,
       x ->> 'startTime' AS start_time, x ->> 'endTime' AS end_time, x -> 'count' AS count
  FROM jsonb_array_elements(:'page'::jsonb -> 'results') x;
SELECT :'page'::jsonb -> 'paging' ? 'nextCursor' AS more_after, :'page'::jsonb -> 'paging' ? 'prevCursor' AS more_before;
\echo 'ThousandEyes-style units usage this month, per account group and consumer (here: the model), projected to June''s end:'
SELECT b ->> 'accountGroup' AS account_group, b ->> 'consumer' AS consumer, b -> 'used' AS used, b -> 'projected' AS projected
  FROM jsonb_array_elements(metering.units_usage('tokens') -> 'breakdowns') b;

\echo
\echo '== 9. Prices: an invoice draft for one subject'
SET metering.now = '2024-06-01 00:00:00+00';
INSERT INTO metering.meters (slug, description, event_type, aggregation)
VALUES ('requests', 'LLM requests', 'llm.completion', 'COUNT');
-- tokens: the first 1,000 free, then 0.002 each, above 100,000 0.001 each plus 5 once past it
INSERT INTO metering.prices (meter_slug, model, tiers, name) VALUES ('tokens', 'graduated',
  '[{"up_to": 1000, "unit_amount": 0}, {"up_to": 100000, "unit_amount": 0.002}, {"up_to": null, "unit_amount": 0.001, "flat_amount": 5}]',
  'LLM tokens');
-- requests: 0.01 each, but at least 20 a month
INSERT INTO metering.prices (meter_slug, model, unit_amount, minimum_amount, name)
VALUES ('requests', 'unit', 0.01, 20, 'requests (minimum 20 a month)');
SET metering.now = '2024-06-01 12:00:00+00';
\echo 'acme''s June so far, one line per price, and a minimum true-up:'
SELECT p.name, u.model, u.quantity, u.amount, u.rounded, u.currency
  FROM metering.price_usage('acme', '2024-06-01', '2024-07-01') u JOIN metering.prices p ON p.id = u.price_id;
\echo 'the tier detail of the tokens line:'
SELECT t ->> 'from' AS "from", t ->> 'up_to' AS up_to, t -> 'units' AS units, t -> 'unit_amount' AS unit_amount,
       t -> 'flat_amount' AS flat_amount, t -> 'amount' AS amount
  FROM metering.price_usage('acme', '2024-06-01', '2024-07-01') u, jsonb_array_elements(u.details -> 'tiers') t
 WHERE u.model = 'graduated';
\echo 'what if acme used 250,000 tokens this month?'
SELECT amount FROM metering.price_quote((SELECT id FROM metering.prices WHERE name = 'LLM tokens'), 250000);

\echo
\echo '== 10. Real-time enforcement: an LLM gateway reserves tokens before the call, commits what it used'
SELECT metering.create_feature('gateway-tokens', 'Tokens through the gateway', 'tokens') IS NOT NULL AS feature;
SELECT metering.create_entitlement('initech', 'gateway-tokens', usage_period => '1 month',
         usage_period_anchor => '2024-06-01', measure_usage_from => '2024-06-01') AS gw \gset
SELECT metering.create_grant(:'gw', 10000, '2024-06-01') IS NOT NULL AS granted_10000_tokens;
INSERT INTO metering.notification_rules (name, feature_key, thresholds)
VALUES ('gateway 80%', 'gateway-tokens', '[{"type": "USAGE_PERCENT", "value": 80}]');
\echo 'this session listens on the rules'' channel (psql shows what arrives after each command):'
LISTEN metering_alerts;
\echo 'a request comes in: hold 2,000 tokens for it (another request cannot spend them meanwhile)'
SELECT granted, available, expires_at FROM metering.reserve('initech', 'gateway-tokens', 2000, '2 minutes', 'req-9001');
SELECT reservation_id AS hold FROM metering.reserve('initech', 'gateway-tokens', 2000, '2 minutes', 'req-9001') \gset
\echo '(a retry with the same idempotency key gets the same hold, not a second one)'
SELECT balance, reserved, available FROM metering.entitlement_value('initech', 'gateway-tokens');
\echo 'the model answered with 1,234 tokens: commit them (the event is stored as ingest stores it, the hold ends)'
SELECT * FROM metering.commit_reservation(:'hold',
  '{"specversion": "1.0", "id": "req-9001", "source": "gateway", "type": "llm.completion", "subject": "initech",
    "time": "2024-06-01T11:59:00Z", "data": {"tokens": 1234, "model": "large", "user": "bob"}}');
\echo 'a long batch job: check and record in one call; it takes usage past 80%, and the alert is sent when it commits'
SELECT * FROM metering.consume(
  '{"specversion": "1.0", "id": "job-77", "source": "gateway", "type": "llm.completion", "subject": "initech",
    "time": "2024-06-01T11:59:30Z", "data": {"tokens": 6900, "model": "small", "user": "batch"}}', 'gateway-tokens');
SELECT kind, threshold, usage, balance, total_available_grant_amount FROM metering.notification_events;
\echo 'the next request wants 2,000 more: only 1,866 are left, so it is denied (an answer, not an error)'
SELECT granted, reservation_id, available FROM metering.reserve('initech', 'gateway-tokens', 2000);
UNLISTEN metering_alerts;
