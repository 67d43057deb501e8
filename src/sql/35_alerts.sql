-- Alerts: threshold rules over metered entitlements, evaluated by the
-- transaction whose write (usage, a grant, a void, a reset) moves an
-- entitlement across a threshold; each crossing is a row of
-- notification_events and a pg_notify on the rule's channel, sent when that
-- transaction commits (and never when it rolls back).

CREATE TABLE metering.notification_rules (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  name        text NOT NULL,
  feature_key text COLLATE "C",
  thresholds  jsonb NOT NULL,
  channel     text NOT NULL DEFAULT 'metering_alerts',
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  disabled_at timestamptz,
  deleted_at  timestamptz
);
CREATE INDEX notification_rules_feature ON metering.notification_rules (feature_key);
COMMENT ON TABLE metering.notification_rules IS
  'alert rules: thresholds of usage or balance of the metered entitlements of a feature (or of all); DELETE sets deleted_at';
COMMENT ON COLUMN metering.notification_rules.id IS 'the rule id (uuid v7)';
COMMENT ON COLUMN metering.notification_rules.name IS 'a name for people';
COMMENT ON COLUMN metering.notification_rules.feature_key IS 'the feature whose entitlements it watches; NULL: every metered feature';
COMMENT ON COLUMN metering.notification_rules.thresholds IS
  'a JSON array of {"type": "USAGE_PERCENT" | "USAGE_VALUE" | "BALANCE_VALUE", "value": n}: usage >= n % of total_available_grant_amount, usage >= n, balance <= n';
COMMENT ON COLUMN metering.notification_rules.channel IS 'the pg_notify channel its notifications are sent on';
COMMENT ON COLUMN metering.notification_rules.created_at IS 'when it was made';
COMMENT ON COLUMN metering.notification_rules.disabled_at IS 'when it was disabled (set to NULL to enable it again)';
COMMENT ON COLUMN metering.notification_rules.deleted_at IS 'when it was deleted';

CREATE TABLE metering.notification_events (
  id             uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  -- (checked at commit, as the entitlements' feature: 31_entitlements.sql)
  rule_id        uuid NOT NULL REFERENCES metering.notification_rules (id) DEFERRABLE INITIALLY DEFERRED,
  entitlement_id uuid NOT NULL REFERENCES metering.entitlements (id),
  subject        text COLLATE "C" NOT NULL,
  feature_key    text COLLATE "C" NOT NULL,
  kind           text NOT NULL,
  threshold      jsonb NOT NULL,
  period_start   timestamptz NOT NULL,
  usage          numeric NOT NULL,
  balance        numeric NOT NULL,
  total_available_grant_amount numeric NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT metering.now(),
  seq            bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME metering.notification_events_seq),
  CONSTRAINT notification_events_kind CHECK (kind IN ('crossed', 'resolved'))
);
CREATE INDEX notification_events_state ON metering.notification_events (entitlement_id, rule_id, seq);
CREATE INDEX notification_events_subject ON metering.notification_events (subject);
COMMENT ON TABLE metering.notification_events IS
  'alerts: an entitlement crossed a threshold of a rule (or went back across it), written by the transaction that moved it and sent with pg_notify(channel, the row as JSON) when it commits';
COMMENT ON SEQUENCE metering.notification_events_seq IS 'numbers notification events in the order they are written';
COMMENT ON COLUMN metering.notification_events.id IS 'the notification id (uuid v7)';
COMMENT ON COLUMN metering.notification_events.rule_id IS 'the rule';
COMMENT ON COLUMN metering.notification_events.entitlement_id IS 'the entitlement';
COMMENT ON COLUMN metering.notification_events.subject IS 'its subject';
COMMENT ON COLUMN metering.notification_events.feature_key IS 'its feature key';
COMMENT ON COLUMN metering.notification_events.kind IS 'crossed (the threshold is reached) or resolved (a grant or a reset took it back across)';
COMMENT ON COLUMN metering.notification_events.threshold IS 'the threshold of the rule, {"type": ..., "value": n}';
COMMENT ON COLUMN metering.notification_events.period_start IS 'the usage period it happened in (a new period re-arms the threshold)';
COMMENT ON COLUMN metering.notification_events.usage IS 'the usage of the period then';
COMMENT ON COLUMN metering.notification_events.balance IS 'the balance then';
COMMENT ON COLUMN metering.notification_events.total_available_grant_amount IS 'the grants'' total of the period then';
COMMENT ON COLUMN metering.notification_events.created_at IS 'when it was written (metering.now())';
COMMENT ON COLUMN metering.notification_events.seq IS 'the order in which notifications were written';

