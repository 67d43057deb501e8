-- Holds and consumption (reserve, commit_reservation, release_reservation,
-- consume), reserved and available, and alerts.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-03-15 12:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('tokens', 'llm.tokens', 'SUM', '$.tokens', '{"model": "$.model"}'),
       ('calls', 'api.call', 'COUNT', NULL, '{}');
SELECT metering.create_feature('llm', 'LLM tokens', 'tokens') IS NOT NULL AS feature;
SELECT metering.create_feature('gpt4', 'GPT-4 tokens', 'tokens', '{"model": "gpt-4"}') IS NOT NULL AS feature;
SELECT metering.create_feature('api', 'API calls', 'calls') IS NOT NULL AS feature;
SELECT metering.create_feature('sso', 'SSO') IS NOT NULL AS feature;
SELECT metering.create_entitlement('acme', 'llm', usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                   measure_usage_from => '2024-03-01') AS e \gset
SELECT metering.create_grant(:'e', 500, '2024-03-01') IS NOT NULL AS grant;
SELECT metering.create_entitlement('acme', 'gpt4', usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                   measure_usage_from => '2024-03-01') AS e_gpt4 \gset
SELECT metering.create_grant(:'e_gpt4', 100, '2024-03-01') IS NOT NULL AS grant;
SELECT metering.create_entitlement('acme', 'api', usage_period => '1 day', measure_usage_from => '2024-03-15',
                                   is_soft_limit => true, issue_after_reset => 2) AS e_api \gset
SELECT metering.create_entitlement('acme', 'sso', 'boolean') AS e_sso \gset
CREATE FUNCTION regress.tok(id text, tokens numeric, subject text DEFAULT 'acme', model text DEFAULT 'gpt-4',
                            "time" text DEFAULT '2024-03-15T11:30:00Z') RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT regress.ev(id, subject, 'llm.tokens', "time", jsonb_build_object('tokens', tokens, 'model', model))
$$;

-- the plan of a query, a line a row
CREATE FUNCTION regress.plan(q text) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
  l text;
BEGIN
  FOR l IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP
    RETURN NEXT l;
  END LOOP;
END $$;

-- errors that name a reservation, with its id masked
CREATE FUNCTION regress.err_id(statement text) RETURNS text LANGUAGE sql AS $$
  SELECT regexp_replace(regress.err(statement), '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<id>', 'g')
$$;

-- entitlement_value: reserved and available are its last two columns
SELECT has_access, balance, usage, reserved, available FROM metering.entitlement_value('acme', 'llm');
SELECT has_access, balance, reserved, available FROM metering.entitlement_value('acme', 'sso');
SELECT has_access, balance, reserved, available FROM metering.entitlement_value('nobody', 'llm');

-- reserve: granted while available >= amount
SELECT granted, reservation_id IS NOT NULL AS has_id, available, expires_at
  FROM metering.reserve('acme', 'llm', 200, '10 minutes');
SELECT granted, available FROM metering.reserve('acme', 'llm', 250) \gset r2_
SELECT :'r2_granted' AS granted, :'r2_available' AS available;
-- 50 left: a hold of 51 is denied, writes nothing, and is not an error
SELECT granted, reservation_id, available, expires_at FROM metering.reserve('acme', 'llm', 51);
SELECT count(*) AS holds FROM metering.reservations WHERE entitlement_id = :'e';
SELECT balance, reserved, available FROM metering.entitlement_value('acme', 'llm');
SELECT feature, balance, reserved, available FROM metering.entitlement_status WHERE subject = 'acme' ORDER BY feature;
-- no entitlement, an archived or unknown feature: answers, not errors
SELECT granted, reservation_id, available FROM metering.reserve('nobody', 'llm', 1);
SELECT granted, reservation_id, available FROM metering.reserve('acme', 'nothing', 1);
-- boolean: granted when there is access
SELECT granted, reservation_id IS NOT NULL AS has_id, available FROM metering.reserve('acme', 'sso', 1);
-- a soft limit is granted beyond its balance
SELECT granted, available FROM metering.reserve('acme', 'api', 5);

