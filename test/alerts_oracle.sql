-- The alerts of a statement's events (src/alerts_batch.c) against an
-- oracle: the same decisions written as SQL (the implementation before it
-- moved to C), over random batches of events of random subjects, types and
-- values (numbers, numeric strings, negatives, nulls, objects, subjects
-- that differ only by case, spaces or Unicode normalisation) against
-- entitlements to SUM and COUNT features with and without group filters,
-- with rules for one feature, for every feature, disabled and deleted.
-- Each batch runs three ways from the same state, rolled back, and compares
-- what they leave (turns, headrooms, notifications): the oracle, the C
-- function given the events as arrays (a Citus coordinator's writers), and
-- the events' trigger in C reading the statement's rows; then it is applied
-- by one of the three, so that the state (headrooms, crossed thresholds,
-- deleted entitlements, rules switched off and on) moves on.  And one batch
-- of thousands of events whose rows the trigger reads back from disk.
BEGIN;
SELECT plan(7);
SELECT setseed(0.17);
SET LOCAL timezone = 'UTC';
SET LOCAL metering.now = '2024-03-15 12:00:00+00';
-- the calls below are the only evaluations
ALTER TABLE metering.events DISABLE TRIGGER events_alerts;

INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('tokens', 'llm.tokens', 'SUM', '$.tokens', '{"model": "$.model"}'),
       ('calls', 'api.call', 'COUNT', NULL, '{}'),
       ('bytes', 'net.bytes', 'SUM', '$.b', '{"region": "$.r", "tier": "$.t"}'),
       ('calls2', 'llm.tokens', 'COUNT', NULL, '{"model": "$.model"}');
DO $$
BEGIN
  PERFORM metering.create_feature('llm', 'LLM tokens', 'tokens');
  PERFORM metering.create_feature('gpt4', 'GPT-4 tokens', 'tokens', '{"model": "gpt-4"}');
  PERFORM metering.create_feature('api', 'API calls', 'calls');
  PERFORM metering.create_feature('eu', 'EU bytes', 'bytes', '{"region": "eu"}');
  PERFORM metering.create_feature('gpt4calls', 'GPT-4 calls', 'calls2', '{"model": "gpt-4"}');
  PERFORM metering.create_feature('sso', 'SSO');
END $$;
DO $$
DECLARE
  s int;
  f text;
  e uuid;
BEGIN
  FOR s IN 1..12 LOOP
    FOREACH f IN ARRAY ARRAY['llm', 'gpt4', 'api', 'eu', 'gpt4calls'] LOOP
      IF random() < 0.7 THEN
        e := metering.create_entitlement('s' || s, f, usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                         measure_usage_from => '2024-03-01', is_soft_limit => random() < 0.3);
        PERFORM metering.create_grant(e, (50 + floor(random() * 400))::numeric, '2024-03-01');
      END IF;
    END LOOP;
    IF random() < 0.5 THEN
      PERFORM metering.create_entitlement('s' || s, 'sso', 'boolean');
    END IF;
  END LOOP;
END $$;
-- subjects that differ from others only by case, a space or Unicode normalisation
SELECT count(metering.create_entitlement(x, 'llm', usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                         measure_usage_from => '2024-03-01')) = 4 AS lookalikes
  FROM unnest(ARRAY['S1', 's1 ', U&'\00E9', U&'e\0301']) x \gset
INSERT INTO metering.notification_rules (name, feature_key, thresholds)
VALUES ('all', NULL, '[{"type": "USAGE_PERCENT", "value": 50}, {"type": "USAGE_VALUE", "value": 100}, {"type": "BALANCE_VALUE", "value": 20}]'),
       ('gpt4', 'gpt4', '[{"type": "USAGE_PERCENT", "value": 30}]'),
       ('eu', 'eu', '[{"type": "USAGE_VALUE", "value": 40}]'),
       ('off', 'api', '[{"type": "USAGE_VALUE", "value": 1}]'),
       ('gone', 'llm', '[{"type": "USAGE_VALUE", "value": 1}]');
UPDATE metering.notification_rules SET disabled_at = metering.now() WHERE name = 'off';
DELETE FROM metering.notification_rules WHERE name = 'gone';

-- the oracle
CREATE FUNCTION pg_temp.oracle(subjects text[], types text[], times timestamptz[], datas jsonb[])
  RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  x record;
  every boolean;
  covered uuid[];
  -- the covered entitlements of the events' subjects, and their meters
  ids uuid[];
  owners text[];
  event_types text[];
  filters jsonb[];
  group_bys jsonb[];
  counts boolean[];
  paths jsonpath[];
BEGIN
  -- the features the live rules cover, once (nothing more when none is live)
  SELECT bool_or(r.feature_key IS NULL), array_agg(f.id) INTO every, covered
    FROM metering.notification_rules r LEFT JOIN metering.features f ON f.key = r.feature_key
   WHERE r.disabled_at IS NULL AND r.deleted_at IS NULL;
  IF every IS NULL THEN
    RETURN;
  END IF;
  SELECT array_agg(e.id), array_agg(e.subject), array_agg(m.event_type), array_agg(f.meter_group_by_filters),
         array_agg(m.group_by), array_agg(m.aggregation = 'COUNT'), array_agg(m.value_property)
    INTO ids, owners, event_types, filters, group_bys, counts, paths
    FROM metering.entitlements e
    JOIN metering.features f ON f.id = e.feature_id
    JOIN metering.meters m ON m.slug = f.meter_slug
   WHERE e.subject IN (SELECT unnest(subjects)) AND e.deleted_at IS NULL AND e.type = 'metered'
     AND (every OR e.feature_id = ANY (covered));
  IF ids IS NULL THEN
    RETURN;
  END IF;
  -- each event's amount for each of those entitlements its subject and type reach
  FOR x IN
    WITH usage AS (
      SELECT c.id, c.subject, n.time,
             CASE WHEN c.filters IS NOT NULL AND NOT metering._meter_groups(n.data, c.group_by) @> c.filters THEN 0
                  WHEN c.counts THEN 1
                  ELSE greatest(coalesce(metering._meter_number(n.data, c.path), 0), 0) END AS amount
        FROM unnest(subjects, types, times, datas) AS n(subject, type, "time", data)
        JOIN unnest(ids, owners, event_types, filters, group_bys, counts, paths)
               AS c(id, subject, type, filters, group_by, counts, path)
          ON c.subject = n.subject AND c.type = n.type)
    INSERT INTO metering.entitlement_turns AS t (entitlement_id, subject, purpose, turns, usage_until, armed_from, armed_until, headroom)
    SELECT u.id, u.subject, 'a', 1, max(u.time), w.armed_from, w.armed_until,
           -- (the usage in the window, carried to the update as the new row's headroom)
           CASE WHEN w.armed_from IS NOT NULL
                THEN coalesce(sum(u.amount) FILTER (WHERE u.time >= w.armed_from AND u.time < w.armed_until), 0) END
      FROM usage u
      LEFT JOIN metering.entitlement_turns w ON w.entitlement_id = u.id AND w.purpose = 'a'
     GROUP BY u.id, u.subject, w.armed_from, w.armed_until ORDER BY u.id
    ON CONFLICT ON CONSTRAINT entitlement_turns_pkey
    DO UPDATE SET turns = t.turns + 1, usage_until = greatest(t.usage_until, excluded.usage_until),
                  headroom = CASE WHEN t.armed_from = excluded.armed_from AND t.armed_until = excluded.armed_until
                                       AND t.headroom > excluded.headroom
                                       AND t.armed_from <= now AND now < t.armed_until
                                       AND greatest(t.usage_until, excluded.usage_until) < t.armed_until
                                  THEN t.headroom - excluded.headroom END
    RETURNING t.entitlement_id, t.subject, t.usage_until, t.headroom
  LOOP
    IF x.headroom IS NULL THEN
      -- usage only grows: events cross thresholds, they never take one back
      PERFORM metering._evaluate_alerts(x.entitlement_id, x.subject, x.usage_until, false);
    END IF;
  END LOOP;
END $$;

-- what a batch leaves behind
CREATE FUNCTION pg_temp.digest() RETURNS text LANGUAGE sql AS $$
  SELECT coalesce((SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s', entitlement_id, purpose, turns, usage_until,
                                            armed_from, armed_until, headroom), ';' ORDER BY entitlement_id, purpose)
                     FROM metering.entitlement_turns), '')
      || '##' ||
      coalesce((SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s', r.name, n.entitlement_id, n.kind, n.threshold, n.usage,
                                         n.balance, n.period_start), ';'
                                  ORDER BY r.name, n.entitlement_id, n.kind, n.threshold::text, n.seq)
                  FROM metering.notification_events n JOIN metering.notification_rules r ON r.id = n.rule_id), '')
