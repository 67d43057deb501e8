-- metering.consume in C (src/consume.c, through the gate of src/gate.c)
-- against an oracle: the plpgsql consume it replaced and the plpgsql
-- helpers that one called (_active_entitlement, _event_usage,
-- _lock_entitlement, _take_turn, _check_instant, as they were before
-- b3d56f9), kept here in the schema oracle.  They share with the C only
-- what did not change: entitlement_value, _parse_events, _store_events,
-- _period_bound and _unchanged_since_snapshot (and the meter readers the old
-- _event_usage called, _meter_number and _meter_groups).
-- Each of 300 random calls (events of lookalike subjects, of the wrong type
-- or group, repeats of stored events, usage beyond what is left, negative,
-- missing and string values, times ahead of metering.now(), malformed
-- events, NULL arguments; features by key and by entitlement id, against
-- metered soft and hard limits with SUM and COUNT meters and group filters,
-- boolean and static entitlements, deleted ones, grants that run out and
-- holds) runs both ways from the same state, rolled back, and compares the
-- answer (or the error's SQLSTATE and message) and what it leaves (the
-- events, the turns, entitlement_value); then one of the two applies it, so
-- that the state moves on.  The clock moves through three instants: midday,
-- the end of a day and the end of the month.  One rule changed on purpose
-- after the old plpgsql (the holds a check counts with usage dated ahead,
-- see o_holds below): a call may differ from the old oracle only where the
-- old oracle with that rule answers as the C.  Mutants of the oracle, each
-- with one rule changed, must differ from the C.
BEGIN;
SELECT plan(17);
SELECT setseed(0.29);
SET LOCAL timezone = 'UTC';
SET LOCAL metering.now = '2024-03-01 00:00:00+00';

CREATE FUNCTION pg_temp.pick(a anyarray) RETURNS anyelement LANGUAGE sql VOLATILE AS $$
  SELECT a[1 + floor(random() * cardinality(a))::int]