-- the arguments
SELECT regress.err(s) FROM unnest(ARRAY[
  'SELECT metering.reserve(''acme'', ''llm'', 0)',
  'SELECT metering.reserve(''acme'', ''llm'', -1)',
  'SELECT metering.reserve(''acme'', ''llm'', NULL)',
  'SELECT metering.reserve(''acme'', ''llm'', ''NaN'')',
  'SELECT metering.reserve(''acme'', ''llm'', 1, ''0.5 seconds'')',
  'SELECT metering.reserve(''acme'', ''llm'', 1, ''25 hours'')',
  'SELECT metering.reserve(''acme'', ''llm'', 1, NULL)',
  'SELECT metering.reserve(''acme'', ''llm'', 1, idempotency_key => '''')']) s;

-- idempotency: the same key on the same entitlement returns the first reservation and writes nothing
SELECT reservation_id AS k1, expires_at AS k1_expires FROM metering.reserve('acme', 'gpt4', 30, idempotency_key => 'req-1') \gset
SELECT granted, reservation_id = :'k1' AS same, available, expires_at = :'k1_expires' AS same_expiry
  FROM metering.reserve('acme', 'gpt4', 30, idempotency_key => 'req-1');
SELECT count(*) AS holds FROM metering.reservations WHERE idempotency_key = 'req-1';
-- and the first call's answer, even after another hold changed what is available
SELECT metering.reserve('acme', 'gpt4', 5, idempotency_key => 'req-other') IS NOT NULL AS other_hold;
SELECT granted, reservation_id = :'k1' AS same, available AS first_available
  FROM metering.reserve('acme', 'gpt4', 30, idempotency_key => 'req-1');
SELECT metering.release_reservation(id) AS released FROM metering.reservations WHERE idempotency_key = 'req-other';
SELECT regress.err('SELECT metering.reserve(''acme'', ''gpt4'', 31, idempotency_key => ''req-1'')');
-- a key is per entitlement
SELECT granted FROM metering.reserve('acme', 'llm', 1, idempotency_key => 'req-1');
SELECT metering.release_reservation(id) FROM metering.reservations WHERE idempotency_key = 'req-1' AND feature_key = 'llm';

-- commit: the usage that happened is stored, the hold ends; the usage may exceed the hold
SELECT stored, amount, balance, available FROM metering.commit_reservation(:'k1', regress.tok('c1', 45));
SELECT committed_amount, committed_at IS NOT NULL AS committed FROM metering.reservations WHERE id = :'k1';
SELECT balance, usage, reserved, available FROM metering.entitlement_value('acme', 'gpt4');
-- a second commit or a release of it is 55000
SELECT regress.err_id(format('SELECT metering.commit_reservation(%L, %L)', :'k1', regress.tok('c2', 1)));
SELECT regress.err_id(format('SELECT metering.release_reservation(%L)', :'k1'));
-- the event must be of the reservation's subject, of the feature's meter and pass its group filters
SELECT reservation_id AS k2 FROM metering.reserve('acme', 'gpt4', 10) \gset
SELECT regress.err(format('SELECT metering.commit_reservation(%L, %L)', :'k2', regress.tok('c3', 1, subject => 'globex')));
SELECT regress.err(format('SELECT metering.commit_reservation(%L, %L)', :'k2', regress.tok('c3', 1, model => 'gpt-3')));
SELECT regress.err(format('SELECT metering.commit_reservation(%L, %L)', :'k2',
                          regress.ev('c3', 'acme', 'api.call', '2024-03-15T11:30:00Z')));
SELECT regress.err(format('SELECT metering.commit_reservation(%L, %L)', :'k2', '{"id": "x"}'));
SELECT regress.err(format('SELECT metering.commit_reservation(%L, NULL)', :'k2'));
SELECT regress.err('SELECT metering.commit_reservation(''00000000-0000-7000-8000-000000000000'', ''{}'')');
SELECT regress.err('SELECT metering.release_reservation(''00000000-0000-7000-8000-000000000000'')');
-- a repeat of a stored event is stored once: the hold ends, the usage is not counted again
SELECT stored, amount, balance, available FROM metering.commit_reservation(:'k2', regress.tok('c1', 45));
-- release: true when the hold was active
SELECT reservation_id AS k3 FROM metering.reserve('acme', 'gpt4', 10, '1 minute') \gset
SELECT metering.release_reservation(:'k3') AS released;
SELECT regress.err_id(format('SELECT metering.release_reservation(%L)', :'k3'));

-- expired holds hold nothing; they can still be committed, and released (false)
SELECT reservation_id AS k4 FROM metering.reserve('acme', 'gpt4', 20, '1 minute') \gset
SELECT reservation_id AS k5 FROM metering.reserve('acme', 'gpt4', 5, '1 minute') \gset
SELECT reserved, available FROM metering.entitlement_value('acme', 'gpt4');
SET metering.now = '2024-03-15 12:02:00+00';
SELECT reserved, available FROM metering.entitlement_value('acme', 'gpt4');
-- ... and an instant before still sees them
SELECT reserved FROM metering.entitlement_value('acme', 'gpt4', '2024-03-15 12:00:30+00');
SELECT stored, amount, balance, available FROM metering.commit_reservation(:'k4', regress.tok('c4', 20, "time" => '2024-03-15T12:00:30Z'));
SELECT metering.release_reservation(:'k5') AS released;

-- reservations are immutable but for one transition, and kept
SELECT regress.err(format('UPDATE metering.reservations SET amount = 1 WHERE id = %L', :'k4'));
SELECT regress.err_id(format('UPDATE metering.reservations SET released_at = now() WHERE id = %L', :'k4'));
SELECT regress.err_id(format('DELETE FROM metering.reservations WHERE id = %L', :'k4'));

-- consume: check and record in one call
SET metering.now = '2024-03-15 13:00:00+00';
SELECT balance, reserved, available FROM metering.entitlement_value('acme', 'llm');
SELECT granted, stored, amount, available FROM metering.consume(regress.tok('u1', 30, "time" => '2024-03-15T12:30:00Z'), 'llm');
SELECT granted, stored, amount, available FROM metering.consume(regress.tok('u2', 30, "time" => '2024-03-15T12:30:00Z'), 'llm');
-- a repeat of a stored event: granted, not stored, nothing consumed again
SELECT granted, stored, amount, available FROM metering.consume(regress.tok('u1', 30, "time" => '2024-03-15T12:30:00Z'), 'llm');
SELECT count(*) AS stored FROM metering.events WHERE id IN ('u1', 'u2');
SELECT balance, usage, reserved, available FROM metering.entitlement_value('acme', 'llm');
-- release the big holds: the balance is free again
SELECT metering.release_reservation(id) FROM metering.reservations
 WHERE entitlement_id = :'e' AND committed_at IS NULL AND released_at IS NULL ORDER BY amount;
SELECT granted, stored, amount, available FROM metering.consume(regress.tok('u3', 440, "time" => '2024-03-15T12:30:00Z'), 'llm');
SELECT granted, stored, amount, available FROM metering.consume(regress.tok('u4', 1, "time" => '2024-03-15T12:30:00Z'), 'llm');
SELECT granted, stored, amount, available FROM metering.consume(regress.tok('u4', 0, "time" => '2024-03-15T12:30:00Z'), 'llm');
-- a repeat whose usage is more than is left: still granted, and nothing stored or consumed
SELECT granted, stored, amount, available FROM metering.consume(regress.tok('u2', 500, "time" => '2024-03-15T12:30:00Z'), 'llm');
-- the same event twice in one statement, the second more than is left: a repeat (granted, not stored)
SELECT n, c.* FROM generate_series(1, 2) n,
  LATERAL metering.consume(regress.tok('u5', 200 + 0 * n, "time" => '2024-03-15T12:30:00Z'), 'llm') c;
-- usage dated ahead of now: the check reads there, and the holds made now still count
SELECT metering.create_entitlement('ahead', 'llm', usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                   measure_usage_from => '2024-03-01') AS e_ahead \gset
SELECT metering.create_grant(:'e_ahead', 500, '2024-03-01') IS NOT NULL AS grant;
SELECT granted, stored, amount, available
  FROM metering.consume(regress.tok('f1', 1, subject => 'ahead', "time" => '2024-03-15T14:00:00Z'), 'llm');
SELECT granted, available FROM metering.reserve('ahead', 'llm', 400);
SELECT granted, available FROM metering.reserve('ahead', 'llm', 400);
SELECT granted, stored, available
  FROM metering.consume(regress.tok('f2', 300, subject => 'ahead', "time" => '2024-03-15T12:30:00Z'), 'llm');
SELECT balance, reserved, available FROM metering.entitlement_value('ahead', 'llm');
SELECT balance, reserved, available FROM metering.entitlement_value('ahead', 'llm', '2024-03-15 14:00:01+00');
-- COUNT: every event is 1; a soft limit goes into overage
SELECT n, c.* FROM generate_series(1, 3) n,
  LATERAL metering.consume(regress.ev('a' || n, 'acme', 'api.call', '2024-03-15T12:30:00Z'), 'api') c;
SELECT balance, usage, overage FROM metering.entitlement_value('acme', 'api');
-- boolean: granted and stored while there is access
SELECT granted, stored, amount, available FROM metering.consume(regress.ev('s1', 'acme', 'login', '2024-03-15T12:30:00Z'), 'sso');
-- no entitlement: denied, nothing stored
SELECT granted, stored, amount, available FROM metering.consume(regress.tok('n1', 1, subject => 'nobody'), 'llm');
SELECT count(*) AS stored FROM metering.events WHERE id = 'n1';
SELECT regress.err(s) FROM unnest(ARRAY[
  'SELECT metering.consume(NULL, ''llm'')',
  format('SELECT metering.consume(%L, NULL)', regress.tok('x', 1)),
  format('SELECT metering.consume(%L, ''gpt4'')', regress.tok('x', 1, model => 'claude')),
  format('SELECT metering.consume(%L, ''llm'')', regress.ev('x', 'acme', 'api.call', '2024-03-15T12:30:00Z')),
  'SELECT metering.consume(''{"specversion": "1.0"}'', ''llm'')']) s;

-- a deleted entitlement gives nothing
SELECT metering.delete_entitlement(:'e_gpt4');
SELECT granted, reservation_id FROM metering.reserve('acme', 'gpt4', 1);
SELECT granted, stored FROM metering.consume(regress.tok('d1', 1), 'gpt4');

-- Alerts: rules are validated, naming the field
SELECT regress.err(format('INSERT INTO metering.notification_rules (name, feature_key, thresholds, channel) VALUES (%s)', v))
  FROM unnest(ARRAY[
    'NULL, NULL, ''[{"type": "USAGE_VALUE", "value": 1}]'', DEFAULT',
    '''r'', ''nothing'', ''[{"type": "USAGE_VALUE", "value": 1}]'', DEFAULT',
    '''r'', NULL, ''[]'', DEFAULT',
    '''r'', NULL, ''{"type": "USAGE_VALUE"}'', DEFAULT',
    '''r'', NULL, ''[{"type": "USAGE", "value": 1}]'', DEFAULT',
    '''r'', NULL, ''[{"type": "USAGE_PERCENT", "value": "80"}]'', DEFAULT',
    '''r'', NULL, ''[{"type": "USAGE_PERCENT", "value": 0}]'', DEFAULT',
    '''r'', NULL, ''[{"type": "USAGE_VALUE", "value": 1, "x": 2}]'', DEFAULT',
    '''r'', NULL, ''[{"type": "USAGE_VALUE", "value": 1}]'', ''''']) v;

