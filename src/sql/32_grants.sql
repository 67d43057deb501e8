-- Grants (OpenMeter): amounts of usage a metered entitlement may burn.

-- the entitlements this transaction created (src/metering.c): their insert
-- trigger notes them, the grants' rules ask
CREATE FUNCTION metering._note_created(entitlement uuid) RETURNS void
  AS 'MODULE_PATHNAME', 'metering_note_created'
  LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
COMMENT ON FUNCTION metering._note_created(uuid) IS
  'internal: notes that the current transaction created the entitlement';
-- (whoever inserts an entitlement runs its trigger; a note lets the noting
-- transaction's own grants of it start in the past, which whoever may write
-- grants may do by creating the entitlement anew)
CREATE FUNCTION metering._created_here(entitlement uuid) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_created_here'
  LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
COMMENT ON FUNCTION metering._created_here(uuid) IS
  'internal: whether the current transaction created the entitlement (metering._note_created)';

CREATE TABLE metering.grants (
  id                  uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  entitlement_id      uuid NOT NULL REFERENCES metering.entitlements (id),
  amount              numeric NOT NULL,
  priority            integer NOT NULL DEFAULT 0,
  effective_at        timestamptz NOT NULL,
  expiration          interval,
  expires_at          timestamptz,
  recurrence          interval,
  recurrence_anchor   timestamptz,
  min_rollover_amount numeric NOT NULL DEFAULT 0,
  max_rollover_amount numeric NOT NULL DEFAULT 0,
  voided_at           timestamptz,
  deleted_at          timestamptz,
  metadata            jsonb,
  created_at          timestamptz NOT NULL DEFAULT metering.now(),
  subject             text COLLATE "C" NOT NULL
);
CREATE INDEX grants_entitlement ON metering.grants (entitlement_id);
COMMENT ON TABLE metering.grants IS
  'grants of usage to metered entitlements; never updated: voiding sets voided_at, DELETE sets deleted_at';
COMMENT ON COLUMN metering.grants.id IS 'the grant id (uuid v7, increasing in creation order)';
COMMENT ON COLUMN metering.grants.entitlement_id IS 'the metered entitlement';
COMMENT ON COLUMN metering.grants.amount IS 'how much usage the grant covers (positive)';
COMMENT ON COLUMN metering.grants.priority IS '0..255; lower burns first';
COMMENT ON COLUMN metering.grants.effective_at IS 'when it becomes active (truncated to the minute)';
COMMENT ON COLUMN metering.grants.expiration IS 'how long it stays active; NULL never expires';
COMMENT ON COLUMN metering.grants.expires_at IS 'effective_at + expiration, in UTC with the day clamped to the month end';
COMMENT ON COLUMN metering.grants.recurrence IS 'refills the balance to amount every recurrence (at least an hour)';
COMMENT ON COLUMN metering.grants.recurrence_anchor IS 'refills happen at recurrence_anchor + n * recurrence (default effective_at)';
COMMENT ON COLUMN metering.grants.min_rollover_amount IS 'a period boundary keeps at least this much';
COMMENT ON COLUMN metering.grants.max_rollover_amount IS 'a period boundary keeps at most this much';
COMMENT ON COLUMN metering.grants.voided_at IS 'when it was voided: it ends there, usage already burnt stays burnt';
COMMENT ON COLUMN metering.grants.deleted_at IS 'when it was deleted: it ends there';
COMMENT ON COLUMN metering.grants.metadata IS 'free-form JSON object';
COMMENT ON COLUMN metering.grants.created_at IS 'when it was made (metering.now()); breaks ties in burn order';
COMMENT ON COLUMN metering.grants.subject IS 'the entitlement''s subject (filled in when not given; another is refused)';

CREATE TABLE metering.resets (
  id               uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  entitlement_id   uuid NOT NULL REFERENCES metering.entitlements (id),
  effective_at     timestamptz NOT NULL,
  retain_anchor    boolean NOT NULL DEFAULT false,
  preserve_overage boolean,
  created_at       timestamptz NOT NULL DEFAULT metering.now(),
  subject          text COLLATE "C" NOT NULL,
  UNIQUE (entitlement_id, effective_at)
);
COMMENT ON TABLE metering.resets IS
  'manual resets of metered entitlements: a new usage period starts at effective_at; immutable';
