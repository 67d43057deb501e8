-- Real-time enforcement: holds against a balance (reserve, commit, release)
-- and consume, a check and a record in one call.  The writers of one
-- entitlement take turns (metering._take_turn) and read the balance after
-- they hold it, so two sessions cannot both spend the last of it.

CREATE TABLE metering.reservations (
  id               uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  entitlement_id   uuid NOT NULL REFERENCES metering.entitlements (id),
  subject          text COLLATE "C" NOT NULL,
  feature_key      text COLLATE "C" NOT NULL,
  amount           numeric NOT NULL,
  idempotency_key  text COLLATE "C",
  created_at       timestamptz NOT NULL DEFAULT metering.now(),
  expires_at       timestamptz NOT NULL,
  committed_at     timestamptz,
  committed_amount numeric,
  released_at      timestamptz,
  available        numeric,
  CONSTRAINT reservations_amount_positive CHECK (amount > 0 AND amount < 'Infinity'),
  CONSTRAINT reservations_expire_after_creation CHECK (expires_at > created_at),
  CONSTRAINT reservations_one_end CHECK (committed_at IS NULL OR released_at IS NULL)
);
-- the holds that may be active at an instant: those expiring after it
CREATE INDEX reservations_entitlement_expiry ON metering.reservations (entitlement_id, expires_at);
CREATE UNIQUE INDEX reservations_idempotency ON metering.reservations (entitlement_id, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE INDEX reservations_subject ON metering.reservations (subject);
COMMENT ON TABLE metering.reservations IS
  'holds against the balance of an entitlement (metering.reserve); immutable but for one transition, to committed or to released';
COMMENT ON COLUMN metering.reservations.id IS 'the reservation id (uuid v7)';
COMMENT ON COLUMN metering.reservations.entitlement_id IS 'the entitlement held against';
COMMENT ON COLUMN metering.reservations.subject IS 'the entitlement''s subject';
COMMENT ON COLUMN metering.reservations.feature_key IS 'the entitlement''s feature key';
COMMENT ON COLUMN metering.reservations.amount IS 'how much it holds (positive)';
COMMENT ON COLUMN metering.reservations.available IS 'what reserve answered as available when it granted the hold: a repeat of its idempotency_key answers the same';
COMMENT ON COLUMN metering.reservations.idempotency_key IS 'the caller''s key: a repeat of reserve with it returns this reservation';
COMMENT ON COLUMN metering.reservations.created_at IS 'when it was made (metering.now())';
COMMENT ON COLUMN metering.reservations.expires_at IS 'when it stops holding, unless committed or released before';
COMMENT ON COLUMN metering.reservations.committed_at IS 'when the usage it held for was recorded (metering.commit_reservation)';
COMMENT ON COLUMN metering.reservations.committed_amount IS 'the amount of that usage, as the feature''s meter reads it';
COMMENT ON COLUMN metering.reservations.released_at IS 'when it was released unused (metering.release_reservation)';

-- derived: one row per entitlement and purpose that writers of it update to
-- take turns; the update is the lock, and at REPEATABLE READ a snapshot that
-- predates the previous holder's commit fails on it with 40001
CREATE TABLE metering.entitlement_turns (
  entitlement_id uuid NOT NULL,
  purpose        "char" NOT NULL,
  turns          bigint NOT NULL,
  usage_until    timestamptz,
  armed_from     timestamptz,
  armed_until    timestamptz,
  headroom       numeric,
  PRIMARY KEY (entitlement_id, purpose)
);
COMMENT ON TABLE metering.entitlement_turns IS
  'derived: the turns taken on an entitlement by the writers that must see each other (purpose u: reserve, consume and commit; a: alert evaluation)';
COMMENT ON COLUMN metering.entitlement_turns.entitlement_id IS 'the entitlement';
COMMENT ON COLUMN metering.entitlement_turns.purpose IS 'u: usage gate (reserve, consume, commit_reservation); a: alert evaluation';
COMMENT ON COLUMN metering.entitlement_turns.turns IS 'how many turns were taken (the update is the lock)';
COMMENT ON COLUMN metering.entitlement_turns.usage_until IS 'the latest instant the holders wrote at (their metering.now(), or the time of the usage they stored): checks count holds and usage up to it';
COMMENT ON COLUMN metering.entitlement_turns.armed_from IS 'a: the start of the usage period of the last full evaluation of the alerts';
COMMENT ON COLUMN metering.entitlement_turns.armed_until IS 'a: until when its headroom holds (the period''s end, or the next activation or expiry of a grant)';
COMMENT ON COLUMN metering.entitlement_turns.headroom IS 'a: how much more usage in the period may come before a threshold that is not crossed can be; events that add less skip the full evaluation';

CREATE FUNCTION metering._reservations_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  e metering.entitlements;
BEGIN
  SELECT * INTO e FROM metering.entitlements WHERE id = NEW.entitlement_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'entitlement % does not exist', NEW.entitlement_id USING ERRCODE = 'foreign_key_violation';
  END IF;
  IF NEW.subject IS DISTINCT FROM e.subject OR NEW.feature_key IS DISTINCT FROM e.feature_key THEN
    RAISE EXCEPTION 'reservation: subject and feature_key must be those of entitlement % ("%", "%")',
      e.id, e.subject, e.feature_key USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.committed_at IS NULL AND NEW.committed_amount IS NOT NULL THEN
    RAISE EXCEPTION 'reservation: committed_amount needs committed_at' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._reservations_before_insert() IS
  'internal: a reservation names its entitlement''s subject and feature';

CREATE FUNCTION metering._reservations_before_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF (to_jsonb(NEW) - 'committed_at' - 'committed_amount' - 'released_at')
     IS DISTINCT FROM (to_jsonb(OLD) - 'committed_at' - 'committed_amount' - 'released_at') THEN
    RAISE EXCEPTION 'reservations are immutable: they can only be committed or released'
      USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Reservation %s.', OLD.id);
  END IF;
  IF OLD.committed_at IS NOT NULL OR OLD.released_at IS NOT NULL THEN
    RAISE EXCEPTION 'reservation % is already %', OLD.id,
      CASE WHEN OLD.committed_at IS NOT NULL THEN 'committed' ELSE 'released' END
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF NEW.committed_at IS NOT NULL AND NEW.released_at IS NOT NULL THEN
    RAISE EXCEPTION 'reservation %: committed or released, not both', OLD.id
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._reservations_before_update() IS
  'internal: a reservation changes once, to committed or to released';

CREATE FUNCTION metering._reservations_no_delete() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RAISE EXCEPTION 'reservations are kept: release reservation % instead', OLD.id
    USING ERRCODE = 'object_not_in_prerequisite_state';
END $$;
COMMENT ON FUNCTION metering._reservations_no_delete() IS 'internal: reservations are never deleted';

CREATE TRIGGER reservations_before_insert BEFORE INSERT ON metering.reservations
  FOR EACH ROW EXECUTE FUNCTION metering._reservations_before_insert();
CREATE TRIGGER reservations_before_update BEFORE UPDATE ON metering.reservations
  FOR EACH ROW EXECUTE FUNCTION metering._reservations_before_update();
CREATE TRIGGER reservations_no_delete BEFORE DELETE ON metering.reservations
  FOR EACH ROW EXECUTE FUNCTION metering._reservations_no_delete();

-- the entitlement of (subject, feature) active at `at`, as entitlement_value finds it
CREATE FUNCTION metering._active_entitlement(subject text, feature text, at timestamptz)
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
COMMENT ON FUNCTION metering._active_entitlement(text, text, timestamptz) IS
  'internal: the entitlement of a subject to a feature (key or entitlement id) active at an instant';

-- Takes the entitlement's turn: the update of its row of entitlement_turns
-- (gate u: reserve, consume and commit_reservation, which also hold the
-- entitlement's row lock, shared with the grant, void and reset writers and
-- their REPEATABLE READ guard; a: alert evaluations).  At READ COMMITTED
-- the caller's next statement sees what the previous holder committed; at
-- REPEATABLE READ a snapshot taken before that commit fails here with 40001.
-- Returns the latest instant the holders wrote at (this one's included: its
-- metering.now(), and the time of the usage it stores when that is later):
-- the instant a check must count holds and usage up to, since a holder
-- whose transaction began later than ours wrote its hold at its own now.
CREATE FUNCTION metering._take_turn(entitlement uuid, purpose "char", usage_time timestamptz) RETURNS timestamptz
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  until timestamptz;
BEGIN
  INSERT INTO metering.entitlement_turns AS t (entitlement_id, purpose, turns, usage_until)
  VALUES (_take_turn.entitlement, _take_turn.purpose, 1, _take_turn.usage_time)
  ON CONFLICT ON CONSTRAINT entitlement_turns_pkey
  DO UPDATE SET turns = t.turns + 1, usage_until = greatest(t.usage_until, excluded.usage_until)
  RETURNING t.usage_until INTO until;
  RETURN until;
END $$;
COMMENT ON FUNCTION metering._take_turn(uuid, "char", timestamptz) IS
  'internal: waits for the entitlement''s previous writer of this purpose to end (40001 at REPEATABLE READ when its commit is invisible to the snapshot); returns the latest usage time its holders stored';

-- The instant a check reads the balance at: just after now, so that usage
-- stored at now counts, or just after the latest usage the holders stored
-- when that is later (an event's time may run ahead of metering.now()), but
-- within the current usage period.
CREATE FUNCTION metering._check_instant(e metering.entitlements, now timestamptz, usage_until timestamptz)
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
                         metering._period_bound(e.id, now, true) - interval '1 microsecond') END;
END $$;
COMMENT ON FUNCTION metering._check_instant(metering.entitlements, timestamptz, timestamptz) IS
  'internal: the instant a check of the balance counts usage up to: after now and after the latest usage stored by the holders of the turn, within the current period';

-- The usage an event records for an entitlement: checks that the event is
-- of the entitlement's subject and of its feature's meter (type and group
-- filters), and returns what the meter reads from it (1 for COUNT; NULL for
-- a feature without a meter).
CREATE FUNCTION metering._event_usage(e metering.entitlements, subject text, type text, data jsonb, what text)
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
COMMENT ON FUNCTION metering._event_usage(metering.entitlements, text, text, jsonb, text) IS
  'internal: the usage an event records against an entitlement; 22023 when the event is not of its subject, meter type or group filters';

CREATE FUNCTION metering.reserve(subject text, feature text, amount numeric, ttl interval DEFAULT '5 minutes',
  idempotency_key text DEFAULT NULL)
  RETURNS TABLE(granted boolean, reservation_id uuid, available numeric, expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  e metering.entitlements;
  r metering.reservations;
  v record;
  ok boolean;
  at timestamptz;
BEGIN
  IF amount IS NULL OR amount <= 0 OR amount >= 'Infinity' THEN
    RAISE EXCEPTION 'reserve: amount must be a positive finite number, got %', coalesce(amount::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF ttl IS NULL OR ttl < interval '1 second' OR ttl > interval '1 day' THEN
    RAISE EXCEPTION 'reserve: ttl must be from 1 second to 1 day, got %', coalesce(ttl::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF idempotency_key = '' THEN
    RAISE EXCEPTION 'reserve: idempotency_key must not be empty' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  e := metering._active_entitlement(subject, feature, now);
  IF e.id IS NULL THEN
    RETURN QUERY SELECT false, NULL::uuid, NULL::numeric, NULL::timestamptz;
    RETURN;
  END IF;
  e := metering._lock_entitlement(e.id);
  -- (the instant of the hold it may write: a session whose transaction began
  -- earlier must count it, as it counts the usage of a later one)
  at := metering._check_instant(e, now, metering._take_turn(e.id, 'u', now));
  IF idempotency_key IS NOT NULL THEN
    SELECT * INTO r FROM metering.reservations x
     WHERE x.entitlement_id = e.id AND x.idempotency_key = reserve.idempotency_key;
    IF FOUND THEN
      IF r.amount <> amount THEN
        RAISE EXCEPTION 'reserve: idempotency_key "%" was used for a reservation of %, not %',
          idempotency_key, r.amount, amount USING ERRCODE = 'invalid_parameter_value',
          DETAIL = format('Reservation %s.', r.id);
      END IF;
      -- the first call's answer
      RETURN QUERY SELECT true, r.id, r.available, r.expires_at;
      RETURN;
    END IF;
  END IF;
  -- a statement that starts after the turn is ours: it sees the previous holder's commit
  SELECT * INTO v FROM metering.entitlement_value(e.subject, e.id::text, at);
  IF e.deleted_at IS NOT NULL AND e.deleted_at <= now THEN
    ok := false;
  ELSIF e.type = 'metered' THEN
    ok := v.balance IS NOT NULL AND (e.is_soft_limit OR v.available >= amount);
  ELSE
    ok := v.has_access;
  END IF;
  IF NOT ok THEN
    RETURN QUERY SELECT false, NULL::uuid, v.available, NULL::timestamptz;
    RETURN;
  END IF;
  INSERT INTO metering.reservations AS x (entitlement_id, subject, feature_key, amount, idempotency_key,
                                          created_at, expires_at, available)
  VALUES (e.id, e.subject, e.feature_key, amount, idempotency_key, now, now + ttl, v.available - amount)
  RETURNING * INTO r;
  RETURN QUERY SELECT true, r.id, r.available, r.expires_at;
END $$;
COMMENT ON FUNCTION metering.reserve(text, text, numeric, interval, text) IS
  'holds amount of the subject''s entitlement to the feature for ttl (1 second to 1 day): granted when the entitlement is active and is a soft limit or has available >= amount (boolean and static: when there is access); denied writes nothing; a repeat of idempotency_key on the entitlement returns the first reservation';

CREATE FUNCTION metering.commit_reservation(reservation_id uuid, event jsonb)
  RETURNS TABLE(stored boolean, amount numeric, balance numeric, available numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  r metering.reservations;
  e metering.entitlements;
  p record;
  usage numeric;
  n bigint;
  v record;
  at timestamptz;
BEGIN
  IF event IS NULL THEN
    RAISE EXCEPTION 'commit_reservation: event must not be NULL' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT * INTO r FROM metering.reservations x WHERE x.id = reservation_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'reservation % does not exist', coalesce(reservation_id::text, 'NULL') USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO e FROM metering.entitlements x WHERE x.id = r.entitlement_id;
  SELECT * INTO p FROM metering._parse_events(event, false);
  usage := metering._event_usage(e, p.subject, p.type, p.data, 'reservation');
  e := metering._lock_entitlement(e.id);
  at := metering._check_instant(e, now, metering._take_turn(e.id, 'u', greatest(p.time, now)));
  -- a concurrent commit or release of the hold ends first, or waits for us
  UPDATE metering.reservations x SET committed_at = now, committed_amount = usage
   WHERE x.id = r.id AND x.committed_at IS NULL AND x.released_at IS NULL
  RETURNING * INTO r;
  IF NOT FOUND THEN
    SELECT * INTO r FROM metering.reservations x WHERE x.id = reservation_id;
    RAISE EXCEPTION 'reservation % is already %', r.id,
      CASE WHEN r.committed_at IS NOT NULL THEN 'committed' ELSE 'released' END
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  n := metering._store_events(event, false);
  SELECT * INTO v FROM metering.entitlement_value(e.subject, e.id::text, at);
  RETURN QUERY SELECT n = 1, usage, v.balance, v.available;
END $$;
COMMENT ON FUNCTION metering.commit_reservation(uuid, jsonb) IS
  'records the usage a hold was made for (a CloudEvent of the reservation''s subject and the feature''s meter; stored as ingest stores it, stored false for a repeat) and ends the hold; the usage may exceed the hold; 55000 when it was already committed or released';

CREATE FUNCTION metering.release_reservation(reservation_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  r metering.reservations;
BEGIN
  UPDATE metering.reservations x SET released_at = now
   WHERE x.id = reservation_id AND x.committed_at IS NULL AND x.released_at IS NULL
  RETURNING * INTO r;
  IF FOUND THEN
    RETURN r.expires_at > now AND r.created_at <= now;
  END IF;
  SELECT * INTO r FROM metering.reservations x WHERE x.id = reservation_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'reservation % does not exist', coalesce(reservation_id::text, 'NULL') USING ERRCODE = 'no_data_found';
  END IF;
  RAISE EXCEPTION 'reservation % is already %', r.id,
    CASE WHEN r.committed_at IS NOT NULL THEN 'committed' ELSE 'released' END
    USING ERRCODE = 'object_not_in_prerequisite_state';
END $$;
COMMENT ON FUNCTION metering.release_reservation(uuid) IS
  'ends a hold unused; true when it was active (not expired); 55000 when it was already committed or released';

CREATE FUNCTION metering.consume(event jsonb, feature text)
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
  e := metering._active_entitlement(p.subject, feature, now);
  IF e.id IS NULL THEN
    RETURN QUERY SELECT false, false, NULL::numeric, NULL::numeric;
    RETURN;
  END IF;
  usage := metering._event_usage(e, p.subject, p.type, p.data, 'entitlement');
  e := metering._lock_entitlement(e.id);
  at := metering._check_instant(e, now, metering._take_turn(e.id, 'u', greatest(p.time, now)));
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
COMMENT ON FUNCTION metering.consume(jsonb, text) IS
  'checks and records one usage event against the subject''s entitlement to the feature: granted (and stored) when it is active and is a soft limit or has available >= the event''s usage; denied stores nothing; a repeat of a stored event is granted, not stored and consumes nothing';

REVOKE EXECUTE ON FUNCTION
  metering.reserve(text, text, numeric, interval, text), metering.commit_reservation(uuid, jsonb),
  metering.release_reservation(uuid), metering.consume(jsonb, text),
  metering._take_turn(uuid, "char", timestamptz)
FROM PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('metering.reservations', '');