SET metering.now = '2024-03-15 14:00:00+00';
SELECT metering.create_entitlement('beta', 'llm', usage_period => '1 day', usage_period_anchor => '2024-03-15',
                                   measure_usage_from => '2024-03-15', issue_after_reset => 1000) AS eb \gset
INSERT INTO metering.notification_rules (name, feature_key, thresholds)
VALUES ('llm 80%', 'llm', '[{"type": "USAGE_PERCENT", "value": 80}, {"type": "BALANCE_VALUE", "value": 0}]'),
       ('big', NULL, '[{"type": "USAGE_VALUE", "value": 900}]');
-- below the thresholds: nothing
SELECT metering.ingest(regress.tok('b1', 700, subject => 'beta', "time" => '2024-03-15T13:30:00Z'));
SELECT count(*) AS notifications FROM metering.notification_events;
-- a batch crosses 80%: one evaluation, one notification
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.tok('b2', 60, subject => 'beta', "time" => '2024-03-15T13:30:00Z'),
  regress.tok('b3', 60, subject => 'beta', "time" => '2024-03-15T13:30:00Z')));
SELECT r.name, n.subject, n.feature_key, n.kind, n.threshold, n.period_start, n.usage, n.balance, n.total_available_grant_amount
  FROM metering.notification_events n JOIN metering.notification_rules r ON r.id = n.rule_id ORDER BY n.seq;