CREATE FUNCTION metering._notification_rules_before_write() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t jsonb;
  i integer := 0;
BEGIN
  IF TG_OP = 'UPDATE' THEN
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
      RAISE EXCEPTION 'notification rule %: id and created_at do not change', OLD.id
        USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF OLD.deleted_at IS NOT NULL THEN
      RAISE EXCEPTION 'notification rule % is deleted', OLD.id USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
  ELSIF NOT metering._restored(format('notification rule %s', coalesce(quote_literal(NEW.name), 'NULL')), NEW.created_at)
        AND NEW.deleted_at IS NOT NULL THEN
    RAISE EXCEPTION 'notification rule: a new rule is not deleted'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.name IS NULL OR btrim(NEW.name) = '' THEN
    RAISE EXCEPTION 'notification rule: name is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.feature_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM metering.features f WHERE f.key = NEW.feature_key) THEN
    RAISE EXCEPTION 'notification rule: feature_key "%" is not the key of a feature', NEW.feature_key
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.channel IS NULL OR NEW.channel = '' OR octet_length(NEW.channel) > 63 THEN
    RAISE EXCEPTION 'notification rule: channel must be a name of 1 to 63 bytes, got "%"', NEW.channel
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.thresholds IS NULL OR jsonb_typeof(NEW.thresholds) <> 'array' OR jsonb_array_length(NEW.thresholds) = 0 THEN
    RAISE EXCEPTION 'notification rule: thresholds must be a non-empty JSON array, got %', coalesce(NEW.thresholds::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR t IN SELECT x FROM jsonb_array_elements(NEW.thresholds) x LOOP
    IF jsonb_typeof(t) <> 'object' OR NOT (t ? 'type') OR NOT (t ? 'value') OR (t - 'type' - 'value') <> '{}' THEN
      RAISE EXCEPTION 'notification rule: thresholds[%] must be an object {"type": ..., "value": n}, got %', i, t
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(t->'type') <> 'string' OR t->>'type' NOT IN ('USAGE_PERCENT', 'USAGE_VALUE', 'BALANCE_VALUE') THEN
      RAISE EXCEPTION 'notification rule: thresholds[%].type must be USAGE_PERCENT, USAGE_VALUE or BALANCE_VALUE, got %', i, t->'type'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(t->'value') <> 'number'
       OR (t->>'type' <> 'BALANCE_VALUE' AND (t->>'value')::numeric <= 0) THEN
      RAISE EXCEPTION 'notification rule: thresholds[%].value must be a % number, got %', i,
        CASE WHEN t->>'type' = 'BALANCE_VALUE' THEN 'JSON' ELSE 'positive' END, t->'value'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    i := i + 1;
  END LOOP;
  IF TG_OP = 'UPDATE' AND NEW.deleted_at IS NOT NULL THEN
    NEW.deleted_at := metering.now();
  END IF;
  IF NEW.disabled_at IS NOT NULL AND (TG_OP = 'INSERT' OR OLD.disabled_at IS NULL)
     AND NOT metering._restored('notification rule', NEW.created_at) THEN
    NEW.disabled_at := metering.now();
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._notification_rules_before_write() IS
  'internal: validates a notification rule (22023 naming the field); disabling and deleting take metering.now()';

CREATE FUNCTION metering._soft_delete_notification_rule() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE metering.notification_rules SET deleted_at = metering.now() WHERE id = OLD.id AND deleted_at IS NULL;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._soft_delete_notification_rule() IS 'internal: DELETE on metering.notification_rules marks deleted_at';

CREATE TRIGGER notification_rules_before_write BEFORE INSERT OR UPDATE ON metering.notification_rules
  FOR EACH ROW EXECUTE FUNCTION metering._notification_rules_before_write();
CREATE TRIGGER notification_rules_soft_delete BEFORE DELETE ON metering.notification_rules
  FOR EACH ROW EXECUTE FUNCTION metering._soft_delete_notification_rule();

CREATE FUNCTION metering._notification_events_immutable() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RAISE EXCEPTION 'notification events are immutable' USING ERRCODE = 'object_not_in_prerequisite_state';
END $$;
COMMENT ON FUNCTION metering._notification_events_immutable() IS 'internal: notification events are never changed or removed';
CREATE TRIGGER notification_events_immutable BEFORE UPDATE OR DELETE ON metering.notification_events
  FOR EACH ROW EXECUTE FUNCTION metering._notification_events_immutable();

-- Whether a rule that is neither disabled nor deleted exists: every writer
-- asks first, and pays nothing more when none does.
CREATE FUNCTION metering._alerts_live() RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN EXISTS (SELECT 1 FROM metering.notification_rules r WHERE r.disabled_at IS NULL AND r.deleted_at IS NULL);
END $$;
COMMENT ON FUNCTION metering._alerts_live() IS 'internal: whether any notification rule is live';

-- One evaluation of one entitlement against the live rules that cover it.
-- Evaluators of an entitlement take turns, and read its value in a
-- statement that starts after theirs began: each crossing is seen by
-- exactly one of them.  The state of a (rule, threshold) is its latest
-- notification: a crossing is written when it is not crossed yet in the
-- current period; a resolution (may_resolve: grants, voids, resets; usage
-- only grows) when it is crossed in this period, or in the one a reset
-- ended, and no longer holds.
-- An evaluation also keeps, in the entitlement's turn row, the headroom:
-- how much usage may still come in the period before a threshold that is
-- not crossed can be, valid until the period ends or a grant activates or
-- expires (the trigger of events uses it).
CREATE FUNCTION metering._evaluate_alerts(entitlement uuid, subject text, usage_until timestamptz, may_resolve boolean)
  RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  at timestamptz;
  e metering.entitlements;
  t metering.entitlement_turns;
  v record;
  rule metering.notification_rules;
  th jsonb;
  last metering.notification_events;
  ne metering.notification_events;
  crossed boolean;
  room numeric := 'Infinity';
  written integer := 0;
BEGIN
  SELECT * INTO e FROM metering.entitlements x WHERE x.id = entitlement AND x.subject = _evaluate_alerts.subject;
  IF NOT FOUND OR e.type <> 'metered' THEN
    RETURN 0;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM metering.notification_rules r
                  WHERE r.disabled_at IS NULL AND r.deleted_at IS NULL
                    AND (r.feature_key IS NULL OR r.feature_key = e.feature_key)) THEN
    RETURN 0;
  END IF;
  INSERT INTO metering.entitlement_turns AS x (entitlement_id, subject, purpose, turns, usage_until)
  VALUES (e.id, e.subject, 'a', 1, _evaluate_alerts.usage_until)
  ON CONFLICT ON CONSTRAINT entitlement_turns_pkey
  DO UPDATE SET turns = x.turns + 1, usage_until = greatest(x.usage_until, excluded.usage_until)
  RETURNING * INTO t;
  at := metering._check_instant(e, now, t.usage_until);
  SELECT * INTO v FROM metering.entitlement_value(e.subject, e.id::text, at);
  IF v.balance IS NULL THEN
    RETURN 0;
  END IF;
  FOR rule IN SELECT * FROM metering.notification_rules r
               WHERE r.disabled_at IS NULL AND r.deleted_at IS NULL
                 AND (r.feature_key IS NULL OR r.feature_key = e.feature_key)
               ORDER BY r.id LOOP
    FOR th IN SELECT x FROM jsonb_array_elements(rule.thresholds) x LOOP
      crossed := CASE th->>'type'
        WHEN 'USAGE_PERCENT' THEN v.total_available_grant_amount > 0
                                  AND v.usage * 100 >= (th->>'value')::numeric * v.total_available_grant_amount
        WHEN 'USAGE_VALUE' THEN v.usage >= (th->>'value')::numeric
        WHEN 'BALANCE_VALUE' THEN v.balance <= (th->>'value')::numeric
      END;
      IF NOT crossed THEN
        -- usage burns the balance one for one at most
        room := least(room, CASE th->>'type'
          WHEN 'USAGE_PERCENT' THEN (th->>'value')::numeric * v.total_available_grant_amount / 100 - v.usage
          WHEN 'USAGE_VALUE' THEN (th->>'value')::numeric - v.usage
          WHEN 'BALANCE_VALUE' THEN v.balance - (th->>'value')::numeric
        END);
      END IF;
      SELECT * INTO last FROM metering.notification_events x
       WHERE x.entitlement_id = e.id AND x.subject = e.subject AND x.rule_id = rule.id AND x.threshold = th
       ORDER BY x.seq DESC LIMIT 1;
      IF crossed AND (last.id IS NULL OR last.kind = 'resolved' OR last.period_start <> v.start_of_period) THEN
        INSERT INTO metering.notification_events AS x (rule_id, entitlement_id, subject, feature_key, kind, threshold,
          period_start, usage, balance, total_available_grant_amount, created_at)
        VALUES (rule.id, e.id, e.subject, e.feature_key, 'crossed', th, v.start_of_period, v.usage, v.balance,
                v.total_available_grant_amount, now)
        RETURNING * INTO ne;
      ELSIF may_resolve AND NOT crossed AND last.kind = 'crossed'
            AND (last.period_start = v.start_of_period
                 OR EXISTS (SELECT 1 FROM metering.resets s
                             WHERE s.entitlement_id = e.id AND s.subject = e.subject AND s.effective_at = v.start_of_period
                               AND s.effective_at > last.period_start)) THEN
        INSERT INTO metering.notification_events AS x (rule_id, entitlement_id, subject, feature_key, kind, threshold,
          period_start, usage, balance, total_available_grant_amount, created_at)
        VALUES (rule.id, e.id, e.subject, e.feature_key, 'resolved', th, v.start_of_period, v.usage, v.balance,
                v.total_available_grant_amount, now)
        RETURNING * INTO ne;
      ELSE
        CONTINUE;
      END IF;
      PERFORM pg_catalog.pg_notify(rule.channel, pg_catalog.row_to_json(ne)::text);
      written := written + 1;
    END LOOP;
  END LOOP;
  -- the headroom holds while the period and the grants stay as they are
  UPDATE metering.entitlement_turns x
     SET armed_from = v.start_of_period,
         armed_until = least(metering._period_bound(e.id, e.subject, at, true),
                             (SELECT min(b.t) FROM metering.grants g,
                                     LATERAL (VALUES (g.effective_at), (g.expires_at)) b(t)
                               WHERE g.entitlement_id = e.id AND g.subject = e.subject AND b.t > at)),
         headroom = room
   WHERE x.entitlement_id = e.id AND x.subject = e.subject AND x.purpose = 'a';
  RETURN written;