$$;
CREATE FUNCTION pg_temp.rfc(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;
CREATE FUNCTION pg_temp.ev(id text, source text, subject text, type text, "time" timestamptz, data jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('specversion', '1.0', 'id', id, 'source', source, 'subject', subject, 'type', type,
                            'time', pg_temp.rfc("time"), 'data', data)
$$;

-- the oracle: the plpgsql of b3d56f9~1 (src/sql/34_holds.sql and, for
-- _lock_entitlement, src/sql/32_grants.sql), renamed into the schema oracle
CREATE SCHEMA oracle;

CREATE FUNCTION oracle._lock_entitlement(entitlement uuid) RETURNS metering.entitlements
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  e metering.entitlements;
BEGIN
  SELECT * INTO e FROM metering.entitlements WHERE id = entitlement FOR NO KEY UPDATE;
  -- once the lock is ours: whoever held it before us has committed
  IF FOUND THEN
    PERFORM metering._unchanged_since_snapshot(entitlement, e.subject);
  END IF;
  RETURN e;
END $$;

CREATE FUNCTION oracle._active_entitlement(subject text, feature text, at timestamptz)
  RETURNS metering.entitlements
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r metering.entitlements;
BEGIN
  SELECT e.* INTO r FROM metering.entitlements e
   WHERE e.subject = _active_entitlement.subject
     AND (e.feature_key = _active_entitlement.feature OR e.id::text = lower(_active_entitlement.feature))
     AND CASE WHEN e.type = 'metered' THEN e.measure_usage_from ELSE e.created_at END <= _active_entitlement.at
     AND (e.deleted_at IS NULL OR _active_entitlement.at < e.deleted_at)
   ORDER BY e.created_at DESC LIMIT 1;
  RETURN r;
END $$;

CREATE FUNCTION oracle._take_turn(entitlement uuid, subject text, purpose "char", usage_time timestamptz) RETURNS timestamptz
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  until timestamptz;
BEGIN
  INSERT INTO metering.entitlement_turns AS t (entitlement_id, subject, purpose, turns, usage_until)
  VALUES (_take_turn.entitlement, _take_turn.subject, _take_turn.purpose, 1, _take_turn.usage_time)
  ON CONFLICT ON CONSTRAINT entitlement_turns_pkey
  DO UPDATE SET turns = t.turns + 1, usage_until = greatest(t.usage_until, excluded.usage_until)
  RETURNING t.usage_until INTO until;
  RETURN until;
END $$;

CREATE FUNCTION oracle._check_instant(e metering.entitlements, now timestamptz, usage_until timestamptz)
  RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN CASE WHEN e.type <> 'metered' THEN now
              WHEN usage_until IS NULL OR usage_until <= now THEN now + interval '1 microsecond'
              -- anchors and resets are whole UTC minutes: with a period of whole minutes
              -- no bound lies between two instants of one minute
              WHEN date_part('second', e.usage_period) = 0
                   AND date_trunc('minute', usage_until + interval '1 microsecond', 'UTC') = date_trunc('minute', now, 'UTC')
                THEN usage_until + interval '1 microsecond'
              ELSE least(usage_until + interval '1 microsecond',
                         metering._period_bound(e.id, e.subject, now, true) - interval '1 microsecond') END;
END $$;

CREATE FUNCTION oracle._event_usage(e metering.entitlements, subject text, type text, data jsonb, what text)
  RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  f metering.features;
  m metering.meters;
BEGIN
  IF _event_usage.subject IS DISTINCT FROM e.subject THEN
    RAISE EXCEPTION 'event subject "%" is not the subject of the %: "%"', _event_usage.subject, what, e.subject
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT * INTO f FROM metering.features WHERE id = e.feature_id;
  IF f.meter_slug IS NULL THEN
    RETURN NULL;
  END IF;
  SELECT * INTO m FROM metering.meters WHERE slug = f.meter_slug;
  IF _event_usage.type IS DISTINCT FROM m.event_type THEN
    RAISE EXCEPTION 'event type "%" is not the type of the events of meter "%" of feature "%": "%"',
      _event_usage.type, m.slug, f.key, m.event_type USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF f.meter_group_by_filters IS NOT NULL
     AND NOT metering._meter_groups(data, m.group_by) @> f.meter_group_by_filters THEN
    RAISE EXCEPTION 'event data does not pass the group filters of feature "%": %', f.key, f.meter_group_by_filters
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF m.aggregation = 'COUNT' THEN
    RETURN 1;
  END IF;
  -- as the entitlement counts it: negative values (corrections) are not usage
  RETURN greatest(coalesce(metering._meter_number(data, m.value_property), 0), 0);
END $$;

CREATE FUNCTION oracle.consume(event jsonb, feature text)
  RETURNS TABLE(granted boolean, stored boolean, amount numeric, available numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  e metering.entitlements;
  p record;
  usage numeric;
  v record;
  ok boolean;
  n bigint;
  at timestamptz;
BEGIN
  IF event IS NULL OR feature IS NULL THEN
    RAISE EXCEPTION 'consume: % must not be NULL', CASE WHEN event IS NULL THEN 'event' ELSE 'feature' END
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT * INTO p FROM metering._parse_events(event, false);
  e := oracle._active_entitlement(p.subject, feature, now);
  IF e.id IS NULL THEN
    RETURN QUERY SELECT false, false, NULL::numeric, NULL::numeric;
    RETURN;
  END IF;
  usage := oracle._event_usage(e, p.subject, p.type, p.data, 'entitlement');
  e := oracle._lock_entitlement(e.id);
  at := oracle._check_instant(e, now, oracle._take_turn(e.id, e.subject, 'u', greatest(p.time, now)));
  SELECT * INTO v FROM metering.entitlement_value(e.subject, e.id::text, at);
  IF e.deleted_at IS NOT NULL AND e.deleted_at <= now THEN
    ok := false;
  ELSIF e.type = 'metered' THEN
    ok := v.balance IS NOT NULL AND (e.is_soft_limit OR v.available >= usage);
  ELSE
    ok := v.has_access;
  END IF;
  IF NOT ok THEN
    -- a repeat consumes nothing again: granted (where granted, the store finds it a repeat)
    RETURN QUERY SELECT EXISTS (SELECT 1 FROM metering.events x
                                 WHERE x.subject = p.subject AND x.source = p.source AND x.id = p.id),
                        false, usage, v.available;
    RETURN;
  END IF;
  n := metering._store_events(event, false);
  -- what is left once this usage burns (it burns the balance, then becomes overage)
  RETURN QUERY SELECT true, n = 1, usage,
    CASE WHEN e.type = 'metered' THEN greatest(v.balance - CASE WHEN n = 1 THEN usage ELSE 0 END, 0) - v.reserved END;
END $$;

-- Mutants: the oracle copied into schema `name` with one rule changed (the
-- fragment must be there: a mutant that changes nothing would prove nothing)
CREATE FUNCTION pg_temp.mutant(name text, fn text, fragment text, replacement text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  f record;
  def text;
  hits int := 0;
BEGIN
  EXECUTE format('CREATE SCHEMA %I', name);
  FOR f IN SELECT p.oid, p.proname FROM pg_proc p WHERE p.pronamespace = 'oracle'::regnamespace LOOP
    def := replace(pg_get_functiondef(f.oid), 'oracle.', name || '.');
    IF f.proname = fn AND strpos(def, fragment) > 0 THEN
      def := replace(def, fragment, replacement);
      hits := hits + 1;
    END IF;
    EXECUTE def;
  END LOOP;
  RETURN hits = 1;
END $$;
SELECT ok(pg_temp.mutant('m_strict', 'consume', 'v.available >= usage', 'v.available > usage')
          AND pg_temp.mutant('m_turn', 'consume', '''u'', greatest(p.time, now))', '''u'', p.time)')
          AND pg_temp.mutant('m_negative', '_event_usage',
                             'greatest(coalesce(metering._meter_number(data, m.value_property), 0), 0)',
                             'coalesce(metering._meter_number(data, m.value_property), 0)')
          AND pg_temp.mutant('m_period', '_check_instant',
                             'least(usage_until + interval ''1 microsecond'',',
                             'coalesce(usage_until + interval ''1 microsecond'','),
          'four mutants of the oracle: a denial at available = usage, the turn at the event''s time only, '
          'negative values as usage, a check instant not kept within the period');

-- The holds a check counts.  The old consume read entitlement_value at its
-- check instant `at`, which counts the holds active at `at`: with usage
-- dated ahead of now, a hold made now and expiring before `at` did not
-- count, and the usage could take the balance that hold was granted.  The C
-- now counts every hold made by `at` that is still open after now (the
-- working tree's metering._gate_value / EntValueAt(ent, at, now)): a fix,
-- not a regression.  So the comparison also runs the old oracle with that
-- one rule written in SQL (o_holds), and a difference from the old oracle
-- passes only where o_holds answers as the C does.
SELECT ok(pg_temp.mutant('o_holds', 'consume', 'SELECT * INTO v FROM metering.entitlement_value(e.subject, e.id::text, at);',
                         $$SELECT x.has_access, x.balance, x.usage, x.overage, x.total_available_grant_amount,
         x.start_of_period, x.config, h.reserved, x.balance - h.reserved AS available
    INTO v FROM metering.entitlement_value(e.subject, e.id::text, at) x,
         LATERAL (SELECT coalesce(sum(r.amount), 0) AS reserved FROM metering.reservations r
                   WHERE r.entitlement_id = e.id AND r.created_at <= at
                     AND least(r.expires_at, coalesce(r.committed_at, r.released_at, 'infinity')) > now) h;$$),
          'the old oracle with the holds still open at now counted (o_holds)');

-- the state: meters and features
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('tokens', 'llm.tokens', 'SUM', '$.tokens', '{"model": "$.model"}'),
       ('calls', 'api.call', 'COUNT', NULL, '{}'),
       ('bytes', 'net.bytes', 'SUM', '$.b', '{"region": "$.r", "tier": "$.t"}');
DO $$
BEGIN
  PERFORM metering.create_feature('llm', 'LLM tokens', 'tokens');
  PERFORM metering.create_feature('gpt4', 'GPT-4 tokens', 'tokens', '{"model": "gpt-4"}');
  PERFORM metering.create_feature('api', 'API calls', 'calls');
  PERFORM metering.create_feature('eu', 'EU bytes', 'bytes', '{"region": "eu"}');
  PERFORM metering.create_feature('sso', 'SSO');
END $$;
-- entitlements from March 1st: monthly, daily and daily-and-30-seconds
-- periods (bounds off the minute), soft and hard limits, grants small enough
-- to run out, recurring and expiring ones; s7 has a boolean entitlement to
-- the metered feature api, s8 a static one to gpt4 (with its group filter)
DO $$
DECLARE
  s int;
  f text;
  e uuid;
  p interval;
BEGIN
  FOR s IN 1..8 LOOP
    FOREACH f IN ARRAY ARRAY['llm', 'gpt4', 'api', 'eu'] LOOP
      IF (s, f) = (7, 'api') THEN
        PERFORM metering.create_entitlement('s7', 'api', 'boolean');
      ELSIF (s, f) = (8, 'gpt4') THEN
        PERFORM metering.create_entitlement('s8', 'gpt4', 'static', config => '{"model": "gpt-4", "seats": 3}');
      ELSIF random() < 0.8 THEN
        p := pg_temp.pick(ARRAY['1 month', '1 month', '1 day', '1 day', '1 day 30 seconds']::interval[]);
        e := metering.create_entitlement('s' || s, f, usage_period => p, usage_period_anchor => '2024-03-01',
                                         measure_usage_from => '2024-03-01', is_soft_limit => random() < 0.2,
                                         issue_after_reset => CASE WHEN random() < 0.15 THEN 10 END);
        IF random() < 0.85 THEN
          PERFORM metering.create_grant(e, (5 + floor(random() * 35))::numeric, '2024-03-01',
                                        recurrence => CASE WHEN random() < 0.4 THEN p END);
        END IF;
        IF random() < 0.3 THEN
          -- expires at midnight after the 15th
          PERFORM metering.create_grant(e, (5 + floor(random() * 40))::numeric, '2024-03-10', priority => 2,
                                        expiration => '6 days');
        END IF;
      END IF;
    END LOOP;
    IF s = 6 THEN
      PERFORM metering.create_entitlement('s6', 'sso', 'static', config => '{"idp": "okta"}');
    ELSIF random() < 0.6 THEN
      PERFORM metering.create_entitlement('s' || s, 'sso', 'boolean');
    END IF;
  END LOOP;
  -- subjects that differ from s1 only by case or a space, and two spellings of é
  e := metering.create_entitlement('S1', 'llm', usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                   measure_usage_from => '2024-03-01');
  PERFORM metering.create_grant(e, 30, '2024-03-01');
  -- (measured from the 16th: not active at first)
  PERFORM metering.create_entitlement('s1 ', 'api', usage_period => '1 day', usage_period_anchor => '2024-03-01',
                                      measure_usage_from => '2024-03-16', issue_after_reset => 5);
  e := metering.create_entitlement(U&'\00E9', 'llm', usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                   measure_usage_from => '2024-03-01', is_soft_limit => true);
  PERFORM metering.create_grant(e, 10, '2024-03-01');
END $$;
-- usage before the calls, rolled up in part
DO $$
DECLARE
  e record;
  n int := 0;
BEGIN
  FOR e IN SELECT x.subject, m.event_type, x.feature_key FROM metering.entitlements x
             JOIN metering.features f ON f.id = x.feature_id JOIN metering.meters m ON m.slug = f.meter_slug
            ORDER BY x.subject, x.feature_key LOOP
    FOR i IN 1..floor(random() * 4)::int LOOP
      n := n + 1;
      PERFORM metering.ingest(pg_temp.ev('pre-' || n, 'pre', e.subject, e.event_type,
                                         '2024-03-01'::timestamptz + random() * interval '14 days',
                                         jsonb_build_object('tokens', floor(random() * 40), 'model', 'gpt-4',
                                                            'b', floor(random() * 40), 'r', 'eu')));
    END LOOP;
  END LOOP;
END $$;
SET LOCAL metering.now = '2024-03-10 00:00:00+00';
SELECT metering.refresh_rollups() >= 0 AS rolled_up \gset
DO $$
DECLARE
  e uuid;
BEGIN
  -- deleted and made again (the old one with its usage), and deleted for good
  PERFORM metering.delete_entitlement(x.id) FROM metering.entitlements x WHERE x.subject = 's2' AND x.feature_key = 'llm';
  e := metering.create_entitlement('s2', 'llm', usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                   measure_usage_from => '2024-03-10');
  PERFORM metering.create_grant(e, 25, '2024-03-10');
  PERFORM metering.delete_entitlement(x.id) FROM metering.entitlements x WHERE x.subject = 's3' AND x.feature_key = 'gpt4';
END $$;
-- deleted at an instant after the first calls' clock (a clock set back, or a
-- deletion dated ahead): found at now, not at an instant past its deletion
SET LOCAL metering.now = '2024-03-16 00:00:00.25+00';
DO $$
BEGIN
  PERFORM metering.ingest(pg_temp.ev('pre-late', 'pre', 's4', 'api.call', '2024-03-15 18:00:00+00', '{}'));
  PERFORM metering.delete_entitlement(x.id) FROM metering.entitlements x WHERE x.subject = 's4' AND x.feature_key = 'api';
  PERFORM metering.create_entitlement('s4', 'api', usage_period => '1 month', usage_period_anchor => '2024-03-01',
                                      measure_usage_from => '2024-03-16 00:01', issue_after_reset => 3);
END $$;
SET LOCAL metering.now = '2024-03-15 12:00:00+00';
SELECT count(*) > 0 AS snapshots FROM (SELECT metering.refresh_snapshots()) s \gset

-- holds against some metered entitlements (some expire before the later clocks)
CREATE FUNCTION pg_temp.holds(n int) RETURNS bigint LANGUAGE sql AS $$
  SELECT count(*) FILTER (WHERE r.granted) FROM (
    SELECT x.subject, x.feature_key FROM (SELECT * FROM metering.entitlements ORDER BY subject, feature_key OFFSET 0) x
     WHERE x.type = 'metered' AND x.deleted_at IS NULL ORDER BY random() LIMIT n) x,
    LATERAL metering.reserve(x.subject, x.feature_key, (1 + floor(random() * 15))::numeric,
                             pg_temp.pick(ARRAY['1 minute', '30 minutes', '13 hours', '1 day']::interval[])) r
$$;

-- one call: its arguments
CREATE TEMP TABLE pool (n serial, subject text);
INSERT INTO pool (subject) SELECT 's' || s FROM generate_series(1, 8) s, generate_series(1, 3);
INSERT INTO pool (subject) VALUES ('S1'), ('s1 '), (U&'\00E9'), (U&'e\0301'), ('nobody');
CREATE FUNCTION pg_temp.type_of(feature text) RETURNS text LANGUAGE sql AS $$
  SELECT CASE feature WHEN 'llm' THEN 'llm.tokens' WHEN 'gpt4' THEN 'llm.tokens' WHEN 'LLM' THEN 'llm.tokens'
                      WHEN 'api' THEN 'api.call' WHEN 'eu' THEN 'net.bytes'
                      ELSE pg_temp.pick(ARRAY['login', 'llm.tokens']) END
$$;
CREATE FUNCTION pg_temp.call(trial int, OUT event jsonb, OUT feature text, OUT kind text) LANGUAGE plpgsql AS $$
DECLARE
  now timestamptz := metering.now();
  r float8 := random();
  x record;
  who text := (SELECT p.subject FROM (SELECT * FROM pool ORDER BY n OFFSET 0) p ORDER BY random() LIMIT 1);
  key text;
  type text;
  t timestamptz;
  data jsonb;
BEGIN
  -- NULL arguments
  IF r < 0.02 THEN
    kind := 'null';
    feature := pg_temp.pick(ARRAY['llm', NULL]);
    IF feature IS NULL THEN
      event := pg_temp.ev('n' || trial, 'or-a', 's1', 'llm.tokens', now, '{"tokens": 1}');
    END IF;
    RETURN;
  END IF;
  -- malformed events
  IF r < 0.06 THEN
    kind := 'malformed';
    feature := 'llm';
    event := pg_temp.pick(ARRAY[
      '[]', '"event"', '{"specversion": "1.0", "source": "or-a", "subject": "s1", "type": "llm.tokens"}',
      '{"specversion": "0.3", "id": "m1", "source": "or-a", "subject": "s1", "type": "llm.tokens"}',
      '{"specversion": "1.0", "id": "m2", "source": "or-a", "subject": "s1", "type": "llm.tokens", "time": "yesterday"}',
      '{"specversion": "1.0", "id": "m3", "source": "or-a", "subject": "s1", "type": "llm.tokens", "time": 5}',
      '{"specversion": "1.0", "id": "m4", "source": "or-a", "subject": "s1", "type": "llm.tokens", "data": [1]}',
      '{"specversion": "1.0", "id": "m5", "source": "or-a", "subject": "", "type": "llm.tokens"}',
      '{"specversion": "1.0", "id": 7, "source": "or-a", "subject": "s1", "type": "llm.tokens"}']::jsonb[]);
    RETURN;
  END IF;
  -- a repeat of a stored event: as it was, with more usage, or of another subject (the same source and id)
  IF r < 0.24 THEN
    kind := 'repeat';
    SELECT * INTO x FROM (SELECT * FROM metering.events ORDER BY source, id OFFSET 0) e ORDER BY random() LIMIT 1;
    event := pg_temp.ev(x.id, x.source, x.subject, x.type, x.time, x.data);
    IF random() < 0.3 THEN
      event := jsonb_set(event, '{data}', x.data || '{"tokens": 400, "b": 400}');
    END IF;
    IF random() < 0.15 THEN
      event := jsonb_set(event, '{subject}', to_jsonb(who));
    END IF;
    feature := CASE x.type WHEN 'llm.tokens' THEN pg_temp.pick(ARRAY['llm', 'gpt4']) WHEN 'api.call' THEN 'api'
                           WHEN 'net.bytes' THEN 'eu' ELSE 'sso' END;
    RETURN;
  END IF;
  kind := 'new';
  -- the feature: by key (an unknown one, one in another case), or by an entitlement's id
  feature := pg_temp.pick(ARRAY['llm', 'llm', 'llm', 'llm', 'gpt4', 'gpt4', 'gpt4', 'api', 'api', 'api', 'eu', 'eu',
                                'sso', 'sso', 'nothing', 'LLM', '#id', '#id', '#ID', '#other', '#deleted']);
  IF feature LIKE '#%' THEN
    SELECT e.id::text, e.feature_key INTO x
      FROM (SELECT * FROM metering.entitlements ORDER BY subject, feature_key, created_at OFFSET 0) e
     WHERE CASE feature WHEN '#other' THEN true WHEN '#deleted' THEN e.deleted_at IS NOT NULL
                        ELSE e.subject = who END
     ORDER BY random() LIMIT 1;
    feature := CASE WHEN x.id IS NULL THEN 'llm' WHEN feature = '#ID' THEN upper(x.id) ELSE x.id END;
    key := coalesce(x.feature_key, 'llm');
  ELSE
    key := feature;
  END IF;
  -- the type: the feature's meter's, or another
  type := CASE WHEN random() < 0.12 THEN pg_temp.pick(ARRAY['other', 'LLM.TOKENS', 'api.call', 'net.bytes', 'llm.tokens'])
               ELSE pg_temp.type_of(key) END;
  -- the time: lately, ahead of now (within a minute or two, or days), missing, before the usage is measured
  r := random();
  t := CASE WHEN r < 0.45 THEN now - random() * interval '3 hours'
            WHEN r < 0.57 THEN now + random() * interval '90 seconds'
            WHEN r < 0.78 THEN now + random() * interval '2 days'
            WHEN r < 0.82 THEN '2024-02-25'::timestamptz + random() * interval '4 days'
            ELSE now END;
  data := jsonb_strip_nulls(jsonb_build_object(
    'tokens', pg_temp.pick(ARRAY[to_jsonb(floor(random() * 30)), to_jsonb(floor(random() * 30)), to_jsonb(400), to_jsonb(60), to_jsonb(60),
                                 to_jsonb(-5), to_jsonb('7'::text), to_jsonb('x'::text), 'null'::jsonb, to_jsonb(2.5),
                                 '{"a": 1}'::jsonb, NULL, to_jsonb('1e2'::text), to_jsonb(' 3'::text), '-0.0'::jsonb,
                                 '0.000'::jsonb, to_jsonb('-0'::text), to_jsonb(0)]),
    'model', pg_temp.pick(ARRAY[to_jsonb('gpt-4'::text), to_jsonb('gpt-4'::text), to_jsonb('gpt-4'::text),
                                to_jsonb('gpt-3'::text), to_jsonb(4), NULL]),
    'b', pg_temp.pick(ARRAY[to_jsonb(floor(random() * 20)), to_jsonb(400), to_jsonb('12'::text), to_jsonb(-3), NULL]),
    'r', pg_temp.pick(ARRAY[to_jsonb('eu'::text), to_jsonb('eu'::text), to_jsonb('eu'::text), to_jsonb('us'::text), NULL]),
    't', pg_temp.pick(ARRAY[to_jsonb('gold'::text), NULL])));
  event := pg_temp.ev('t' || trial, pg_temp.pick(ARRAY['or-a', 'or-b']), who, type, t, data);
  r := random();
  IF r < 0.08 THEN
    event := event - 'time';
  ELSIF r < 0.1 THEN
    event := jsonb_set(event, '{time}', 'null');
  ELSIF r < 0.13 THEN
    event := event - 'data';
  END IF;
END $$;

-- what a call leaves behind: the events, the turns, and entitlement_value of
-- the entitlement it named (just after now, at the event's time, late in the
-- month and in the next one)
CREATE FUNCTION pg_temp.digest(event jsonb, feature text) RETURNS text LANGUAGE sql AS $$
  SELECT coalesce((SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s', source, id, subject, type, time, data, ingested_at), ';'
                                     ORDER BY source, id)
                     FROM metering.events), '')
      || '##' ||
      coalesce((SELECT string_agg(format('%s|%s|%s|%s', entitlement_id, purpose, turns, usage_until), ';'
                                  ORDER BY entitlement_id, purpose)
                  FROM metering.entitlement_turns), '')
      || '##' ||
      coalesce((SELECT string_agg(format('%s|%s', t, v), ';' ORDER BY t)
                  FROM unnest(ARRAY[metering.now() + interval '1 microsecond', '2024-03-31 23:59:59+00', '2024-04-10 00:00:00+00',
                                    (SELECT p.time + interval '1 microsecond' FROM metering._parse_events(event, false) p)]) t,
                       LATERAL metering.entitlement_value(event->>'subject', feature, t) v
                 WHERE t IS NOT NULL AND event->>'subject' IS NOT NULL AND feature IS NOT NULL), '')
$$;
-- runs one call one way (impl c, or the schema of an oracle); with undo,
-- rolls it back and returns its answer and what it left; an error is its
-- SQLSTATE and message
CREATE FUNCTION pg_temp.run(impl text, event jsonb, feature text, undo boolean) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  answer text;
BEGIN
  IF impl = 'c' THEN
    SELECT format('%s|%s|%s|%s', c.granted, c.stored, c.amount, c.available) INTO answer
      FROM metering.consume(event, feature) c;
  ELSE
    EXECUTE format('SELECT format(''%%s|%%s|%%s|%%s'', c.granted, c.stored, c.amount, c.available) FROM %I.consume($1, $2) c',
                   impl)
       INTO answer USING event, feature;
  END IF;
  IF NOT undo THEN
    RETURN answer;
  END IF;
  answer := answer || '##' || pg_temp.digest(event, feature);
  RAISE EXCEPTION USING ERRCODE = 'P0004';
EXCEPTION
  WHEN assert_failure THEN
    RETURN answer;
  WHEN OTHERS THEN
    RETURN format('error %s: %s', SQLSTATE, SQLERRM);
END $$;

-- whether a call's event is valid and dated after metering.now()
CREATE FUNCTION pg_temp.ahead(event jsonb) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  RETURN (SELECT p.time > metering.now() FROM metering._parse_events(event, false) p);
EXCEPTION WHEN OTHERS THEN
  RETURN NULL;
END $$;
CREATE TEMP TABLE trials (trial int, kind text, event jsonb, feature text, ahead boolean, c text, o text, o_holds text,
                          m_strict text, m_turn text,
                          m_negative text, m_period text);
DO $$
DECLARE
  a record;
  c text;
BEGIN
  PERFORM pg_temp.holds(8);
  FOR i IN 1..300 LOOP
    IF i = 1 THEN
      PERFORM set_config('metering.now', '2024-03-15 12:00:30.25+00', true);
    ELSIF i = 101 THEN
      -- the end of a day: events a few seconds ahead are in the next day's period, or past an expiry
      PERFORM set_config('metering.now', '2024-03-15 23:59:59.5+00', true);
      PERFORM metering.create_grant(e.id, 20, '2024-03-15 00:00') FROM metering.entitlements e
       WHERE e.type = 'metered' AND e.deleted_at IS NULL AND e.usage_period = '1 month' AND e.subject IN ('s3', 's5');
      PERFORM pg_temp.holds(6);
    ELSIF i = 201 THEN
      -- the end of the month, after a reset, and a feature key that moved to a new feature
      PERFORM set_config('metering.now', '2024-03-31 23:59:40+00', true);
      PERFORM metering.reset_entitlement(e.id, '2024-03-31 23:00') FROM metering.entitlements e
       WHERE e.type = 'metered' AND e.deleted_at IS NULL AND e.subject = 's1' AND e.feature_key IN ('llm', 'api');
      PERFORM metering.archive_feature('eu');
      PERFORM metering.create_feature('eu', 'US bytes', 'bytes', '{"region": "us"}');
      PERFORM metering.create_grant(metering.create_entitlement(s, 'eu', usage_period => '1 day',
                                                                usage_period_anchor => '2024-03-01',
                                                                measure_usage_from => '2024-03-31 23:00'),
                                    15, '2024-03-31 23:00')
         FROM unnest(ARRAY['s1', 's2', 's3']) s;
      PERFORM pg_temp.holds(6);
    END IF;
    IF i % 15 = 10 THEN
      PERFORM pg_temp.holds(6);
    END IF;
    a := pg_temp.call(i);
    c := pg_temp.run('c', a.event, a.feature, true);
    INSERT INTO trials
    VALUES (i, a.kind, a.event, a.feature,
            pg_temp.ahead(a.event),
            c, pg_temp.run('oracle', a.event, a.feature, true), pg_temp.run('o_holds', a.event, a.feature, true),
            pg_temp.run('m_strict', a.event, a.feature, true), pg_temp.run('m_turn', a.event, a.feature, true),
            pg_temp.run('m_negative', a.event, a.feature, true), pg_temp.run('m_period', a.event, a.feature, true));
    PERFORM pg_temp.run(CASE WHEN i % 2 = 0 THEN 'oracle' ELSE 'c' END, a.event, a.feature, false);
  END LOOP;
END $$;
CREATE TEMP VIEW outcomes AS
  SELECT t.*, CASE WHEN c LIKE 'error %' THEN 'error'
                   WHEN c LIKE 't|t|%' THEN 'stored'
                   WHEN c LIKE 't|f|%' THEN 'repeat'
                   WHEN c LIKE 'f|f||##%' THEN 'none'
                   WHEN c LIKE 'f|f|%' THEN 'denied' END AS outcome,
         split_part(split_part(c, '##', 1), '|', 4) AS available
    FROM trials t;

SELECT is((SELECT count(*) FILTER (WHERE c IS DISTINCT FROM o AND c IS DISTINCT FROM o_holds) FROM trials), 0::bigint,
          '300 random calls: consume in C answers and leaves what the plpgsql oracle does (or fails with its SQLSTATE and message), '
          'but for the holds it counts (o_holds)');
SELECT diag(format('calls whose answer or state differs from the old oracle: %s; from o_holds: %s',
                   count(*) FILTER (WHERE c IS DISTINCT FROM o), count(*) FILTER (WHERE c IS DISTINCT FROM o_holds)))
  FROM trials;
-- not a comparison of no-ops: every outcome, many times
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE outcome = 'stored'), '>=', 50::bigint, 'granted and stored');
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE outcome = 'repeat'), '>=', 20::bigint,
              'granted, not stored: repeats of stored events');
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE outcome = 'repeat' AND available <> ''
                   AND available::numeric < split_part(c, '|', 3)::numeric), '>=', 5::bigint,
              'repeats granted though their usage is more than is left');
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE outcome = 'denied'), '>=', 15::bigint,
              'denied by the balance (an entitlement found)');
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE outcome = 'none'), '>=', 30::bigint, 'denied: no active entitlement');
SELECT cmp_ok((SELECT count(DISTINCT regexp_replace(c, '"[^"]*"', '', 'g')) FROM outcomes WHERE outcome = 'error'), '>=', 8::bigint,
              'errors of eight kinds or more (wrong type, group filters, NULL arguments, malformed events)');
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE ahead AND outcome IN ('stored', 'repeat')), '>=', 10::bigint,
              'granted events ahead of metering.now()');