-- more usage past the same threshold: no second notification; a plain INSERT counts as ingest does
INSERT INTO metering.events (id, source, subject, type, time, data)
VALUES ('b4', 'test', 'beta', 'llm.tokens', '2024-03-15T13:30:00Z', '{"tokens": 100, "model": "x"}');
SELECT r.name, n.kind, n.threshold->>'type' AS type, n.usage FROM metering.notification_events n
  JOIN metering.notification_rules r ON r.id = n.rule_id ORDER BY n.seq;
-- a grant takes 80% back across (usage >= 900 stays): resolved
SELECT metering.create_grant(:'eb', 1000, '2024-03-15 14:00') AS gb2 \gset
SELECT r.name, n.kind, n.threshold->>'type' AS type, n.usage, n.total_available_grant_amount
  FROM metering.notification_events n JOIN metering.notification_rules r ON r.id = n.rule_id ORDER BY n.seq;
-- voiding it crosses again
SELECT metering.void_grant(:'gb2');
SELECT r.name, n.kind, n.threshold->>'type' AS type, n.usage
  FROM metering.notification_events n JOIN metering.notification_rules r ON r.id = n.rule_id ORDER BY n.seq;
-- a consume that empties the balance: BALANCE_VALUE 0
SELECT granted, stored, available FROM metering.consume(regress.tok('b5', 80, subject => 'beta', "time" => '2024-03-15T13:30:00Z'), 'llm');
SELECT n.kind, n.threshold->>'type' AS type, n.usage, n.balance FROM metering.notification_events n ORDER BY n.seq DESC LIMIT 1;
-- a reset takes every threshold back across
SELECT metering.reset_entitlement(:'eb');
SELECT r.name, n.kind, n.threshold->>'type' AS type, n.period_start, n.usage
  FROM metering.notification_events n JOIN metering.notification_rules r ON r.id = n.rule_id ORDER BY n.seq DESC LIMIT 3;