END $$;
COMMENT ON FUNCTION metering._evaluate_alerts(uuid, text, timestamptz, boolean) IS
  'internal: writes (and notifies at commit) the crossings of the live rules'' thresholds by a metered entitlement, counting usage up to now and to usage_until (with may_resolve also the thresholds taken back across), and keeps its headroom; returns how many';

-- a change of the rules re-arms every entitlement's headroom
CREATE FUNCTION metering._notification_rules_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM metering._require_own_table(TG_TABLE_SCHEMA, TG_NAME);
  UPDATE metering.entitlement_turns SET headroom = NULL WHERE purpose = 'a' AND headroom IS NOT NULL;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._notification_rules_changed() IS
  'internal: after a change of the notification rules, the next write of each entitlement evaluates its alerts in full';
CREATE TRIGGER notification_rules_changed AFTER INSERT OR UPDATE OR DELETE ON metering.notification_rules
  FOR EACH STATEMENT EXECUTE FUNCTION metering._notification_rules_changed();

-- events: once per statement, each touched (subject, feature) entitlement
-- once.  The turns of all of them are taken in one statement, in id order
-- (no deadlock between two batches), which also takes the statement's usage
-- from the headroom of those it fits in (the usage is computed for the
-- window of the headroom read before the turn, and taken only if that is
-- still the window once the turn is ours); the others get no headroom and
-- are evaluated in full.
-- In C (alerts_batch.c): the live rules and the covered entitlements of the
-- events' subjects are read with plans made once, by index whatever the
-- tables' size when the plan was made, and the events are matched to them in
-- memory; the turns are one statement.  On one node the events' trigger
-- reads the statement's transition table; on a Citus coordinator, where that
-- trigger runs on the shards, _alerts_for_events gets the rows that the
-- owner-run writers (ingest, ingest_batch, commit_reservation, consume)
-- stored, as arrays (one element per event), as they returned them.  Nobody
-- else may call it: the arrays are trusted.
CREATE FUNCTION metering._alerts_for_events(subjects text[], types text[], times timestamptz[], datas jsonb[])
  RETURNS void
  AS 'MODULE_PATHNAME', 'metering_alerts_for_events'
  LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION metering._alerts_for_events(text[], text[], timestamptz[], jsonb[]) IS
  'internal: evaluates the alerts of each metered entitlement that the given stored events reach, once';

