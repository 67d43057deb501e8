-- Meters (OpenMeter): how events of one type turn into a number.

CREATE TYPE metering.aggregation AS ENUM
  ('SUM', 'COUNT', 'AVG', 'MIN', 'MAX', 'UNIQUE_COUNT', 'LATEST');
COMMENT ON TYPE metering.aggregation IS
  'how a meter combines the values of its events in a window';

CREATE TYPE metering.window_size AS ENUM ('MINUTE', 'HOUR', 'DAY');
COMMENT ON TYPE metering.window_size IS 'the window sizes of meter queries';

CREATE TABLE metering.meters (
  slug           text PRIMARY KEY,
  description    text,
  event_type     text NOT NULL,
  aggregation    metering.aggregation NOT NULL,
  value_property jsonpath,
  group_by       jsonb NOT NULL DEFAULT '{}',
  window_size    metering.window_size NOT NULL DEFAULT 'MINUTE',
  created_at     timestamptz NOT NULL DEFAULT metering.now(),
  deleted_at     timestamptz
);
COMMENT ON TABLE metering.meters IS
  'meter definitions: inserting a row defines a meter over every stored and future event of its type; DELETE is a soft delete; only description may change';
COMMENT ON COLUMN metering.meters.slug IS 'the meter''s name: lowercase letters, digits, _ and -';
COMMENT ON COLUMN metering.meters.description IS 'free text, the one column that may change';
COMMENT ON COLUMN metering.meters.event_type IS 'the CloudEvents type this meter counts';
COMMENT ON COLUMN metering.meters.aggregation IS 'SUM, COUNT, AVG, MIN, MAX, UNIQUE_COUNT or LATEST';
COMMENT ON COLUMN metering.meters.value_property IS 'JSONPath into the event data selecting the value; required except for COUNT';
COMMENT ON COLUMN metering.meters.group_by IS 'group name -> JSONPath into the event data';
COMMENT ON COLUMN metering.meters.window_size IS 'the smallest window the meter is reported in (informational: any window can be queried)';
COMMENT ON COLUMN metering.meters.created_at IS 'when the meter was defined (metering.now())';
COMMENT ON COLUMN metering.meters.deleted_at IS 'when the meter was deleted; a deleted meter cannot be queried';