-- crossing again in the same period notifies again
SELECT metering.ingest(regress.tok('b6', 950, subject => 'beta', "time" => '2024-03-15T14:30:00Z'));
SELECT r.name, n.kind, n.threshold->>'type' AS type, n.period_start, n.usage
  FROM metering.notification_events n JOIN metering.notification_rules r ON r.id = n.rule_id
 WHERE n.period_start = '2024-03-15 14:00+00' AND n.created_at >= '2024-03-15 14:00+00' ORDER BY n.seq DESC LIMIT 2;
-- a new period re-arms: its first crossing notifies, with no resolution before it
SET metering.now = '2024-03-16 15:00:00+00';
SELECT metering.ingest(regress.tok('b7', 950, subject => 'beta', "time" => '2024-03-16T14:30:00Z'));
SELECT r.name, n.kind, n.threshold->>'type' AS type, n.period_start, n.usage
  FROM metering.notification_events n JOIN metering.notification_rules r ON r.id = n.rule_id
 WHERE n.period_start >= '2024-03-16' ORDER BY n.seq;
-- a disabled rule is silent; events of subjects without a covered entitlement pay nothing
UPDATE metering.notification_rules SET disabled_at = now();
SELECT count(*) AS notifications FROM metering.notification_events \gset
SELECT metering.ingest(regress.tok('b8', 100, subject => 'beta', "time" => '2024-03-16T14:40:00Z'));
SELECT metering.reset_entitlement(:'eb');
SELECT count(*) - :notifications AS new_notifications FROM metering.notification_events;
-- notification events are immutable; a deleted rule is kept
SELECT regress.err('UPDATE metering.notification_events SET usage = 0');
SELECT regress.err('DELETE FROM metering.notification_events');
DELETE FROM metering.notification_rules WHERE name = 'big';
SELECT name, deleted_at IS NOT NULL AS deleted FROM metering.notification_rules ORDER BY name;
-- a rule of one feature, among other subjects' entitlements to it: a batch
-- and single events notify each entitlement that crosses, and only those
UPDATE metering.notification_rules SET disabled_at = NULL WHERE name = 'llm 80%';
SELECT count(metering.create_grant(metering.create_entitlement('g' || i, 'llm', usage_period => '1 day',
                                                               usage_period_anchor => '2024-03-16', measure_usage_from => '2024-03-16'),
                                   100, '2024-03-16')) AS entitlements
  FROM generate_series(1, 4) i;