-- In C too (alerts_batch.c): it reads the statement's transition table
-- itself (no array of the events is made), and nothing when no rule is live;
-- a shard of the distributed events (80_distribute.sql) does nothing: its
-- node's rules and entitlements are not the coordinator's, whose writers
-- evaluate instead.
CREATE FUNCTION metering._events_alerts() RETURNS trigger
  AS 'MODULE_PATHNAME', 'metering_events_alerts'
  LANGUAGE C SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION metering._events_alerts() IS
  'internal: after a statement stored events, evaluates the alerts of each metered entitlement they reach once';

CREATE TRIGGER events_alerts AFTER INSERT ON metering.events
  REFERENCING NEW TABLE AS new_events
  FOR EACH STATEMENT EXECUTE FUNCTION metering._events_alerts();

-- grants, voids and resets: the entitlement they change
CREATE FUNCTION metering._entitlement_changed_alerts() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM metering._require_own_table(TG_TABLE_SCHEMA, TG_NAME);
  -- a shard of a distributed install: its node does not send the
  -- coordinator's notifications, whose writers evaluate instead
  -- (metering._writer_alerts)
  IF TG_RELID NOT IN ('metering.grants'::regclass, 'metering.resets'::regclass) THEN
    RETURN NULL;
  END IF;
  IF metering._alerts_live() THEN
    PERFORM metering._evaluate_alerts(NEW.entitlement_id, NEW.subject, NULL, true);
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._entitlement_changed_alerts() IS
  'internal: after a grant, a void, a deletion or a reset, evaluates the alerts of its entitlement';
