-- Features (OpenMeter): what an entitlement gives access to.

CREATE FUNCTION metering.calendar_step(anchor timestamptz, step interval, n bigint) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_calendar_step'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering.calendar_step(timestamptz, interval, bigint) IS
  'anchor + n * step in UTC, the day clamped to the end of the month, never chained: the boundaries of usage periods, expirations and recurrences';

CREATE FUNCTION metering._minute(t timestamptz, what text) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_minute'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._minute(timestamptz, text) IS 'internal: t truncated to the UTC minute; an infinite t is an error naming the field `what`';

CREATE FUNCTION metering._time_in_range(t timestamptz) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_time_in_range'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._time_in_range(timestamptz) IS 'internal: whether t is a finite time in the years 1 to 9999 (UTC), the extension''s range of instants';

CREATE FUNCTION metering._interval_at_least(iv interval, min interval) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_interval_at_least'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._interval_at_least(interval, interval) IS
  'internal: whether an interval has no negative field and is at least min long (a month counts as 28 days)';

CREATE TABLE metering.features (
  id                     uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  key                    text COLLATE "C" NOT NULL,
  name                   text NOT NULL,
  meter_slug             text REFERENCES metering.meters (slug),
  meter_group_by_filters jsonb,
  metadata               jsonb,
  created_at             timestamptz NOT NULL DEFAULT metering.now(),
  updated_at             timestamptz NOT NULL DEFAULT metering.now(),
  archived_at            timestamptz,
  deleted_at             timestamptz
);
CREATE UNIQUE INDEX features_live_key ON metering.features (key)
  WHERE archived_at IS NULL AND deleted_at IS NULL;
CREATE INDEX features_meter_idx ON metering.features (meter_slug);
COMMENT ON TABLE metering.features IS
  'features an entitlement gives access to; metered when they name a meter (SUM or COUNT); never updated, only archived (archive_feature) or deleted (soft)';
COMMENT ON COLUMN metering.features.id IS 'the feature id (uuid v7)';
COMMENT ON COLUMN metering.features.key IS 'lowercase letters, digits and dashes; unique among features that are neither archived nor deleted';
COMMENT ON COLUMN metering.features.name IS 'a readable name';
COMMENT ON COLUMN metering.features.meter_slug IS 'the meter whose value is the usage of metered entitlements';
COMMENT ON COLUMN metering.features.meter_group_by_filters IS 'group name -> value: only the meter''s events with these group values count';
COMMENT ON COLUMN metering.features.metadata IS 'free-form JSON object';
COMMENT ON COLUMN metering.features.created_at IS 'when the feature was created (metering.now())';
COMMENT ON COLUMN metering.features.updated_at IS 'the creation or the archiving time';
COMMENT ON COLUMN metering.features.archived_at IS 'when it was archived: no new entitlements from then on';
COMMENT ON COLUMN metering.features.deleted_at IS 'when it was deleted (DELETE keeps the row)';

CREATE FUNCTION metering._features_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  m metering.meters;
  f record;
  restored boolean := metering._restored(format('feature %s', coalesce(quote_literal(NEW.key), 'NULL')), NEW.created_at);
