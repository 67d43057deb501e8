-- Entitlements (OpenMeter): a subject's access to a feature.

CREATE TYPE metering.entitlement_type AS ENUM ('metered', 'boolean', 'static');
COMMENT ON TYPE metering.entitlement_type IS
  'metered (usage against grants), boolean (access while active), static (access and a configuration)';

CREATE TABLE metering.entitlements (
  id                         uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  subject                    text COLLATE "C" NOT NULL,
  -- (checked at commit: a restore of a distributed coordinator's dump, in one
  -- transaction, may bring the features after the entitlements; 80_distribute.sql)
  feature_id                 uuid NOT NULL REFERENCES metering.features (id) DEFERRABLE INITIALLY DEFERRED,
  feature_key                text COLLATE "C" NOT NULL,
  type                       metering.entitlement_type NOT NULL DEFAULT 'metered',
  config                     jsonb,
  usage_period               interval,
  usage_period_anchor        timestamptz,
  measure_usage_from         timestamptz,
  is_soft_limit              boolean NOT NULL DEFAULT false,
  issue_after_reset          numeric,
  issue_after_reset_priority integer NOT NULL DEFAULT 1,
  preserve_overage_at_reset  boolean NOT NULL DEFAULT false,
  metadata                   jsonb,
  created_at                 timestamptz NOT NULL DEFAULT metering.now(),
  deleted_at                 timestamptz
);
CREATE UNIQUE INDEX entitlements_live ON metering.entitlements (subject, feature_id) WHERE deleted_at IS NULL;
CREATE INDEX entitlements_subject_key ON metering.entitlements (subject, feature_key);
CREATE INDEX entitlements_feature ON metering.entitlements (feature_id);
-- the alerts of every statement that stores events look up each of its
-- subjects here (alerts_batch.c): a hash probe is about a third cheaper than
-- a btree descent
CREATE INDEX entitlements_metered_subject ON metering.entitlements USING hash (subject)
  WHERE deleted_at IS NULL AND type = 'metered';
COMMENT ON TABLE metering.entitlements IS
  'a subject''s entitlement to a feature; one that is not deleted per (subject, feature); never updated; DELETE sets deleted_at';
COMMENT ON COLUMN metering.entitlements.id IS 'the entitlement id (uuid v7)';
COMMENT ON COLUMN metering.entitlements.subject IS 'the entitled party (the events'' subject)';
COMMENT ON COLUMN metering.entitlements.feature_id IS 'the feature';
COMMENT ON COLUMN metering.entitlements.feature_key IS 'the feature''s key, copied at creation';
COMMENT ON COLUMN metering.entitlements.type IS 'metered, boolean or static';
COMMENT ON COLUMN metering.entitlements.config IS 'the configuration a static entitlement hands out (JSON)';
COMMENT ON COLUMN metering.entitlements.usage_period IS 'metered: the length of a usage period (at least an hour)';
COMMENT ON COLUMN metering.entitlements.usage_period_anchor IS 'metered: periods start at anchor + n * usage_period (UTC, day clamped to the month end)';
COMMENT ON COLUMN metering.entitlements.measure_usage_from IS 'metered: usage counts from here; the first period starts here';
COMMENT ON COLUMN metering.entitlements.is_soft_limit IS 'metered: access even when the balance is exhausted';
COMMENT ON COLUMN metering.entitlements.issue_after_reset IS 'metered: every period starts with this much, from a grant made with the entitlement';
COMMENT ON COLUMN metering.entitlements.issue_after_reset_priority IS 'the priority of that grant (0..255, default 1)';
COMMENT ON COLUMN metering.entitlements.preserve_overage_at_reset IS 'metered: whether a period''s overage is carried into the next (resets may say otherwise)';
COMMENT ON COLUMN metering.entitlements.metadata IS 'free-form JSON object';
COMMENT ON COLUMN metering.entitlements.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.entitlements.deleted_at IS 'when it was deleted; questions about earlier instants still see it';