SELECT count(*) AS llm_entitlements FROM metering.entitlements WHERE feature_key = 'llm' AND deleted_at IS NULL;
SELECT count(*) AS notifications FROM metering.notification_events \gset
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.tok('g1a', 90, subject => 'g1', "time" => '2024-03-16T14:50:00Z'),
  regress.tok('g2a', 10, subject => 'g2', "time" => '2024-03-16T14:50:00Z')));
SELECT metering.ingest(regress.tok('g3a', 85, subject => 'g3', "time" => '2024-03-16T14:50:00Z'));
SELECT metering.ingest(regress.tok('g2b', 5, subject => 'g2', "time" => '2024-03-16T14:51:00Z'));
SELECT n.subject, n.kind, n.threshold->>'type' AS type, n.usage FROM metering.notification_events n
 WHERE n.seq > (SELECT max(seq) FROM (SELECT seq FROM metering.notification_events ORDER BY seq LIMIT :notifications) x)
 ORDER BY n.seq;
UPDATE metering.notification_rules SET disabled_at = now() WHERE name = 'llm 80%';
-- a batch counts toward an entitlement what its feature's meter reads: the
-- events of its group only (gpt4 filters on the model), one per event for
-- a COUNT meter; a batch with no covered subject notifies nobody
SELECT metering.create_entitlement('f1', 'gpt4', usage_period => '1 day', usage_period_anchor => '2024-03-16',
                                   measure_usage_from => '2024-03-16') AS ef \gset
SELECT metering.create_grant(:'ef', 100, '2024-03-16') IS NOT NULL AS grant;
SELECT metering.create_entitlement('f1', 'api', usage_period => '1 day', usage_period_anchor => '2024-03-16',
                                   measure_usage_from => '2024-03-16', is_soft_limit => true) IS NOT NULL AS api;
INSERT INTO metering.notification_rules (name, feature_key, thresholds)
VALUES ('gpt4 50', 'gpt4', '[{"type": "USAGE_VALUE", "value": 50}]'),
       ('api 3', 'api', '[{"type": "USAGE_VALUE", "value": 3}]');
SELECT count(*) AS notifications FROM metering.notification_events \gset
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.tok('f1a', 40, subject => 'f1', "time" => '2024-03-16T14:52:00Z'),
  regress.tok('f1b', 500, subject => 'f1', model => 'claude', "time" => '2024-03-16T14:52:00Z'),
  regress.ev('f1c', 'f1', 'api.call', '2024-03-16T14:52:00Z'),
  regress.ev('f1d', 'f1', 'api.call', '2024-03-16T14:52:00Z')));
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.tok('n1', 500, subject => 'nobody', "time" => '2024-03-16T14:52:00Z'),
  regress.ev('n2', 'nobody', 'api.call', '2024-03-16T14:52:00Z')));
