-- metering 0.1.0 -> 0.2.0, the part that changes what 0.1.0 made.  make
-- appends the new files of 0.2.0 (features, entitlements, grants: the same
-- files a fresh install runs) to build metering--0.1.0--0.2.0.sql.

-- a meter that live features use cannot be deleted
CREATE OR REPLACE FUNCTION metering._meters_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
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

-- TRUNCATE of events also empties the entitlement snapshots
CREATE OR REPLACE FUNCTION metering._events_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  -- DELETE, not TRUNCATE: the same statement may be truncating the rollups too
  DELETE FROM metering.meter_rollups;
  DELETE FROM metering.usage_periods;
  UPDATE metering.meter_rollup_state SET rolled_up_to = 0;
  DELETE FROM metering.entitlement_snapshots;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._events_truncate() IS 'internal: TRUNCATE of events empties the rollups, the usage periods and the snapshots, and resets the watermarks';
-- its trigger's comment follows the function's (src/sql/95_object_comments.sql writes it again)
COMMENT ON TRIGGER events_truncate ON metering.events IS NULL;

-- rollups of SUM meters now keep their minimum (entitlements read buckets
-- with negative values event by event): the next refresh_rollups() rebuilds
-- them all
DELETE FROM metering.meter_rollups;
UPDATE metering.meter_rollup_state SET rolled_up_to = 0;
COMMENT ON COLUMN metering.meter_rollups.min IS 'smallest value (MIN and SUM meters)';

-- a deleted meter drops its usage periods too
CREATE OR REPLACE FUNCTION metering._meters_after_delete_mark() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM metering.meter_rollup_state WHERE meter = NEW.slug;
  DELETE FROM metering.meter_rollups WHERE meter = NEW.slug;
  DELETE FROM metering.usage_periods WHERE meter = NEW.slug;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._meters_after_delete_mark() IS
  'internal: drops the rollups and usage periods of a deleted meter';
-- its trigger's comment follows the function's (src/sql/95_object_comments.sql writes it again)
COMMENT ON TRIGGER meters_after_delete_mark ON metering.meters IS NULL;