CREATE FUNCTION metering._entitlements_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  f metering.features;
  fresh boolean := NOT metering._restored('entitlement', NEW.created_at);
BEGIN
  SELECT * INTO f FROM metering.features WHERE id = NEW.feature_id;
  -- A restored row on one node may come before its feature (the dump of a
  -- distributed install, restored in one transaction, orders them by
  -- name): the foreign key checks the feature at commit, and the checks
  -- that need it (its key, its meter) are those the row passed when it was
  -- made.  A distributed install's shards have no such key.
  IF NOT FOUND AND (fresh OR NEW.feature_key IS NULL OR metering._distributed()) THEN
    RAISE EXCEPTION 'feature % does not exist', NEW.feature_id USING ERRCODE = 'foreign_key_violation';
  END IF;
  -- a row made now is new; one with an earlier created_at is being restored
  -- (pg_restore, a migration), and was checked when it was made
  IF fresh AND (f.archived_at IS NOT NULL OR f.deleted_at IS NOT NULL) THEN
    RAISE EXCEPTION 'feature "%" is %: it takes no new entitlements', f.key,
      CASE WHEN f.deleted_at IS NOT NULL THEN 'deleted' ELSE 'archived' END
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF NEW.deleted_at IS NOT NULL AND (fresh OR NOT isfinite(NEW.deleted_at)
                                     OR NEW.deleted_at < NEW.created_at) THEN
    RAISE EXCEPTION 'entitlement: a new entitlement is not deleted (a restored one was deleted after its creation)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF f.id IS NOT NULL AND NEW.feature_key IS NOT NULL AND NEW.feature_key <> f.key THEN
    RAISE EXCEPTION 'feature_key "%" is not the key of feature % ("%")', NEW.feature_key, f.id, f.key
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  NEW.feature_key := coalesce(f.key, NEW.feature_key);
  IF NEW.subject IS NULL OR NEW.subject = '' THEN
    RAISE EXCEPTION 'entitlement: subject is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.metadata IS NOT NULL AND jsonb_typeof(NEW.metadata) <> 'object' THEN
    RAISE EXCEPTION 'entitlement: metadata must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
  END IF;

  IF NEW.type IS NULL THEN
    RAISE EXCEPTION 'entitlement: type is required (metered, boolean or static)' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.type = 'metered' THEN
    IF f.id IS NOT NULL AND f.meter_slug IS NULL THEN
      RAISE EXCEPTION 'feature "%" has no meter: a metered entitlement needs one', f.key
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Use a boolean or static entitlement.';
    END IF;
    IF NEW.usage_period IS NULL OR NOT metering._interval_at_least(NEW.usage_period, '1 hour')
       OR NEW.usage_period > '1000 years' THEN
      RAISE EXCEPTION 'entitlement: usage_period must be an interval from one hour to 1000 years, got %',
        coalesce(NEW.usage_period::text, 'NULL')
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.config IS NOT NULL THEN
      RAISE EXCEPTION 'entitlement: config belongs to static entitlements' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    NEW.usage_period_anchor := metering._minute(coalesce(NEW.usage_period_anchor, NEW.created_at), 'entitlement: usage_period_anchor');
    NEW.measure_usage_from := metering._minute(coalesce(NEW.measure_usage_from, NEW.created_at), 'entitlement: measure_usage_from');
    IF NEW.issue_after_reset IS NOT NULL AND (NEW.issue_after_reset <= 0 OR NEW.issue_after_reset >= 'Infinity') THEN
      RAISE EXCEPTION 'entitlement: issue_after_reset must be a positive finite number, got %', NEW.issue_after_reset
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.issue_after_reset_priority NOT BETWEEN 0 AND 255 THEN
      RAISE EXCEPTION 'entitlement: issue_after_reset_priority must be between 0 and 255, got %',
        NEW.issue_after_reset_priority
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  ELSE
    IF NEW.usage_period IS NOT NULL OR NEW.usage_period_anchor IS NOT NULL OR NEW.measure_usage_from IS NOT NULL
       OR NEW.issue_after_reset IS NOT NULL OR NEW.is_soft_limit OR NEW.preserve_overage_at_reset THEN
      RAISE EXCEPTION 'entitlement: usage periods, grants and limits belong to metered entitlements, not %', NEW.type
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.type = 'static' AND (NEW.config IS NULL OR jsonb_typeof(NEW.config) = 'null') THEN
      RAISE EXCEPTION 'entitlement: a static entitlement needs a config' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.type = 'boolean' AND NEW.config IS NOT NULL THEN
      RAISE EXCEPTION 'entitlement: config belongs to static entitlements' USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  -- (the grants made with it may start before its current period; noted
  -- before the row is stored, so that a later part of the same statement,
  -- a writable CTE's grants, sees it)
  PERFORM metering._note_created(NEW.id);
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._entitlements_before_insert() IS 'internal: validates an entitlement and fills its defaults';

-- issue_after_reset: a grant made with the entitlement, effective from the
-- first period, never expiring, rolled over to exactly its amount
CREATE FUNCTION metering._entitlements_after_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- only for a new entitlement: a restored one comes with its grant
  IF NEW.issue_after_reset IS NOT NULL AND NEW.deleted_at IS NULL AND NEW.created_at = metering.now() THEN
    INSERT INTO metering.grants (entitlement_id, subject, amount, priority, effective_at,
                                 min_rollover_amount, max_rollover_amount, metadata, created_at)
    VALUES (NEW.id, NEW.subject, NEW.issue_after_reset, NEW.issue_after_reset_priority, NEW.measure_usage_from,
            NEW.issue_after_reset, NEW.issue_after_reset, '{"issue_after_reset": true}', NEW.created_at);
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._entitlements_after_insert() IS 'internal: the grant of issue_after_reset';

CREATE FUNCTION metering._entitlements_before_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- an update that changes nothing is skipped (it would only renew the row's xmin)
  IF to_jsonb(NEW) = to_jsonb(OLD) THEN
    RETURN NULL;
  END IF;
  -- compared as JSON, where '1 mon' and '30 days' differ
  IF (to_jsonb(NEW) - 'deleted_at') IS DISTINCT FROM (to_jsonb(OLD) - 'deleted_at') THEN
    RAISE EXCEPTION 'entitlements are immutable: they can only be deleted'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = format('Entitlement %s of subject %s to feature %s.', OLD.id, OLD.subject, OLD.feature_key),
            HINT = 'Delete it and create a new one.';
  END IF;
  IF OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS DISTINCT FROM OLD.deleted_at THEN
    RAISE EXCEPTION 'the entitlement is already deleted' USING ERRCODE = 'object_not_in_prerequisite_state',
      DETAIL = format('Entitlement %s was deleted at %s.', OLD.id, OLD.deleted_at);
  END IF;
  IF OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL THEN
    NEW.deleted_at := metering.now();
    PERFORM metering._forget_snapshots(NEW.id, NEW.subject, NEW.deleted_at);
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._entitlements_before_update() IS
  'internal: entitlements are immutable; deleting sets deleted_at to metering.now()';

CREATE FUNCTION metering._soft_delete_entitlement() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE metering.entitlements SET deleted_at = metering.now()
   WHERE id = OLD.id AND subject = OLD.subject AND deleted_at IS NULL;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._soft_delete_entitlement() IS 'internal: DELETE on metering.entitlements marks deleted_at';

CREATE TRIGGER entitlements_before_insert BEFORE INSERT ON metering.entitlements
  FOR EACH ROW EXECUTE FUNCTION metering._entitlements_before_insert();
CREATE TRIGGER entitlements_after_insert AFTER INSERT ON metering.entitlements
  FOR EACH ROW EXECUTE FUNCTION metering._entitlements_after_insert();
CREATE TRIGGER entitlements_before_update BEFORE UPDATE ON metering.entitlements
  FOR EACH ROW EXECUTE FUNCTION metering._entitlements_before_update();
CREATE TRIGGER entitlements_soft_delete BEFORE DELETE ON metering.entitlements
  FOR EACH ROW EXECUTE FUNCTION metering._soft_delete_entitlement();

CREATE FUNCTION metering.create_entitlement(subject text, feature text,
  type metering.entitlement_type DEFAULT 'metered', usage_period interval DEFAULT NULL,
  usage_period_anchor timestamptz DEFAULT NULL, measure_usage_from timestamptz DEFAULT NULL,
  is_soft_limit boolean DEFAULT false, issue_after_reset numeric DEFAULT NULL,
  issue_after_reset_priority integer DEFAULT 1, preserve_overage_at_reset boolean DEFAULT false,
  config jsonb DEFAULT NULL, metadata jsonb DEFAULT NULL) RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  f metering.features := metering._find_feature(feature);
  id uuid;
BEGIN
  IF EXISTS (SELECT 1 FROM metering.entitlements e
              WHERE e.subject = create_entitlement.subject AND e.feature_id = f.id AND e.deleted_at IS NULL) THEN
    RAISE EXCEPTION 'subject "%" already has an entitlement to feature "%"', create_entitlement.subject, f.key
      USING ERRCODE = 'unique_violation', HINT = 'Delete it first.';
  END IF;
  INSERT INTO metering.entitlements AS e (subject, feature_id, type, usage_period, usage_period_anchor,
    measure_usage_from, is_soft_limit, issue_after_reset, issue_after_reset_priority,
    preserve_overage_at_reset, config, metadata)
  VALUES (create_entitlement.subject, f.id, create_entitlement.type, create_entitlement.usage_period,
    create_entitlement.usage_period_anchor, create_entitlement.measure_usage_from,
    coalesce(create_entitlement.is_soft_limit, false), create_entitlement.issue_after_reset,
    coalesce(create_entitlement.issue_after_reset_priority, 1),
    coalesce(create_entitlement.preserve_overage_at_reset, false),
    create_entitlement.config, create_entitlement.metadata)
  RETURNING e.id INTO id;
  -- (the grant of issue_after_reset: 35_alerts.sql)
  IF create_entitlement.issue_after_reset IS NOT NULL THEN
    PERFORM metering._writer_alerts(id, create_entitlement.subject);
  END IF;
  RETURN id;
EXCEPTION WHEN unique_violation THEN
  -- a concurrent creation committed first: the same answer as the check above
  RAISE EXCEPTION 'subject "%" already has an entitlement to feature "%"', create_entitlement.subject, f.key
    USING ERRCODE = 'unique_violation', HINT = 'Delete it first.';
END $$;
COMMENT ON FUNCTION metering.create_entitlement(text, text, metering.entitlement_type, interval, timestamptz, timestamptz, boolean, numeric, integer, boolean, jsonb, jsonb) IS
  'gives a subject an entitlement to a feature (key or id) and returns its id';

CREATE FUNCTION metering.delete_entitlement(entitlement uuid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  e metering.entitlements;
BEGIN
  SELECT * INTO e FROM metering.entitlements WHERE id = entitlement;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'entitlement % does not exist', entitlement USING ERRCODE = 'no_data_found';
  END IF;
  IF e.deleted_at IS NOT NULL THEN
    RAISE EXCEPTION 'the entitlement is already deleted' USING ERRCODE = 'object_not_in_prerequisite_state',
      DETAIL = format('Entitlement %s was deleted at %s.', e.id, e.deleted_at);
  END IF;
  UPDATE metering.entitlements SET deleted_at = metering.now() WHERE id = entitlement AND subject = e.subject;
END $$;
COMMENT ON FUNCTION metering.delete_entitlement(uuid) IS
  'deletes an entitlement: from metering.now() on it gives no access; earlier instants still see it';