$$;
CREATE FUNCTION pg_temp.batch(OUT subjects text[], OUT types text[], OUT times timestamptz[], OUT datas jsonb[])
LANGUAGE sql AS $$
  WITH ev AS (
    SELECT (ARRAY['s1', 's2', 's3', 's4', 's5', 's6', 's7', 's8', 's9', 's10', 's11', 's12', 'S1', 's1 ',
                  U&'\00E9', U&'e\0301', 'nobody'])[1 + floor(random() * 17)::int] AS subject,
           (ARRAY['llm.tokens', 'api.call', 'net.bytes', 'other', 'LLM.TOKENS'])[1 + floor(random() * 5)::int] AS type,
           '2024-02-25'::timestamptz + random() * interval '25 days' AS time,
           jsonb_strip_nulls(jsonb_build_object(
             'tokens', (ARRAY[to_jsonb(floor(random() * 30)), to_jsonb(-5), to_jsonb('7'::text), to_jsonb('x'::text),
                              'null'::jsonb, to_jsonb(2.5), '{"a": 1}'::jsonb, NULL, to_jsonb('1e2'::text),
                              to_jsonb(' 3'::text)])[1 + floor(random() * 10)::int],
             'model', (ARRAY[to_jsonb('gpt-4'::text), to_jsonb('gpt-3'::text), to_jsonb(4), NULL])[1 + floor(random() * 4)::int],
             'b', (ARRAY[to_jsonb(floor(random() * 20)), to_jsonb('12'::text), NULL])[1 + floor(random() * 3)::int],
             'r', (ARRAY[to_jsonb('eu'::text), to_jsonb('us'::text), NULL])[1 + floor(random() * 3)::int],
             't', (ARRAY[to_jsonb('gold'::text), NULL])[1 + floor(random() * 2)::int])) AS data
      FROM generate_series(1, 1 + floor(random() * 40)::int))
  SELECT array_agg(subject), array_agg(type), array_agg(time), array_agg(data) FROM ev
