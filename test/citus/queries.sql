-- The questions test/citus.sh asks one node and a Citus coordinator holding
-- the same data (test/citus/data.sql); each "-- q:" line names one whose
-- answers must be the same, row by row.  Signed cursors are compared
-- without their signatures (each database signs with its own secret), and
-- identifiers a database draws (uuids, seq) are left out.
-- q: events stored
SELECT count(*), count(DISTINCT (source, id)), sum(length(data::text)) FROM metering.events;
-- q: query_meter SUM by day and model
SELECT * FROM metering.query_meter('tokens', '2026-03-01', '2026-03-05', 'DAY', 'UTC', NULL, '{model}', NULL) ORDER BY 1, 2, 3, 4;
-- q: query_meter COUNT by hour, two subjects, by route
SELECT * FROM metering.query_meter('calls', '2026-03-01', '2026-03-05', 'HOUR', 'UTC', '{s3,s4}', '{route}', NULL) ORDER BY 1, 2, 3, 4;
-- q: query_meter UNIQUE_COUNT, no window
SELECT * FROM metering.query_meter('users', '2026-03-01', '2026-03-05', NULL, 'UTC', NULL, NULL, NULL) ORDER BY 1, 2, 3, 4;
-- q: query_meter MAX by day in a time zone, filtered
SELECT * FROM metering.query_meter('peak', '2026-03-01', '2026-03-05', 'DAY', 'Europe/Paris', '{s1,s9,s17}', NULL, NULL) ORDER BY 1, 2, 3, 4;
-- q: query_meter with a group filter and minute windows
SELECT * FROM metering.query_meter('tokens', '2026-03-04', '2026-03-04 02:00', 'MINUTE', 'UTC', '{s12}', NULL, '{"model": "big"}') ORDER BY 1, 2, 3, 4;
-- q: entitlement_value of every entitlement
WITH e AS MATERIALIZED (SELECT subject, feature_key FROM metering.entitlements)
SELECT e.subject, e.feature_key, v.* FROM e, metering.entitlement_value(e.subject, e.feature_key) v ORDER BY 1, 2;
-- q: entitlement_value in the past
WITH e AS MATERIALIZED (SELECT subject FROM metering.entitlements WHERE feature_key = 'gpt')
SELECT e.subject, v.* FROM e, metering.entitlement_value(e.subject, 'gpt', '2026-03-02 13:00') v ORDER BY 1;
-- q: entitlement_status
SELECT subject, feature, type, access, balance, usage, overage, period_start, period_end, reserved, available FROM metering.entitlement_status ORDER BY 1, 2;
-- q: grant_balances
WITH e AS MATERIALIZED (SELECT id, subject FROM metering.entitlements WHERE feature_key = 'gpt'),
     b AS MATERIALIZED (SELECT e.subject, b.* FROM e, metering.grant_balances(e.id) b)
SELECT b.subject, g.amount, g.priority, b.balance FROM b
  JOIN metering.grants g ON g.id = b.grant_id AND g.subject = b.subject ORDER BY 1, 2, 3;
-- q: balance_history
WITH e AS MATERIALIZED (SELECT id, subject FROM metering.entitlements WHERE subject IN ('s5', 's8', 's20') AND feature_key = 'gpt')
SELECT e.subject, b.* FROM e, metering.balance_history(e.id, '2026-03-01', '2026-03-04 12:00', 'DAY') b ORDER BY 1, 2;
-- q: burndown_history
SELECT e.subject, b.segment_start, b.segment_end, b.balance_at_start, b.overage_at_start, b.usage, b.overage, b.terminations,
       (SELECT array_agg(u.v ORDER BY u.v) FROM jsonb_each_text(b.grant_usages) u(k, v)) AS grant_usages
  FROM (SELECT id, subject FROM metering.entitlements WHERE subject IN ('s5', 's10') AND feature_key = 'gpt' OFFSET 0) e,
       metering.burndown_history(e.id, '2026-03-01', '2026-03-04 12:00') b
 ORDER BY 1, 2, 3;
-- q: usage_overview
SELECT s, o.* FROM unnest(ARRAY['s1', 's6', 's7', 's40']) s, metering.usage_overview(s, 'calls') o ORDER BY 1, 2;
-- q: usage_overview of an entitlement's meter
SELECT s, o.* FROM unnest(ARRAY['s2', 's11']) s, metering.usage_overview(s, 'tokens') o ORDER BY 1, 2;
-- q: search_usage by count
SELECT regexp_replace(metering.search_usage('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2026-03-01T00:00:00"},
  {"name": "aggregationPeriod", "operator": "EQUALS", "value": "DAILY"}],
  "orderByAttribute": {"name": "count", "ascending": false}, "limit": 7}')::text, '\.[A-Za-z0-9_-]{20,}"', '"', 'g');
-- q: search_usage of some tenants, weekly
SELECT regexp_replace(metering.search_usage('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2026-02-20T00:00:00"},
  {"name": "tenantId", "operator": "IN", "value": ["s3", "s4", "s5"]},
  {"name": "aggregationPeriod", "operator": "EQUALS", "value": "WEEKLY"}], "limit": 20}')::text, '\.[A-Za-z0-9_-]{20,}"', '"', 'g');
-- q: units_usage
SELECT regexp_replace(metering.units_usage('calls', '2026-03-01', '2026-03-05', page_size => 25)::text, '\.[A-Za-z0-9_-]{20,}"', '"', 'g');
-- q: daily_usage
SELECT * FROM metering.daily_usage ORDER BY 1, 2, 3, 4;
-- q: unknown_subjects
SELECT * FROM metering.unknown_subjects ORDER BY 1;
-- q: price_usage
SELECT s, p.meter, p.model, p.currency, p.quantity, p.amount, p.rounded FROM unnest(ARRAY['s1', 's2', 's30']) s,
       metering.price_usage(s, '2026-03-01', '2026-03-05') p ORDER BY 1, 2;