SELECT count(*) - :notifications AS new_notifications FROM metering.notification_events;
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.tok('f1e', 10, subject => 'f1', "time" => '2024-03-16T14:53:00Z'),
  regress.tok('f1f', 500, subject => 'f1', model => 'claude', "time" => '2024-03-16T14:53:00Z'),
  regress.ev('f1g', 'f1', 'api.call', '2024-03-16T14:53:00Z')));
SELECT r.name, n.subject, n.feature_key, n.threshold->>'type' AS type, n.usage FROM metering.notification_events n
  JOIN metering.notification_rules r ON r.id = n.rule_id
 WHERE n.seq > (SELECT max(seq) FROM (SELECT seq FROM metering.notification_events ORDER BY seq LIMIT :notifications) x)
 ORDER BY r.name;
UPDATE metering.notification_rules SET disabled_at = now() WHERE name IN ('gpt4 50', 'api 3');

-- who may: writers hold and consume (as the owner), nobody else; readers see their subjects' holds
SELECT metering.setup_roles();
SELECT granted FROM metering.reserve('beta', 'llm', 1);
CREATE ROLE regress_holds_reader;
CREATE ROLE regress_holds_writer;
CREATE ROLE regress_holds_nobody;
GRANT metering_reader TO regress_holds_reader;
GRANT metering_writer TO regress_holds_writer;
GRANT USAGE ON SCHEMA metering, regress TO regress_holds_reader, regress_holds_writer, regress_holds_nobody;
INSERT INTO metering.subject_access (role_name, subject) VALUES ('regress_holds_reader', 'beta');
SET ROLE regress_holds_reader;
SELECT DISTINCT subject FROM metering.reservations;
SELECT DISTINCT subject FROM metering.notification_events;
SELECT subject, feature, reserved FROM metering.entitlement_status ORDER BY 1, 2;
SELECT regress.err('SELECT metering.reserve(''beta'', ''llm'', 1)');
-- under row security the holds' end stays an index condition (a reader's balance read
-- passes the open holds only, not every hold made)
SET enable_seqscan = off;
SELECT line FROM regress.plan($$SELECT sum(r.amount) FROM metering.reservations r
  WHERE r.entitlement_id = '00000000-0000-0000-0000-000000000000' AND r.created_at <= now()
    AND least(r.expires_at, CASE WHEN r.committed_at IS NOT NULL THEN r.committed_at
                                 WHEN r.released_at IS NOT NULL THEN r.released_at ELSE 'infinity' END) > now()$$) line
 WHERE line ~ 'Index Cond';
RESET enable_seqscan;
RESET ROLE;
SET ROLE regress_holds_writer;
SELECT granted FROM metering.reserve('acme', 'llm', 1);
SELECT granted, stored FROM metering.consume(regress.tok('w1', 1, "time" => '2024-03-16T14:00:00Z'), 'llm');
SELECT regress.err('INSERT INTO metering.reservations (entitlement_id, subject, feature_key, amount, expires_at) SELECT entitlement_id, subject, feature_key, 1, now() FROM metering.reservations LIMIT 1');
SELECT regress.err('INSERT INTO metering.notification_rules (name, thresholds) VALUES (''x'', ''[{"type": "USAGE_VALUE", "value": 1}]'')');
RESET ROLE;
SET ROLE regress_holds_nobody;
SELECT regress.err('SELECT metering.consume(''{}'', ''llm'')');
RESET ROLE;
DELETE FROM metering.subject_access WHERE role_name = 'regress_holds_reader';
REVOKE metering_reader FROM regress_holds_reader;
REVOKE metering_writer FROM regress_holds_writer;
REVOKE USAGE ON SCHEMA metering, regress FROM regress_holds_reader, regress_holds_writer, regress_holds_nobody;
DROP ROLE regress_holds_reader, regress_holds_writer, regress_holds_nobody;