$$;
-- stores a batch and evaluates it one way (0: the oracle, 1: _alerts_for_events,
-- 2: the events' trigger); with undo, rolls it back and returns what it left
CREATE FUNCTION pg_temp.run(way int, b record, trial int, undo boolean) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  left_behind text;
BEGIN
  IF way = 2 THEN
    ALTER TABLE metering.events ENABLE TRIGGER events_alerts;
  END IF;
  INSERT INTO metering.events (id, source, subject, type, time, data)
  SELECT 't' || trial || '-' || i, 'oracle', b.subjects[i], b.types[i], b.times[i], b.datas[i]
    FROM generate_subscripts(b.subjects, 1) i;
  IF way = 0 THEN
    PERFORM pg_temp.oracle(b.subjects, b.types, b.times, b.datas);
  ELSIF way = 1 THEN
    PERFORM metering._alerts_for_events(b.subjects, b.types, b.times, b.datas);
  ELSE
    ALTER TABLE metering.events DISABLE TRIGGER events_alerts;
  END IF;
  IF NOT undo THEN
    RETURN NULL;
  END IF;
  left_behind := pg_temp.digest();
  RAISE EXCEPTION USING ERRCODE = 'P0004';
EXCEPTION WHEN assert_failure THEN
  RETURN left_behind;
END $$;

CREATE TEMP TABLE trials (trial int, same boolean, same_trigger boolean, notified bigint);
DO $$
DECLARE
  b record;
  before bigint;
  oracle text;
BEGIN
  FOR i IN 1..300 LOOP
    IF i = 150 THEN
      UPDATE metering.notification_rules SET disabled_at = metering.now() WHERE name = 'all';
    ELSIF i = 200 THEN
      UPDATE metering.notification_rules SET disabled_at = NULL WHERE name = 'all';
      PERFORM metering.delete_entitlement(e.id) FROM metering.entitlements e WHERE e.subject = 's2' AND e.deleted_at IS NULL;
    END IF;
    b := pg_temp.batch();
    before := (SELECT count(*) FROM metering.notification_events);
    oracle := pg_temp.run(0, b, i, true);
    INSERT INTO trials
    VALUES (i, pg_temp.run(1, b, i, true) IS NOT DISTINCT FROM oracle,
            pg_temp.run(2, b, i, true) IS NOT DISTINCT FROM oracle, 0);
    PERFORM pg_temp.run(i % 3, b, i, false);
    UPDATE trials SET notified = (SELECT count(*) FROM metering.notification_events) - before WHERE trial = i;
  END LOOP;
END $$;

SELECT is((SELECT count(*) FILTER (WHERE NOT same) FROM trials), 0::bigint,
          '300 random batches: the alerts in C leave what the SQL oracle leaves (turns, headroom, notifications)');
SELECT is((SELECT count(*) FILTER (WHERE NOT same_trigger) FROM trials), 0::bigint,
          '300 random batches: the events'' trigger leaves what the SQL oracle leaves');
-- a statement of 3,000 events: its rows (about 1 MB) are more than the
-- transition table keeps in memory at work_mem 64kB, and are read from disk twice
SET LOCAL work_mem = '64kB';
CREATE TEMP TABLE big AS
SELECT array_agg(s) AS subjects, array_agg(CASE WHEN n % 3 = 0 THEN 'api.call' ELSE 'llm.tokens' END) AS types,
       array_agg(timestamptz '2024-03-10' + n * interval '1 second') AS times,
       array_agg(jsonb_build_object('tokens', n % 7, 'model', 'gpt-4', 'pad', repeat('x', 300))) AS datas
  FROM generate_series(1, 3000) n, LATERAL (SELECT 's' || (1 + n % 12) AS s) x;
-- with two other triggers reading the same rows, one firing before the alerts' and one after
CREATE TEMP TABLE seen (who text, n bigint);
CREATE FUNCTION pg_temp.count_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO seen SELECT TG_NAME, count(*) FROM new_events;
  RETURN NULL;
END $$;
CREATE TRIGGER aa_count AFTER INSERT ON metering.events REFERENCING NEW TABLE AS new_events
  FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.count_rows();
CREATE TRIGGER zz_count AFTER INSERT ON metering.events REFERENCING NEW TABLE AS new_events
  FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.count_rows();
SELECT is((SELECT pg_temp.run(2, b, 9999, true) FROM big b), (SELECT pg_temp.run(0, b, 9999, true) FROM big b),
          'a statement of 3,000 events read back from disk: the trigger leaves what the oracle leaves');
TRUNCATE seen;
ALTER TABLE metering.events ENABLE TRIGGER events_alerts;
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'seen' || i, 'oracle', b.subjects[i], b.types[i], b.times[i], b.datas[i]
  FROM big b, generate_subscripts(b.subjects, 1) i;
ALTER TABLE metering.events DISABLE TRIGGER events_alerts;
SELECT is((SELECT string_agg(who || ' ' || n, ', ' ORDER BY who) FROM seen), 'aa_count 3000, zz_count 3000',
          'the triggers before and after the alerts'' read every row of the statement');
DROP TRIGGER aa_count ON metering.events;
DROP TRIGGER zz_count ON metering.events;
RESET work_mem;
-- and the batches reached what they should have: not a comparison of two no-ops
SELECT cmp_ok((SELECT count(*) FROM trials WHERE notified > 0), '>=', 20::bigint, 'batches that sent notifications');
SELECT cmp_ok((SELECT count(*) FROM metering.entitlement_turns WHERE purpose = 'a' AND headroom IS NOT NULL), '>=', 10::bigint,
              'entitlements with headroom, taken by later batches');
SELECT cmp_ok((SELECT count(DISTINCT r.name) FROM metering.notification_events n
                 JOIN metering.notification_rules r ON r.id = n.rule_id), '=', 3::bigint,
              'notifications of the three live rules, none of the disabled or deleted one');
ROLLBACK;