-- q: rate on the coordinator
SELECT metering.rate('llm.tokens', q) FROM unnest(ARRAY[1, 99, 100, 5000]) q;
-- q: rated_total over the events, read in a materialized CTE
WITH ev AS MATERIALIZED (SELECT type, data, subject, time FROM metering.events)
SELECT subject, metering.rated_total(type, (data->>'tokens')::numeric, data, subject, time) FROM ev GROUP BY subject
UNION ALL
SELECT NULL, metering.rated_total(type, (data->>'tokens')::numeric, data, subject, time) FROM ev ORDER BY 1 NULLS FIRST;
-- q: rated_total over the distributed events directly: each worker rates its shards with its copy of the rules
SELECT subject, metering.rated_total(type, (data->>'tokens')::numeric, data, subject, time) FROM metering.events GROUP BY subject
UNION ALL
SELECT NULL, metering.rated_total(type, (data->>'tokens')::numeric, data, subject, time) FROM metering.events ORDER BY 1 NULLS FIRST;
-- q: rate of each event, in a query on the events (pushed down to the shards)
SELECT subject, id, metering.rate(type, (data->>'tokens')::numeric, data, subject, time) FROM metering.events
 WHERE type = 'llm.tokens' AND time >= '2026-03-03' ORDER BY 1, 2;
-- q: rate_explain
SELECT * FROM metering.rate_explain('llm.tokens', 250) ORDER BY 1;
-- q: subject_tree
SELECT * FROM metering.subject_tree('s1') ORDER BY 1;
-- q: price_quote
SELECT q.amount, q.details FROM metering.prices p, metering.price_quote(p.id, 12345) q;
-- q: the burndown aggregate over each subject's events
SELECT subject, metering.burndown(time, (data->>'tokens')::numeric, '[{"amount": 20000, "priority": 1, "effective_at": "2026-03-01T00:00:00Z", "recurrence": "1 day"}]')
  FROM (SELECT subject, time, data FROM metering.events WHERE type = 'llm.tokens' ORDER BY subject, time) e GROUP BY subject ORDER BY 1;
-- q: grants, resets and entitlements after the other writers
SELECT e.subject, e.feature_key, e.deleted_at IS NOT NULL, g.amount, g.priority, g.voided_at IS NOT NULL,
       (SELECT count(*) FROM metering.resets r WHERE r.entitlement_id = e.id AND r.subject = e.subject)
  FROM metering.entitlements e LEFT JOIN metering.grants g ON g.entitlement_id = e.id AND g.subject = e.subject ORDER BY 1, 2, 4, 5;
-- q: AWS usage records
SELECT customer_identifier, product_code, dimension, usage_hour, quantity FROM metering.usage_records ORDER BY 1, 2, 3, 4;
-- q: AWS customers
SELECT customer_identifier, product_code, registration_token, registration_token_used_at FROM metering.customers ORDER BY 1;
-- q: AWS registrations
SELECT customer_identifier, product_code, nonce, public_key_version, first_registered_at, last_registered_at, calls
  FROM metering.registrations ORDER BY 1, 2, 3;
-- q: AWS events
SELECT subject, type, time, data - 'allocations' FROM metering.events WHERE source LIKE 'aws-marketplace/%' ORDER BY 1, 2, 3;
-- q: reservations
SELECT subject, feature_key, amount, committed_amount, committed_at IS NOT NULL FROM metering.reservations ORDER BY 1, 3;
-- q: notification events
SELECT n.subject, n.feature_key, n.kind, n.threshold, n.period_start, n.usage, n.balance, n.total_available_grant_amount, n.created_at
  FROM metering.notification_events n ORDER BY 1, 2, 5, 4::text, 3;
-- q: refresh_rollups
SELECT metering.refresh_rollups();
-- q: rollups after the refresh
SELECT meter, subject, bucket, groups, events, valued, sum, min, max, first_time, last_time, latest_time, latest_value, encode(groups_key, 'hex')
  FROM metering.meter_rollups ORDER BY 1, 2, 3, groups::text;
-- q: usage periods after the refresh
SELECT meter, subject, kind, start_time, end_time, id, events, valued, sum, min, max, latest_time, latest_value FROM metering.usage_periods ORDER BY 1, 2, 3, 4;
-- q: entitlement_value after the refresh
WITH e AS MATERIALIZED (SELECT subject, feature_key FROM metering.entitlements)
SELECT e.subject, e.feature_key, v.* FROM e, metering.entitlement_value(e.subject, e.feature_key) v ORDER BY 1, 2;
-- q: query_meter after the refresh
SELECT * FROM metering.query_meter('tokens', '2026-03-01', '2026-03-05', 'HOUR', 'UTC', NULL, '{model}', NULL) ORDER BY 1, 2, 3, 4;
-- q: search_usage after the refresh
SELECT regexp_replace(metering.search_usage('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2026-03-01T00:00:00"},
  {"name": "aggregationPeriod", "operator": "EQUALS", "value": "MONTHLY"}], "limit": 50}')::text, '\.[A-Za-z0-9_-]{20,}"', '"', 'g');
-- q: snapshots after the refresh
SELECT e.subject, e.feature_key, s.at, s.usage, s.overage FROM metering.entitlement_snapshots s
  JOIN metering.entitlements e ON e.id = s.entitlement_id AND e.subject = s.subject ORDER BY 1, 2, 3;