COMMENT ON COLUMN metering.resets.id IS 'the reset id';
COMMENT ON COLUMN metering.resets.entitlement_id IS 'the metered entitlement';
COMMENT ON COLUMN metering.resets.effective_at IS 'when the new period starts (truncated to the minute)';
COMMENT ON COLUMN metering.resets.retain_anchor IS 'keep the old grid of period boundaries (else the grid starts here)';
COMMENT ON COLUMN metering.resets.preserve_overage IS 'whether the overage is carried into the new period (default: the entitlement''s setting, stored here)';
COMMENT ON COLUMN metering.resets.created_at IS 'when the reset was made';
COMMENT ON COLUMN metering.resets.subject IS 'the entitlement''s subject (filled in when not given; another is refused)';

CREATE TABLE metering.entitlement_snapshots (
  entitlement_id uuid NOT NULL REFERENCES metering.entitlements (id),
  at             timestamptz NOT NULL,
  usage          numeric NOT NULL,
  grant_usage    numeric NOT NULL,
  overage        numeric NOT NULL,
  grant_ids      uuid[] NOT NULL,
  balances       numeric[] NOT NULL,
  inputs         bigint NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT metering.now(),
  hour_usage_before numeric,
  subject        text COLLATE "C" NOT NULL,
  PRIMARY KEY (entitlement_id, at)
);
COMMENT ON TABLE metering.entitlement_snapshots IS
  'derived: the burndown state of a metered entitlement after the cut at an instant, written by refresh_rollups() and removed by any change it depends on';
COMMENT ON COLUMN metering.entitlement_snapshots.entitlement_id IS 'the entitlement';
COMMENT ON COLUMN metering.entitlement_snapshots.at IS 'the instant (a cut: period boundary, grant change or recurrence; or the last whole hour past the last cut)';
COMMENT ON COLUMN metering.entitlement_snapshots.hour_usage_before IS
  'the usage of the events of the UTC hour of `at` before `at` (NULL when `at` is a whole hour): a reader subtracts it from that hour''s rollup instead of reading the hour''s events';
COMMENT ON COLUMN metering.entitlement_snapshots.usage IS 'usage in the period up to `at`';
COMMENT ON COLUMN metering.entitlement_snapshots.grant_usage IS 'what grants paid in the period up to `at`';
COMMENT ON COLUMN metering.entitlement_snapshots.overage IS 'the unpaid usage at `at`';
COMMENT ON COLUMN metering.entitlement_snapshots.grant_ids IS 'the grants active at `at`';
COMMENT ON COLUMN metering.entitlement_snapshots.balances IS 'their balances, in the same order';
COMMENT ON COLUMN metering.entitlement_snapshots.inputs IS 'a fingerprint of the period rules, resets and grants it was computed from; a reader ignores the snapshot when they differ';
COMMENT ON COLUMN metering.entitlement_snapshots.created_at IS 'when it was computed';
COMMENT ON COLUMN metering.entitlement_snapshots.subject IS 'the entitlement''s subject';

CREATE TABLE metering.entitlement_snapshot_queue (
  entitlement_id uuid PRIMARY KEY REFERENCES metering.entitlements (id),
  subject        text COLLATE "C" NOT NULL
);
COMMENT ON TABLE metering.entitlement_snapshot_queue IS
  'derived: entitlements whose snapshots a grant, void or reset removed, or whose new ones the background refresh left to its next full round; the next refresh saves them';
COMMENT ON COLUMN metering.entitlement_snapshot_queue.entitlement_id IS 'the entitlement';
COMMENT ON COLUMN metering.entitlement_snapshot_queue.subject IS 'the entitlement''s subject';

CREATE FUNCTION metering._forget_snapshots(entitlement uuid, subject text, since timestamptz) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- (two statements: Citus sends neither a modifying CTE nor an INSERT ... SELECT to one shard)
  DELETE FROM metering.entitlement_snapshots s
   WHERE s.entitlement_id = entitlement AND s.subject = _forget_snapshots.subject AND s.at >= since;
  IF FOUND THEN
    INSERT INTO metering.entitlement_snapshot_queue (entitlement_id, subject)
    VALUES (entitlement, _forget_snapshots.subject) ON CONFLICT DO NOTHING;
  END IF;
END $$;
COMMENT ON FUNCTION metering._forget_snapshots(uuid, text, timestamptz) IS
  'internal: drops the snapshots a change at `since` reaches, and queues the entitlement for new ones';

CREATE FUNCTION metering._period_bound(entitlement uuid, subject text, at timestamptz, upper boolean) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_period_start'
  LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION metering._period_bound(uuid, text, timestamptz, boolean) IS
  'internal: the start (or with upper, the exclusive end) of the usage period containing `at` (resets included)';