SELECT cmp_ok((SELECT count(*) FROM outcomes WHERE outcome = 'stored' AND available = ''), '>=', 8::bigint,
              'granted by boolean and static entitlements');
SELECT cmp_ok((SELECT count(*) FROM metering.entitlements e, metering.entitlement_value(e.subject, e.id::text) v
                WHERE e.deleted_at IS NULL AND v.overage > 0), '>=', 2::bigint, 'soft limits in overage');
SELECT cmp_ok((SELECT count(*) FROM trials WHERE o IS DISTINCT FROM o_holds), '>=', 2::bigint,
              'calls where the holds rule matters (usage dated past the end of a hold open at now)');
-- and the comparison fails for an oracle with one rule changed
SELECT cmp_ok((SELECT count(*) FROM trials WHERE c IS DISTINCT FROM m_strict), '>=', 3::bigint,
              'mutant: denied at available = usage');
SELECT cmp_ok((SELECT count(*) FROM trials WHERE c IS DISTINCT FROM m_turn), '>=', 3::bigint,
              'mutant: the turn taken at the event''s time, not at the later of it and now');
SELECT cmp_ok((SELECT count(*) FROM trials WHERE c IS DISTINCT FROM m_negative), '>=', 3::bigint,
              'mutant: negative values counted as usage');
SELECT cmp_ok((SELECT count(*) FROM trials WHERE c IS DISTINCT FROM m_period), '>=', 3::bigint,
              'mutant: the check instant not kept within the period');
SELECT * FROM finish();
ROLLBACK;
