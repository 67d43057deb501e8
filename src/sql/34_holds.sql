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
-- the holds active at an instant are those made by it that end after it
-- (expire, or are committed or released): by their end, a read of the
-- present passes only the open holds, not every hold committed in the last
-- ttl (a hot entitlement's reserve and commit make thousands a minute)
-- (written without COALESCE, which row security counts as leaky: the
-- condition on it stays an index condition for every role)
CREATE INDEX reservations_entitlement_end ON metering.reservations
  (entitlement_id, least(expires_at, CASE WHEN committed_at IS NOT NULL THEN committed_at
                                          WHEN released_at IS NOT NULL THEN released_at
                                          ELSE 'infinity' END));
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
  subject        text COLLATE "C" NOT NULL,
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
COMMENT ON COLUMN metering.entitlement_turns.subject IS 'the entitlement''s subject';
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
  -- (by the subject too: the shard of a distributed install holds that one only)
  SELECT * INTO e FROM metering.entitlements WHERE id = NEW.entitlement_id AND subject = NEW.subject;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'entitlement % of subject "%" does not exist', NEW.entitlement_id, NEW.subject
      USING ERRCODE = 'foreign_key_violation';
  END IF;
  IF NEW.feature_key IS DISTINCT FROM e.feature_key THEN
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

-- The usage gate's steps (src/gate.c): one rule each, called by the
-- plpgsql functions here and directly by consume (src/consume.c).

-- the entitlement of (subject, feature) active at `at`, as entitlement_value finds it
CREATE FUNCTION metering._find_entitlement(subject text, feature text, at timestamptz) RETURNS uuid
  AS 'MODULE_PATHNAME', 'metering_find_entitlement'
  LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION metering._find_entitlement(text, text, timestamptz) IS
  'internal: the id of the entitlement of a subject to a feature (key or entitlement id) active at an instant, as entitlement_value finds it';
CREATE FUNCTION metering._active_entitlement(subject text, feature text, at timestamptz)
  RETURNS metering.entitlements
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  -- (found first: a distributed install sends the read of the row to the subject's shard alone)
  found_id uuid := metering._find_entitlement(subject, feature, at);
  e metering.entitlements;
BEGIN
  SELECT * INTO e FROM metering.entitlements x WHERE x.id = found_id AND x.subject = _active_entitlement.subject;
  RETURN e;
END $$;
COMMENT ON FUNCTION metering._active_entitlement(text, text, timestamptz) IS
  'internal: the entitlement of a subject to a feature (key or entitlement id) active at an instant';

-- Takes the entitlement's turn of a purpose (u: reserve, consume and
-- commit_reservation, which also hold the entitlement's row lock; a: alert
-- evaluations): the update of its row of entitlement_turns waits for the
-- previous holder.  At READ COMMITTED the caller's next statement sees what
-- that holder committed; at REPEATABLE READ a snapshot taken before that
-- commit fails here with 40001.  Returns the latest instant the holders
-- wrote at (see GateTakeTurn).
CREATE FUNCTION metering._take_turn(entitlement uuid, subject text, purpose "char", usage_time timestamptz) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_take_turn'
  LANGUAGE C;
COMMENT ON FUNCTION metering._take_turn(uuid, text, "char", timestamptz) IS
  'internal: waits for the entitlement''s previous writer of this purpose to end (40001 at REPEATABLE READ when its commit is invisible to the snapshot); returns the latest usage time its holders stored';

-- The instant a check reads the balance at: just after now, or just after
-- the latest usage the holders stored when that is later, within the
-- current usage period (see GateCheckInstant).
CREATE FUNCTION metering._check_instant(e metering.entitlements, now timestamptz, usage_until timestamptz)
  RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_check_instant'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering._check_instant(metering.entitlements, timestamptz, timestamptz) IS
  'internal: the instant a check of the balance counts usage up to: after now and after the latest usage stored by the holders of the turn, within the current period';

-- The balance a check reads (entitlement_value's row) at its instant `at`,
-- with every hold made by then that is still open after `since` (its now):
-- a hold made now counts even when the check reads past its expiry, as it
-- does when the usage it stores is dated ahead of now.
CREATE FUNCTION metering._gate_value(entitlement uuid, subject text, at timestamptz, since timestamptz,
  OUT has_access boolean, OUT balance numeric, OUT usage numeric, OUT overage numeric,
  OUT total_available_grant_amount numeric, OUT start_of_period timestamptz, OUT config jsonb,
  OUT reserved numeric, OUT available numeric)
  AS 'MODULE_PATHNAME', 'metering_gate_value'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering._gate_value(uuid, text, timestamptz, timestamptz) IS
  'internal: entitlement_value''s row for the entitlement at `at`, reserved counting the holds made by `at` and still open after `since`';

-- The usage an event records for an entitlement: checks that the event is
-- of the entitlement's subject and of its feature's meter (type and group
-- filters), and returns what the meter reads from it (1 for COUNT; NULL for
-- a feature without a meter).
CREATE FUNCTION metering._event_usage(e metering.entitlements, subject text, type text, data jsonb, what text)
  RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_event_usage'
  LANGUAGE C STABLE;
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
  e := metering._lock_entitlement(e.id, e.subject);
  -- (the instant of the hold it may write: a session whose transaction began
  -- earlier must count it, as it counts the usage of a later one)
  at := metering._check_instant(e, now, metering._take_turn(e.id, e.subject, 'u', now));
  IF idempotency_key IS NOT NULL THEN
    SELECT * INTO r FROM metering.reservations x
     WHERE x.entitlement_id = e.id AND x.subject = e.subject AND x.idempotency_key = reserve.idempotency_key;
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
  SELECT * INTO v FROM metering._gate_value(e.id, e.subject, at, now);
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
  SELECT * INTO e FROM metering.entitlements x WHERE x.id = r.entitlement_id AND x.subject = r.subject;
  SELECT * INTO p FROM metering._parse_events(event, false);
  usage := metering._event_usage(e, p.subject, p.type, p.data, 'reservation');
  e := metering._lock_entitlement(e.id, e.subject);
  at := metering._check_instant(e, now, metering._take_turn(e.id, e.subject, 'u', greatest(p.time, now)));
  -- a concurrent commit or release of the hold ends first, or waits for us
  UPDATE metering.reservations x SET committed_at = now, committed_amount = usage
   WHERE x.id = r.id AND x.subject = r.subject AND x.committed_at IS NULL AND x.released_at IS NULL
  RETURNING * INTO r;
  IF NOT FOUND THEN
    SELECT * INTO r FROM metering.reservations x WHERE x.id = reservation_id AND x.subject = e.subject;
    RAISE EXCEPTION 'reservation % is already %', r.id,
      CASE WHEN r.committed_at IS NOT NULL THEN 'committed' ELSE 'released' END
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  n := metering._store_events(event, false);
  SELECT * INTO v FROM metering._gate_value(e.id, e.subject, at, now);
  RETURN QUERY SELECT n = 1, usage, v.balance, v.available;
END $$;
COMMENT ON FUNCTION metering.commit_reservation(uuid, jsonb) IS
  'records the usage a hold was made for (a CloudEvent of the reservation''s subject and the feature''s meter; stored as ingest stores it, stored false for a repeat) and ends the hold; the usage may exceed the hold; 55000 when it was already committed or released';

CREATE FUNCTION metering.release_reservation(reservation_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  r metering.reservations;
  who text;
BEGIN
  -- (by its subject too: the shard of a distributed install)
  SELECT x.subject INTO who FROM metering.reservations x WHERE x.id = reservation_id;
  UPDATE metering.reservations x SET released_at = now
   WHERE x.id = reservation_id AND x.subject = who AND x.committed_at IS NULL AND x.released_at IS NULL
  RETURNING * INTO r;
  IF FOUND THEN
    RETURN r.expires_at > now AND r.created_at <= now;
  END IF;
  SELECT * INTO r FROM metering.reservations x WHERE x.id = reservation_id AND x.subject = who;
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
  AS 'MODULE_PATHNAME', 'metering_consume'
  LANGUAGE C SECURITY DEFINER;
COMMENT ON FUNCTION metering.consume(jsonb, text) IS
  'checks and records one usage event against the subject''s entitlement to the feature: granted (and stored) when it is active and is a soft limit or has available >= the event''s usage; denied stores nothing; a repeat of a stored event is granted, not stored and consumes nothing';

REVOKE EXECUTE ON FUNCTION
  metering.reserve(text, text, numeric, interval, text), metering.commit_reservation(uuid, jsonb),
  metering.release_reservation(uuid), metering.consume(jsonb, text),
  metering._take_turn(uuid, text, "char", timestamptz)
FROM PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('metering.reservations', '');