CREATE TRIGGER grants_alerts AFTER INSERT OR UPDATE OF voided_at, deleted_at ON metering.grants
  FOR EACH ROW EXECUTE FUNCTION metering._entitlement_changed_alerts();
CREATE TRIGGER resets_alerts AFTER INSERT ON metering.resets
  FOR EACH ROW EXECUTE FUNCTION metering._entitlement_changed_alerts();

-- Distributed (80_distribute.sql), the triggers of grants and resets run on
-- the shards, whose nodes send no notification of the coordinator: the
-- writers of the grants, voids and resets (create_grant, void_grant,
-- reset_entitlement) evaluate them on the coordinator instead.
CREATE FUNCTION metering._writer_alerts(entitlement uuid, subject text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF metering._distributed() AND metering._alerts_live() THEN
    PERFORM metering._evaluate_alerts(entitlement, subject, NULL, true);
  END IF;
END $$;
COMMENT ON FUNCTION metering._writer_alerts(uuid, text) IS
  'internal (distributed mode): after a grant, a void or a reset made on the coordinator, evaluates the alerts of its entitlement';
REVOKE EXECUTE ON FUNCTION metering._writer_alerts(uuid, text) FROM PUBLIC;

-- the evaluation reads every entitlement and writes notifications, whoever
-- stored the events
ALTER FUNCTION metering._evaluate_alerts(uuid, text, timestamptz, boolean) SECURITY DEFINER;
ALTER FUNCTION metering._notification_rules_changed() SECURITY DEFINER;
ALTER FUNCTION metering._events_alerts() SECURITY DEFINER;
ALTER FUNCTION metering._alerts_for_events(text[], text[], timestamptz[], jsonb[]) SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION metering._alerts_for_events(text[], text[], timestamptz[], jsonb[]) FROM PUBLIC;
ALTER FUNCTION metering._entitlement_changed_alerts() SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION metering._evaluate_alerts(uuid, text, timestamptz, boolean) FROM PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('metering.notification_rules', '');
SELECT pg_catalog.pg_extension_config_dump('metering.notification_events', '');
SELECT pg_catalog.pg_extension_config_dump('metering.notification_events_seq', '');