BEGIN
  IF NEW.key IS NULL OR NEW.key !~ '^[a-z0-9]+(-[a-z0-9]+)*$' OR length(NEW.key) > 64 THEN
    RAISE EXCEPTION 'feature key must be lowercase letters, digits and dashes (up to 64), got %',
      coalesce(quote_literal(NEW.key), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.name IS NULL OR btrim(NEW.name) = '' THEN
    RAISE EXCEPTION 'feature "%": name is required', NEW.key USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.metadata IS NOT NULL AND jsonb_typeof(NEW.metadata) <> 'object' THEN
    RAISE EXCEPTION 'feature "%": metadata must be a JSON object', NEW.key USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.meter_slug IS NULL THEN
    IF NEW.meter_group_by_filters IS NOT NULL THEN
      RAISE EXCEPTION 'feature "%": meter_group_by_filters needs a meter', NEW.key
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  ELSE
    -- a restored feature (created earlier) may name a meter deleted since
    SELECT * INTO m FROM metering.meters WHERE slug = NEW.meter_slug
       AND (deleted_at IS NULL OR restored);
    IF NOT FOUND THEN
      RAISE EXCEPTION 'feature "%": meter "%" does not exist', NEW.key, NEW.meter_slug
        USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF m.aggregation NOT IN ('SUM', 'COUNT') THEN
      RAISE EXCEPTION 'feature "%": meter "%" aggregates with %, but a feature''s meter must SUM or COUNT',
        NEW.key, m.slug, m.aggregation
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.meter_group_by_filters IS NOT NULL THEN
      IF jsonb_typeof(NEW.meter_group_by_filters) <> 'object' THEN
        RAISE EXCEPTION 'feature "%": meter_group_by_filters must be a JSON object of group name to value', NEW.key
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      FOR f IN SELECT key, value FROM jsonb_each(NEW.meter_group_by_filters) LOOP
        IF NOT m.group_by ? f.key THEN
          RAISE EXCEPTION 'feature "%": meter_group_by_filters "%" is not a group of meter "%"', NEW.key, f.key, m.slug
            USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(f.value) NOT IN ('string', 'number', 'boolean') THEN
          RAISE EXCEPTION 'feature "%": meter_group_by_filters "%" must be a single value', NEW.key, f.key
            USING ERRCODE = 'invalid_parameter_value';
        END IF;
      END LOOP;
      -- group values are compared as text, as the meter stores them
      NEW.meter_group_by_filters := (SELECT jsonb_object_agg(key, value #>> '{}')
                                       FROM jsonb_each(NEW.meter_group_by_filters));
    END IF;
  END IF;
  IF NOT restored THEN
    NEW.updated_at := NEW.created_at;
    IF NEW.archived_at IS NOT NULL OR NEW.deleted_at IS NOT NULL THEN
      RAISE EXCEPTION 'feature "%": a new feature is neither archived nor deleted', NEW.key
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._features_before_insert() IS 'internal: validates a feature';

CREATE FUNCTION metering._features_before_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- compared as JSON, where '1 mon' and '30 days' differ and no column is forgotten
  IF (to_jsonb(NEW) - 'archived_at' - 'deleted_at' - 'updated_at')
     IS DISTINCT FROM (to_jsonb(OLD) - 'archived_at' - 'deleted_at' - 'updated_at')
     OR (NEW.updated_at IS DISTINCT FROM OLD.updated_at
         AND NOT (NEW.archived_at IS DISTINCT FROM OLD.archived_at OR NEW.deleted_at IS DISTINCT FROM OLD.deleted_at)) THEN
    RAISE EXCEPTION 'feature "%" is immutable: it can only be archived or deleted', OLD.key
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF OLD.archived_at IS NOT NULL AND NEW.archived_at IS DISTINCT FROM OLD.archived_at THEN
    RAISE EXCEPTION 'feature "%" is already archived', OLD.key USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS DISTINCT FROM OLD.deleted_at THEN
    RAISE EXCEPTION 'feature "%" is deleted', OLD.key USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF NEW.archived_at IS NOT NULL AND OLD.archived_at IS NULL THEN
    NEW.archived_at := metering.now();
    NEW.updated_at := NEW.archived_at;
  END IF;
  IF NEW.deleted_at IS NOT NULL AND OLD.deleted_at IS NULL THEN
    NEW.deleted_at := metering.now();
    NEW.updated_at := NEW.deleted_at;
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._features_before_update() IS
  'internal: features are immutable but for archiving and deleting, which take metering.now()';

CREATE FUNCTION metering._soft_delete_feature() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE metering.features SET deleted_at = metering.now() WHERE id = OLD.id AND deleted_at IS NULL;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._soft_delete_feature() IS 'internal: DELETE on metering.features marks deleted_at';

CREATE TRIGGER features_before_insert BEFORE INSERT ON metering.features
  FOR EACH ROW EXECUTE FUNCTION metering._features_before_insert();
CREATE TRIGGER features_before_update BEFORE UPDATE ON metering.features
  FOR EACH ROW EXECUTE FUNCTION metering._features_before_update();
CREATE TRIGGER features_soft_delete BEFORE DELETE ON metering.features
  FOR EACH ROW EXECUTE FUNCTION metering._soft_delete_feature();

CREATE FUNCTION metering.create_feature(key text, name text, meter_slug text DEFAULT NULL,
  meter_group_by_filters jsonb DEFAULT NULL, metadata jsonb DEFAULT NULL) RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  id uuid;
BEGIN
  IF EXISTS (SELECT 1 FROM metering.features f
              WHERE f.key = create_feature.key AND f.archived_at IS NULL AND f.deleted_at IS NULL) THEN
    RAISE EXCEPTION 'a feature with key "%" already exists', create_feature.key
      USING ERRCODE = 'unique_violation', HINT = 'Archive it first to reuse the key.';
  END IF;
  INSERT INTO metering.features AS f (key, name, meter_slug, meter_group_by_filters, metadata)
  VALUES (create_feature.key, create_feature.name, create_feature.meter_slug,
          create_feature.meter_group_by_filters, create_feature.metadata)
  RETURNING f.id INTO id;
  RETURN id;
END $$;
COMMENT ON FUNCTION metering.create_feature(text, text, text, jsonb, jsonb) IS
  'creates a feature (metered when it names a SUM or COUNT meter) and returns its id';

-- a feature by key (the live one) or by id
CREATE FUNCTION metering._find_feature(feature text) RETURNS metering.features
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  f metering.features;
BEGIN
  IF feature ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
    SELECT * INTO f FROM metering.features WHERE id = feature::uuid;
  END IF;
  IF f.id IS NULL THEN
    SELECT * INTO f FROM metering.features
     WHERE key = feature ORDER BY (archived_at IS NULL AND deleted_at IS NULL) DESC, created_at DESC LIMIT 1;
  END IF;
  IF f.id IS NULL THEN
    RAISE EXCEPTION 'feature "%" does not exist', feature USING ERRCODE = 'no_data_found';
  END IF;
  RETURN f;
END $$;
COMMENT ON FUNCTION metering._find_feature(text) IS 'internal: a feature by id, or by key (the live one first)';

CREATE FUNCTION metering.archive_feature(feature text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  f metering.features := metering._find_feature(feature);
BEGIN
  IF f.archived_at IS NOT NULL THEN
    RAISE EXCEPTION 'feature "%" is already archived', f.key USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  UPDATE metering.features SET archived_at = metering.now() WHERE id = f.id;
END $$;
COMMENT ON FUNCTION metering.archive_feature(text) IS
  'archives a feature (key or id): it takes no new entitlements, existing ones stay; one-way';