CREATE FUNCTION metering._period_start(entitlement uuid, subject text, at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE STRICT
BEGIN ATOMIC
 SELECT metering._period_bound(entitlement, subject, at, false);
END;
COMMENT ON FUNCTION metering._period_start(uuid, text, timestamptz) IS
  'internal: the start of the usage period containing `at` (resets included)';

-- A change to an entitlement's grants or resets waits for the snapshot
-- writers of that entitlement (which hold FOR SHARE) and is then seen by
-- them; the snapshots it reaches are dropped in the same transaction.
CREATE FUNCTION metering._unchanged_since_snapshot(entitlement uuid, subject text) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_unchanged_since_snapshot'
  LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION metering._unchanged_since_snapshot(uuid, text) IS
  'internal: at REPEATABLE READ or SERIALIZABLE, raises 40001 when another transaction changed the entitlement''s grants or resets after this one''s snapshot';

-- (src/gate.c: FOR NO KEY UPDATE, then _unchanged_since_snapshot once the
-- lock is ours; by the subject too when it is given, which a distributed
-- install needs to find the row's shard)
CREATE FUNCTION metering._lock_entitlement(entitlement uuid, subject text) RETURNS metering.entitlements
  AS 'MODULE_PATHNAME', 'metering_lock_entitlement'
  LANGUAGE C;
COMMENT ON FUNCTION metering._lock_entitlement(uuid, text) IS
  'internal: locks an entitlement (of the subject, unless NULL) against concurrent grant, void, reset and snapshot writers';

-- A row of an entitlement names the entitlement's subject, so that it can
-- live beside the subject's events (a distributed install keys them by it):
-- filled in when not given, refused when another.
CREATE FUNCTION metering._entitlement_subject(given text, e metering.entitlements, what text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF given IS NOT NULL AND given IS DISTINCT FROM e.subject THEN
    RAISE EXCEPTION '% subject must be its entitlement''s (%), got %', what, e.subject, given
      USING ERRCODE = 'invalid_parameter_value', DETAIL = format('Entitlement %s.', e.id);
  END IF;
  RETURN e.subject;
END $$;
COMMENT ON FUNCTION metering._entitlement_subject(text, metering.entitlements, text) IS
  'internal: the subject a row of an entitlement carries: the entitlement''s; 22023 when another is given';
REVOKE EXECUTE ON FUNCTION metering._entitlement_subject(text, metering.entitlements, text) FROM PUBLIC;

-- The entitlement a new row of it names, locked (_lock_entitlement): by the
-- row's subject, as a distributed install's shard must find it; on one node
-- also when that subject is another's, which _entitlement_subject refuses.
CREATE FUNCTION metering._entitlement_of(entitlement uuid, subject text) RETURNS metering.entitlements
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  e metering.entitlements := metering._lock_entitlement(entitlement, subject);
BEGIN
  IF e.id IS NULL AND subject IS NOT NULL AND NOT metering._distributed() THEN
    e := metering._lock_entitlement(entitlement, NULL);
  END IF;
  RETURN e;
END $$;
COMMENT ON FUNCTION metering._entitlement_of(uuid, text) IS
  'internal: the entitlement a new grant or reset names, locked, found by its subject (on one node by its id alone when the subject is another)';

-- Rows that carry their own created_at (a restore, a migration) are checked
-- for shape only; rows made now are also checked against now.
CREATE FUNCTION metering._grants_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  e metering.entitlements := metering._entitlement_of(NEW.entitlement_id, NEW.subject);
  fresh boolean := NOT metering._restored('grant', NEW.created_at);
  period_start timestamptz;
BEGIN
  IF e.id IS NULL THEN
    RAISE EXCEPTION 'entitlement % does not exist', NEW.entitlement_id USING ERRCODE = 'foreign_key_violation';
  END IF;
  NEW.subject := metering._entitlement_subject(NEW.subject, e, 'grant');
  IF e.type <> 'metered' THEN
    RAISE EXCEPTION 'grants belong to metered entitlements, not % ones', e.type
      USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Entitlement %s.', e.id);
  END IF;
  IF e.deleted_at IS NOT NULL AND fresh THEN
    RAISE EXCEPTION 'the entitlement is deleted' USING ERRCODE = 'object_not_in_prerequisite_state',
      DETAIL = format('Entitlement %s.', e.id);
  END IF;
  -- numeric sorts NaN above Infinity above every number
  IF NEW.amount IS NULL OR NEW.amount <= 0 OR NEW.amount >= 'Infinity' THEN
    RAISE EXCEPTION 'grant amount must be a positive finite number, got %', coalesce(NEW.amount::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.priority IS NULL OR NEW.priority NOT BETWEEN 0 AND 255 THEN
    RAISE EXCEPTION 'grant priority must be between 0 and 255, got %', coalesce(NEW.priority::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.effective_at IS NULL THEN
    RAISE EXCEPTION 'grant effective_at is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  NEW.effective_at := metering._minute(NEW.effective_at, 'grant effective_at');
  IF NEW.expiration IS NOT NULL
     AND (NOT metering._interval_at_least(NEW.expiration, '1 microsecond') OR NEW.expiration > '1000 years') THEN
    RAISE EXCEPTION 'grant expiration must be a positive interval of at most 1000 years, got %', NEW.expiration
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.expiration IS NOT NULL THEN
    IF NEW.expires_at IS NOT NULL
       AND NEW.expires_at <> metering.calendar_step(NEW.effective_at, NEW.expiration, 1) THEN
      RAISE EXCEPTION 'grant expires_at must be effective_at + expiration (%), got %',
        metering.calendar_step(NEW.effective_at, NEW.expiration, 1), NEW.expires_at
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    NEW.expires_at := metering.calendar_step(NEW.effective_at, NEW.expiration, 1);
  ELSIF NEW.expires_at IS NOT NULL THEN
    RAISE EXCEPTION 'grant expires_at comes from expiration' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.recurrence IS NOT NULL
     AND (NOT metering._interval_at_least(NEW.recurrence, '1 hour') OR NEW.recurrence > '1000 years') THEN
    RAISE EXCEPTION 'grant recurrence must be from an hour to 1000 years, got %', NEW.recurrence
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.recurrence IS NULL AND NEW.recurrence_anchor IS NOT NULL THEN
    RAISE EXCEPTION 'grant recurrence_anchor needs a recurrence' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.recurrence IS NOT NULL THEN
    NEW.recurrence_anchor := metering._minute(coalesce(NEW.recurrence_anchor, NEW.effective_at), 'grant recurrence_anchor');
  END IF;
  IF NEW.min_rollover_amount IS NULL OR NEW.max_rollover_amount IS NULL
     OR NEW.min_rollover_amount < 0 OR NEW.min_rollover_amount > NEW.max_rollover_amount
     OR NEW.max_rollover_amount >= 'Infinity' THEN
    RAISE EXCEPTION 'grant rollover amounts must be finite and satisfy 0 <= min (%) <= max (%)',
      coalesce(NEW.min_rollover_amount::text, 'NULL'), coalesce(NEW.max_rollover_amount::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.metadata IS NOT NULL AND jsonb_typeof(NEW.metadata) <> 'object' THEN
    RAISE EXCEPTION 'grant metadata must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF fresh THEN
    IF NEW.voided_at IS NOT NULL OR NEW.deleted_at IS NOT NULL THEN
      RAISE EXCEPTION 'a new grant is neither voided nor deleted' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- no retroactive grants, but for the first grants of an entitlement made
    -- in the same transaction (issue_after_reset, a migration)
    period_start := metering._period_start(e.id, e.subject, metering.now());
    IF NEW.effective_at < period_start
       AND NOT (e.created_at = metering.now() AND metering._created_here(e.id)) THEN
      RAISE EXCEPTION 'grant effective_at % is before the start of the current usage period (%)',
        NEW.effective_at, period_start
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Grants are not retroactive.';
    END IF;
  END IF;
  PERFORM metering._forget_snapshots(e.id, e.subject, NEW.effective_at);
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._grants_before_insert() IS 'internal: validates a grant and fills expires_at';

CREATE FUNCTION metering._grants_before_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering._minute(metering.now(), 'metering.now()');
BEGIN
  -- compared as JSON, where '1 mon' and '30 days' differ
  IF (to_jsonb(NEW) - 'voided_at' - 'deleted_at') IS DISTINCT FROM (to_jsonb(OLD) - 'voided_at' - 'deleted_at') THEN
    RAISE EXCEPTION 'grants are immutable: they can only be voided or deleted'
      USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Grant %s.', OLD.id);
  END IF;
  IF OLD.deleted_at IS NOT NULL AND (NEW.deleted_at IS DISTINCT FROM OLD.deleted_at
                                     OR NEW.voided_at IS DISTINCT FROM OLD.voided_at) THEN
    RAISE EXCEPTION 'the grant is deleted' USING ERRCODE = 'object_not_in_prerequisite_state',
      DETAIL = format('Grant %s was deleted at %s.', OLD.id, OLD.deleted_at);
  END IF;
  IF NEW.voided_at IS DISTINCT FROM OLD.voided_at THEN
    IF OLD.voided_at IS NOT NULL THEN
      RAISE EXCEPTION 'the grant is already voided' USING ERRCODE = 'object_not_in_prerequisite_state',
        DETAIL = format('Grant %s was voided at %s.', OLD.id, OLD.voided_at);
    END IF;
    IF OLD.expires_at <= now THEN
      RAISE EXCEPTION 'the grant expired at %', OLD.expires_at
        USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Grant %s.', OLD.id);
    END IF;
    NEW.voided_at := now;
  END IF;
  IF NEW.deleted_at IS DISTINCT FROM OLD.deleted_at THEN
    NEW.deleted_at := now;
  END IF;
  IF (NEW.voided_at, NEW.deleted_at) IS DISTINCT FROM (OLD.voided_at, OLD.deleted_at) THEN
    PERFORM metering._lock_entitlement(OLD.entitlement_id, OLD.subject);
    PERFORM metering._forget_snapshots(OLD.entitlement_id, OLD.subject, now);
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._grants_before_update() IS
  'internal: grants are immutable; voiding and deleting take metering.now(), to the minute';

CREATE FUNCTION metering._soft_delete_grant() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE metering.grants SET deleted_at = metering.now()
   WHERE id = OLD.id AND subject = OLD.subject AND deleted_at IS NULL;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._soft_delete_grant() IS 'internal: DELETE on metering.grants marks deleted_at';

CREATE TRIGGER grants_before_insert BEFORE INSERT ON metering.grants
  FOR EACH ROW EXECUTE FUNCTION metering._grants_before_insert();
CREATE TRIGGER grants_before_update BEFORE UPDATE ON metering.grants
  FOR EACH ROW EXECUTE FUNCTION metering._grants_before_update();
CREATE TRIGGER grants_soft_delete BEFORE DELETE ON metering.grants
  FOR EACH ROW EXECUTE FUNCTION metering._soft_delete_grant();

CREATE FUNCTION metering._resets_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  e metering.entitlements := metering._entitlement_of(NEW.entitlement_id, NEW.subject);
  fresh boolean := NOT metering._restored('reset', NEW.created_at);
  period_start timestamptz;
  last_reset timestamptz;
BEGIN
  IF e.id IS NULL THEN
    RAISE EXCEPTION 'entitlement % does not exist', NEW.entitlement_id USING ERRCODE = 'foreign_key_violation';
  END IF;
  NEW.subject := metering._entitlement_subject(NEW.subject, e, 'reset');
  IF e.type <> 'metered' THEN
    RAISE EXCEPTION 'only metered entitlements have usage to reset, not % ones', e.type
      USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Entitlement %s.', e.id);
  END IF;
  NEW.effective_at := metering._minute(coalesce(NEW.effective_at, metering.now()), 'reset effective_at');
  NEW.preserve_overage := coalesce(NEW.preserve_overage, e.preserve_overage_at_reset);
  IF fresh THEN
    IF e.deleted_at IS NOT NULL THEN
      RAISE EXCEPTION 'the entitlement is deleted' USING ERRCODE = 'object_not_in_prerequisite_state',
        DETAIL = format('Entitlement %s.', e.id);
    END IF;
    IF NEW.effective_at > metering.now() THEN
      RAISE EXCEPTION 'a reset cannot be in the future: % is after %', NEW.effective_at, metering.now()
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.effective_at < e.measure_usage_from THEN
      RAISE EXCEPTION 'a reset cannot be before measure_usage_from (%)', e.measure_usage_from
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    period_start := metering._period_start(e.id, e.subject, metering.now());
    IF NEW.effective_at < period_start THEN
      RAISE EXCEPTION 'a reset cannot be before the start of the current usage period (%)', period_start
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT max(r.effective_at) INTO last_reset FROM metering.resets r WHERE r.entitlement_id = e.id AND r.subject = e.subject;
    IF NEW.effective_at <= last_reset THEN
      RAISE EXCEPTION 'a reset must come after the last one (%)', last_reset
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  PERFORM metering._forget_snapshots(e.id, e.subject, NEW.effective_at);
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._resets_before_insert() IS 'internal: validates a manual reset';

CREATE FUNCTION metering._resets_immutable() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RAISE EXCEPTION 'resets are immutable' USING ERRCODE = 'object_not_in_prerequisite_state';
END $$;
COMMENT ON FUNCTION metering._resets_immutable() IS 'internal: resets are never changed or removed';

CREATE TRIGGER resets_before_insert BEFORE INSERT ON metering.resets
  FOR EACH ROW EXECUTE FUNCTION metering._resets_before_insert();
CREATE TRIGGER resets_immutable BEFORE UPDATE OR DELETE ON metering.resets
  FOR EACH ROW EXECUTE FUNCTION metering._resets_immutable();

CREATE FUNCTION metering.create_grant(entitlement uuid, amount numeric, effective_at timestamptz,
  priority integer DEFAULT 0, expiration interval DEFAULT NULL, recurrence interval DEFAULT NULL,
  recurrence_anchor timestamptz DEFAULT NULL, min_rollover_amount numeric DEFAULT 0,
  max_rollover_amount numeric DEFAULT 0, metadata jsonb DEFAULT NULL) RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  id uuid;
  subject text;
BEGIN
  -- (the subject routes the row to its shard in a distributed install)
  SELECT e.subject INTO subject FROM metering.entitlements e WHERE e.id = entitlement;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'entitlement % does not exist', entitlement USING ERRCODE = 'no_data_found';
  END IF;
  INSERT INTO metering.grants AS g (entitlement_id, subject, amount, priority, effective_at, expiration, recurrence,
    recurrence_anchor, min_rollover_amount, max_rollover_amount, metadata)
  VALUES (create_grant.entitlement, subject, create_grant.amount, coalesce(create_grant.priority, 0),
    create_grant.effective_at, create_grant.expiration, create_grant.recurrence,
    create_grant.recurrence_anchor, coalesce(create_grant.min_rollover_amount, 0),
    coalesce(create_grant.max_rollover_amount, 0), create_grant.metadata)
  RETURNING g.id INTO id;
  PERFORM metering._writer_alerts(entitlement, subject);
  RETURN id;
END $$;
COMMENT ON FUNCTION metering.create_grant(uuid, numeric, timestamptz, integer, interval, interval, timestamptz, numeric, numeric, jsonb) IS
  'grants an amount of usage to a metered entitlement and returns the grant''s id';

CREATE FUNCTION metering.void_grant(grant_id uuid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  g metering.grants;
  who text;
BEGIN
  -- locked, so that of two concurrent voids the second sees the first (by
  -- its subject too: Citus locks the rows of one shard only)
  SELECT x.subject INTO who FROM metering.grants x WHERE x.id = grant_id;
  SELECT * INTO g FROM metering.grants WHERE id = grant_id AND subject = who FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'grant % does not exist', grant_id USING ERRCODE = 'no_data_found';
  END IF;
  IF g.voided_at IS NOT NULL THEN
    RAISE EXCEPTION 'the grant is already voided' USING ERRCODE = 'object_not_in_prerequisite_state',
      DETAIL = format('Grant %s was voided at %s.', g.id, g.voided_at);
  END IF;
  UPDATE metering.grants SET voided_at = metering.now() WHERE id = grant_id AND subject = g.subject;
  PERFORM metering._writer_alerts(g.entitlement_id, g.subject);
END $$;
COMMENT ON FUNCTION metering.void_grant(uuid) IS
  'voids a grant from metering.now() (to the minute) on; usage it already paid stays paid';

CREATE FUNCTION metering.reset_entitlement(entitlement uuid, effective_at timestamptz DEFAULT NULL,
  retain_anchor boolean DEFAULT false, preserve_overage boolean DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  subject text;
BEGIN
  SELECT e.subject INTO subject FROM metering.entitlements e WHERE e.id = entitlement;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'entitlement % does not exist', entitlement USING ERRCODE = 'no_data_found';
  END IF;
  INSERT INTO metering.resets (entitlement_id, subject, effective_at, retain_anchor, preserve_overage)
  VALUES (reset_entitlement.entitlement, subject, reset_entitlement.effective_at,
          coalesce(reset_entitlement.retain_anchor, false), reset_entitlement.preserve_overage);
  PERFORM metering._writer_alerts(entitlement, subject);
END $$;
COMMENT ON FUNCTION metering.reset_entitlement(uuid, timestamptz, boolean, boolean) IS
  'starts a new usage period at effective_at (default metering.now(), to the minute): grants roll over, usage counts from zero';

-- the engine
CREATE FUNCTION metering.rollover(balance numeric, min_rollover numeric, max_rollover numeric) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_rollover'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering.rollover(numeric, numeric, numeric) IS
  'what a grant keeps at a period boundary: min(max_rollover, max(balance, min_rollover))';

CREATE FUNCTION metering.entitlement_value(subject text, feature text, at timestamptz DEFAULT NULL,
  OUT has_access boolean, OUT balance numeric, OUT usage numeric, OUT overage numeric,
  OUT total_available_grant_amount numeric, OUT start_of_period timestamptz, OUT config jsonb,
  OUT reserved numeric, OUT available numeric)
  AS 'MODULE_PATHNAME', 'metering_entitlement_value'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering.entitlement_value(text, text, timestamptz) IS
  'may the subject use the feature (key or entitlement id) at `at` (default metering.now()), and what is left: one row, has_access false and NULLs when there is no entitlement; metered: reserved (the holds active at `at`) and available (balance - reserved)';

CREATE FUNCTION metering.grant_balances(entitlement uuid, at timestamptz DEFAULT NULL)
  RETURNS TABLE(grant_id uuid, balance numeric)
  AS 'MODULE_PATHNAME', 'metering_grant_balances'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering.grant_balances(uuid, timestamptz) IS
  'the balance of each grant active at `at` (default metering.now())';

CREATE FUNCTION metering.burndown_history(entitlement uuid, from_time timestamptz DEFAULT NULL,
  to_time timestamptz DEFAULT NULL)
  RETURNS TABLE(segment_start timestamptz, segment_end timestamptz, balance_at_start numeric,
                overage_at_start numeric, usage numeric, overage numeric,
                grant_balances_at_start jsonb, grant_usages jsonb, terminations text[])
  AS 'MODULE_PATHNAME', 'metering_burndown_history'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering.burndown_history(uuid, timestamptz, timestamptz) IS
  'contiguous segments of the burndown between from_time (default measure_usage_from) and to_time (default metering.now()); a segment ends at a priority change, a recurrence or a usage reset, which adds a rollover segment [R, R]';

CREATE FUNCTION metering._balance_history(entitlement uuid, from_time timestamptz, to_time timestamptz,
  unit text, zone text)
  RETURNS TABLE(window_start timestamptz, window_end timestamptz, usage numeric,
                balance_at_start numeric, overage numeric)
  AS 'MODULE_PATHNAME', 'metering_balance_history'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering._balance_history(uuid, timestamptz, timestamptz, text, text) IS
  'internal: balance_history after its arguments are checked';

CREATE FUNCTION metering.balance_history(entitlement uuid, from_time timestamptz DEFAULT NULL,
  to_time timestamptz DEFAULT NULL, window_size text DEFAULT 'DAY', window_time_zone text DEFAULT 'UTC')
  RETURNS TABLE(window_start timestamptz, window_end timestamptz, usage numeric,
                balance_at_start numeric, overage numeric)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF upper(window_size) NOT IN ('HOUR', 'DAY') OR window_size IS NULL THEN
    RAISE EXCEPTION 'window_size must be HOUR or DAY, not "%"', window_size
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF window_time_zone IS NULL OR NOT metering._valid_time_zone(window_time_zone) THEN
    RAISE EXCEPTION 'window_time_zone "%" is not a known time zone', window_time_zone
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN QUERY SELECT * FROM metering._balance_history(entitlement, from_time, to_time,
                                                       lower(window_size), window_time_zone);
END $$;
COMMENT ON FUNCTION metering.balance_history(uuid, timestamptz, timestamptz, text, text) IS
  'per HOUR or DAY window of window_time_zone between from_time and to_time: the usage, the exact balance at the window''s start and the overage at its end';

-- Hooks of the rollups: events that arrive late, or are deleted, reach the
-- snapshots after them; a refresh also writes new snapshots.
CREATE FUNCTION metering._events_changed(meter text, subjects text[], since timestamptz[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  -- (the features first: a distributed install's shards hold no join with the coordinator's tables)
  features uuid[] := ARRAY(SELECT f.id FROM metering.features f WHERE f.meter_slug = meter);
  who text[];
  earliest timestamptz[];
BEGIN
  SELECT array_agg(k.subject), array_agg(k.since) INTO who, earliest
    FROM (SELECT k.subject, min(k.since) AS since FROM unnest(subjects, since) AS k(subject, since)
           GROUP BY k.subject) k;
  DELETE FROM metering.entitlement_snapshots s
   WHERE s.subject = ANY (who)
     AND s.at > (SELECT k.since FROM unnest(who, earliest) AS k(subject, since) WHERE k.subject = s.subject)
     -- (e.subject = ANY (who) too: one node reads the snapshots of those entitlements by their key)
     AND EXISTS (SELECT 1 FROM metering.entitlements e
                  WHERE e.id = s.entitlement_id AND e.subject = s.subject AND e.subject = ANY (who)
                    AND e.feature_id = ANY (features));
END $$;
COMMENT ON FUNCTION metering._events_changed(text, text[], timestamptz[]) IS
  'internal: drops the snapshots that events of these subjects, at these times, reach';

CREATE FUNCTION metering._snapshot_meter(meter text, from_seq bigint, to_seq bigint) RETURNS bigint
  AS 'MODULE_PATHNAME', 'metering_snapshot_meter'
  LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION metering._snapshot_meter(text, bigint, bigint) IS
  'internal: after a refresh rolled up events (from_seq, to_seq] of a meter, drops the snapshots they reach and writes new ones for their subjects'' entitlements; returns how many';

CREATE FUNCTION metering._snapshot_queue() RETURNS bigint
  AS 'MODULE_PATHNAME', 'metering_snapshot_queue'
  LANGUAGE C VOLATILE;
COMMENT ON FUNCTION metering._snapshot_queue() IS
  'internal: saves the snapshots of the entitlements queued by _forget_snapshots (refresh_rollups calls it)';

CREATE FUNCTION metering.refresh_snapshots(entitlement uuid DEFAULT NULL) RETURNS bigint
  AS 'MODULE_PATHNAME', 'metering_refresh_snapshots'
  LANGUAGE C VOLATILE;
COMMENT ON FUNCTION metering.refresh_snapshots(uuid) IS
  'saves the burndown state at the last cut before metering.now() of one live metered entitlement, or of all (refresh_rollups does this for the entitlements its new events touch); returns how many it saved';

CREATE FUNCTION metering._burndown_trans(internal, timestamptz, numeric, jsonb) RETURNS internal
  AS 'MODULE_PATHNAME', 'metering_burndown_trans'
  LANGUAGE C CALLED ON NULL INPUT;
COMMENT ON FUNCTION metering._burndown_trans(internal, timestamptz, numeric, jsonb) IS
  'internal: transition function of metering.burndown';
CREATE FUNCTION metering._burndown_trans(internal, timestamptz, numeric, jsonb, timestamptz) RETURNS internal
  AS 'MODULE_PATHNAME', 'metering_burndown_trans'
  LANGUAGE C CALLED ON NULL INPUT;
COMMENT ON FUNCTION metering._burndown_trans(internal, timestamptz, numeric, jsonb, timestamptz) IS
  'internal: transition function of metering.burndown with an end instant';
CREATE FUNCTION metering._burndown_final(internal) RETURNS jsonb
  AS 'MODULE_PATHNAME', 'metering_burndown_final'
  LANGUAGE C;
COMMENT ON FUNCTION metering._burndown_final(internal) IS 'internal: final function of metering.burndown';

CREATE AGGREGATE metering.burndown(at timestamptz, amount numeric, grants jsonb) (
  SFUNC = metering._burndown_trans, STYPE = internal, FINALFUNC = metering._burndown_final
);
COMMENT ON AGGREGATE metering.burndown(timestamptz, numeric, jsonb) IS
  'burns usage rows (ORDER BY at) through grants given as a JSON array ({id, amount, priority, effective_at, expires_at, recurrence, recurrence_anchor}); returns {"balances": {id: n}, "overage": n, "usage": n} after the last row';
CREATE AGGREGATE metering.burndown(at timestamptz, amount numeric, grants jsonb, until timestamptz) (
  SFUNC = metering._burndown_trans, STYPE = internal, FINALFUNC = metering._burndown_final
);
COMMENT ON AGGREGATE metering.burndown(timestamptz, numeric, jsonb, timestamptz) IS
  'the same, counting rows before `until` and returning the balances at `until` (activations, expiries and refills up to it applied)';

-- TRUNCATE is a wipe, not a change: what the snapshots were computed from is
-- gone, so they go too
CREATE FUNCTION metering._entitlement_tables_truncated() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  DELETE FROM metering.entitlement_snapshots;
  DELETE FROM metering.entitlement_snapshot_queue;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._entitlement_tables_truncated() IS
  'internal: TRUNCATE of grants or resets drops every entitlement snapshot';
CREATE TRIGGER grants_truncated AFTER TRUNCATE ON metering.grants
  FOR EACH STATEMENT EXECUTE FUNCTION metering._entitlement_tables_truncated();
CREATE TRIGGER resets_truncated AFTER TRUNCATE ON metering.resets
  FOR EACH STATEMENT EXECUTE FUNCTION metering._entitlement_tables_truncated();

-- a deleted meter has no rollups and no refreshes: its entitlements'
-- snapshots go (their answers come from the events from then on)
CREATE FUNCTION metering._meter_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  -- (the features first: a distributed install's shards hold no join with the coordinator's tables)
  features uuid[] := ARRAY(SELECT f.id FROM metering.features f WHERE f.meter_slug = NEW.slug);
BEGIN
  PERFORM metering._require_own_table(TG_TABLE_SCHEMA, TG_NAME);
  DELETE FROM metering.entitlement_snapshots s
   WHERE EXISTS (SELECT 1 FROM metering.entitlements e
                  WHERE e.id = s.entitlement_id AND e.subject = s.subject AND e.feature_id = ANY (features));
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._meter_deleted() IS
  'internal: deleting a meter drops the snapshots of the entitlements that count it';
CREATE TRIGGER meters_deleted_snapshots AFTER UPDATE OF deleted_at ON metering.meters
  FOR EACH ROW WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL)
  EXECUTE FUNCTION metering._meter_deleted();