-- LATEST's order of its values, the one rule every reader and writer of it
-- follows: the later instant, then the larger value, then (5 and 5.00,
-- equal numbers) the longer spelling, so that no answer depends on the
-- order the events came in.  The greatest key wins (max() of it, [2] its
-- value); a NULL instant or value has no place in the order (a NULL element
-- sorts above every value): callers leave those out.  Immutable (the epoch of the UTC wall time), as Citus wants of
-- what an upsert into a distributed table calls.
CREATE FUNCTION metering._latest_key(at timestamptz, v numeric) RETURNS numeric[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY[extract(epoch FROM at AT TIME ZONE 'UTC'), v, scale(v)];
COMMENT ON FUNCTION metering._latest_key(timestamptz, numeric) IS
  'internal: the order of LATEST values (instant, value, scale); the greatest wins';

CREATE FUNCTION metering._meters_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  g record;
  path jsonpath;
BEGIN
  IF NEW.slug IS NULL OR NEW.slug !~ '^[a-z0-9_-]{1,63}$' THEN
    RAISE EXCEPTION 'meter slug must be 1 to 63 lowercase letters, digits, _ or -, got %',
      coalesce(quote_literal(NEW.slug), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.event_type IS NULL OR NEW.event_type = '' THEN
    RAISE EXCEPTION 'meter "%": event_type is required', NEW.slug
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.aggregation IS NULL THEN
    RAISE EXCEPTION 'meter "%": aggregation is required', NEW.slug
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'One of SUM, COUNT, AVG, MIN, MAX, UNIQUE_COUNT, LATEST.';
  END IF;
  IF NEW.value_property IS NULL AND NEW.aggregation <> 'COUNT' THEN
    RAISE EXCEPTION 'meter "%": value_property is required for aggregation %', NEW.slug, NEW.aggregation
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF metering._meter_path_problem(NEW.value_property) IS NOT NULL THEN
    RAISE EXCEPTION 'meter "%": value_property % cannot be used: %', NEW.slug, NEW.value_property,
      metering._meter_path_problem(NEW.value_property)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.group_by IS NULL OR jsonb_typeof(NEW.group_by) <> 'object' THEN
    RAISE EXCEPTION 'meter "%": group_by must be a JSON object of name to JSONPath', NEW.slug
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR g IN SELECT key, value FROM jsonb_each(NEW.group_by) LOOP
    IF g.key = '' OR jsonb_typeof(g.value) <> 'string' THEN
      RAISE EXCEPTION 'meter "%": group_by "%" must map a non-empty name to a JSONPath string', NEW.slug, g.key
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
      path := (g.value #>> '{}')::jsonpath;
    EXCEPTION WHEN syntax_error OR invalid_text_representation OR invalid_regular_expression THEN
      RAISE EXCEPTION 'meter "%": group_by "%" is not a valid JSONPath: %', NEW.slug, g.key, g.value #>> '{}'
        USING ERRCODE = 'invalid_parameter_value';
    END;
    IF metering._meter_path_problem(path) IS NOT NULL THEN
      RAISE EXCEPTION 'meter "%": group_by "%" cannot be used: %', NEW.slug, g.key, metering._meter_path_problem(path)
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END LOOP;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._meters_before_insert() IS
  'internal: validates a meter definition';

-- A new meter starts with an empty rollup (watermark 0): it reads every
-- stored event of its type until refresh_rollups() rolls them up.
CREATE FUNCTION metering._meters_after_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM metering._require_own_table(TG_TABLE_SCHEMA, TG_NAME);
  IF NEW.deleted_at IS NULL THEN
    INSERT INTO metering.meter_rollup_state (meter) VALUES (NEW.slug);
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._meters_after_insert() IS
  'internal: gives a new meter its (empty) rollup';

CREATE FUNCTION metering._meters_before_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF (NEW.slug, NEW.event_type, NEW.aggregation, NEW.value_property::text, NEW.group_by,
      NEW.window_size, NEW.created_at)
     IS DISTINCT FROM
     (OLD.slug, OLD.event_type, OLD.aggregation, OLD.value_property::text, OLD.group_by,
      OLD.window_size, OLD.created_at) THEN
    RAISE EXCEPTION 'meter "%" is immutable: only description may change', OLD.slug
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Define a new meter with another slug, and delete this one.';
  END IF;
  IF OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS DISTINCT FROM OLD.deleted_at THEN
    RAISE EXCEPTION 'meter "%" is deleted', OLD.slug
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF NEW.deleted_at IS NOT NULL AND OLD.deleted_at IS NULL
     AND EXISTS (SELECT 1 FROM metering.features f
                  WHERE f.meter_slug = OLD.slug AND f.archived_at IS NULL AND f.deleted_at IS NULL) THEN
    RAISE EXCEPTION 'meter "%" is the meter of features that are not archived', OLD.slug
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Archive those features first.';
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._meters_before_update() IS
  'internal: meters are immutable but for description and the soft delete';

CREATE FUNCTION metering._meters_after_delete_mark() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM metering._require_own_table(TG_TABLE_SCHEMA, TG_NAME);
  DELETE FROM metering.meter_rollup_state WHERE meter = NEW.slug;
  DELETE FROM metering.meter_rollups WHERE meter = NEW.slug;
  DELETE FROM metering.usage_periods WHERE meter = NEW.slug;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._meters_after_delete_mark() IS
  'internal: drops the rollups and usage periods of a deleted meter';

CREATE FUNCTION metering._soft_delete_meter() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE metering.meters SET deleted_at = metering.now()
   WHERE slug = OLD.slug AND deleted_at IS NULL;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._soft_delete_meter() IS
  'internal: DELETE on metering.meters marks deleted_at and keeps the row';

CREATE TRIGGER meters_before_insert BEFORE INSERT ON metering.meters
  FOR EACH ROW EXECUTE FUNCTION metering._meters_before_insert();
CREATE TRIGGER meters_after_insert AFTER INSERT ON metering.meters
  FOR EACH ROW EXECUTE FUNCTION metering._meters_after_insert();
CREATE TRIGGER meters_before_update BEFORE UPDATE ON metering.meters
  FOR EACH ROW EXECUTE FUNCTION metering._meters_before_update();
CREATE TRIGGER meters_after_delete_mark AFTER UPDATE OF deleted_at ON metering.meters
  FOR EACH ROW WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL)
  EXECUTE FUNCTION metering._meters_after_delete_mark();
CREATE TRIGGER meters_soft_delete BEFORE DELETE ON metering.meters
  FOR EACH ROW EXECUTE FUNCTION metering._soft_delete_meter();
