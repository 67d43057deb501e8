-- metering: usage metering, entitlements, credit grants and rating.
\echo Use "CREATE EXTENSION metering" to load this file. \quit

COMMENT ON SCHEMA metering IS
  'usage metering, entitlements, credit grants and rating (the metering extension)';

-- Internal helpers (names starting with _) are not part of the public
-- surface; nobody but the extension owner may run them.
-- The clock and identifiers every other part uses.

CREATE FUNCTION metering.now() RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_now'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering.now() IS
  'the extension''s present: the setting metering.now when set (by a superuser or the extension owner), else the start of the current transaction';

CREATE FUNCTION metering.uuid_v7() RETURNS uuid
  AS 'MODULE_PATHNAME', 'metering_uuid_v7'
  LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION metering.uuid_v7() IS
  'a new time-ordered uuid (RFC 9562 version 7), monotonic within a backend';

CREATE FUNCTION metering.uuid_v7_time(id uuid) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_uuid_v7_time'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering.uuid_v7_time(uuid) IS
  'the instant, to the millisecond, at which a version 7 uuid was made';

CREATE FUNCTION metering._valid_time_zone(zone text) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_valid_time_zone'
  LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._valid_time_zone(text) IS
  'internal: whether date_trunc and AT TIME ZONE accept this time zone name';
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

CREATE FUNCTION metering._meters_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.deleted_at IS NULL THEN
    INSERT INTO metering.meter_rollup_state (meter) VALUES (NEW.slug);
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._meters_after_insert() IS
  'internal: gives a new meter its (empty) rollup';

CREATE FUNCTION metering._meters_before_update() RETURNS trigger
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

CREATE FUNCTION metering._meters_after_delete_mark() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM metering.meter_rollup_state WHERE meter = NEW.slug;
  DELETE FROM metering.meter_rollups WHERE meter = NEW.slug;
  DELETE FROM metering.usage_periods WHERE meter = NEW.slug;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._meters_after_delete_mark() IS
  'internal: drops the rollups and usage periods of a deleted meter';

CREATE FUNCTION metering._soft_delete_meter() RETURNS trigger
LANGUAGE plpgsql AS $$
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
-- Events (CloudEvents 1.0) and the hourly rollups derived from them.

-- Identifiers compare byte by byte (COLLATE "C"): they are not prose, their
-- order must not change with the operating system's locale data, and their
-- indexes are much cheaper to maintain.
CREATE TABLE metering.events (
  id          text COLLATE "C" NOT NULL,
  source      text COLLATE "C" NOT NULL,
  subject     text COLLATE "C" NOT NULL,
  type        text COLLATE "C" NOT NULL,
  time        timestamptz NOT NULL DEFAULT metering.now(),
  data        jsonb NOT NULL DEFAULT '{}',
  ingested_at timestamptz NOT NULL DEFAULT metering.now(),
  seq         bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME metering.events_seq),
  PRIMARY KEY (source, id),
  CONSTRAINT events_id_not_empty CHECK (id <> ''),
  CONSTRAINT events_source_not_empty CHECK (source <> ''),
  CONSTRAINT events_subject_not_empty CHECK (subject <> ''),
  CONSTRAINT events_type_not_empty CHECK (type <> ''),
  CONSTRAINT events_data_is_object CHECK (jsonb_typeof(data) = 'object'),
  CONSTRAINT events_time_is_finite CHECK (isfinite(time))
);
-- Events arrive roughly in time and exactly in seq order: a BRIN index finds
-- the events of a time range, and those not yet rolled up, for almost nothing
-- per insert.  Per-subject questions are answered from the rollups, which
-- are indexed by subject; a btree on (subject, type, time) here would cost a
-- third of the ingest rate (README, Scaling).
CREATE INDEX events_seq_time_brin ON metering.events USING brin (seq, time);
COMMENT ON TABLE metering.events IS
  'usage events (CloudEvents 1.0); (source, id) is unique and a repeat is a duplicate; rows are immutable; a plain INSERT is as good as metering.ingest';
COMMENT ON COLUMN metering.events.id IS 'the CloudEvents id, unique per source';
COMMENT ON COLUMN metering.events.source IS 'the CloudEvents source';
COMMENT ON COLUMN metering.events.subject IS 'the metered party (customer, tenant, account)';
COMMENT ON COLUMN metering.events.type IS 'the CloudEvents type; meters select events by it';
COMMENT ON COLUMN metering.events.time IS 'when the usage happened';
COMMENT ON COLUMN metering.events.data IS 'the event payload, a JSON object';
COMMENT ON COLUMN metering.events.ingested_at IS 'when the event was stored (metering.now())';
COMMENT ON SEQUENCE metering.events_seq IS 'numbers events in the order they are stored';
COMMENT ON COLUMN metering.events.seq IS 'storage order, from metering.events_seq; rollups cover events up to a watermark on it';

CREATE TABLE metering.meter_rollups (
  meter        text COLLATE "C" NOT NULL,
  subject      text COLLATE "C" NOT NULL,
  bucket       timestamptz NOT NULL,
  groups       jsonb NOT NULL,
  events       bigint NOT NULL,
  valued       bigint NOT NULL,
  sum          numeric,
  min          numeric,
  max          numeric,
  first_time   timestamptz NOT NULL,
  last_time    timestamptz NOT NULL,
  latest_time  timestamptz,
  latest_value numeric,
  PRIMARY KEY (meter, subject, bucket, groups)
);
COMMENT ON TABLE metering.meter_rollups IS
  'derived: per meter, subject, UTC hour and group values, the partial aggregates of its events up to the meter''s watermark; written by metering.refresh_rollups() and DELETE triggers, never by hand';
COMMENT ON COLUMN metering.meter_rollups.meter IS 'the meter slug';
COMMENT ON COLUMN metering.meter_rollups.subject IS 'the event subject';
COMMENT ON COLUMN metering.meter_rollups.bucket IS 'start of the UTC hour';
COMMENT ON COLUMN metering.meter_rollups.groups IS 'the group values of the meter''s group_by, as text (null when missing)';
COMMENT ON COLUMN metering.meter_rollups.events IS 'events in the bucket';
COMMENT ON COLUMN metering.meter_rollups.valued IS 'events whose value the meter could use';
COMMENT ON COLUMN metering.meter_rollups.sum IS 'sum of the values (SUM and AVG meters)';
COMMENT ON COLUMN metering.meter_rollups.min IS 'smallest value (MIN and SUM meters)';
COMMENT ON COLUMN metering.meter_rollups.max IS 'largest value (MAX meters)';
COMMENT ON COLUMN metering.meter_rollups.first_time IS 'first event instant in the bucket';
COMMENT ON COLUMN metering.meter_rollups.last_time IS 'last event instant in the bucket';
COMMENT ON COLUMN metering.meter_rollups.latest_time IS 'instant of the latest value (LATEST meters)';
COMMENT ON COLUMN metering.meter_rollups.latest_value IS 'the latest value; at equal instants the largest (LATEST meters)';

CREATE TABLE metering.meter_rollup_state (
  meter        text PRIMARY KEY,
  rolled_up_to bigint NOT NULL DEFAULT 0,
  refreshed_at timestamptz
);
COMMENT ON TABLE metering.meter_rollup_state IS
  'derived: per live meter, the watermark of its rollups: they hold exactly its events with seq <= rolled_up_to; readers add the rest from metering.events';
COMMENT ON COLUMN metering.meter_rollup_state.meter IS 'the meter slug';
COMMENT ON COLUMN metering.meter_rollup_state.rolled_up_to IS 'the highest events.seq the rollups include';
COMMENT ON COLUMN metering.meter_rollup_state.refreshed_at IS 'when metering.refresh_rollups() last moved the watermark (metering.now())';

CREATE FUNCTION metering.refresh_rollups(meter text DEFAULT NULL) RETURNS bigint
  AS 'MODULE_PATHNAME', 'metering_refresh_rollups'
  LANGUAGE C VOLATILE;
COMMENT ON FUNCTION metering.refresh_rollups(text) IS
  'rolls up the events stored since the last refresh, for every live meter or one; never blocks ingestion; run it every few minutes (answers are exact without it, only slower); returns the (meter, event) pairs added';

CREATE FUNCTION metering._events_deleted() RETURNS trigger
  AS 'MODULE_PATHNAME', 'metering_events_deleted'
  LANGUAGE C;
COMMENT ON FUNCTION metering._events_deleted() IS
  'internal: rebuilds the rolled-up hours of deleted events';

CREATE FUNCTION metering._events_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'events are immutable: cannot update event "%" of source "%"', OLD.id, OLD.source
    USING ERRCODE = 'object_not_in_prerequisite_state',
          HINT = 'Record a correcting event instead, or delete the event.';
END $$;
COMMENT ON FUNCTION metering._events_immutable() IS 'internal: events are never updated';

CREATE FUNCTION metering._events_truncate() RETURNS trigger
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

CREATE TRIGGER events_deleted AFTER DELETE ON metering.events
  REFERENCING OLD TABLE AS old_events
  FOR EACH STATEMENT EXECUTE FUNCTION metering._events_deleted();
CREATE TRIGGER events_immutable BEFORE UPDATE ON metering.events
  FOR EACH ROW EXECUTE FUNCTION metering._events_immutable();
CREATE TRIGGER events_truncate AFTER TRUNCATE ON metering.events
  FOR EACH STATEMENT EXECUTE FUNCTION metering._events_truncate();

-- meter value helpers, shared by raw scans and views
CREATE FUNCTION metering._meter_number(data jsonb, path jsonpath) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_meter_number'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._meter_number(jsonb, jsonpath) IS
  'internal: the numeric value a meter reads from event data (a JSON number or a numeric string), else NULL';

CREATE FUNCTION metering._meter_text(data jsonb, path jsonpath) RETURNS text
  AS 'MODULE_PATHNAME', 'metering_meter_text'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._meter_text(jsonb, jsonpath) IS
  'internal: the value a meter reads from event data as text (strings as they are, others in JSON spelling), NULL when missing';

CREATE FUNCTION metering._meter_groups(data jsonb, group_by jsonb) RETURNS jsonb
  AS 'MODULE_PATHNAME', 'metering_meter_groups'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._meter_groups(jsonb, jsonb) IS
  'internal: the group values of one event for a meter''s group_by';

CREATE FUNCTION metering._meter_path_problem(path jsonpath) RETURNS text
  AS 'MODULE_PATHNAME', 'metering_meter_path_problem'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._meter_path_problem(jsonpath) IS
  'internal: why a JSONPath cannot serve a meter (it uses variables or datetime()), or NULL';
-- Ingestion: CloudEvents in, exactly once per (source, id).

CREATE FUNCTION metering._parse_events(events jsonb, batch boolean,
  OUT ord integer, OUT id text, OUT source text, OUT subject text, OUT type text,
  OUT "time" timestamptz, OUT data jsonb)
  RETURNS SETOF record
  AS 'MODULE_PATHNAME', 'metering_parse_events'
  LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION metering._parse_events(jsonb, boolean) IS
  'internal: validates one CloudEvents object (batch false) or an array of them, and returns the rows to store';

-- _parse_events returns a batch in (source, id) order (see ingest.c).
CREATE FUNCTION metering.ingest(event jsonb) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  n bigint;
BEGIN
  IF event IS NULL THEN
    RAISE EXCEPTION 'event must not be NULL' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO metering.events AS e (id, source, subject, type, time, data)
  SELECT p.id, p.source, p.subject, p.type, p.time, p.data
    FROM metering._parse_events(event, false) p
  ON CONFLICT (source, id) DO NOTHING;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n = 1;
END $$;
COMMENT ON FUNCTION metering.ingest(jsonb) IS
  'stores one CloudEvents 1.0 event; true when stored, false when (source, id) was already stored';

CREATE FUNCTION metering.ingest_batch(events jsonb)
  RETURNS TABLE(accepted bigint, duplicates bigint)
LANGUAGE plpgsql AS $$
DECLARE
  n bigint;
BEGIN
  IF events IS NULL THEN
    RAISE EXCEPTION 'events must not be NULL' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO metering.events AS e (id, source, subject, type, time, data)
  SELECT p.id, p.source, p.subject, p.type, p.time, p.data
    FROM metering._parse_events(events, true) p
  ON CONFLICT (source, id) DO NOTHING;
  GET DIAGNOSTICS n = ROW_COUNT;
  accepted := n;
  duplicates := jsonb_array_length(events) - n;
  RETURN NEXT;
END $$;
COMMENT ON FUNCTION metering.ingest_batch(jsonb) IS
  'stores an array of CloudEvents 1.0 events, all or nothing for invalid input (the error names the index and the field); repeats of stored or earlier (source, id) are counted as duplicates';
-- Querying meters: values per window, subject and group.

CREATE TYPE metering.meter_value AS (
  window_start timestamptz,
  window_end   timestamptz,
  subject      text,
  group_by     jsonb,
  value        numeric
);
COMMENT ON TYPE metering.meter_value IS
  'one row of metering.query_meter: the meter''s value in [window_start, window_end) for a subject and group';

-- The start of the window containing instant `expr` (SQL text), for a
-- window size and a time zone placeholder; NULL window: the whole range.
CREATE FUNCTION metering._window_start_sql(window_size text, expr text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN window_size IS NULL THEN 'NULL::timestamptz'
              ELSE format('date_trunc(%L, %s, $6)', lower(window_size), expr) END
$$;
COMMENT ON FUNCTION metering._window_start_sql(text, text) IS
  'internal: SQL text of the window start of an instant';

-- The end of a window is the start of the next one, found by truncating an
-- instant safely inside it: this gives 23- and 25-hour days on DST changes.
CREATE FUNCTION metering._window_end_sql(window_size text, expr text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT format('date_trunc(%L, %s + interval %L, $6)', lower(window_size), expr,
                CASE window_size WHEN 'MINUTE' THEN '90 seconds'
                                 WHEN 'HOUR' THEN '90 minutes'
                                 ELSE '36 hours' END)
$$;
COMMENT ON FUNCTION metering._window_end_sql(text, text) IS
  'internal: SQL text of the end of the window starting at an instant';

CREATE FUNCTION metering.query_meter(
  meter text,
  from_time timestamptz DEFAULT NULL,
  to_time timestamptz DEFAULT NULL,
  window_size text DEFAULT NULL,
  window_time_zone text DEFAULT 'UTC',
  subjects text[] DEFAULT NULL,
  group_by text[] DEFAULT NULL,
  filter_group_by jsonb DEFAULT NULL)
RETURNS SETOF metering.meter_value
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  m metering.meters;
  w text := upper(window_size);
  names text[];
  drop_names text[];
  name text;
  filter_sql text := '';
  f record;
  vals text[];
  lo_h timestamptz;             -- rollups cover [lo_h, hi_h)
  hi_h timestamptz;
  use_rollups boolean;
  raw_where text;
  watermark bigint;
  raw_cols text;
  subject_sql text;
  straddles text;
  parts text[] := '{}';
  value_sql text;
  raw_value text;
  raw_valued text;
  raw_text text := 'NULL::text';
  sql text;
BEGIN
  SELECT * INTO m FROM metering.meters mm WHERE mm.slug = meter AND mm.deleted_at IS NULL;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'meter "%" does not exist', meter USING ERRCODE = 'no_data_found';
  END IF;
  IF w IS NOT NULL AND w NOT IN ('MINUTE', 'HOUR', 'DAY') THEN
    RAISE EXCEPTION 'window_size must be MINUTE, HOUR or DAY, not "%"', window_size
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF window_time_zone IS NULL OR NOT metering._valid_time_zone(window_time_zone) THEN
    RAISE EXCEPTION 'window_time_zone "%" is not a known time zone', window_time_zone
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use a name of pg_timezone_names, such as America/New_York.';
  END IF;
  IF from_time > to_time THEN
    RAISE EXCEPTION 'from_time (%) is after to_time (%)', from_time, to_time
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  names := ARRAY(SELECT jsonb_object_keys(m.group_by));
  FOREACH name IN ARRAY coalesce(group_by, '{}') LOOP
    IF name IS NULL OR NOT name = ANY (names) THEN
      RAISE EXCEPTION 'group_by "%" is not a group of meter "%"', name, m.slug
        USING ERRCODE = 'invalid_parameter_value',
              HINT = format('The meter groups by: %s.', coalesce(nullif(array_to_string(names, ', '), ''), 'nothing'));
    END IF;
  END LOOP;
  drop_names := ARRAY(SELECT unnest(names) EXCEPT SELECT unnest(group_by));

  IF filter_group_by IS NOT NULL THEN
    IF jsonb_typeof(filter_group_by) <> 'object' THEN
      RAISE EXCEPTION 'filter_group_by must be a JSON object such as {"name": "value"} or {"name": ["v1", "v2"]}'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR f IN SELECT key, value FROM jsonb_each(filter_group_by) LOOP
      IF NOT f.key = ANY (names) THEN
        RAISE EXCEPTION 'filter_group_by "%" is not a group of meter "%"', f.key, m.slug
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF jsonb_typeof(f.value) = 'array' THEN
        IF EXISTS (SELECT 1 FROM jsonb_array_elements(f.value) v
                    WHERE jsonb_typeof(v) IN ('array', 'object', 'null')) THEN
          RAISE EXCEPTION 'filter_group_by "%" must be a value or an array of values', f.key
            USING ERRCODE = 'invalid_parameter_value';
        END IF;
        vals := ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(f.value) v);
      ELSIF jsonb_typeof(f.value) IN ('string', 'number', 'boolean') THEN
        vals := ARRAY[f.value #>> '{}'];
      ELSE
        RAISE EXCEPTION 'filter_group_by "%" must be a value or an array of values', f.key
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      filter_sql := filter_sql || format(' AND (p.groups ->> %L) = ANY (%L::text[])', f.key, vals);
    END LOOP;
  END IF;

  -- Three regions, read in one statement so they share one snapshot:
  --   whole UTC hours of the range, from the rollups (events up to the
  --     meter's watermark), but for hours that straddle two windows (a time
  --     zone whose offset is not a whole hour at that moment);
  --   the same hours from the events: those above the watermark, and all
  --     of a straddling hour;
  --   the partial hours at either end, from the events.
  -- MINUTE windows and UNIQUE_COUNT read the events only.
  lo_h := CASE WHEN from_time IS NULL THEN '-infinity'
               ELSE date_trunc('hour', from_time, 'UTC')
                    + CASE WHEN date_trunc('hour', from_time, 'UTC') < from_time
                           THEN interval '1 hour' ELSE interval '0' END END;
  hi_h := CASE WHEN to_time IS NULL THEN 'infinity' ELSE date_trunc('hour', to_time, 'UTC') END;
  use_rollups := m.aggregation <> 'UNIQUE_COUNT' AND coalesce(w, '') <> 'MINUTE' AND lo_h < hi_h;
  IF use_rollups AND w IS NOT NULL AND window_time_zone <> 'UTC' THEN
    straddles := format('date_trunc(%1$L, %%1$s, $6) <> date_trunc(%1$L, %%1$s + interval %2$L, $6)',
                        lower(w), '59 minutes 59.999999 seconds');
  END IF;

  IF m.aggregation = 'COUNT' THEN
    raw_value := 'NULL::numeric';
    raw_valued := '1::bigint';
  ELSIF m.aggregation = 'UNIQUE_COUNT' THEN
    raw_value := 'NULL::numeric';
    raw_text := 'metering._meter_text(e.data, $3)';
    raw_valued := format('(%s IS NOT NULL)::int::bigint', raw_text);
  ELSE
    raw_value := 'metering._meter_number(e.data, $3)';
    raw_valued := '(x.v IS NOT NULL)::int::bigint';
  END IF;
  -- the columns of a rollup row, for one event
  raw_cols := format(
    'e.subject, %s AS ws, %s AS groups, 1::bigint AS events, %s AS valued,
     x.v AS sum, x.v AS min, x.v AS max, e.time AS first_time, e.time AS last_time,
     CASE WHEN x.v IS NOT NULL THEN e.time END AS latest_time, x.v AS latest_value, %s AS utext',
    metering._window_start_sql(w, 'e.time'),
    -- group values only when the question groups or filters by them
    CASE WHEN m.group_by = '{}' OR (group_by IS NULL AND filter_group_by IS NULL) THEN '''{}''::jsonb'
         ELSE 'metering._meter_groups(e.data, $4)' END,
    raw_valued, raw_text);
  subject_sql := CASE WHEN subjects IS NOT NULL THEN 'AND e.subject = ANY ($5)' ELSE '' END;

  IF use_rollups THEN
    -- given subjects, one index range per subject whatever the statistics say
    parts := parts || format(
      'SELECT r.subject, %s AS ws, r.groups, r.events, r.valued, r.sum, r.min, r.max,
              r.first_time, r.last_time, r.latest_time, r.latest_value, NULL::text AS utext
         FROM %s
        WHERE r.meter = $1 AND r.bucket >= $9 AND r.bucket < $10 %s',
      metering._window_start_sql(w, 'r.bucket'),
      CASE WHEN subjects IS NOT NULL
           THEN '(SELECT DISTINCT unnest($5) AS subject) s
                 CROSS JOIN LATERAL (SELECT * FROM metering.meter_rollups r0
                                      WHERE r0.meter = $1 AND r0.subject = s.subject
                                        AND r0.bucket >= $9 AND r0.bucket < $10) r'
           ELSE 'metering.meter_rollups r' END,
      CASE WHEN straddles IS NOT NULL THEN 'AND NOT (' || format(straddles, 'r.bucket') || ')' ELSE '' END);
    raw_where := array_to_string(ARRAY[
      CASE WHEN from_time < lo_h THEN '(e.time >= $7 AND e.time < $9)' END,
      CASE WHEN hi_h < to_time THEN '(e.time >= $10 AND e.time < $8)' END,
      '(e.time >= $9 AND e.time < $10 AND e.seq > $12)'], ' OR ');
    parts := parts || format(
      'SELECT %s FROM metering.events e CROSS JOIN LATERAL (SELECT %s AS v) x
        WHERE e.type = $2 %s AND (%s)',
      raw_cols, raw_value, subject_sql, raw_where);
    IF straddles IS NOT NULL THEN
      parts := parts || format(
        'SELECT %s
           FROM (SELECT DISTINCT r.subject, r.bucket FROM metering.meter_rollups r
                  WHERE r.meter = $1 AND r.bucket >= $9 AND r.bucket < $10 AND %s %s) sb
           JOIN metering.events e ON e.subject = sb.subject AND e.type = $2
                                 AND e.time >= sb.bucket AND e.time < sb.bucket + interval ''1 hour''
           CROSS JOIN LATERAL (SELECT %s AS v) x
          WHERE e.seq <= $12',
        raw_cols, format(straddles, 'r.bucket'),
        CASE WHEN subjects IS NOT NULL THEN 'AND r.subject = ANY ($5)' ELSE '' END, raw_value);
    END IF;
  ELSE
    parts := parts || format(
      'SELECT %s FROM metering.events e CROSS JOIN LATERAL (SELECT %s AS v) x
        WHERE e.type = $2 %s %s %s',
      raw_cols, raw_value, subject_sql,
      CASE WHEN from_time IS NOT NULL THEN 'AND e.time >= $7' ELSE '' END,
      CASE WHEN to_time IS NOT NULL THEN 'AND e.time < $8' ELSE '' END);
  END IF;

  value_sql := CASE m.aggregation
    WHEN 'SUM' THEN 'coalesce(sum(p.sum), 0)'
    WHEN 'COUNT' THEN 'sum(p.events)::numeric'
    WHEN 'AVG' THEN 'sum(p.sum) / nullif(sum(p.valued), 0)'
    WHEN 'MIN' THEN 'min(p.min)'
    WHEN 'MAX' THEN 'max(p.max)'
    WHEN 'LATEST' THEN '(array_agg(p.latest_value ORDER BY p.latest_time DESC, p.latest_value DESC)
                         FILTER (WHERE p.latest_time IS NOT NULL))[1]'
    WHEN 'UNIQUE_COUNT' THEN 'count(DISTINCT p.utext)::numeric'
  END;

  sql := format($q$
    WITH p AS (%1$s),
    a AS (
      SELECT p.ws, p.subject, p.groups - $11 AS g, %2$s AS value,
             min(p.first_time) AS ft, max(p.last_time) AS lt
        FROM p
       WHERE true %3$s
       GROUP BY 1, 2, 3
    )
    SELECT %4$s, %5$s, a.subject, a.g, a.value
      FROM a
     ORDER BY 1, 3, 4$q$,
    array_to_string(parts, ' UNION ALL '),
    value_sql,
    filter_sql,
    CASE WHEN w IS NULL THEN 'coalesce($7, min(a.ft) OVER ())' ELSE 'a.ws' END,
    CASE WHEN w IS NULL THEN 'coalesce($8, max(a.lt) OVER ())'
         ELSE metering._window_end_sql(w, 'a.ws') END);

  -- The watermark is passed in as a value, so that the planner knows how few
  -- events lie above it.  A STABLE function reads with one snapshot, so the
  -- rollups the statement reads are the ones this watermark describes.
  watermark := coalesce((SELECT s.rolled_up_to FROM metering.meter_rollup_state s WHERE s.meter = m.slug), 0);
  RETURN QUERY EXECUTE sql
    USING m.slug, m.event_type, m.value_property, m.group_by, subjects,
          window_time_zone, from_time, to_time, lo_h, hi_h, drop_names, watermark;
END $fn$;
COMMENT ON FUNCTION metering.query_meter(text, timestamptz, timestamptz, text, text, text[], text[], jsonb) IS
  'the meter''s value per window, subject and group in [from_time, to_time); windows MINUTE, HOUR or DAY aligned in window_time_zone, or one window for the whole range';
-- Views over meters.

CREATE VIEW metering.meter_rejected_values AS
SELECT m.slug AS meter,
       coalesce((SELECT sum(r.events - r.valued) FROM metering.meter_rollups r WHERE r.meter = m.slug), 0)::bigint
       + (SELECT count(*) FROM metering.events e
           WHERE e.type = m.event_type AND e.seq > coalesce(s.rolled_up_to, 0)
             AND NOT CASE m.aggregation
                       WHEN 'COUNT' THEN true
                       WHEN 'UNIQUE_COUNT' THEN metering._meter_text(e.data, m.value_property) IS NOT NULL
                       ELSE metering._meter_number(e.data, m.value_property) IS NOT NULL END) AS events
  FROM metering.meters m
  LEFT JOIN metering.meter_rollup_state s ON s.meter = m.slug
 WHERE m.deleted_at IS NULL;
COMMENT ON VIEW metering.meter_rejected_values IS
  'per live meter, how many of its events it ignored because the value was missing (or, but for UNIQUE_COUNT, not a number)';
COMMENT ON COLUMN metering.meter_rejected_values.meter IS 'the meter slug';
COMMENT ON COLUMN metering.meter_rejected_values.events IS 'events ignored by the meter';
-- Per-database signing secrets (JWTs of register_usage, signed cursors).

CREATE TABLE metering.signing_keys (
  version    integer PRIMARY KEY CHECK (version >= 1),
  secret     bytea NOT NULL CHECK (octet_length(secret) >= 32),
  created_at timestamptz NOT NULL DEFAULT metering.now()
);
REVOKE ALL ON metering.signing_keys FROM PUBLIC;
COMMENT ON TABLE metering.signing_keys IS
  'HMAC-SHA256 secrets of this database, by version; the highest version is current; made on first use, rotated with metering.rotate_signing_key()';
COMMENT ON COLUMN metering.signing_keys.version IS 'key version (AWS PublicKeyVersion), from 1';
COMMENT ON COLUMN metering.signing_keys.secret IS 'the secret, at least 32 random bytes';
COMMENT ON COLUMN metering.signing_keys.created_at IS 'when the key was made: the rotation instant of the key before it';

CREATE FUNCTION metering._hmac_sha256(message text, key bytea) RETURNS bytea
  AS 'MODULE_PATHNAME', 'metering_hmac_sha256'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._hmac_sha256(text, bytea) IS 'internal: HMAC-SHA256 of a message';

CREATE FUNCTION metering._base64url(data bytea) RETURNS text
  AS 'MODULE_PATHNAME', 'metering_base64url'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._base64url(bytea) IS 'internal: base64url without padding';

CREATE FUNCTION metering._jwt_hs256(header text, claims text, secret bytea) RETURNS text
  AS 'MODULE_PATHNAME', 'metering_jwt_hs256'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._jwt_hs256(text, text, bytea) IS 'internal: a compact HS256 JWT over the given JSON header and claims';

CREATE FUNCTION metering._random_bytes(n integer) RETURNS bytea
  AS 'MODULE_PATHNAME', 'metering_random_bytes'
  LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._random_bytes(integer) IS 'internal: bytes from the server''s strong random source';

CREATE FUNCTION metering._rfc3339(value text) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_rfc3339'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._rfc3339(text) IS 'internal: an RFC 3339 date-time, or NULL when the text is not one';

-- The current key, made on first use rather than at CREATE EXTENSION, so
-- that a restored dump brings back the same secret instead of clashing
-- with a new one.
CREATE FUNCTION metering._current_signing_key() RETURNS metering.signing_keys
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  k metering.signing_keys;
BEGIN
  SELECT * INTO k FROM metering.signing_keys ORDER BY version DESC LIMIT 1;
  IF NOT FOUND THEN
    INSERT INTO metering.signing_keys (version, secret)
    VALUES (1, metering._random_bytes(32))
    ON CONFLICT (version) DO NOTHING;
    SELECT * INTO STRICT k FROM metering.signing_keys ORDER BY version DESC LIMIT 1;
  END IF;
  RETURN k;
END $$;
COMMENT ON FUNCTION metering._current_signing_key() IS 'internal: the current signing key, made on first use';
REVOKE EXECUTE ON FUNCTION metering._current_signing_key() FROM PUBLIC;

CREATE FUNCTION metering.rotate_signing_key() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v integer;
BEGIN
  LOCK TABLE metering.signing_keys IN SHARE ROW EXCLUSIVE MODE;
  v := (metering._current_signing_key()).version + 1;
  INSERT INTO metering.signing_keys (version, secret) VALUES (v, metering._random_bytes(32));
  RETURN v;
END $$;
COMMENT ON FUNCTION metering.rotate_signing_key() IS
  'makes a new current signing key and returns its version; older versions keep verifying';
-- AWS Marketplace Metering Service: products, customers and usage records.

CREATE TABLE metering.products (
  product_code text PRIMARY KEY CHECK (product_code <> ''),
  name         text,
  created_at   timestamptz NOT NULL DEFAULT metering.now()
);
COMMENT ON TABLE metering.products IS 'AWS Marketplace products (ProductCode)';
COMMENT ON COLUMN metering.products.product_code IS 'the AWS product code';
COMMENT ON COLUMN metering.products.name IS 'a readable name';
COMMENT ON COLUMN metering.products.created_at IS 'when the product was added';

CREATE TABLE metering.product_dimensions (
  product_code text NOT NULL REFERENCES metering.products ON DELETE CASCADE,
  dimension    text NOT NULL CHECK (dimension <> ''),
  description  text,
  PRIMARY KEY (product_code, dimension)
);
COMMENT ON TABLE metering.product_dimensions IS
  'the usage dimensions a product meters (UsageDimension); each becomes the type of its events';
COMMENT ON COLUMN metering.product_dimensions.product_code IS 'the product';
COMMENT ON COLUMN metering.product_dimensions.dimension IS 'the dimension name, also the event type of its records';
COMMENT ON COLUMN metering.product_dimensions.description IS 'free text';

CREATE TABLE metering.customers (
  customer_identifier           text PRIMARY KEY CHECK (customer_identifier <> ''),
  product_code                  text REFERENCES metering.products,
  customer_aws_account_id       text,
  subscribed_at                 timestamptz DEFAULT metering.now(),
  unsubscribed_at               timestamptz,
  registration_token            text UNIQUE,
  registration_token_expires_at timestamptz,
  registration_token_used_at    timestamptz,
  CONSTRAINT customers_subscription_order CHECK (unsubscribed_at > subscribed_at)
);
CREATE INDEX customers_product_account_idx ON metering.customers (product_code, customer_aws_account_id);
COMMENT ON TABLE metering.customers IS
  'AWS Marketplace customers; a customer is subscribed to product_code on [subscribed_at, unsubscribed_at)';
COMMENT ON COLUMN metering.customers.customer_identifier IS 'the AWS CustomerIdentifier, also the subject of the customer''s events';
COMMENT ON COLUMN metering.customers.product_code IS 'the product the customer subscribed to';
COMMENT ON COLUMN metering.customers.customer_aws_account_id IS 'the customer''s AWS account id';
COMMENT ON COLUMN metering.customers.subscribed_at IS 'start of the subscription; NULL means since always';
COMMENT ON COLUMN metering.customers.unsubscribed_at IS 'end of the subscription (exclusive); NULL while subscribed';
COMMENT ON COLUMN metering.customers.registration_token IS 'the one-time token metering.resolve_customer exchanges';
COMMENT ON COLUMN metering.customers.registration_token_expires_at IS 'when the token expires; NULL never';
COMMENT ON COLUMN metering.customers.registration_token_used_at IS 'when the token was resolved; a used token is expired';

CREATE TABLE metering.usage_records (
  metering_record_id  uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  customer_identifier text NOT NULL,
  product_code        text NOT NULL,
  dimension           text NOT NULL,
  usage_hour          timestamptz NOT NULL,
  quantity            bigint NOT NULL CHECK (quantity BETWEEN 0 AND 2147483647),
  allocations         jsonb,
  usage_timestamp     timestamptz NOT NULL,
  created_at          timestamptz NOT NULL DEFAULT metering.now(),
  UNIQUE (customer_identifier, product_code, dimension, usage_hour)
);
COMMENT ON TABLE metering.usage_records IS
  'accepted MeterUsage and BatchMeterUsage records, one per (customer, product, dimension, UTC hour), shared by both calls; each is also an event; immutable';
COMMENT ON COLUMN metering.usage_records.metering_record_id IS 'the MeteringRecordId';
COMMENT ON COLUMN metering.usage_records.customer_identifier IS 'the customer (event subject)';
COMMENT ON COLUMN metering.usage_records.product_code IS 'the product';
COMMENT ON COLUMN metering.usage_records.dimension IS 'the usage dimension (event type)';
COMMENT ON COLUMN metering.usage_records.usage_hour IS 'the usage timestamp rounded down to the UTC hour (event time)';
COMMENT ON COLUMN metering.usage_records.quantity IS 'the usage quantity';
COMMENT ON COLUMN metering.usage_records.allocations IS 'the UsageAllocations as sent, or NULL';
COMMENT ON COLUMN metering.usage_records.usage_timestamp IS 'the timestamp as sent';
COMMENT ON COLUMN metering.usage_records.created_at IS 'when the record was accepted';

CREATE FUNCTION metering._usage_records_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'usage records are immutable'
    USING ERRCODE = 'object_not_in_prerequisite_state',
          DETAIL = format('Metering record %s was accepted at %s.', OLD.metering_record_id, OLD.created_at);
END $$;
COMMENT ON FUNCTION metering._usage_records_immutable() IS 'internal: usage records are never updated or deleted';
CREATE TRIGGER usage_records_immutable BEFORE UPDATE OR DELETE ON metering.usage_records
  FOR EACH ROW EXECUTE FUNCTION metering._usage_records_immutable();

CREATE TABLE metering.registrations (
  product_code        text NOT NULL,
  customer_identifier text NOT NULL,
  nonce               text,
  public_key_version  integer NOT NULL,
  first_registered_at timestamptz NOT NULL DEFAULT metering.now(),
  last_registered_at  timestamptz NOT NULL DEFAULT metering.now(),
  calls               bigint NOT NULL DEFAULT 1,
  UNIQUE NULLS NOT DISTINCT (customer_identifier, product_code, nonce)
);
COMMENT ON TABLE metering.registrations IS
  'RegisterUsage calls, one row per (customer, product, nonce): the subscription is checked only at the first call of a nonce';
COMMENT ON COLUMN metering.registrations.product_code IS 'the product';
COMMENT ON COLUMN metering.registrations.customer_identifier IS 'the customer';
COMMENT ON COLUMN metering.registrations.nonce IS 'the caller''s nonce (a task or pod); NULL for calls without one';
COMMENT ON COLUMN metering.registrations.public_key_version IS 'the key version of the latest call';
COMMENT ON COLUMN metering.registrations.first_registered_at IS 'the first call';
COMMENT ON COLUMN metering.registrations.last_registered_at IS 'the latest call';
COMMENT ON COLUMN metering.registrations.calls IS 'how many calls';
-- AWS Marketplace Metering Service calls: ResolveCustomer, RegisterUsage,
-- MeterUsage and BatchMeterUsage.  Errors carry the AWS exception name at
-- the start of the message ("TimestampOutOfBounds: ...").

CREATE FUNCTION metering._aws_error(name text, sqlstate text, message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '%: %', name, message USING ERRCODE = sqlstate;
END $$;
COMMENT ON FUNCTION metering._aws_error(text, text, text) IS
  'internal: raises an error named after an AWS exception';

CREATE FUNCTION metering._aws_check_product(product text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF product IS NULL OR NOT EXISTS (SELECT 1 FROM metering.products p WHERE p.product_code = product) THEN
    PERFORM metering._aws_error('InvalidProductCode', '22023',
      format('product code %s does not exist', coalesce(quote_literal(product), 'NULL')));
  END IF;
END $$;
COMMENT ON FUNCTION metering._aws_check_product(text) IS 'internal: InvalidProductCode unless the product exists';

CREATE FUNCTION metering._aws_check_dimension(product text, dim text, what text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF dim IS NULL OR NOT EXISTS (SELECT 1 FROM metering.product_dimensions d
                                 WHERE d.product_code = product AND d.dimension = dim) THEN
    PERFORM metering._aws_error('InvalidUsageDimension', '22023',
      format('%susage dimension %s is not a dimension of product %s', what,
             coalesce(quote_literal(dim), 'NULL'), quote_literal(product)));
  END IF;
END $$;
COMMENT ON FUNCTION metering._aws_check_dimension(text, text, text) IS
  'internal: InvalidUsageDimension unless the product meters the dimension';

-- Timestamps are judged as given (not yet rounded to the hour): not in the
-- future, and not more than max_age in the past, the bound included.
CREATE FUNCTION metering._aws_check_timestamp(ts timestamptz, batch boolean, what text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
  max_age interval := metering._usage_max_age(batch);
BEGIN
  IF ts > metering.now() THEN
    PERFORM metering._aws_error('TimestampOutOfBounds', '22023',
      format('%stimestamp %s is in the future (now is %s)', what, ts, metering.now()));
  END IF;
  IF ts < metering.now() - max_age THEN
    PERFORM metering._aws_error('TimestampOutOfBounds', '22023',
      format('%stimestamp %s is more than %s in the past (now is %s)', what, ts, max_age, metering.now()));
  END IF;
END $$;
COMMENT ON FUNCTION metering._aws_check_timestamp(timestamptz, boolean, text) IS
  'internal: TimestampOutOfBounds unless the timestamp is within the MeterUsage or BatchMeterUsage window';

CREATE FUNCTION metering._usage_max_age(batch boolean) RETURNS interval
  AS 'MODULE_PATHNAME', 'metering_max_age'
  LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._usage_max_age(boolean) IS
  'internal: the settings metering.meter_usage_max_age (false) and metering.batch_meter_usage_max_age (true)';

CREATE FUNCTION metering._aws_check_quantity(q jsonb, what text, field text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF jsonb_typeof(q) <> 'number' OR (q #>> '{}')::numeric <> trunc((q #>> '{}')::numeric)
     OR (q #>> '{}')::numeric NOT BETWEEN 0 AND 2147483647 THEN
    RAISE EXCEPTION '%', format('%s%s must be an integer from 0 to 2147483647, not %s', what, field, q)
      USING ERRCODE = 'numeric_value_out_of_range';
  END IF;
  RETURN (q #>> '{}')::bigint;
END $$;
COMMENT ON FUNCTION metering._aws_check_quantity(jsonb, text, text) IS
  'internal: a JSON quantity as AWS accepts it (an integer from 0 to 2147483647)';

-- UsageAllocations: 1..2500 allocations whose quantities add up to the
-- record's; each with 1..5 tags (key 1..100, value 1..256 characters, AWS's
-- published pattern); no two allocations with the same tag set.
CREATE FUNCTION metering._aws_check_allocations(allocations jsonb, quantity bigint, what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  a jsonb;
  t jsonb;
  i integer := 0;
  total numeric := 0;
  tagsets text[] := '{}';
  tagset text;
  keys text[];
  tag_pattern constant text := '^[a-zA-Z0-9+ -=._:\/@]+$';
BEGIN
  IF allocations IS NULL OR jsonb_typeof(allocations) = 'null' THEN
    RETURN;
  END IF;
  IF jsonb_typeof(allocations) <> 'array' OR jsonb_array_length(allocations) NOT BETWEEN 1 AND 2500 THEN
    PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
      format('%sUsageAllocations must be an array of 1 to 2500 allocations', what));
  END IF;
  FOR a IN SELECT value FROM jsonb_array_elements(allocations) LOOP
    IF jsonb_typeof(a) <> 'object' OR NOT a ? 'AllocatedUsageQuantity' THEN
      PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
        format('%sUsageAllocations[%s] must be an object with AllocatedUsageQuantity and Tags', what, i));
    END IF;
    BEGIN
      total := total + metering._aws_check_quantity(a -> 'AllocatedUsageQuantity', what,
                                                    format('UsageAllocations[%s].AllocatedUsageQuantity', i));
    EXCEPTION WHEN numeric_value_out_of_range THEN
      PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
        format('%sUsageAllocations[%s].AllocatedUsageQuantity must be an integer from 0 to 2147483647, not %s',
               what, i, a -> 'AllocatedUsageQuantity'));
    END;
    IF jsonb_typeof(a -> 'Tags') IS DISTINCT FROM 'array' OR jsonb_array_length(a -> 'Tags') NOT BETWEEN 1 AND 5 THEN
      PERFORM metering._aws_error('InvalidTag', '22023',
        format('%sUsageAllocations[%s].Tags must be an array of 1 to 5 tags', what, i));
    END IF;
    keys := '{}';
    FOR t IN SELECT value FROM jsonb_array_elements(a -> 'Tags') LOOP
      IF jsonb_typeof(t) <> 'object'
         OR jsonb_typeof(t -> 'Key') IS DISTINCT FROM 'string'
         OR jsonb_typeof(t -> 'Value') IS DISTINCT FROM 'string' THEN
        PERFORM metering._aws_error('InvalidTag', '22023',
          format('%sUsageAllocations[%s]: a tag must be an object with string Key and Value, not %s', what, i, t));
      END IF;
      IF char_length(t ->> 'Key') NOT BETWEEN 1 AND 100 OR (t ->> 'Key') !~ tag_pattern THEN
        PERFORM metering._aws_error('InvalidTag', '22023',
          format('%sUsageAllocations[%s]: tag key %s must be 1 to 100 characters matching %s',
                 what, i, quote_literal(t ->> 'Key'), tag_pattern));
      END IF;
      IF char_length(t ->> 'Value') NOT BETWEEN 1 AND 256 OR (t ->> 'Value') !~ tag_pattern THEN
        PERFORM metering._aws_error('InvalidTag', '22023',
          format('%sUsageAllocations[%s]: tag value %s must be 1 to 256 characters matching %s',
                 what, i, quote_literal(t ->> 'Value'), tag_pattern));
      END IF;
      IF (t ->> 'Key') = ANY (keys) THEN
        PERFORM metering._aws_error('InvalidTag', '22023',
          format('%sUsageAllocations[%s]: tag key %s appears twice', what, i, quote_literal(t ->> 'Key')));
      END IF;
      keys := keys || (t ->> 'Key');
    END LOOP;
    tagset := (SELECT string_agg(quote_literal(x ->> 'Key') || '=' || quote_literal(x ->> 'Value'), ','
                                 ORDER BY x ->> 'Key')
                 FROM jsonb_array_elements(a -> 'Tags') x);
    IF tagset = ANY (tagsets) THEN
      PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
        format('%sUsageAllocations[%s] repeats the tag set of an earlier allocation', what, i));
    END IF;
    tagsets := tagsets || tagset;
    i := i + 1;
  END LOOP;
  IF total <> quantity THEN
    PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
      format('%sthe allocated quantities add up to %s, not to the quantity %s', what, total, quantity));
  END IF;
END $$;
COMMENT ON FUNCTION metering._aws_check_allocations(jsonb, bigint, text) IS
  'internal: InvalidUsageAllocations or InvalidTag unless the allocations are valid for the quantity';

CREATE FUNCTION metering._aws_subscribed(customer text, product text, at timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM metering.customers c
     WHERE c.customer_identifier = customer AND c.product_code = product
       AND (c.subscribed_at IS NULL OR c.subscribed_at <= at)
       AND (c.unsubscribed_at IS NULL OR at < c.unsubscribed_at))
$$;
COMMENT ON FUNCTION metering._aws_subscribed(text, text, timestamptz) IS
  'internal: whether the customer is subscribed to the product at an instant';

-- The record space both calls share: one record per (customer, product,
-- dimension, UTC hour).  An identical repeat returns the stored record; a
-- different quantity or allocation is a duplicate.
CREATE FUNCTION metering._aws_record(p_product text, p_customer text, p_dimension text,
  p_timestamp timestamptz, p_quantity bigint, p_allocations jsonb, p_dry_run boolean,
  OUT status text, OUT record_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
  hour timestamptz := date_trunc('hour', p_timestamp, 'UTC');
  r metering.usage_records;
BEGIN
  FOR attempt IN 1..2 LOOP
    SELECT * INTO r FROM metering.usage_records u
     WHERE u.customer_identifier = p_customer AND u.product_code = p_product
       AND u.dimension = p_dimension AND u.usage_hour = hour;
    IF FOUND THEN
      IF r.quantity = p_quantity AND r.allocations IS NOT DISTINCT FROM p_allocations THEN
        status := 'Success';
        record_id := r.metering_record_id;
      ELSE
        status := 'DuplicateRecord';
      END IF;
      RETURN;
    END IF;
    IF p_customer IS NULL OR NOT metering._aws_subscribed(p_customer, p_product, p_timestamp) THEN
      status := 'CustomerNotSubscribed';
      RETURN;
    END IF;
    IF p_dry_run THEN
      status := 'Success';
      RETURN;
    END IF;
    INSERT INTO metering.usage_records AS u
      (customer_identifier, product_code, dimension, usage_hour, quantity, allocations, usage_timestamp)
    VALUES (p_customer, p_product, p_dimension, hour, p_quantity, p_allocations, p_timestamp)
    ON CONFLICT (customer_identifier, product_code, dimension, usage_hour) DO NOTHING
    RETURNING u.metering_record_id INTO record_id;
    IF FOUND THEN
      INSERT INTO metering.events (id, source, subject, type, time, data)
      VALUES (record_id::text, 'aws-marketplace/' || p_product, p_customer, p_dimension, hour,
              jsonb_strip_nulls(jsonb_build_object('quantity', p_quantity, 'product_code', p_product,
                                                   'allocations', p_allocations)));
      status := 'Success';
      RETURN;
    END IF;
    -- another session stored the record first: read it on the next pass
  END LOOP;
  RAISE EXCEPTION 'could not serialize access to metering record of % / % / % at %',
    p_customer, p_product, p_dimension, hour
    USING ERRCODE = 'serialization_failure';
END $$;
COMMENT ON FUNCTION metering._aws_record(text, text, text, timestamptz, bigint, jsonb, boolean) IS
  'internal: stores or finds the usage record of (customer, product, dimension, hour); status Success, CustomerNotSubscribed or DuplicateRecord';

CREATE FUNCTION metering.resolve_customer(registration_token text)
RETURNS TABLE(customer_identifier text, product_code text, customer_aws_account_id text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  c metering.customers;
BEGIN
  SELECT * INTO c FROM metering.customers cu
   WHERE cu.registration_token = resolve_customer.registration_token
   FOR UPDATE;
  IF NOT FOUND OR resolve_customer.registration_token IS NULL THEN
    PERFORM metering._aws_error('InvalidToken', '22023', 'the registration token is not valid');
  END IF;
  IF c.registration_token_used_at IS NOT NULL THEN
    PERFORM metering._aws_error('ExpiredToken', '22023',
      format('the registration token was already used at %s', c.registration_token_used_at));
  END IF;
  IF c.registration_token_expires_at <= metering.now() THEN
    PERFORM metering._aws_error('ExpiredToken', '22023',
      format('the registration token expired at %s', c.registration_token_expires_at));
  END IF;
  UPDATE metering.customers cu SET registration_token_used_at = metering.now()
   WHERE cu.customer_identifier = c.customer_identifier;
  customer_identifier := c.customer_identifier;
  product_code := c.product_code;
  customer_aws_account_id := c.customer_aws_account_id;
  RETURN NEXT;
END $$;
COMMENT ON FUNCTION metering.resolve_customer(text) IS
  'ResolveCustomer: exchanges a one-time registration token for the customer identifier, product code and AWS account id';

-- SECURITY DEFINER: it signs with the database's secret, which the caller
-- must not be able to read (or it could forge signatures).
CREATE FUNCTION metering.register_usage(product_code text, customer_identifier text,
  public_key_version integer, nonce text DEFAULT NULL)
RETURNS TABLE(signature text, public_key_rotation_timestamp timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  p_product text := register_usage.product_code;
  p_customer text := register_usage.customer_identifier;
  p_version integer := register_usage.public_key_version;
  p_nonce text := register_usage.nonce;
  cur metering.signing_keys;
  k metering.signing_keys;
  seen boolean;
  now timestamptz := metering.now();
BEGIN
  PERFORM metering._aws_check_product(p_product);
  cur := metering._current_signing_key();
  IF p_version IS NULL OR p_version < 1 OR p_version > cur.version THEN
    PERFORM metering._aws_error('InvalidPublicKeyVersion', '22023',
      format('public key version %s is not a version from 1 to %s', coalesce(p_version::text, 'NULL'), cur.version));
  END IF;
  IF p_customer IS NULL OR p_customer = '' THEN
    RAISE EXCEPTION 'customer_identifier is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF char_length(p_nonce) > 255 THEN
    RAISE EXCEPTION 'nonce must be at most 255 characters' USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- AWS checks the subscription at the first call of a task or pod only.
  seen := p_nonce IS NOT NULL AND EXISTS (
    SELECT 1 FROM metering.registrations r
     WHERE r.customer_identifier = p_customer AND r.product_code = p_product AND r.nonce = p_nonce);
  IF NOT seen AND NOT metering._aws_subscribed(p_customer, p_product, now) THEN
    PERFORM metering._aws_error('CustomerNotEntitled', '55000',
      format('customer %s is not subscribed to product %s', quote_literal(p_customer), quote_literal(p_product)));
  END IF;
  INSERT INTO metering.registrations AS r
    (product_code, customer_identifier, nonce, public_key_version, first_registered_at, last_registered_at)
  VALUES (p_product, p_customer, p_nonce, p_version, now, now)
  ON CONFLICT (customer_identifier, product_code, nonce) DO UPDATE
    SET public_key_version = excluded.public_key_version,
        last_registered_at = excluded.last_registered_at,
        calls = r.calls + 1;

  SELECT * INTO STRICT k FROM metering.signing_keys sk WHERE sk.version = p_version;
  signature := metering._jwt_hs256(
    jsonb_build_object('alg', 'HS256', 'typ', 'JWT', 'kid', p_version::text)::text,
    jsonb_build_object('productCode', p_product, 'customerIdentifier', p_customer,
                       'nonce', p_nonce, 'publicKeyVersion', p_version,
                       'iat', floor(extract(epoch FROM now))::bigint)::text,
    k.secret);
  public_key_rotation_timestamp := CASE WHEN p_version < cur.version THEN cur.created_at END;
  RETURN NEXT;
END $$;
COMMENT ON FUNCTION metering.register_usage(text, text, integer, text) IS
  'RegisterUsage: checks the subscription at the first call of a nonce, records the call and returns an HS256 JWT with productCode, customerIdentifier, nonce, publicKeyVersion and iat';

CREATE FUNCTION metering.meter_usage(product_code text, customer_identifier text,
  usage_timestamp timestamptz, usage_dimension text, usage_quantity bigint DEFAULT 0,
  usage_allocations jsonb DEFAULT NULL, dry_run boolean DEFAULT false)
RETURNS uuid
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  res record;
BEGIN
  PERFORM metering._aws_check_product(meter_usage.product_code);
  PERFORM metering._aws_check_dimension(meter_usage.product_code, meter_usage.usage_dimension, '');
  IF usage_quantity IS NULL OR usage_quantity NOT BETWEEN 0 AND 2147483647 THEN
    RAISE EXCEPTION 'usage_quantity must be an integer from 0 to 2147483647, not %', coalesce(usage_quantity::text, 'NULL')
      USING ERRCODE = 'numeric_value_out_of_range';
  END IF;
  IF usage_timestamp IS NULL THEN
    RAISE EXCEPTION 'usage_timestamp is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM metering._aws_check_timestamp(usage_timestamp, false, '');
  PERFORM metering._aws_check_allocations(usage_allocations, usage_quantity, '');
  IF meter_usage.customer_identifier IS NULL THEN
    RAISE EXCEPTION 'customer_identifier is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;

  res := metering._aws_record(meter_usage.product_code, meter_usage.customer_identifier,
                              usage_dimension, usage_timestamp, usage_quantity,
                              nullif(usage_allocations, 'null'), coalesce(dry_run, false));
  IF res.status = 'CustomerNotSubscribed' THEN
    PERFORM metering._aws_error('CustomerNotEntitled', '55000',
      format('customer %s is not subscribed to product %s at %s',
             quote_literal(meter_usage.customer_identifier), quote_literal(meter_usage.product_code), usage_timestamp));
  ELSIF res.status = 'DuplicateRecord' THEN
    PERFORM metering._aws_error('DuplicateRequest', '23505',
      format('a record of customer %s, dimension %s in the hour of %s was already metered with another quantity or allocation',
             quote_literal(meter_usage.customer_identifier), quote_literal(usage_dimension),
             date_trunc('hour', usage_timestamp, 'UTC')));
  END IF;
  RETURN res.record_id;
END $$;
COMMENT ON FUNCTION metering.meter_usage(text, text, timestamptz, text, bigint, jsonb, boolean) IS
  'MeterUsage: records the usage of a customer for a dimension and hour, idempotently; returns the metering record id (NULL on a dry run of a new record)';
-- BatchMeterUsage in the AWS JSON shape.

CREATE FUNCTION metering._aws_batch_timestamp(ts jsonb, what text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
  t timestamptz;
  secs numeric;
BEGIN
  -- the SDKs send epoch seconds; people and other tools send RFC 3339
  IF jsonb_typeof(ts) = 'number' AND (ts #>> '{}')::numeric BETWEEN -1e11 AND 1e11 THEN
    secs := (ts #>> '{}')::numeric;
    -- exactly, to the microsecond: no detour through double precision
    RETURN timestamptz 'epoch' + (trunc(secs)::text || ' seconds')::interval
           + (round((secs - trunc(secs)) * 1000000)::text || ' microseconds')::interval;
  ELSIF jsonb_typeof(ts) = 'string' THEN
    t := metering._rfc3339(ts #>> '{}');
    IF t IS NOT NULL THEN
      RETURN t;
    END IF;
  END IF;
  RAISE EXCEPTION '%Timestamp must be an RFC 3339 date-time or epoch seconds, not %', what, coalesce(ts::text, 'missing')
    USING ERRCODE = 'invalid_parameter_value';
END $$;
COMMENT ON FUNCTION metering._aws_batch_timestamp(jsonb, text) IS
  'internal: a BatchMeterUsage Timestamp (RFC 3339 string or epoch seconds)';

CREATE FUNCTION metering.batch_meter_usage(request jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  product text;
  rec jsonb;
  i integer;
  n integer;
  what text;
  customers text[] := '{}';
  times timestamptz[] := '{}';
  quantities bigint[] := '{}';
  customer text;
  q bigint;
  res record;
  results jsonb := '[]';
  result jsonb;
BEGIN
  IF request IS NULL OR jsonb_typeof(request) <> 'object' THEN
    RAISE EXCEPTION 'request must be a JSON object with ProductCode and UsageRecords'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF octet_length(request::text) > 1048576 THEN
    RAISE EXCEPTION 'request is larger than 1 MB' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(request -> 'ProductCode') IS DISTINCT FROM 'string' THEN
    PERFORM metering._aws_error('InvalidProductCode', '22023', 'ProductCode must be a string');
  END IF;
  product := request ->> 'ProductCode';
  PERFORM metering._aws_check_product(product);
  IF jsonb_typeof(request -> 'UsageRecords') IS DISTINCT FROM 'array' THEN
    RAISE EXCEPTION 'UsageRecords must be an array' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  n := jsonb_array_length(request -> 'UsageRecords');
  IF n > 25 THEN
    RAISE EXCEPTION 'UsageRecords has % records; at most 25 are accepted', n
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- First every record is validated: one bad record rejects the batch.
  FOR i IN 0 .. n - 1 LOOP
    rec := request -> 'UsageRecords' -> i;
    what := format('UsageRecords[%s]: ', i);
    IF jsonb_typeof(rec) <> 'object' THEN
      RAISE EXCEPTION '%a usage record must be a JSON object', what USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (rec ? 'CustomerIdentifier') = (rec ? 'CustomerAWSAccountId') THEN
      RAISE EXCEPTION '%exactly one of CustomerIdentifier and CustomerAWSAccountId is required', what
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(coalesce(rec -> 'CustomerIdentifier', rec -> 'CustomerAWSAccountId')) <> 'string' THEN
      RAISE EXCEPTION '%CustomerIdentifier and CustomerAWSAccountId must be strings', what
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(rec -> 'Dimension') IS DISTINCT FROM 'string' THEN
      PERFORM metering._aws_error('InvalidUsageDimension', '22023', what || 'Dimension must be a string');
    END IF;
    PERFORM metering._aws_check_dimension(product, rec ->> 'Dimension', what);
    q := CASE WHEN rec ? 'Quantity'
              THEN metering._aws_check_quantity(rec -> 'Quantity', what, 'Quantity') ELSE 0 END;
    times := times || metering._aws_batch_timestamp(rec -> 'Timestamp', what);
    PERFORM metering._aws_check_timestamp(times[i + 1], true, what);
    PERFORM metering._aws_check_allocations(rec -> 'UsageAllocations', q, what);
    quantities := quantities || q;
    IF rec ? 'CustomerIdentifier' THEN
      customers := customers || (rec ->> 'CustomerIdentifier');
    ELSE
      customers := customers || (SELECT c.customer_identifier FROM metering.customers c
                                  WHERE c.product_code = product
                                    AND c.customer_aws_account_id = rec ->> 'CustomerAWSAccountId'
                                  ORDER BY c.subscribed_at DESC NULLS LAST LIMIT 1);
    END IF;
  END LOOP;

  -- Then each record, in order, gets its status.
  FOR i IN 0 .. n - 1 LOOP
    rec := request -> 'UsageRecords' -> i;
    res := metering._aws_record(product, customers[i + 1], rec ->> 'Dimension', times[i + 1],
                                quantities[i + 1], nullif(rec -> 'UsageAllocations', 'null'), false);
    result := jsonb_build_object('UsageRecord', rec, 'Status', res.status);
    IF res.record_id IS NOT NULL THEN
      result := result || jsonb_build_object('MeteringRecordId', res.record_id::text);
    END IF;
    results := results || jsonb_build_array(result);
  END LOOP;
  RETURN jsonb_build_object('Results', results, 'UnprocessedRecords', '[]'::jsonb);
END $$;
COMMENT ON FUNCTION metering.batch_meter_usage(jsonb) IS
  'BatchMeterUsage: takes the AWS request body (ProductCode, UsageRecords) and returns the AWS response body (Results with Status Success, CustomerNotSubscribed or DuplicateRecord, UnprocessedRecords)';
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
LANGUAGE plpgsql AS $$
DECLARE
  m metering.meters;
  f record;
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
       AND (deleted_at IS NULL OR NEW.created_at <> metering.now());
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
  IF NEW.created_at = metering.now() THEN
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql STABLE AS $$
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
LANGUAGE plpgsql AS $$
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
-- Entitlements (OpenMeter): a subject's access to a feature.

CREATE TYPE metering.entitlement_type AS ENUM ('metered', 'boolean', 'static');
COMMENT ON TYPE metering.entitlement_type IS
  'metered (usage against grants), boolean (access while active), static (access and a configuration)';

CREATE TABLE metering.entitlements (
  id                         uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  subject                    text COLLATE "C" NOT NULL,
  feature_id                 uuid NOT NULL REFERENCES metering.features (id),
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
LANGUAGE plpgsql AS $$
DECLARE
  f metering.features;
BEGIN
  SELECT * INTO f FROM metering.features WHERE id = NEW.feature_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'feature % does not exist', NEW.feature_id USING ERRCODE = 'foreign_key_violation';
  END IF;
  -- a row made now is new; one with an earlier created_at is being restored
  -- (pg_restore, a migration), and was checked when it was made
  IF NEW.created_at = metering.now() AND (f.archived_at IS NOT NULL OR f.deleted_at IS NOT NULL) THEN
    RAISE EXCEPTION 'feature "%" is %: it takes no new entitlements', f.key,
      CASE WHEN f.deleted_at IS NOT NULL THEN 'deleted' ELSE 'archived' END
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF NEW.deleted_at IS NOT NULL AND (NEW.created_at = metering.now() OR NOT isfinite(NEW.deleted_at)
                                     OR NEW.deleted_at < NEW.created_at) THEN
    RAISE EXCEPTION 'entitlement: a new entitlement is not deleted (a restored one was deleted after its creation)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.feature_key IS NOT NULL AND NEW.feature_key <> f.key THEN
    RAISE EXCEPTION 'feature_key "%" is not the key of feature % ("%")', NEW.feature_key, f.id, f.key
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  NEW.feature_key := f.key;
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
    IF f.meter_slug IS NULL THEN
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
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._entitlements_before_insert() IS 'internal: validates an entitlement and fills its defaults';

-- issue_after_reset: a grant made with the entitlement, effective from the
-- first period, never expiring, rolled over to exactly its amount
CREATE FUNCTION metering._entitlements_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  -- only for a new entitlement: a restored one comes with its grant
  IF NEW.issue_after_reset IS NOT NULL AND NEW.deleted_at IS NULL AND NEW.created_at = metering.now() THEN
    INSERT INTO metering.grants (entitlement_id, amount, priority, effective_at,
                                 min_rollover_amount, max_rollover_amount, metadata, created_at)
    VALUES (NEW.id, NEW.issue_after_reset, NEW.issue_after_reset_priority, NEW.measure_usage_from,
            NEW.issue_after_reset, NEW.issue_after_reset, '{"issue_after_reset": true}', NEW.created_at);
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._entitlements_after_insert() IS 'internal: the grant of issue_after_reset';

CREATE FUNCTION metering._entitlements_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
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
    PERFORM metering._forget_snapshots(NEW.id, NEW.deleted_at);
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._entitlements_before_update() IS
  'internal: entitlements are immutable; deleting sets deleted_at to metering.now()';

CREATE FUNCTION metering._soft_delete_entitlement() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE metering.entitlements SET deleted_at = metering.now() WHERE id = OLD.id AND deleted_at IS NULL;
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
LANGUAGE plpgsql AS $$
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
  RETURN id;
EXCEPTION WHEN unique_violation THEN
  -- a concurrent creation committed first: the same answer as the check above
  RAISE EXCEPTION 'subject "%" already has an entitlement to feature "%"', create_entitlement.subject, f.key
    USING ERRCODE = 'unique_violation', HINT = 'Delete it first.';
END $$;
COMMENT ON FUNCTION metering.create_entitlement(text, text, metering.entitlement_type, interval, timestamptz, timestamptz, boolean, numeric, integer, boolean, jsonb, jsonb) IS
  'gives a subject an entitlement to a feature (key or id) and returns its id';

CREATE FUNCTION metering.delete_entitlement(entitlement uuid) RETURNS void
LANGUAGE plpgsql AS $$
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
  UPDATE metering.entitlements SET deleted_at = metering.now() WHERE id = entitlement;
END $$;
COMMENT ON FUNCTION metering.delete_entitlement(uuid) IS
  'deletes an entitlement: from metering.now() on it gives no access; earlier instants still see it';
-- Grants (OpenMeter): amounts of usage a metered entitlement may burn.

CREATE FUNCTION metering._made_by_us(row_xmin xid) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_made_by_us'
  LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;
COMMENT ON FUNCTION metering._made_by_us(xid) IS
  'internal: whether a row with this xmin was written by the current transaction (subtransactions included)';

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
  created_at          timestamptz NOT NULL DEFAULT metering.now()
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

CREATE TABLE metering.resets (
  id               uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  entitlement_id   uuid NOT NULL REFERENCES metering.entitlements (id),
  effective_at     timestamptz NOT NULL,
  retain_anchor    boolean NOT NULL DEFAULT false,
  preserve_overage boolean,
  created_at       timestamptz NOT NULL DEFAULT metering.now(),
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
  PRIMARY KEY (entitlement_id, at)
);
COMMENT ON TABLE metering.entitlement_snapshots IS
  'derived: the burndown state of a metered entitlement after the cut at an instant, written by refresh_rollups() and removed by any change it depends on';
COMMENT ON COLUMN metering.entitlement_snapshots.entitlement_id IS 'the entitlement';
COMMENT ON COLUMN metering.entitlement_snapshots.at IS 'the instant (a cut: period boundary, grant change or recurrence)';
COMMENT ON COLUMN metering.entitlement_snapshots.usage IS 'usage in the period up to `at`';
COMMENT ON COLUMN metering.entitlement_snapshots.grant_usage IS 'what grants paid in the period up to `at`';
COMMENT ON COLUMN metering.entitlement_snapshots.overage IS 'the unpaid usage at `at`';
COMMENT ON COLUMN metering.entitlement_snapshots.grant_ids IS 'the grants active at `at`';
COMMENT ON COLUMN metering.entitlement_snapshots.balances IS 'their balances, in the same order';
COMMENT ON COLUMN metering.entitlement_snapshots.inputs IS 'a fingerprint of the period rules, resets and grants it was computed from; a reader ignores the snapshot when they differ';
COMMENT ON COLUMN metering.entitlement_snapshots.created_at IS 'when it was computed';

CREATE TABLE metering.entitlement_snapshot_queue (
  entitlement_id uuid PRIMARY KEY REFERENCES metering.entitlements (id)
);
COMMENT ON TABLE metering.entitlement_snapshot_queue IS
  'derived: entitlements whose snapshots a grant, void or reset removed; the next refresh_rollups() saves new ones';
COMMENT ON COLUMN metering.entitlement_snapshot_queue.entitlement_id IS 'the entitlement';

CREATE FUNCTION metering._forget_snapshots(entitlement uuid, since timestamptz) RETURNS void
LANGUAGE sql AS $$
  WITH gone AS (
    DELETE FROM metering.entitlement_snapshots WHERE entitlement_id = entitlement AND at >= since RETURNING 1)
  INSERT INTO metering.entitlement_snapshot_queue
  SELECT entitlement WHERE EXISTS (SELECT 1 FROM gone)
  ON CONFLICT DO NOTHING
$$;
COMMENT ON FUNCTION metering._forget_snapshots(uuid, timestamptz) IS
  'internal: drops the snapshots a change at `since` reaches, and queues the entitlement for new ones';

CREATE FUNCTION metering._period_bound(entitlement uuid, at timestamptz, upper boolean) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_period_start'
  LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION metering._period_bound(uuid, timestamptz, boolean) IS
  'internal: the start (or with upper, the exclusive end) of the usage period containing `at` (resets included)';
CREATE FUNCTION metering._period_start(entitlement uuid, at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE STRICT AS $$ SELECT metering._period_bound(entitlement, at, false) $$;
COMMENT ON FUNCTION metering._period_start(uuid, timestamptz) IS
  'internal: the start of the usage period containing `at` (resets included)';

-- A change to an entitlement's grants or resets waits for the snapshot
-- writers of that entitlement (which hold FOR SHARE) and is then seen by
-- them; the snapshots it reaches are dropped in the same transaction.
CREATE FUNCTION metering._unchanged_since_snapshot(entitlement uuid) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_unchanged_since_snapshot'
  LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION metering._unchanged_since_snapshot(uuid) IS
  'internal: at REPEATABLE READ or SERIALIZABLE, raises 40001 when another transaction changed the entitlement''s grants or resets after this one''s snapshot';

CREATE FUNCTION metering._lock_entitlement(entitlement uuid) RETURNS metering.entitlements
LANGUAGE plpgsql AS $$
DECLARE
  e metering.entitlements;
BEGIN
  SELECT * INTO e FROM metering.entitlements WHERE id = entitlement FOR NO KEY UPDATE;
  -- once the lock is ours: whoever held it before us has committed
  IF FOUND THEN
    PERFORM metering._unchanged_since_snapshot(entitlement);
  END IF;
  RETURN e;
END $$;
COMMENT ON FUNCTION metering._lock_entitlement(uuid) IS
  'internal: locks an entitlement against concurrent grant, void, reset and snapshot writers';

-- Rows that carry their own created_at (a restore, a migration) are checked
-- for shape only; rows made now are also checked against now.
CREATE FUNCTION metering._grants_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  e metering.entitlements := metering._lock_entitlement(NEW.entitlement_id);
  fresh boolean := NEW.created_at = metering.now();
  period_start timestamptz;
BEGIN
  IF e.id IS NULL THEN
    RAISE EXCEPTION 'entitlement % does not exist', NEW.entitlement_id USING ERRCODE = 'foreign_key_violation';
  END IF;
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
    period_start := metering._period_start(e.id, metering.now());
    IF NEW.effective_at < period_start
       AND NOT (e.created_at = metering.now()
                AND metering._made_by_us((SELECT x.xmin FROM metering.entitlements x WHERE x.id = e.id))) THEN
      RAISE EXCEPTION 'grant effective_at % is before the start of the current usage period (%)',
        NEW.effective_at, period_start
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Grants are not retroactive.';
    END IF;
  END IF;
  PERFORM metering._forget_snapshots(e.id, NEW.effective_at);
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._grants_before_insert() IS 'internal: validates a grant and fills expires_at';

CREATE FUNCTION metering._grants_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
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
    PERFORM metering._lock_entitlement(OLD.entitlement_id);
    PERFORM metering._forget_snapshots(OLD.entitlement_id, now);
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._grants_before_update() IS
  'internal: grants are immutable; voiding and deleting take metering.now(), to the minute';

CREATE FUNCTION metering._soft_delete_grant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE metering.grants SET deleted_at = metering.now() WHERE id = OLD.id AND deleted_at IS NULL;
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
LANGUAGE plpgsql AS $$
DECLARE
  e metering.entitlements := metering._lock_entitlement(NEW.entitlement_id);
  fresh boolean := NEW.created_at = metering.now();
  period_start timestamptz;
  last_reset timestamptz;
BEGIN
  IF e.id IS NULL THEN
    RAISE EXCEPTION 'entitlement % does not exist', NEW.entitlement_id USING ERRCODE = 'foreign_key_violation';
  END IF;
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
    period_start := metering._period_start(e.id, metering.now());
    IF NEW.effective_at < period_start THEN
      RAISE EXCEPTION 'a reset cannot be before the start of the current usage period (%)', period_start
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT max(r.effective_at) INTO last_reset FROM metering.resets r WHERE r.entitlement_id = e.id;
    IF NEW.effective_at <= last_reset THEN
      RAISE EXCEPTION 'a reset must come after the last one (%)', last_reset
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  PERFORM metering._forget_snapshots(e.id, NEW.effective_at);
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._resets_before_insert() IS 'internal: validates a manual reset';

CREATE FUNCTION metering._resets_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
DECLARE
  id uuid;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM metering.entitlements e WHERE e.id = entitlement) THEN
    RAISE EXCEPTION 'entitlement % does not exist', entitlement USING ERRCODE = 'no_data_found';
  END IF;
  INSERT INTO metering.grants AS g (entitlement_id, amount, priority, effective_at, expiration, recurrence,
    recurrence_anchor, min_rollover_amount, max_rollover_amount, metadata)
  VALUES (create_grant.entitlement, create_grant.amount, coalesce(create_grant.priority, 0),
    create_grant.effective_at, create_grant.expiration, create_grant.recurrence,
    create_grant.recurrence_anchor, coalesce(create_grant.min_rollover_amount, 0),
    coalesce(create_grant.max_rollover_amount, 0), create_grant.metadata)
  RETURNING g.id INTO id;
  RETURN id;
END $$;
COMMENT ON FUNCTION metering.create_grant(uuid, numeric, timestamptz, integer, interval, interval, timestamptz, numeric, numeric, jsonb) IS
  'grants an amount of usage to a metered entitlement and returns the grant''s id';

CREATE FUNCTION metering.void_grant(grant_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  g metering.grants;
BEGIN
  -- locked, so that of two concurrent voids the second sees the first
  SELECT * INTO g FROM metering.grants WHERE id = grant_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'grant % does not exist', grant_id USING ERRCODE = 'no_data_found';
  END IF;
  IF g.voided_at IS NOT NULL THEN
    RAISE EXCEPTION 'the grant is already voided' USING ERRCODE = 'object_not_in_prerequisite_state',
      DETAIL = format('Grant %s was voided at %s.', g.id, g.voided_at);
  END IF;
  UPDATE metering.grants SET voided_at = metering.now() WHERE id = grant_id;
END $$;
COMMENT ON FUNCTION metering.void_grant(uuid) IS
  'voids a grant from metering.now() (to the minute) on; usage it already paid stays paid';

CREATE FUNCTION metering.reset_entitlement(entitlement uuid, effective_at timestamptz DEFAULT NULL,
  retain_anchor boolean DEFAULT false, preserve_overage boolean DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM metering.entitlements e WHERE e.id = entitlement) THEN
    RAISE EXCEPTION 'entitlement % does not exist', entitlement USING ERRCODE = 'no_data_found';
  END IF;
  INSERT INTO metering.resets (entitlement_id, effective_at, retain_anchor, preserve_overage)
  VALUES (reset_entitlement.entitlement, reset_entitlement.effective_at,
          coalesce(reset_entitlement.retain_anchor, false), reset_entitlement.preserve_overage);
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
  OUT total_available_grant_amount numeric, OUT start_of_period timestamptz, OUT config jsonb)
  AS 'MODULE_PATHNAME', 'metering_entitlement_value'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering.entitlement_value(text, text, timestamptz) IS
  'may the subject use the feature (key or entitlement id) at `at` (default metering.now()), and what is left: one row, has_access false and NULLs when there is no entitlement';

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
LANGUAGE plpgsql STABLE AS $$
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
LANGUAGE sql AS $$
  DELETE FROM metering.entitlement_snapshots s
   USING metering.entitlements e, metering.features f,
         (SELECT k.subject, min(k.since) AS since FROM unnest(subjects, since) AS k(subject, since)
           GROUP BY k.subject) k
   WHERE f.meter_slug = meter AND e.feature_id = f.id AND e.subject = k.subject
     AND s.entitlement_id = e.id AND s.at > k.since
$$;
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM metering.entitlement_snapshots s
   USING metering.entitlements e, metering.features f
   WHERE s.entitlement_id = e.id AND e.feature_id = f.id AND f.meter_slug = NEW.slug;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._meter_deleted() IS
  'internal: deleting a meter drops the snapshots of the entitlements that count it';
CREATE TRIGGER meters_deleted_snapshots AFTER UPDATE OF deleted_at ON metering.meters
  FOR EACH ROW WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL)
  EXECUTE FUNCTION metering._meter_deleted();
-- pg_dump keeps the rows of the entitlement tables (snapshots are derived).
SELECT pg_catalog.pg_extension_config_dump('metering.features', '');
SELECT pg_catalog.pg_extension_config_dump('metering.entitlements', '');
SELECT pg_catalog.pg_extension_config_dump('metering.grants', '');
SELECT pg_catalog.pg_extension_config_dump('metering.resets', '');
-- HashMap rating (CloudKitty): services, fields, groups, and the rules
-- (mappings and thresholds) that price a point of usage.

CREATE TABLE metering.hashmap_services (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  name        text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE UNIQUE INDEX hashmap_services_live_name ON metering.hashmap_services (name) WHERE deleted_at IS NULL;
COMMENT ON TABLE metering.hashmap_services IS
  'what is rated: a usage type such as compute or volume.size; never renamed; DELETE is a soft delete that takes its fields and rules with it';
COMMENT ON COLUMN metering.hashmap_services.id IS 'the service id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_services.name IS 'the usage type points are rated under; unique among services not deleted';
COMMENT ON COLUMN metering.hashmap_services.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_services.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_services.deleted_at IS 'when it was deleted; points rated before then still see its rules';
COMMENT ON COLUMN metering.hashmap_services.deleted_by IS 'who deleted it';

CREATE TABLE metering.hashmap_fields (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  service_id  uuid NOT NULL REFERENCES metering.hashmap_services (id),
  name        text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE UNIQUE INDEX hashmap_fields_live_name ON metering.hashmap_fields (service_id, name) WHERE deleted_at IS NULL;
COMMENT ON TABLE metering.hashmap_fields IS
  'a metadata key of a service (flavor, volume_type) that mappings and thresholds look at; DELETE is a soft delete that takes its rules with it';
COMMENT ON COLUMN metering.hashmap_fields.id IS 'the field id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_fields.service_id IS 'the service whose points carry this metadata key';
COMMENT ON COLUMN metering.hashmap_fields.name IS 'the metadata key; unique per service among fields not deleted';
COMMENT ON COLUMN metering.hashmap_fields.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_fields.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_fields.deleted_at IS 'when it was deleted';
COMMENT ON COLUMN metering.hashmap_fields.deleted_by IS 'who deleted it';

CREATE TABLE metering.hashmap_groups (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  name        text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE UNIQUE INDEX hashmap_groups_live_name ON metering.hashmap_groups (name) WHERE deleted_at IS NULL;
COMMENT ON TABLE metering.hashmap_groups IS
  'a division of the calculation: each group prices a point on its own and the prices add up; rules without a group are in the default group';
COMMENT ON COLUMN metering.hashmap_groups.id IS 'the group id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_groups.name IS 'unique among groups not deleted';
COMMENT ON COLUMN metering.hashmap_groups.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_groups.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_groups.deleted_at IS 'when it was deleted (delete_hashmap_group)';
COMMENT ON COLUMN metering.hashmap_groups.deleted_by IS 'who deleted it';

CREATE TABLE metering.hashmap_mappings (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  service_id  uuid REFERENCES metering.hashmap_services (id),
  field_id    uuid REFERENCES metering.hashmap_fields (id),
  group_id    uuid REFERENCES metering.hashmap_groups (id),
  value       text,
  cost        numeric NOT NULL,
  map_type    text NOT NULL DEFAULT 'rate',
  tenant_id   text,
  start       timestamptz NOT NULL DEFAULT metering.now(),
  "end"       timestamptz,
  name        text,
  description text,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  updated_at  timestamptz,
  updated_by  text,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE INDEX hashmap_mappings_service_idx ON metering.hashmap_mappings (service_id);
CREATE INDEX hashmap_mappings_field_idx ON metering.hashmap_mappings (field_id, value);
CREATE INDEX hashmap_mappings_group_idx ON metering.hashmap_mappings (group_id);
COMMENT ON TABLE metering.hashmap_mappings IS
  'a price rule of a service (every point) or of a field (points whose metadata value equals `value`): flat sets the group''s flat price to the largest matching cost, rate multiplies the group''s rate; started rules may only get an end; DELETE is a soft delete';
COMMENT ON COLUMN metering.hashmap_mappings.id IS 'the rule id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_mappings.service_id IS 'the service it applies to (or field_id)';
COMMENT ON COLUMN metering.hashmap_mappings.field_id IS 'the field it applies to (or service_id)';
COMMENT ON COLUMN metering.hashmap_mappings.group_id IS 'its group; NULL: the default group';
COMMENT ON COLUMN metering.hashmap_mappings.value IS 'field mappings: the metadata value (as text, JSON spelling for numbers, true, false, null) that matches';
COMMENT ON COLUMN metering.hashmap_mappings.cost IS 'the flat price or the rate factor, exact';
COMMENT ON COLUMN metering.hashmap_mappings.map_type IS 'flat or rate';
COMMENT ON COLUMN metering.hashmap_mappings.tenant_id IS 'NULL: every tenant; else only this tenant, for whom it replaces the global rule with the same parent, group and value';
COMMENT ON COLUMN metering.hashmap_mappings.start IS 'from when it applies (default metering.now(); earlier needs metering.allow_backdated_rules)';
COMMENT ON COLUMN metering.hashmap_mappings."end" IS 'until when it applies (exclusive); NULL: no end';
COMMENT ON COLUMN metering.hashmap_mappings.name IS 'a readable name';
COMMENT ON COLUMN metering.hashmap_mappings.description IS 'free text';
COMMENT ON COLUMN metering.hashmap_mappings.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_mappings.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_mappings.updated_at IS 'when it was last changed';
COMMENT ON COLUMN metering.hashmap_mappings.updated_by IS 'who last changed it';
COMMENT ON COLUMN metering.hashmap_mappings.deleted_at IS 'when it was deleted: points rated before then still see it';
COMMENT ON COLUMN metering.hashmap_mappings.deleted_by IS 'who deleted it';

CREATE TABLE metering.hashmap_thresholds (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  service_id  uuid REFERENCES metering.hashmap_services (id),
  field_id    uuid REFERENCES metering.hashmap_fields (id),
  group_id    uuid REFERENCES metering.hashmap_groups (id),
  level       numeric NOT NULL,
  cost        numeric NOT NULL,
  map_type    text NOT NULL DEFAULT 'rate',
  tenant_id   text,
  start       timestamptz NOT NULL DEFAULT metering.now(),
  "end"       timestamptz,
  name        text,
  description text,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  updated_at  timestamptz,
  updated_by  text,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE INDEX hashmap_thresholds_service_idx ON metering.hashmap_thresholds (service_id);
CREATE INDEX hashmap_thresholds_field_idx ON metering.hashmap_thresholds (field_id);
CREATE INDEX hashmap_thresholds_group_idx ON metering.hashmap_thresholds (group_id);
COMMENT ON TABLE metering.hashmap_thresholds IS
  'a price rule that applies from a level of the quantity (service thresholds) or of a numeric metadata value (field thresholds); per group only the highest level reached applies; started rules may only get an end; DELETE is a soft delete';
COMMENT ON COLUMN metering.hashmap_thresholds.id IS 'the rule id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_thresholds.service_id IS 'the service whose quantity is compared (or field_id)';
COMMENT ON COLUMN metering.hashmap_thresholds.field_id IS 'the field whose metadata value, as a number, is compared (or service_id)';
COMMENT ON COLUMN metering.hashmap_thresholds.group_id IS 'its group; NULL: the default group';
COMMENT ON COLUMN metering.hashmap_thresholds.level IS 'it applies when the compared value is at least this; -1 and below never apply';
COMMENT ON COLUMN metering.hashmap_thresholds.cost IS 'flat: added (to the flat price of a field threshold, once to the group price of a service threshold); rate: a factor';
COMMENT ON COLUMN metering.hashmap_thresholds.map_type IS 'flat or rate';
COMMENT ON COLUMN metering.hashmap_thresholds.tenant_id IS 'NULL: every tenant; else only this tenant, for whom it replaces the global rule with the same parent, group and level';
COMMENT ON COLUMN metering.hashmap_thresholds.start IS 'from when it applies (default metering.now(); earlier needs metering.allow_backdated_rules)';
COMMENT ON COLUMN metering.hashmap_thresholds."end" IS 'until when it applies (exclusive); NULL: no end';
COMMENT ON COLUMN metering.hashmap_thresholds.name IS 'a readable name';
COMMENT ON COLUMN metering.hashmap_thresholds.description IS 'free text';
COMMENT ON COLUMN metering.hashmap_thresholds.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_thresholds.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_thresholds.updated_at IS 'when it was last changed';
COMMENT ON COLUMN metering.hashmap_thresholds.updated_by IS 'who last changed it';
COMMENT ON COLUMN metering.hashmap_thresholds.deleted_at IS 'when it was deleted: points rated before then still see it';
COMMENT ON COLUMN metering.hashmap_thresholds.deleted_by IS 'who deleted it';
-- HashMap rating: the triggers that keep the rule tables sound, and the
-- functions that change them.

CREATE FUNCTION metering.hashmap_types() RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ VALUES ('flat'), ('rate') $$;
COMMENT ON FUNCTION metering.hashmap_types() IS 'the kinds of rule: flat (a price) and rate (a factor)';

-- A row that carries its own created_at (not metering.now()) is a restored
-- one: pg_restore, a migration.  Only who may move the clock brings those,
-- or a session that re-rates the past on purpose.
CREATE FUNCTION metering._hashmap_may_restore() RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT current_setting('metering.allow_backdated_rules')::boolean
      OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
      OR pg_catalog.pg_has_role(current_user,
           (SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'metering'), 'USAGE')
$$;
COMMENT ON FUNCTION metering._hashmap_may_restore() IS
  'internal: whether this session may insert hashmap rows made earlier (superuser, extension owner, or metering.allow_backdated_rules)';

CREATE FUNCTION metering._hashmap_unchanged_since_snapshot(parent uuid) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_hashmap_unchanged_since_snapshot'
  LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION metering._hashmap_unchanged_since_snapshot(uuid) IS
  'internal: at REPEATABLE READ or SERIALIZABLE, raises 40001 when another transaction changed the rules (or fields) of a service, field or group after this one''s snapshot';

-- services, fields and groups: named once, never renamed; DELETE is soft
CREATE FUNCTION metering._hashmap_named_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  what text := CASE TG_TABLE_NAME WHEN 'hashmap_services' THEN 'service'
                                  WHEN 'hashmap_fields' THEN 'field' ELSE 'group' END;
BEGIN
  IF NEW.name IS NULL OR btrim(NEW.name) = '' OR length(NEW.name) > 255 THEN
    RAISE EXCEPTION 'hashmap %: name is required (up to 255 characters)', what USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.created_at = metering.now() THEN
    NEW.created_by := current_user;
    IF NEW.deleted_at IS NOT NULL OR NEW.deleted_by IS NOT NULL THEN
      RAISE EXCEPTION 'a new hashmap % is not deleted', what USING ERRCODE = 'invalid_parameter_value';
    END IF;
  ELSIF NOT metering._hashmap_may_restore() THEN
    RAISE EXCEPTION 'hashmap %: created_at (%) is not now: only a restore brings rows made earlier', what, NEW.created_at
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Leave created_at to its default; a superuser, the extension owner or metering.allow_backdated_rules may restore.';
  END IF;
  -- a live field needs a live service, which must not be deleted meanwhile
  -- (through jsonb: services and groups have no service_id)
  IF TG_TABLE_NAME = 'hashmap_fields' AND NEW.deleted_at IS NULL THEN
    PERFORM 1 FROM metering.hashmap_services s
      WHERE s.id = (to_jsonb(NEW)->>'service_id')::uuid AND s.deleted_at IS NULL FOR NO KEY UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'hashmap service % does not exist', to_jsonb(NEW)->>'service_id' USING ERRCODE = 'foreign_key_violation';
    END IF;
    PERFORM metering._hashmap_unchanged_since_snapshot((to_jsonb(NEW)->>'service_id')::uuid);
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._hashmap_named_before_insert() IS
  'internal: validates a new hashmap service, field or group';

CREATE FUNCTION metering._hashmap_named_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  what text := CASE TG_TABLE_NAME WHEN 'hashmap_services' THEN 'service'
                                  WHEN 'hashmap_fields' THEN 'field' ELSE 'group' END;
BEGIN
  IF OLD.deleted_at IS NOT NULL THEN
    RAISE EXCEPTION 'hashmap % "%" is deleted', what, OLD.name USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF (to_jsonb(NEW) - 'deleted_at' - 'deleted_by') IS DISTINCT FROM (to_jsonb(OLD) - 'deleted_at' - 'deleted_by')
     OR NEW.deleted_at IS NULL THEN
    RAISE EXCEPTION 'hashmap % "%" cannot change; only deleting it can', what, OLD.name
      USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Create a new one.';
  END IF;
  NEW.deleted_at := metering.now();
  NEW.deleted_by := current_user;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._hashmap_named_before_update() IS
  'internal: services, fields and groups never change but to be deleted (at metering.now(), by current_user)';

-- what goes with a deleted service or field: its fields and rules
CREATE FUNCTION metering._hashmap_named_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  now timestamptz := metering.now();
BEGIN
  -- at REPEATABLE READ: a rule or field added meanwhile would be missed below
  PERFORM metering._hashmap_unchanged_since_snapshot(NEW.id);
  IF TG_TABLE_NAME = 'hashmap_groups' THEN
    -- rules not started yet move to the default group; running ones end now
    -- and go on there as copies; ended ones stay (the past keeps its prices)
    UPDATE metering.hashmap_mappings SET group_id = NULL
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start >= now;
    UPDATE metering.hashmap_thresholds SET group_id = NULL
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start >= now;
    INSERT INTO metering.hashmap_mappings (service_id, field_id, value, cost, map_type, tenant_id, start, "end", name, description)
    SELECT service_id, field_id, value, cost, map_type, tenant_id, now, "end", name, description
      FROM metering.hashmap_mappings
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start < now AND ("end" IS NULL OR "end" > now)
     ORDER BY id;
    INSERT INTO metering.hashmap_thresholds (service_id, field_id, level, cost, map_type, tenant_id, start, "end", name, description)
    SELECT service_id, field_id, level, cost, map_type, tenant_id, now, "end", name, description
      FROM metering.hashmap_thresholds
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start < now AND ("end" IS NULL OR "end" > now)
     ORDER BY id;
    UPDATE metering.hashmap_mappings SET "end" = now
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start < now AND ("end" IS NULL OR "end" > now);
    UPDATE metering.hashmap_thresholds SET "end" = now
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start < now AND ("end" IS NULL OR "end" > now);
  ELSIF TG_TABLE_NAME = 'hashmap_services' THEN
    UPDATE metering.hashmap_fields SET deleted_at = metering.now() WHERE service_id = NEW.id AND deleted_at IS NULL;
    UPDATE metering.hashmap_mappings SET deleted_at = metering.now() WHERE service_id = NEW.id AND deleted_at IS NULL;
    UPDATE metering.hashmap_thresholds SET deleted_at = metering.now() WHERE service_id = NEW.id AND deleted_at IS NULL;
  ELSIF TG_TABLE_NAME = 'hashmap_fields' THEN
    UPDATE metering.hashmap_mappings SET deleted_at = metering.now() WHERE field_id = NEW.id AND deleted_at IS NULL;
    UPDATE metering.hashmap_thresholds SET deleted_at = metering.now() WHERE field_id = NEW.id AND deleted_at IS NULL;
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._hashmap_named_after_delete() IS
  'internal: deleting a service deletes its fields and rules; deleting a field, its rules; deleting a group hands its running and future rules to the default group';

CREATE FUNCTION metering._hashmap_soft_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.deleted_at IS NULL THEN
    IF TG_TABLE_NAME = 'hashmap_groups' THEN
      PERFORM metering.delete_hashmap_group(OLD.id, false);
    ELSE
      EXECUTE format('UPDATE %s SET deleted_at = metering.now() WHERE id = $1', TG_RELID::regclass) USING OLD.id;
    END IF;
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._hashmap_soft_delete() IS
  'internal: DELETE keeps the row and marks it deleted (a group''s rules go on in the default group)';

-- mappings and thresholds
CREATE FUNCTION metering._hashmap_rule_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  now timestamptz := metering.now();
  mapping boolean := TG_TABLE_NAME = 'hashmap_mappings';
  what text := CASE WHEN TG_TABLE_NAME = 'hashmap_mappings' THEN 'mapping' ELSE 'threshold' END;
  backdated boolean := current_setting('metering.allow_backdated_rules')::boolean;
  fresh boolean;
  nv jsonb := to_jsonb(NEW);
  ov jsonb;
  dup uuid;
  parent uuid;
  joins_group boolean;
BEGIN
  IF TG_OP = 'UPDATE' THEN
    ov := to_jsonb(OLD);
    IF OLD.deleted_at IS NOT NULL THEN
      RAISE EXCEPTION 'hashmap %: the rule is deleted', what
        USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Rule %s, deleted at %s.', OLD.id, OLD.deleted_at);
    END IF;
    IF (NEW.id, NEW.created_at, NEW.created_by) IS DISTINCT FROM (OLD.id, OLD.created_at, OLD.created_by) THEN
      RAISE EXCEPTION 'hashmap %: id, created_at and created_by never change', what
        USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- a soft delete (DELETE, or the deletion of its service, field or group)
    IF NEW.deleted_at IS NOT NULL THEN
      IF (nv - 'deleted_at' - 'deleted_by') IS DISTINCT FROM (ov - 'deleted_at' - 'deleted_by') THEN
        RAISE EXCEPTION 'hashmap %: a deletion changes nothing else', what
          USING ERRCODE = 'object_not_in_prerequisite_state';
      END IF;
      NEW.deleted_at := now;
      NEW.deleted_by := current_user;
      RETURN NEW;
    END IF;
    IF NEW.deleted_by IS NOT NULL THEN
      RAISE EXCEPTION 'hashmap %: deleted_by comes with a deletion', what USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- the rules of a deleted group that have not started move to the
    -- default group (see _hashmap_named_after_delete)
    IF NEW.group_id IS NULL AND OLD.group_id IS NOT NULL AND OLD.start >= now
       AND (nv - 'group_id') = (ov - 'group_id')
       AND EXISTS (SELECT 1 FROM metering.hashmap_groups g WHERE g.id = OLD.group_id AND g.deleted_at IS NOT NULL) THEN
      fresh := false;
    ELSIF OLD.start <= now THEN
      -- started: only the end may change, and not into the past
      IF (nv - 'end' - 'updated_at' - 'updated_by') IS DISTINCT FROM (ov - 'end' - 'updated_at' - 'updated_by') THEN
        RAISE EXCEPTION 'hashmap %: the rule has started (%): only its end may change', what, OLD.start
          USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Rule %s.', OLD.id),
                HINT = 'Set its end and create a new rule from then.';
      END IF;
      -- an ended rule stays ended: reopening it would price the gap anew
      IF OLD."end" <= now AND NEW."end" IS DISTINCT FROM OLD."end" AND NOT backdated THEN
        RAISE EXCEPTION 'hashmap %: the rule ended at %: it cannot be reopened', what, OLD."end"
          USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Rule %s.', OLD.id),
                HINT = 'Create a new rule from now.';
      END IF;
      IF NEW."end" IS NOT NULL AND NEW."end" < now AND NOT backdated THEN
        RAISE EXCEPTION 'hashmap %: end % is in the past', what, NEW."end"
          USING ERRCODE = 'invalid_parameter_value', HINT = 'Rules are not changed retroactively.';
      END IF;
      fresh := false;
    ELSE
      fresh := true;             -- not started yet: checked like a new rule
    END IF;
    NEW.updated_at := now;
    NEW.updated_by := current_user;
  ELSE
    -- a row made now is new; one with another created_at is restored
    fresh := NEW.created_at = now;
    IF NOT fresh AND NOT metering._hashmap_may_restore() THEN
      RAISE EXCEPTION 'hashmap %: created_at (%) is not now: only a restore brings rules made earlier', what, NEW.created_at
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'Leave created_at to its default; a superuser, the extension owner or metering.allow_backdated_rules may restore.';
    END IF;
    IF fresh THEN
      NEW.created_by := current_user;
      IF NEW.updated_at IS NOT NULL OR NEW.updated_by IS NOT NULL
         OR NEW.deleted_at IS NOT NULL OR NEW.deleted_by IS NOT NULL THEN
        RAISE EXCEPTION 'hashmap %: a new rule is neither updated nor deleted', what
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
    END IF;
  END IF;

  -- the shape of the rule
  IF (NEW.service_id IS NULL) = (NEW.field_id IS NULL) THEN
    RAISE EXCEPTION 'hashmap % belongs to exactly one service or one field, got %', what,
      CASE WHEN NEW.service_id IS NULL THEN 'neither' ELSE 'both' END
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF mapping AND NEW.service_id IS NOT NULL AND nv->>'value' IS NOT NULL THEN
    RAISE EXCEPTION 'hashmap mapping: a service mapping has no value (it applies to every point), got %', quote_literal(nv->>'value')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF mapping AND NEW.field_id IS NOT NULL AND nv->>'value' IS NULL THEN
    RAISE EXCEPTION 'hashmap mapping: a field mapping needs the value it matches'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.map_type IS NULL OR NEW.map_type NOT IN ('flat', 'rate') THEN
    RAISE EXCEPTION 'hashmap %: map_type must be flat or rate, got %', what, coalesce(quote_literal(NEW.map_type), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- numeric sorts NaN above Infinity above every number
  IF NEW.cost IS NULL OR NEW.cost >= 'Infinity' OR NEW.cost <= '-Infinity' THEN
    RAISE EXCEPTION 'hashmap %: cost must be a finite number, got %', what, coalesce(NEW.cost::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT mapping AND (nv->>'level' IS NULL OR (nv->>'level')::numeric >= 'Infinity' OR (nv->>'level')::numeric <= '-Infinity') THEN
    RAISE EXCEPTION 'hashmap threshold: level must be a finite number, got %', coalesce(nv->>'level', 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.tenant_id = '' THEN
    RAISE EXCEPTION 'hashmap %: tenant_id is NULL (every tenant) or a tenant, not empty', what
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.start IS NULL OR NOT isfinite(NEW.start) THEN
    RAISE EXCEPTION 'hashmap %: start must be a finite time', what USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW."end" IS NOT NULL AND (NEW."end" <= NEW.start OR NOT isfinite(NEW."end")) THEN
    RAISE EXCEPTION 'hashmap %: end (%) must be after start (%)', what, NEW."end", NEW.start
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF fresh THEN
    IF NEW.start < now AND NOT backdated THEN
      RAISE EXCEPTION 'hashmap %: start % is in the past', what, NEW.start
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'SET metering.allow_backdated_rules = on to re-rate the past on purpose.';
    END IF;
    IF NEW."end" < now AND NOT backdated THEN
      RAISE EXCEPTION 'hashmap %: end % is in the past', what, NEW."end"
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'SET metering.allow_backdated_rules = on to re-rate the past on purpose.';
    END IF;
  END IF;

  -- a live rule needs a live service or field (and group), which must not be
  -- deleted meanwhile; writers of one parent take turns, so that the check
  -- below sees the others' rules: one rule per key and tenant at any
  -- instant, or the price would depend on row order.  The group is locked
  -- first, as delete_hashmap_group locks it before the rules' parents.
  -- (A group is checked when the rule joins it: ending a rule of a group
  -- being deleted is part of that deletion.  A restored rule may belong to
  -- a group deleted after it ended.)
  joins_group := NEW.group_id IS NOT NULL AND NEW.deleted_at IS NULL AND (TG_OP = 'INSERT' OR fresh);
  IF joins_group THEN
    PERFORM 1 FROM metering.hashmap_groups g
      WHERE g.id = NEW.group_id
        AND (g.deleted_at IS NULL OR (NOT fresh AND least(NEW."end", NEW.deleted_at) <= g.deleted_at))
      FOR SHARE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'hashmap group % does not exist', NEW.group_id USING ERRCODE = 'foreign_key_violation';
    END IF;
  END IF;
  IF NEW.service_id IS NOT NULL THEN
    SELECT s.id INTO parent FROM metering.hashmap_services s
     WHERE s.id = NEW.service_id AND (s.deleted_at IS NULL OR NEW.deleted_at IS NOT NULL) FOR NO KEY UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'hashmap service % does not exist', NEW.service_id USING ERRCODE = 'foreign_key_violation';
    END IF;
  ELSE
    SELECT f.id INTO parent FROM metering.hashmap_fields f
     WHERE f.id = NEW.field_id AND (f.deleted_at IS NULL OR NEW.deleted_at IS NOT NULL) FOR NO KEY UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'hashmap field % does not exist', NEW.field_id USING ERRCODE = 'foreign_key_violation';
    END IF;
  END IF;
  PERFORM metering._hashmap_unchanged_since_snapshot(parent);
  IF joins_group THEN
    PERFORM metering._hashmap_unchanged_since_snapshot(NEW.group_id);
  END IF;

  IF mapping THEN
    SELECT m.id INTO dup FROM metering.hashmap_mappings m
     WHERE m.id <> NEW.id
       AND m.service_id IS NOT DISTINCT FROM NEW.service_id AND m.field_id IS NOT DISTINCT FROM NEW.field_id
       AND m.group_id IS NOT DISTINCT FROM NEW.group_id AND m.tenant_id IS NOT DISTINCT FROM NEW.tenant_id
       AND m.value IS NOT DISTINCT FROM nv->>'value'
       AND m.start < coalesce(least(m."end", m.deleted_at), 'infinity')
       AND m.start < coalesce(least(NEW."end", NEW.deleted_at), 'infinity')
       AND NEW.start < coalesce(least(m."end", m.deleted_at), 'infinity')
     LIMIT 1;
  ELSE
    SELECT t.id INTO dup FROM metering.hashmap_thresholds t
     WHERE t.id <> NEW.id
       AND t.service_id IS NOT DISTINCT FROM NEW.service_id AND t.field_id IS NOT DISTINCT FROM NEW.field_id
       AND t.group_id IS NOT DISTINCT FROM NEW.group_id AND t.tenant_id IS NOT DISTINCT FROM NEW.tenant_id
       AND t.level = (nv->>'level')::numeric
       AND t.start < coalesce(least(t."end", t.deleted_at), 'infinity')
       AND t.start < coalesce(least(NEW."end", NEW.deleted_at), 'infinity')
       AND NEW.start < coalesce(least(t."end", t.deleted_at), 'infinity')
     LIMIT 1;
  END IF;
  IF dup IS NOT NULL THEN
    RAISE EXCEPTION 'hashmap %: another % applies at the same time to the same %, group and tenant', what, what,
      CASE WHEN mapping AND NEW.field_id IS NOT NULL THEN 'field and value'
           WHEN mapping THEN 'service' ELSE 'parent and level' END
      USING ERRCODE = 'unique_violation', DETAIL = format('The other one is %s.', dup),
            HINT = 'End the other one first, or give this one a start after its end.';
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._hashmap_rule_before_write() IS
  'internal: validates a mapping or threshold, its validity period and its uniqueness; started rules may only get an end; deletions are stamped';

CREATE FUNCTION metering._hashmap_invalidate() RETURNS trigger
  AS 'MODULE_PATHNAME', 'metering_hashmap_invalidate'
  LANGUAGE C;
COMMENT ON FUNCTION metering._hashmap_invalidate() IS
  'internal: tells every backend that the rules changed (their compiled copies are rebuilt at next use)';

DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['hashmap_services', 'hashmap_fields', 'hashmap_groups'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT ON metering.%I FOR EACH ROW EXECUTE FUNCTION metering._hashmap_named_before_insert()', t || '_before_insert', t);
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON metering.%I FOR EACH ROW EXECUTE FUNCTION metering._hashmap_named_before_update()', t || '_before_update', t);
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE OF deleted_at ON metering.%I FOR EACH ROW WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL) EXECUTE FUNCTION metering._hashmap_named_after_delete()', t || '_after_delete', t);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['hashmap_mappings', 'hashmap_thresholds'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON metering.%I FOR EACH ROW EXECUTE FUNCTION metering._hashmap_rule_before_write()', t || '_before_write', t);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['hashmap_services', 'hashmap_fields', 'hashmap_groups', 'hashmap_mappings', 'hashmap_thresholds'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE DELETE ON metering.%I FOR EACH ROW EXECUTE FUNCTION metering._hashmap_soft_delete()', t || '_soft_delete', t);
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON metering.%I FOR EACH STATEMENT EXECUTE FUNCTION metering._hashmap_invalidate()', t || '_invalidate', t);
    -- caches must hear of changes applied by replication too
    EXECUTE format('ALTER TABLE metering.%I ENABLE ALWAYS TRIGGER %I', t, t || '_invalidate');
  END LOOP;
END $$;

CREATE FUNCTION metering.delete_hashmap_group(group_id uuid, recursive boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  g metering.hashmap_groups;
BEGIN
  SELECT * INTO g FROM metering.hashmap_groups WHERE id = delete_hashmap_group.group_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'hashmap group % does not exist', delete_hashmap_group.group_id USING ERRCODE = 'no_data_found';
  END IF;
  IF g.deleted_at IS NOT NULL THEN
    RAISE EXCEPTION 'hashmap group "%" is already deleted', g.name USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF coalesce(recursive, false) THEN
    UPDATE metering.hashmap_mappings m SET deleted_at = metering.now() WHERE m.group_id = g.id AND m.deleted_at IS NULL;
    UPDATE metering.hashmap_thresholds t SET deleted_at = metering.now() WHERE t.group_id = g.id AND t.deleted_at IS NULL;
  END IF;
  -- what is left goes on in the default group (_hashmap_named_after_delete)
  UPDATE metering.hashmap_groups SET deleted_at = metering.now() WHERE id = g.id;
END $$;
COMMENT ON FUNCTION metering.delete_hashmap_group(uuid, boolean) IS
  'deletes a group; with recursive its rules too, else its running and future rules go on in the default group from now (23505 if that makes two rules for one key); ended rules keep pricing the past';
-- HashMap rating: pricing points with the rules (C, over a per-backend
-- compiled copy of the rule tables).

CREATE FUNCTION metering.rate(service text, qty numeric, metadata jsonb DEFAULT '{}', tenant text DEFAULT NULL,
                              at timestamptz DEFAULT NULL, price numeric DEFAULT 0) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_rate'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering.rate(text, numeric, jsonb, text, timestamptz, numeric) IS
  'the price of qty of a service with this metadata, for a tenant, under the rules that apply at `at` (default metering.now()): `price` plus each matched group''s price; exact';

CREATE FUNCTION metering.rate_explain(service text, qty numeric, metadata jsonb DEFAULT '{}', tenant text DEFAULT NULL,
                                      at timestamptz DEFAULT NULL)
  RETURNS TABLE(group_name text, flat numeric, rate numeric, threshold_level numeric, price numeric,
                threshold_cost numeric, threshold_type text, threshold_scope text)
  AS 'MODULE_PATHNAME', 'metering_rate_explain'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering.rate_explain(text, numeric, jsonb, text, timestamptz) IS
  'how rate() prices a point: per group that something matched (NULL: the default group), the flat and rate from its mappings, the threshold that applies, and the group''s price';

CREATE FUNCTION metering._rated_total_trans(numeric, text, numeric, jsonb, text) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_rated_total_trans'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering._rated_total_trans(numeric, text, numeric, jsonb, text) IS
  'internal: transition function of metering.rated_total (each point at metering.now())';
CREATE FUNCTION metering._rated_total_trans(numeric, text, numeric, jsonb, text, timestamptz) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_rated_total_trans'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering._rated_total_trans(numeric, text, numeric, jsonb, text, timestamptz) IS
  'internal: transition function of metering.rated_total (each point at its own instant)';

CREATE AGGREGATE metering.rated_total(service text, qty numeric, metadata jsonb, tenant text) (
  SFUNC = metering._rated_total_trans, STYPE = numeric, COMBINEFUNC = numeric_add, PARALLEL = SAFE
);
COMMENT ON AGGREGATE metering.rated_total(text, numeric, jsonb, text) IS
  'the sum of rate(service, qty, metadata, tenant) over the rows, each rated at metering.now(); parallel safe';
CREATE AGGREGATE metering.rated_total(service text, qty numeric, metadata jsonb, tenant text, at timestamptz) (
  SFUNC = metering._rated_total_trans, STYPE = numeric, COMBINEFUNC = numeric_add, PARALLEL = SAFE
);
COMMENT ON AGGREGATE metering.rated_total(text, numeric, jsonb, text, timestamptz) IS
  'the sum of rate(service, qty, metadata, tenant, at) over the rows, each rated at its own instant (re-rating uses the rules of then); parallel safe';
-- pg_dump keeps the rows of the rating tables.
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_services', '');
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_fields', '');
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_groups', '');
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_mappings', '');
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_thresholds', '');
-- Subjects: the metered parties (an organization and its account groups).
-- Events, entitlements and reports name subjects by key; an event for an
-- unknown subject is still stored, and shows in metering.unknown_subjects.

CREATE TABLE metering.subjects (
  key         text COLLATE "C" PRIMARY KEY,
  name        text,
  -- checked at commit, so that a restore may load a child before its parent
  parent_key  text COLLATE "C" REFERENCES metering.subjects (key) DEFERRABLE INITIALLY DEFERRED,
  is_trial    boolean NOT NULL DEFAULT false,
  metadata    jsonb,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  deleted_at  timestamptz
);
CREATE INDEX subjects_parent_idx ON metering.subjects (parent_key);
COMMENT ON TABLE metering.subjects IS
  'the metered parties, by the key events and entitlements use; parent_key makes an organization of account groups; DELETE is a soft delete';
COMMENT ON COLUMN metering.subjects.key IS 'the subject as events name it';
COMMENT ON COLUMN metering.subjects.name IS 'a readable name';
COMMENT ON COLUMN metering.subjects.parent_key IS 'the organization this account group belongs to (NULL: a top-level subject)';
COMMENT ON COLUMN metering.subjects.is_trial IS 'whether the subject is on a trial';
COMMENT ON COLUMN metering.subjects.metadata IS 'free-form JSON object';
COMMENT ON COLUMN metering.subjects.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.subjects.deleted_at IS 'when it was deleted: its usage stays, reports still name it';

CREATE FUNCTION metering._subjects_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.key IS NULL OR NEW.key = '' THEN
    RAISE EXCEPTION 'subject: key is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.metadata IS NOT NULL AND jsonb_typeof(NEW.metadata) <> 'object' THEN
    RAISE EXCEPTION 'subject "%": metadata must be a JSON object', NEW.key USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF TG_OP = 'UPDATE' THEN
    IF NEW.key IS DISTINCT FROM OLD.key OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
      RAISE EXCEPTION 'subject "%": key and created_at never change', OLD.key
        USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF OLD.deleted_at IS NOT NULL THEN
      RAISE EXCEPTION 'subject "%" is deleted', OLD.key USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF NEW.deleted_at IS NOT NULL THEN
      NEW.deleted_at := metering.now();
    END IF;
  ELSIF NEW.created_at = metering.now() AND NEW.deleted_at IS NOT NULL THEN
    RAISE EXCEPTION 'subject "%": a new subject is not deleted', NEW.key USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.parent_key IS NOT NULL AND NEW.parent_key IS DISTINCT FROM (CASE WHEN TG_OP = 'UPDATE' THEN OLD.parent_key END) THEN
    IF NOT EXISTS (SELECT 1 FROM metering.subjects s WHERE s.key = NEW.parent_key AND s.deleted_at IS NULL) THEN
      RAISE EXCEPTION 'subject "%": parent "%" does not exist', NEW.key, NEW.parent_key
        USING ERRCODE = 'foreign_key_violation';
    END IF;
    -- no cycles: the parent's ancestors must not include this subject
    IF EXISTS (WITH RECURSIVE up(key, parent_key) AS (
                 SELECT s.key, s.parent_key FROM metering.subjects s WHERE s.key = NEW.parent_key
                 UNION
                 SELECT s.key, s.parent_key FROM metering.subjects s JOIN up ON s.key = up.parent_key)
               SELECT 1 FROM up WHERE up.key = NEW.key) THEN
      RAISE EXCEPTION 'subject "%": parent "%" is one of its own descendants', NEW.key, NEW.parent_key
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._subjects_before_write() IS
  'internal: validates a subject (a live parent, no cycles); keys never change; deletions take metering.now()';
CREATE TRIGGER subjects_before_write BEFORE INSERT OR UPDATE ON metering.subjects
  FOR EACH ROW EXECUTE FUNCTION metering._subjects_before_write();

CREATE FUNCTION metering._subjects_soft_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.deleted_at IS NULL THEN
    UPDATE metering.subjects SET deleted_at = metering.now() WHERE key = OLD.key;
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._subjects_soft_delete() IS 'internal: DELETE keeps the subject and marks it deleted';
CREATE TRIGGER subjects_soft_delete BEFORE DELETE ON metering.subjects
  FOR EACH ROW EXECUTE FUNCTION metering._subjects_soft_delete();

-- a subject and everything below it
CREATE FUNCTION metering.subject_tree(subject text) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
  WITH RECURSIVE down(key) AS (
    SELECT subject COLLATE "C"
    UNION
    SELECT s.key FROM metering.subjects s JOIN down ON s.parent_key = down.key)
  SELECT key FROM down
$$;
COMMENT ON FUNCTION metering.subject_tree(text) IS 'a subject and its children, their children, and so on';

CREATE VIEW metering.unknown_subjects WITH (security_invoker = true) AS
SELECT e.subject, count(*) AS events, min(e.time) AS first_seen, max(e.time) AS last_seen
  FROM metering.events e
 WHERE NOT EXISTS (SELECT 1 FROM metering.subjects s WHERE s.key = e.subject)
 GROUP BY e.subject;
COMMENT ON VIEW metering.unknown_subjects IS
  'subjects that events name but metering.subjects does not know (their usage is stored all the same); reads every event';
COMMENT ON COLUMN metering.unknown_subjects.subject IS 'the subject key events use';
COMMENT ON COLUMN metering.unknown_subjects.events IS 'how many events name it';
COMMENT ON COLUMN metering.unknown_subjects.first_seen IS 'the time of its first event';
COMMENT ON COLUMN metering.unknown_subjects.last_seen IS 'the time of its last event';

SELECT pg_catalog.pg_extension_config_dump('metering.subjects', '');
-- Reports for people and portals: the status of every entitlement, daily
-- usage, and the ThousandEyes-style overview of a billing cycle.

CREATE FUNCTION metering._calendar_index(anchor timestamptz, step interval, t timestamptz) RETURNS bigint
  AS 'MODULE_PATHNAME', 'metering_calendar_index'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._calendar_index(timestamptz, interval, timestamptz) IS
  'internal: the largest n with calendar_step(anchor, step, n) <= t';

CREATE VIEW metering.entitlement_status WITH (security_invoker = true) AS
SELECT e.subject, e.feature_key AS feature, e.type, v.has_access AS access, v.balance, v.usage, v.overage,
       v.start_of_period AS period_start,
       CASE WHEN e.type = 'metered' THEN metering._period_bound(e.id, metering.now(), true) END AS period_end,
       v.config, e.id AS entitlement_id
  FROM metering.entitlements e
 CROSS JOIN LATERAL metering.entitlement_value(e.subject, e.id::text, metering.now()) v
 WHERE e.deleted_at IS NULL;
COMMENT ON VIEW metering.entitlement_status IS
  'every live entitlement as of metering.now(): access, balance, usage, overage and the current period';
COMMENT ON COLUMN metering.entitlement_status.subject IS 'the subject';
COMMENT ON COLUMN metering.entitlement_status.feature IS 'the feature key';
COMMENT ON COLUMN metering.entitlement_status.type IS 'metered, boolean or static';
COMMENT ON COLUMN metering.entitlement_status.access IS 'whether the subject may use the feature now';
COMMENT ON COLUMN metering.entitlement_status.balance IS 'metered: what the active grants hold';
COMMENT ON COLUMN metering.entitlement_status.usage IS 'metered: usage in the current period';
COMMENT ON COLUMN metering.entitlement_status.overage IS 'metered: usage no grant paid';
COMMENT ON COLUMN metering.entitlement_status.period_start IS 'metered: the current period''s start';
COMMENT ON COLUMN metering.entitlement_status.period_end IS 'metered: its end (exclusive)';
COMMENT ON COLUMN metering.entitlement_status.config IS 'static: the configuration';
COMMENT ON COLUMN metering.entitlement_status.entitlement_id IS 'the entitlement';

CREATE VIEW metering.daily_usage WITH (security_invoker = true) AS
SELECT m.slug AS meter, q.subject, q.window_start AS day, q.window_end AS day_end, q.value
  FROM metering.meters m
 CROSS JOIN LATERAL metering.query_meter(m.slug, NULL, NULL, 'DAY', 'UTC') q
 WHERE m.deleted_at IS NULL;
COMMENT ON VIEW metering.daily_usage IS
  'each live meter''s value per subject and UTC day (days without usage have no row); filter on meter and day';
COMMENT ON COLUMN metering.daily_usage.meter IS 'the meter';
COMMENT ON COLUMN metering.daily_usage.subject IS 'the subject';
COMMENT ON COLUMN metering.daily_usage.day IS 'the UTC day''s start';
COMMENT ON COLUMN metering.daily_usage.day_end IS 'the next day''s start';
COMMENT ON COLUMN metering.daily_usage.value IS 'the meter''s value for the day';

-- Report times are instants of the years 1 to 9999, as everywhere in the
-- extension: calendar bounds around them stay representable.
CREATE FUNCTION metering._report_time(t timestamptz, what text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF t IS NULL OR NOT isfinite(t) OR t < '0001-01-01 00:00:00+00' OR t >= '10000-01-01 00:00:00+00' THEN
    RAISE EXCEPTION '%: must be a finite time in the years 1 to 9999, got %', what, coalesce(t::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN t;
END $$;
COMMENT ON FUNCTION metering._report_time(timestamptz, text) IS 'internal: a report time, checked (22023 outside the years 1 to 9999)';

CREATE FUNCTION metering.usage_overview(subject text, meter text, at timestamptz DEFAULT NULL,
  OUT period_start timestamptz, OUT period_end timestamptz, OUT included numeric, OUT used numeric,
  OUT projected numeric)
LANGUAGE plpgsql STABLE AS $$
DECLARE
  t timestamptz := coalesce(at, metering.now());
  m metering.meters;
  ent uuid;
  filters jsonb;
  lower timestamptz;
  upper timestamptz;
  g record;
  refills bigint;
  day_from timestamptz;
  day_to timestamptz;
  hour_from timestamptz;
  hour_to timestamptz;
  head_from timestamptz;
  tail_to timestamptz;
  wm bigint;
BEGIN
  IF subject IS NULL OR meter IS NULL THEN
    RAISE EXCEPTION 'usage_overview: subject and meter are required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM metering._report_time(t, 'usage_overview: at');
  PERFORM metering._require_subject(usage_overview.subject);
  SELECT * INTO m FROM metering.meters x WHERE x.slug = usage_overview.meter AND x.deleted_at IS NULL;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'meter "%" does not exist', usage_overview.meter USING ERRCODE = 'no_data_found';
  END IF;
  -- the billing cycle: the usage period of the subject's entitlement on this meter
  SELECT n.id, f.meter_group_by_filters INTO ent, filters
    FROM metering.entitlements n JOIN metering.features f ON f.id = n.feature_id
   WHERE n.subject = usage_overview.subject AND f.meter_slug = usage_overview.meter AND n.type = 'metered'
     AND n.measure_usage_from <= t AND (n.deleted_at IS NULL OR n.deleted_at > t)
   ORDER BY n.created_at DESC, n.id DESC LIMIT 1;
  IF FOUND THEN
    period_start := metering._period_bound(ent, t, false);
    period_end := metering._period_bound(ent, t, true);
    -- what the grants active in the cycle put in it: a recurring grant once per refill
    included := 0;
    FOR g IN SELECT * FROM metering.grants x WHERE x.entitlement_id = ent LOOP
      lower := greatest(period_start, g.effective_at);
      upper := least(period_end, g.expires_at, g.voided_at, g.deleted_at);
      CONTINUE WHEN upper IS NOT NULL AND upper <= lower;
      upper := coalesce(upper, period_end);
      refills := 1;
      IF g.recurrence IS NOT NULL THEN
        refills := metering._calendar_index(g.recurrence_anchor, g.recurrence, upper - interval '1 microsecond')
                 - metering._calendar_index(g.recurrence_anchor, g.recurrence, lower - interval '1 microsecond')
                 + CASE WHEN g.effective_at >= period_start
                         AND metering.calendar_step(g.recurrence_anchor, g.recurrence,
                               metering._calendar_index(g.recurrence_anchor, g.recurrence, g.effective_at)) <> g.effective_at
                        THEN 1 ELSE 0 END;
        refills := greatest(refills, 1);
      END IF;
      included := included + g.amount * refills;
    END LOOP;
  ELSE
    period_start := date_trunc('month', t, 'UTC');
    period_end := date_trunc('month', period_start + interval '32 days', 'UTC');
    included := NULL;
  END IF;
  -- SUM and COUNT add up, so without group filters the cycle is read from
  -- the coarsest parts that fit: kept days (usage_periods), rolled-up hours,
  -- the events of the partial hours at either end, and the events above the
  -- watermark; the same parts query_meter reads, without its planning
  IF m.aggregation IN ('SUM', 'COUNT') AND coalesce(filters, '{}') = '{}' THEN
    wm := coalesce((SELECT s.rolled_up_to FROM metering.meter_rollup_state s WHERE s.meter = m.slug), 0);
    -- whole hours [hour_from, hour_to), whole days [day_from, day_to) in them
    hour_from := date_trunc('hour', period_start, 'UTC');
    hour_from := CASE WHEN hour_from < period_start THEN hour_from + interval '1 hour' ELSE hour_from END;
    hour_to := date_trunc('hour', t, 'UTC');
    IF hour_from >= hour_to THEN
      hour_from := t;
      hour_to := t;
    END IF;
    day_from := date_trunc('day', hour_from, 'UTC');
    day_from := CASE WHEN day_from < hour_from THEN day_from + interval '1 day' ELSE day_from END;
    day_to := date_trunc('day', hour_to, 'UTC');
    IF day_from >= day_to THEN
      day_from := hour_to;
      day_to := hour_to;
    END IF;
    SELECT coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(p.sum, 0) ELSE p.events END), 0) INTO used
      FROM metering.usage_periods p
     WHERE p.meter = m.slug AND p.subject = usage_overview.subject AND p.kind = 'DAILY'
       AND p.start_time >= day_from AND p.start_time < day_to;
    SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(r.sum, 0) ELSE r.events END), 0) INTO used
      FROM metering.meter_rollups r
     WHERE r.meter = m.slug AND r.subject = usage_overview.subject
       AND ((r.bucket >= hour_from AND r.bucket < day_from) OR (r.bucket >= day_to AND r.bucket < hour_to));
    -- the partial hours at either end: their rolled-up hour when none of its
    -- events lies outside the cycle (at now, the usual case), else their
    -- events below the watermark
    head_from := period_start;
    tail_to := t;
    IF period_start < hour_from AND date_trunc('hour', hour_from, 'UTC') = hour_from AND NOT EXISTS (
         SELECT 1 FROM metering.meter_rollups r WHERE r.meter = m.slug AND r.subject = usage_overview.subject
            AND r.bucket = hour_from - interval '1 hour' AND r.first_time < period_start) THEN
      SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(r.sum, 0) ELSE r.events END), 0) INTO used
        FROM metering.meter_rollups r
       WHERE r.meter = m.slug AND r.subject = usage_overview.subject AND r.bucket = hour_from - interval '1 hour';
      head_from := hour_from;
    END IF;
    IF hour_to < t AND date_trunc('hour', t, 'UTC') = hour_to AND NOT EXISTS (
         SELECT 1 FROM metering.meter_rollups r WHERE r.meter = m.slug AND r.subject = usage_overview.subject
            AND r.bucket = hour_to AND r.last_time >= t) THEN
      SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(r.sum, 0) ELSE r.events END), 0) INTO used
        FROM metering.meter_rollups r
       WHERE r.meter = m.slug AND r.subject = usage_overview.subject AND r.bucket = hour_to;
      tail_to := hour_to;
    END IF;
    IF head_from < hour_from OR hour_to < tail_to THEN
      SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(metering._meter_number(e.data, m.value_property), 0)
                                      ELSE 1 END), 0) INTO used
        FROM metering.events e
       WHERE e.type = m.event_type AND e.subject = usage_overview.subject AND e.seq <= wm
         AND ((e.time >= head_from AND e.time < hour_from) OR (e.time >= hour_to AND e.time < tail_to));
    END IF;
    -- ...and every event above it (few: found by seq; the time is not an index condition)
    SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(metering._meter_number(e.data, m.value_property), 0)
                                    ELSE 1 END), 0) INTO used
      FROM metering.events e
     WHERE e.type = m.event_type AND e.subject = usage_overview.subject AND e.seq > wm
       AND (e.time >= period_start AND e.time < t) IS TRUE;
  ELSE
    SELECT coalesce(sum(q.value), 0) INTO used
      FROM metering.query_meter(usage_overview.meter, period_start, t, NULL, 'UTC', ARRAY[usage_overview.subject], NULL,
                                filters) q;
  END IF;
  IF t > period_start THEN
    projected := trim_scale(used * extract(epoch FROM period_end - period_start) / extract(epoch FROM t - period_start));
  END IF;
END $$;
COMMENT ON FUNCTION metering.usage_overview(text, text, timestamptz) IS
  'ThousandEyes usage overview: the billing cycle containing `at` (the subject''s entitlement period on the meter, else the UTC calendar month), the units the grants include, the usage up to `at`, and the usage projected to the cycle''s end';
-- Entrust-style usage search: metering.search_usage(request jsonb), one
-- row per (subject, meter, period) that has usage, paged by signed keyset
-- cursors that carry the whole query.

-- Cursors: base64url(payload) "." base64url(HMAC-SHA256 of the payload with
-- the database's signing key), the key's version inside.  SECURITY DEFINER:
-- they use the secret, which callers may not read.
CREATE FUNCTION metering._sign_cursor(payload jsonb) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  k metering.signing_keys := metering._current_signing_key();
  body text := metering._base64url(convert_to((payload || jsonb_build_object('kv', k.version))::text, 'UTF8'));
BEGIN
  -- a key of its own, derived from the secret: signing cursors for anyone
  -- must not sign anything else (RegisterUsage tokens use the secret itself)
  RETURN body || '.' || metering._base64url(metering._hmac_sha256(body, metering._hmac_sha256('metering cursor', k.secret)));
END $$;
COMMENT ON FUNCTION metering._sign_cursor(jsonb) IS 'internal: a tamper-evident cursor for a payload';

CREATE FUNCTION metering._read_cursor(cursor text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  body text := split_part(cursor, '.', 1);
  mac text := split_part(cursor, '.', 2);
  payload jsonb;
  secret bytea;
BEGIN
  IF cursor IS NULL OR length(cursor) > 100000 OR cursor !~ '^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$' THEN
    RAISE EXCEPTION 'cursor is not a cursor of this database' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  BEGIN
    payload := convert_from(decode(translate(body, '-_', '+/') || repeat('=', (4 - length(body) % 4) % 4), 'base64'),
                            'UTF8')::jsonb;
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'cursor is not a cursor of this database' USING ERRCODE = 'invalid_parameter_value';
  END;
  SELECT k.secret INTO secret FROM metering.signing_keys k
   WHERE jsonb_typeof(payload -> 'kv') = 'number' AND k.version = (payload ->> 'kv')::numeric;
  IF secret IS NULL
     OR metering._base64url(metering._hmac_sha256(body, metering._hmac_sha256('metering cursor', secret))) <> mac THEN
    RAISE EXCEPTION 'cursor is not a cursor of this database' USING ERRCODE = 'invalid_parameter_value',
      HINT = 'Cursors are signed: use them exactly as a response gave them.';
  END IF;
  RETURN payload;
END $$;
COMMENT ON FUNCTION metering._read_cursor(text) IS 'internal: the payload of a cursor this database signed, else 22023';

-- "2018-08-04T18:15:30", as the reference writes times (UTC, no zone)
CREATE FUNCTION metering._search_time(value jsonb, what text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  s text := value #>> '{}';
BEGIN
  IF jsonb_typeof(value) <> 'string' OR s !~ '^\d{4}-\d{2}-\d{2}T([01]\d|2[0-3]):\d{2}:\d{2}(\.\d{1,6})?Z?$' THEN
    RAISE EXCEPTION 'search_usage: % must be a UTC time like 2018-08-04T18:15:30, got %', what, value
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  BEGIN
    RETURN (rtrim(s, 'Z') || '+00')::timestamptz;
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'search_usage: % must be a UTC time like 2018-08-04T18:15:30, got %', what, value
      USING ERRCODE = 'invalid_parameter_value';
  END;
END $$;
COMMENT ON FUNCTION metering._search_time(jsonb, text) IS 'internal: a search time value';

CREATE FUNCTION metering._search_format(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') $$;
COMMENT ON FUNCTION metering._search_format(timestamptz) IS 'internal: a time as search results write it';

-- The conditions of a search (checked already) as SQL over columns
-- start_time, end_time, subject, meter, kind and trial; values are quoted.
CREATE FUNCTION metering._search_where(search jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  c record;
  col text;
  lit text;
  parts text[] := ARRAY['true'];
BEGIN
  FOR c IN SELECT e ->> 'name' AS name, e ->> 'operator' AS op, e -> 'value' AS value
             FROM jsonb_array_elements(search) e LOOP
    col := CASE c.name WHEN 'startTime' THEN 'start_time' WHEN 'endTime' THEN 'end_time' WHEN 'tenantId' THEN 'subject'
                       WHEN 'usageType' THEN 'meter' WHEN 'aggregationPeriod' THEN 'kind' WHEN 'isTrial' THEN 'trial' END;
    IF c.op IN ('EXISTS', 'NOT_EXISTS') THEN
      parts := parts || CASE c.op WHEN 'EXISTS' THEN 'true' ELSE 'false' END;
      CONTINUE;
    END IF;
    -- times in ISO 8601 with their offset read back the same whatever DateStyle says
    lit := CASE WHEN c.name IN ('startTime', 'endTime')
                THEN format('%L::timestamptz', to_char(metering._search_time(c.value, c.name) AT TIME ZONE 'UTC',
                                                      'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00')
                WHEN c.name = 'isTrial' THEN format('%L::boolean', c.value #>> '{}')
                WHEN c.op IN ('IN', 'NOT_IN') THEN format('%L::text[]', ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(c.value) v))
                ELSE format('%L::text', c.value #>> '{}') END;
    parts := parts || CASE c.op
      WHEN 'GREATER_THAN' THEN format('%s > %s', col, lit)
      WHEN 'GREATER_THAN_OR_EQUAL' THEN format('%s >= %s', col, lit)
      WHEN 'LESS_THAN' THEN format('%s < %s', col, lit)
      WHEN 'LESS_THAN_OR_EQUAL' THEN format('%s <= %s', col, lit)
      WHEN 'EQUALS' THEN format('%s = %s', col, lit)
      WHEN 'NOT_EQUALS' THEN format('%s <> %s', col, lit)
      WHEN 'IN' THEN format('%s = ANY (%s)', col, lit)
      WHEN 'NOT_IN' THEN format('NOT (%s = ANY (%s))', col, lit)
      WHEN 'CONTAINS' THEN format('strpos(%s, %s) > 0', col, lit)
      WHEN 'NOT_CONTAINS' THEN format('strpos(%s, %s) = 0', col, lit)
      WHEN 'STARTS_WITH' THEN format('starts_with(%s, %s)', col, lit)
      WHEN 'ENDS_WITH' THEN format('right(%s, length(%s)) = %s', col, lit, lit) END;
  END LOOP;
  RETURN array_to_string(parts, ' AND ');
END $$;
COMMENT ON FUNCTION metering._search_where(jsonb) IS 'internal: the conditions of a search as SQL';

CREATE FUNCTION metering.search_usage(request jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
  q jsonb;                      -- the query: conditions, order, limit
  c jsonb;
  cond record;
  key jsonb;                    -- the keyset position, or NULL for the first page
  backward boolean := false;
  lim integer;
  order_attr text;
  ascending boolean;
  start_lo timestamptz;
  start_hi timestamptz;
  periods text[] := ARRAY['DAILY', 'WEEKLY', 'MONTHLY'];
  meters text[];
  subjects text[];
  has_start boolean := false;
  rows jsonb;
  page jsonb;
  total integer;
  first_key jsonb;
  last_key jsonb;
  more_after boolean;
  more_before boolean;
  more boolean;
  fast_meters text[];
  slow_meters text[];
  fetch_asc boolean;
  dir text;
  cmp text;
  where_sql text;
  keyset_sql text;
  base_sql text;
  order_sql text;
  key_ts timestamptz;
  key_id uuid;
  slow_lo timestamptz;
  slow_hi timestamptz;
  tail_lo timestamptz;
  tail_hi timestamptz;
  page_lo timestamptz;
  page_hi timestamptz;
  n_base bigint;
  ops jsonb := '{"startTime": ["GREATER_THAN", "GREATER_THAN_OR_EQUAL", "LESS_THAN", "LESS_THAN_OR_EQUAL", "EQUALS", "NOT_EQUALS", "EXISTS", "NOT_EXISTS"],
                 "endTime": ["GREATER_THAN", "GREATER_THAN_OR_EQUAL", "LESS_THAN", "LESS_THAN_OR_EQUAL", "EQUALS", "NOT_EQUALS", "EXISTS", "NOT_EXISTS"],
                 "tenantId": ["EQUALS", "IN", "NOT_EQUALS", "NOT_IN", "CONTAINS", "NOT_CONTAINS", "STARTS_WITH", "ENDS_WITH", "EXISTS", "NOT_EXISTS"],
                 "usageType": ["EQUALS", "IN", "NOT_EQUALS", "NOT_IN", "CONTAINS", "NOT_CONTAINS", "STARTS_WITH", "ENDS_WITH", "EXISTS", "NOT_EXISTS"],
                 "aggregationPeriod": ["EQUALS", "IN", "NOT_EQUALS", "NOT_IN", "EXISTS", "NOT_EXISTS"],
                 "isTrial": ["EQUALS", "NOT_EQUALS", "EXISTS", "NOT_EXISTS"]}';
BEGIN
  IF request IS NULL OR jsonb_typeof(request) <> 'object' THEN
    RAISE EXCEPTION 'search_usage: the request must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- a cursor carries the whole query; the request's own attributes are then ignored
  IF request ? 'cursor' AND request -> 'cursor' <> 'null' THEN
    IF jsonb_typeof(request -> 'cursor') <> 'string' THEN
      RAISE EXCEPTION 'search_usage: cursor must be a string' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    c := metering._read_cursor(request ->> 'cursor');
    IF c ? 'kind' THEN
      RAISE EXCEPTION 'search_usage: cursor is a cursor of %, not of search_usage', c ->> 'kind'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- (anyone may sign a cursor: what it carries is checked like a request)
    q := c -> 'q';
    key := c -> 'k';
    backward := (c ->> 'd') = 'prev';
  ELSE
    q := jsonb_build_object('search', coalesce(request -> 'searchByAttributes', '[]'),
                            'order', coalesce(request -> 'orderByAttribute', '{"name": "startTime", "ascending": true}'),
                            'limit', coalesce(request -> 'limit', '100'));
  END IF;

  -- the limit
  IF jsonb_typeof(q) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION 'search_usage: cursor carries no query' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(q -> 'limit') IS DISTINCT FROM 'number' OR (q ->> 'limit')::numeric <> trunc((q ->> 'limit')::numeric)
     OR (q ->> 'limit')::numeric NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'search_usage: limit must be an integer from 1 to 100, got %', q -> 'limit'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  lim := (q ->> 'limit')::numeric::integer;
  -- the order
  IF jsonb_typeof(q -> 'order') IS DISTINCT FROM 'object'
     OR NOT coalesce(ops ? (q -> 'order' ->> 'name') OR (q -> 'order' ->> 'name') IN ('count', 'id'), false)
     OR jsonb_typeof(coalesce(q -> 'order' -> 'ascending', 'true')) <> 'boolean' THEN
    RAISE EXCEPTION 'search_usage: orderByAttribute must be {"name": <attribute>, "ascending": true|false}, got %', q -> 'order'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  order_attr := q -> 'order' ->> 'name';
  ascending := coalesce((q -> 'order' ->> 'ascending')::boolean, true);

  -- the conditions: their shape, and what narrows the computation
  IF jsonb_typeof(q -> 'search') IS DISTINCT FROM 'array' THEN
    RAISE EXCEPTION 'search_usage: searchByAttributes must be an array' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR cond IN SELECT e AS raw, e ->> 'name' AS name, e ->> 'operator' AS op, e -> 'value' AS value
                FROM jsonb_array_elements(q -> 'search') e LOOP
    IF jsonb_typeof(cond.raw) <> 'object' OR cond.name IS NULL OR cond.op IS NULL THEN
      RAISE EXCEPTION 'search_usage: each search attribute needs a name and an operator, got %', cond.raw
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT ops ? cond.name THEN
      RAISE EXCEPTION 'search_usage: unknown attribute "%"', cond.name USING ERRCODE = 'invalid_parameter_value',
        HINT = 'Attributes: startTime, endTime, tenantId, isTrial, usageType, aggregationPeriod.';
    END IF;
    IF NOT (ops -> cond.name) ? cond.op THEN
      RAISE EXCEPTION 'search_usage: operator % does not apply to %', cond.op, cond.name
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cond.op NOT IN ('EXISTS', 'NOT_EXISTS') THEN
      IF cond.value IS NULL THEN
        RAISE EXCEPTION 'search_usage: % % needs a value', cond.name, cond.op USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF cond.op IN ('IN', 'NOT_IN') AND (jsonb_typeof(cond.value) <> 'array' OR jsonb_array_length(cond.value) = 0
           OR EXISTS (SELECT 1 FROM jsonb_array_elements(cond.value) v WHERE jsonb_typeof(v) <> 'string')) THEN
        RAISE EXCEPTION 'search_usage: % % needs a non-empty array of strings, got %', cond.name, cond.op, cond.value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF cond.op NOT IN ('IN', 'NOT_IN') AND cond.name <> 'isTrial' AND jsonb_typeof(cond.value) <> 'string' THEN
        RAISE EXCEPTION 'search_usage: % % needs a string, got %', cond.name, cond.op, cond.value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF cond.name = 'isTrial' AND jsonb_typeof(cond.value) <> 'boolean' THEN
        RAISE EXCEPTION 'search_usage: isTrial % needs true or false, got %', cond.op, cond.value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF cond.name = 'aggregationPeriod' AND EXISTS (
           SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(cond.value) = 'array' THEN cond.value
                                                   ELSE jsonb_build_array(cond.value) END) v
            WHERE v #>> '{}' NOT IN ('DAILY', 'WEEKLY', 'MONTHLY')) THEN
        RAISE EXCEPTION 'search_usage: aggregationPeriod is DAILY, WEEKLY or MONTHLY, got %', cond.value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
    END IF;
    CASE cond.name
      WHEN 'startTime' THEN
        has_start := true;
        IF cond.op IN ('GREATER_THAN', 'GREATER_THAN_OR_EQUAL', 'EQUALS') THEN
          start_lo := greatest(start_lo, metering._search_time(cond.value, 'startTime'));
        END IF;
        IF cond.op IN ('LESS_THAN', 'LESS_THAN_OR_EQUAL', 'EQUALS') THEN
          start_hi := least(start_hi, metering._search_time(cond.value, 'startTime'));
        END IF;
        IF cond.op IN ('NOT_EQUALS') THEN
          PERFORM metering._search_time(cond.value, 'startTime');
        END IF;
      WHEN 'endTime' THEN
        IF cond.op NOT IN ('EXISTS', 'NOT_EXISTS') THEN
          PERFORM metering._search_time(cond.value, 'endTime');
        END IF;
      WHEN 'tenantId' THEN
        IF cond.op = 'EQUALS' THEN
          subjects := ARRAY[cond.value #>> '{}'];
        ELSIF cond.op = 'IN' THEN
          subjects := ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(cond.value) v);
        END IF;
      WHEN 'usageType' THEN
        IF cond.op = 'EQUALS' THEN
          meters := ARRAY[cond.value #>> '{}'];
        ELSIF cond.op = 'IN' THEN
          meters := ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(cond.value) v);
        END IF;
      WHEN 'aggregationPeriod' THEN
        IF cond.op = 'EQUALS' THEN
          periods := ARRAY[cond.value #>> '{}'];
        ELSIF cond.op = 'IN' THEN
          periods := ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(cond.value) v);
        END IF;
      ELSE NULL;
    END CASE;
  END LOOP;
  IF NOT has_start THEN
    RAISE EXCEPTION 'search_usage: a startTime attribute is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- subjects named outright must be yours
  IF subjects IS NOT NULL THEN
    PERFORM metering._require_subject(s) FROM unnest(subjects) s;
  END IF;
  start_lo := coalesce(start_lo, '-infinity');
  -- without an upper bound, periods that start after now are left out
  start_hi := coalesce(start_hi, metering.now());
  IF start_lo > start_hi THEN
    RETURN jsonb_build_object('paging', jsonb_build_object('limit', lim), 'results', '[]'::jsonb);
  END IF;
  -- meters whose periods are kept (usage_periods), and UNIQUE_COUNT ones, read from their events
  SELECT coalesce(array_agg(x.slug) FILTER (WHERE x.aggregation <> 'UNIQUE_COUNT'), '{}'),
         coalesce(array_agg(x.slug) FILTER (WHERE x.aggregation = 'UNIQUE_COUNT'), '{}')
    INTO fast_meters, slow_meters
    FROM metering.meters x WHERE x.deleted_at IS NULL AND (meters IS NULL OR x.slug = ANY (meters));

  -- UNIQUE_COUNT meters are read period by period from their first event
  -- to their last (not to a far bound: no period after it has usage)
  IF cardinality(slow_meters) > 0 THEN
    SELECT greatest(start_lo, min(e.time)), least(start_hi, max(e.time)) INTO slow_lo, slow_hi
      FROM metering.events e
     WHERE e.type IN (SELECT x.event_type FROM metering.meters x WHERE x.slug = ANY (slow_meters));
  END IF;

  -- the page is fetched in this order (the other way round going back)
  fetch_asc := ascending <> backward;
  dir := CASE WHEN fetch_asc THEN 'ASC' ELSE 'DESC' END;
  cmp := CASE WHEN fetch_asc THEN '>' ELSE '<' END;
  where_sql := metering._search_where(q -> 'search');
  IF order_attr = 'startTime' THEN
    -- in (start_time, id) order the kept periods are read by index, a page at a time
    IF key IS NOT NULL THEN
      IF jsonb_typeof(key) IS DISTINCT FROM 'array' OR jsonb_array_length(key) <> 2 THEN
        RAISE EXCEPTION 'search_usage: cursor carries no position' USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF jsonb_typeof(key -> 1) IS DISTINCT FROM 'string'
         OR key ->> 1 !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'search_usage: cursor carries no position' USING ERRCODE = 'invalid_parameter_value';
      END IF;
      key_ts := metering._search_time(key -> 0, 'the cursor''s startTime');
      key_id := (key ->> 1)::uuid;
      keyset_sql := format('(start_time, id) %s ($7, $8)', cmp);
    ELSE
      keyset_sql := 'true';
    END IF;
    base_sql := format('AND %s AND %s ORDER BY p.start_time %s, p.id %s LIMIT $6', where_sql, keyset_sql, dir, dir);
    order_sql := format('start_time %s, id %s', dir, dir);
    -- a page holds no row beyond the kept period that ends it (when there
    -- are that many): newer events matter only up to its start.  (A query of
    -- its own, run again below as the base: passed in as values, the bounds
    -- let the planner see how few events remain; computed inside, they
    -- made it pick a nested loop ten times slower.)
    EXECUTE format('SELECT min(start_time), max(start_time), count(*) FROM (
                      SELECT p.start_time FROM metering.usage_periods p
                       CROSS JOIN LATERAL (SELECT coalesce((SELECT s.is_trial FROM metering.subjects s WHERE s.key = p.subject), false) AS trial) tr
                       WHERE p.meter = ANY ($1) AND p.kind = ANY ($2) AND p.start_time >= $3 AND p.start_time <= $4
                         AND ($5 IS NULL OR p.subject = ANY ($5)) %s) b', base_sql)
      INTO page_lo, page_hi, n_base
      USING fast_meters, periods, start_lo, start_hi, subjects, lim + 1, key_ts, key_id;
    IF fetch_asc THEN
      tail_lo := coalesce(key_ts, '-infinity');
      tail_hi := CASE WHEN n_base > lim THEN page_hi ELSE 'infinity' END;
    ELSE
      tail_lo := CASE WHEN n_base > lim THEN page_lo ELSE '-infinity' END;
      tail_hi := coalesce(key_ts, 'infinity');
    END IF;
  ELSE
    keyset_sql := CASE WHEN key IS NOT NULL THEN format('k %s $9', cmp) ELSE 'true' END;
    tail_lo := '-infinity';
    tail_hi := 'infinity';
    base_sql := format('AND %s', where_sql);
    order_sql := format('k %s', dir);
  END IF;

  EXECUTE format($q$
    WITH ms AS (
      SELECT m.slug, m.event_type, m.aggregation, m.value_property, coalesce(s.rolled_up_to, 0) AS wm
        FROM metering.meters m LEFT JOIN metering.meter_rollup_state s ON s.meter = m.slug
       WHERE m.slug = ANY ($1)),
    -- events above the watermark: not in usage_periods yet ($11: the lowest
    -- watermark, which lets the BRIN index skip the rolled-up events; $12,
    -- $13: the range of period starts the page can hold); LATEST meters
    -- apart, as only they need their values in order
    tail_raw AS MATERIALIZED (
      SELECT e.type, e.seq, e.subject, e.time, e.data, k.kind, k.start_time, k.end_time
        FROM metering.events e CROSS JOIN LATERAL metering._usage_periods_of(e.time) k
       WHERE e.seq > $11 AND e.type IN (SELECT ms.event_type FROM ms)
         AND k.kind = ANY ($2) AND k.start_time >= $3 AND k.start_time <= $4 AND ($5 IS NULL OR e.subject = ANY ($5))
         AND k.start_time >= $12 AND k.start_time <= $13),
    tail_events AS (
      SELECT ms.slug AS meter, ms.aggregation, r.subject, r.time, r.kind, r.start_time, r.end_time, x.v
        FROM tail_raw r JOIN ms ON ms.event_type = r.type AND r.seq > ms.wm
       CROSS JOIN LATERAL (SELECT CASE WHEN ms.aggregation = 'COUNT' THEN NULL
                                       ELSE metering._meter_number(r.data, ms.value_property) END AS v) x),
    tail AS (
      SELECT meter, subject, kind, start_time, min(end_time) AS end_time,
             count(*) AS events, count(v) AS valued, sum(v) AS sum, min(v) AS min, max(v) AS max,
             NULL::timestamptz AS latest_time, NULL::numeric AS latest_value
        FROM tail_events WHERE aggregation <> 'LATEST' GROUP BY 1, 2, 3, 4
      UNION ALL
      SELECT meter, subject, kind, start_time, min(end_time), count(*), count(v), NULL, NULL, NULL,
             max(time) FILTER (WHERE v IS NOT NULL),
             (array_agg(v ORDER BY time DESC, v DESC) FILTER (WHERE v IS NOT NULL))[1]
        FROM tail_events WHERE aggregation = 'LATEST' GROUP BY 1, 2, 3, 4),
    base AS (
      SELECT p.meter, p.subject, p.kind, p.start_time
        FROM metering.usage_periods p
       CROSS JOIN LATERAL (SELECT coalesce((SELECT s.is_trial FROM metering.subjects s WHERE s.key = p.subject), false) AS trial) tr
       WHERE p.meter = ANY ($1) AND p.kind = ANY ($2) AND p.start_time >= $3 AND p.start_time <= $4
         AND ($5 IS NULL OR p.subject = ANY ($5)) %1$s),
    keys AS (SELECT meter, subject, kind, start_time FROM base
             UNION SELECT meter, subject, kind, start_time FROM tail),
    merged AS (
      SELECT k.meter, k.subject, k.kind, k.start_time, coalesce(p.end_time, t.end_time) AS end_time,
             CASE ms.aggregation
               WHEN 'SUM' THEN coalesce(p.sum, 0) + coalesce(t.sum, 0)
               WHEN 'COUNT' THEN (coalesce(p.events, 0) + coalesce(t.events, 0))::numeric
               WHEN 'AVG' THEN (coalesce(p.sum, 0) + coalesce(t.sum, 0)) / nullif(coalesce(p.valued, 0) + coalesce(t.valued, 0), 0)
               WHEN 'MIN' THEN least(p.min, t.min)
               WHEN 'MAX' THEN greatest(p.max, t.max)
               WHEN 'LATEST' THEN CASE WHEN t.latest_time IS NOT NULL AND (p.latest_time IS NULL
                                            OR (t.latest_time, t.latest_value) > (p.latest_time, p.latest_value))
                                       THEN t.latest_value ELSE p.latest_value END
             END AS value
        FROM keys k JOIN ms ON ms.slug = k.meter
        LEFT JOIN metering.usage_periods p
               ON p.meter = k.meter AND p.subject = k.subject AND p.kind = k.kind AND p.start_time = k.start_time
        LEFT JOIN tail t
               ON t.meter = k.meter AND t.subject = k.subject AND t.kind = k.kind AND t.start_time = k.start_time),
    -- UNIQUE_COUNT meters: from their events, day by day and period by period
    slow_from AS (SELECT $14::timestamptz AS lo),
    slow AS (
      SELECT m.slug AS meter, q.subject, 'DAILY' AS kind, q.window_start AS start_time, q.window_end AS end_time, q.value
        FROM unnest($10) m(slug), slow_from
       CROSS JOIN LATERAL metering.query_meter(m.slug, date_trunc('day', slow_from.lo, 'UTC'),
                                               date_trunc('day', $15, 'UTC') + interval '1 day', 'DAY', 'UTC', $5) q
       WHERE 'DAILY' = ANY ($2) AND slow_from.lo IS NOT NULL AND slow_from.lo <= $15
      UNION ALL
      SELECT m.slug, q.subject, p.kind, p.start_time, p.end_time, q.value
        FROM unnest($10) m(slug), slow_from
       CROSS JOIN LATERAL (
         SELECT kind, s AT TIME ZONE 'UTC' AS start_time, metering._usage_period_end(kind, s AT TIME ZONE 'UTC') AS end_time
           FROM unnest($2) kind
          CROSS JOIN LATERAL generate_series(date_trunc(CASE kind WHEN 'WEEKLY' THEN 'week' ELSE 'month' END, slow_from.lo AT TIME ZONE 'UTC'),
                                             $15 AT TIME ZONE 'UTC',
                                             CASE kind WHEN 'WEEKLY' THEN interval '7 days' ELSE interval '1 month' END) s
          WHERE kind IN ('WEEKLY', 'MONTHLY')) p
       CROSS JOIN LATERAL metering.query_meter(m.slug, p.start_time, p.end_time, NULL, 'UTC', $5) q
       WHERE slow_from.lo IS NOT NULL AND slow_from.lo <= $15),
    all_rows AS (
      SELECT r.*, metering._usage_period_id(r.subject, r.meter, r.kind, r.start_time) AS id,
             coalesce((SELECT s.is_trial FROM metering.subjects s WHERE s.key = r.subject), false) AS trial
        FROM (SELECT * FROM merged
              UNION ALL
              SELECT * FROM slow WHERE start_time >= $3 AND start_time <= $4) r),
    f AS (
      SELECT r.*, jsonb_build_array(%2$s, r.id::text) AS k FROM all_rows r WHERE %3$s)
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'id', x.id, 'tenantId', x.subject, 'trial', x.trial, 'usageType', x.meter, 'aggregationPeriod', x.kind,
             'startTime', metering._search_format(x.start_time), 'endTime', metering._search_format(x.end_time),
             'count', x.value, '_k', x.k) ORDER BY x.n), '[]')
      FROM (SELECT f.*, row_number() OVER (ORDER BY %4$s) AS n FROM f WHERE %5$s ORDER BY %4$s LIMIT $6) x
    $q$,
    base_sql,
    CASE order_attr
      WHEN 'startTime' THEN 'to_jsonb(metering._search_format(r.start_time))'
      WHEN 'endTime' THEN 'to_jsonb(metering._search_format(r.end_time))'
      WHEN 'tenantId' THEN 'to_jsonb(r.subject)'
      WHEN 'usageType' THEN 'to_jsonb(r.meter)'
      WHEN 'aggregationPeriod' THEN 'to_jsonb(r.kind)'
      WHEN 'isTrial' THEN 'to_jsonb(r.trial)'
      WHEN 'count' THEN 'to_jsonb(r.value)'
      ELSE 'to_jsonb(r.id::text)' END,
    where_sql, order_sql, keyset_sql)
  INTO rows
  USING fast_meters, periods, start_lo, start_hi, subjects, lim + 1, key_ts, key_id, key, slow_meters,
        (SELECT coalesce(min(coalesce(st.rolled_up_to, 0)), 0) FROM unnest(fast_meters) f(slug)
           LEFT JOIN metering.meter_rollup_state st ON st.meter = f.slug),
        tail_lo, tail_hi, slow_lo, slow_hi;

  -- one row more than the page says whether more follow in that direction
  more := jsonb_array_length(rows) > lim;
  SELECT coalesce(jsonb_agg(x ORDER BY CASE WHEN backward THEN -n ELSE n END), '[]') INTO page
    FROM jsonb_array_elements(rows) WITH ORDINALITY t(x, n) WHERE n <= lim;
  total := jsonb_array_length(page);
  first_key := page -> 0 -> '_k';
  last_key := page -> (total - 1) -> '_k';
  more_after := CASE WHEN backward THEN true ELSE more END;
  more_before := CASE WHEN backward THEN more ELSE key IS NOT NULL END;
  RETURN jsonb_build_object(
    'paging', jsonb_strip_nulls(jsonb_build_object(
      'limit', lim,
      'nextCursor', CASE WHEN total > 0 AND more_after
                         THEN metering._sign_cursor(jsonb_build_object('q', q, 'k', last_key, 'd', 'next')) END,
      'prevCursor', CASE WHEN total > 0 AND more_before
                         THEN metering._sign_cursor(jsonb_build_object('q', q, 'k', first_key, 'd', 'prev')) END)),
    'results', (SELECT coalesce(jsonb_agg(x - '_k' ORDER BY n), '[]') FROM jsonb_array_elements(page) WITH ORDINALITY t(x, n)));
END $$;
COMMENT ON FUNCTION metering.search_usage(jsonb) IS
  'Entrust tenant usage search: rows per (subject, meter, DAILY/WEEKLY/MONTHLY period) with usage, filtered by searchByAttributes, ordered by orderByAttribute then id, paged by signed cursors that carry the whole query';
-- ThousandEyes-style units usage: a meter's usage per account group and
-- per consumer (the meter's first group-by dimension), with shared usage
-- distributed to the account groups its allocations name.

-- The allocations of an event (AWS UsageAllocations in data.allocations):
-- each quantity, and the account group its tags name, if any.
CREATE FUNCTION metering._allocations(data jsonb) RETURNS TABLE(qty numeric, account_group text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT (x ->> 'AllocatedUsageQuantity')::numeric,
         (SELECT t ->> 'Value' FROM jsonb_array_elements(CASE WHEN jsonb_typeof(x -> 'Tags') = 'array' THEN x -> 'Tags' ELSE '[]' END) t
           WHERE t ->> 'Key' = 'account_group' LIMIT 1)
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(data -> 'allocations') = 'array' THEN data -> 'allocations' ELSE '[]' END) x
   WHERE jsonb_typeof(x -> 'AllocatedUsageQuantity') = 'number'
$$;
COMMENT ON FUNCTION metering._allocations(jsonb) IS 'internal: the quantities and account groups of an event''s allocations';

-- Percent-encoding of a query string value (RFC 3986 unreserved characters stay).
CREATE FUNCTION metering._url_encode(value text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT coalesce(string_agg(CASE WHEN c ~ '^[A-Za-z0-9_.~-]$' THEN c
                                  ELSE upper(regexp_replace(encode(convert_to(c, 'UTF8'), 'hex'), '(..)', '%\1', 'g')) END,
                             '' ORDER BY i), '')
    FROM regexp_split_to_table(value, '') WITH ORDINALITY x(c, i)
$$;
COMMENT ON FUNCTION metering._url_encode(text) IS 'internal: percent-encodes a value for a link';

CREATE FUNCTION metering.units_usage(meter text, start_date timestamptz DEFAULT NULL, end_date timestamptz DEFAULT NULL,
  account_group text DEFAULT NULL, cursor text DEFAULT NULL, page_size integer DEFAULT 100) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
  m metering.meters;
  q jsonb;
  key jsonb;
  c jsonb;
  t_from timestamptz;
  t_to timestamptz;
  cycle_end timestamptz;
  consumer_key text;
  rows jsonb;
  page jsonb;
  n integer;
  href text;
BEGIN
  IF cursor IS NOT NULL THEN
    c := metering._read_cursor(cursor);
    IF c ->> 'kind' IS DISTINCT FROM 'units_usage' THEN
      RAISE EXCEPTION 'units_usage: cursor is a cursor of %, not of units_usage', coalesce(c ->> 'kind', 'search_usage')
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- (anyone may sign a cursor: what it carries is checked like arguments)
    q := c -> 'q';
    key := c -> 'k';
  ELSE
    t_to := metering._report_time(coalesce(end_date, metering.now()), 'units_usage: end_date');
    t_from := metering._report_time(coalesce(start_date, date_trunc('month', t_to, 'UTC')), 'units_usage: start_date');
    q := jsonb_build_object('meter', meter, 'from', t_from, 'to', t_to, 'group', account_group, 'size', page_size);
  END IF;
  IF jsonb_typeof(q) IS DISTINCT FROM 'object' OR jsonb_typeof(q -> 'from') IS DISTINCT FROM 'string'
     OR jsonb_typeof(q -> 'to') IS DISTINCT FROM 'string' THEN
    RAISE EXCEPTION 'units_usage: cursor carries no query' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  BEGIN
    t_from := (q ->> 'from')::timestamptz;
    t_to := (q ->> 'to')::timestamptz;
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'units_usage: cursor carries no query' USING ERRCODE = 'invalid_parameter_value';
  END;
  PERFORM metering._report_time(t_from, 'units_usage: start_date'), metering._report_time(t_to, 'units_usage: end_date');
  IF q ->> 'meter' IS NULL THEN
    RAISE EXCEPTION 'units_usage: meter is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT * INTO m FROM metering.meters x WHERE x.slug = q ->> 'meter' AND x.deleted_at IS NULL;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'meter "%" does not exist', q ->> 'meter' USING ERRCODE = 'no_data_found';
  END IF;
  IF m.aggregation NOT IN ('SUM', 'COUNT') THEN
    RAISE EXCEPTION 'units_usage: meter "%" aggregates with %, units add up: SUM or COUNT', m.slug, m.aggregation
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF t_from IS NULL OR t_to IS NULL OR NOT (isfinite(t_from) AND isfinite(t_to)) OR t_from >= t_to THEN
    RAISE EXCEPTION 'units_usage: start_date (%) must be before end_date (%), both finite', t_from, t_to
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(q -> 'size') IS DISTINCT FROM 'number' OR (q ->> 'size')::numeric NOT BETWEEN 1 AND 1000
     OR (q ->> 'size')::numeric <> trunc((q ->> 'size')::numeric) THEN
    RAISE EXCEPTION 'units_usage: page_size must be from 1 to 1000, got %', coalesce(q ->> 'size', 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF q ->> 'group' IS NOT NULL THEN
    PERFORM metering._require_subject(q ->> 'group');
  END IF;
  -- the billing cycle the period belongs to: the UTC calendar month of its start
  cycle_end := date_trunc('month', date_trunc('month', t_from, 'UTC') + interval '32 days', 'UTC');
  SELECT k INTO consumer_key FROM jsonb_object_keys(m.group_by) k ORDER BY k LIMIT 1;

  WITH e AS (
    SELECT e.subject, e.data,
           CASE WHEN m.aggregation = 'COUNT' THEN 1 ELSE metering._meter_number(e.data, m.value_property) END AS value,
           CASE WHEN consumer_key IS NOT NULL THEN metering._meter_groups(e.data, m.group_by) ->> consumer_key END AS consumer
      FROM metering.events e
     WHERE e.type = m.event_type AND e.time >= t_from AND e.time < t_to),
  -- SUM meters: an allocation tagged with an account group counts for that
  -- group, an untagged one for the event's subject, and what the allocations
  -- leave of the event's value for its subject too, so that the rows add up
  -- to the meter's value; a COUNT meter counts each event once, for its subject
  a AS (
    SELECT e.subject, e.consumer, e.value, x.qty, x.account_group
      FROM e CROSS JOIN LATERAL metering._allocations(e.data) x
     WHERE m.aggregation = 'SUM' AND e.value IS NOT NULL),
  parts AS (
    SELECT coalesce(a.account_group, a.subject) AS account_group, a.consumer, a.qty AS used FROM a
    UNION ALL
    SELECT e.subject, e.consumer, e.value - coalesce(s.allocated, 0)
      FROM e LEFT JOIN LATERAL (SELECT sum(x.qty) AS allocated FROM metering._allocations(e.data) x
                                 WHERE m.aggregation = 'SUM') s ON true
     WHERE e.value IS NOT NULL AND (s.allocated IS NULL OR e.value <> s.allocated)),
  visible AS (SELECT metering._visible_subjects(current_user) AS v),
  agg AS (
    SELECT p.account_group, p.consumer, sum(p.used) AS used
      FROM parts p, visible
     WHERE (q ->> 'group' IS NULL OR p.account_group = q ->> 'group')
       AND (visible.v IS NULL OR p.account_group = ANY (visible.v))
     GROUP BY 1, 2)
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'accountGroup', a.account_group, 'consumer', a.consumer, 'used', a.used,
           'projected', CASE WHEN t_to >= cycle_end THEN a.used
                             ELSE trim_scale(a.used * extract(epoch FROM cycle_end - t_from) / extract(epoch FROM t_to - t_from)) END,
           '_k', jsonb_build_array(a.account_group, coalesce(a.consumer, '')))
         ORDER BY a.account_group, coalesce(a.consumer, '')), '[]')
    INTO rows FROM agg a;

  SELECT coalesce(jsonb_agg(x - '_k' ORDER BY i), '[]'), max(i) INTO page, n
    FROM (SELECT x, i FROM jsonb_array_elements(rows) WITH ORDINALITY r(x, i)
           WHERE key IS NULL OR x -> '_k' > key ORDER BY i LIMIT (q ->> 'size')::numeric::integer) s;
  href := format('units_usage?meter=%s&start_date=%s&end_date=%s%s', metering._url_encode(m.slug),
                 metering._search_format(t_from), metering._search_format(t_to),
                 CASE WHEN q ->> 'group' IS NOT NULL THEN '&account_group=' || metering._url_encode(q ->> 'group') ELSE '' END);
  RETURN jsonb_build_object(
    'breakdowns', page,
    '_links', jsonb_strip_nulls(jsonb_build_object(
      'self', jsonb_build_object('href', href || CASE WHEN cursor IS NOT NULL THEN '&cursor=' || cursor ELSE '' END),
      'next', CASE WHEN n IS NOT NULL AND n < jsonb_array_length(rows)
                   THEN jsonb_build_object('href', href || '&cursor=' || metering._sign_cursor(jsonb_build_object(
                          'kind', 'units_usage', 'q', q, 'k', rows -> (n - 1) -> '_k'))) END)));
END $$;
COMMENT ON FUNCTION metering.units_usage(text, timestamptz, timestamptz, text, text, integer) IS
  'ThousandEyes units usage: a SUM or COUNT meter''s usage per account group and consumer (the meter''s first group-by dimension) over [start_date, end_date) (default: this UTC month to now), allocations tagged account_group counted for their group, with the projection to the end of the month; paged by a signed cursor in _links.next';
-- Usage per (meter, subject, UTC day, week and month), kept for search_usage.
--
-- Like the hourly rollups, and with their watermark, the rows hold the
-- partial aggregates of a meter's events up to metering.meter_rollup_state.
-- rolled_up_to: refresh_rollups() adds what it rolls up, the deletion of
-- events recomputes the periods they were in.  search_usage adds the events
-- above the watermark at query time, so its answers are exact whether the
-- periods are current or not.  UNIQUE_COUNT meters have no rows here (their
-- partial aggregates cannot be added up); search_usage reads their events.

CREATE TABLE metering.usage_periods (
  meter        text COLLATE "C" NOT NULL,
  subject      text COLLATE "C" NOT NULL,
  kind         text NOT NULL,
  start_time   timestamptz NOT NULL,
  end_time     timestamptz NOT NULL,
  id           uuid NOT NULL,
  events       bigint NOT NULL,
  valued       bigint NOT NULL,
  sum          numeric,
  min          numeric,
  max          numeric,
  latest_time  timestamptz,
  latest_value numeric,
  PRIMARY KEY (meter, subject, kind, start_time)
);
-- search pages in (startTime, id) order, for everyone or for given subjects
CREATE INDEX usage_periods_start_idx ON metering.usage_periods (start_time, id);
CREATE INDEX usage_periods_subject_idx ON metering.usage_periods (subject, start_time, id);
COMMENT ON TABLE metering.usage_periods IS
  'derived: per meter, subject and UTC day, week (from Monday) and month, the partial aggregates of its events up to the meter''s rollup watermark (not UNIQUE_COUNT meters); written by refresh_rollups() and event deletion, never by hand; read by search_usage';
COMMENT ON COLUMN metering.usage_periods.meter IS 'the meter slug';
COMMENT ON COLUMN metering.usage_periods.subject IS 'the event subject';
COMMENT ON COLUMN metering.usage_periods.kind IS 'DAILY, WEEKLY or MONTHLY';
COMMENT ON COLUMN metering.usage_periods.start_time IS 'start of the period (UTC)';
COMMENT ON COLUMN metering.usage_periods.end_time IS 'end of the period: the start of the next one';
COMMENT ON COLUMN metering.usage_periods.id IS 'the search result id of the period';
COMMENT ON COLUMN metering.usage_periods.events IS 'events in the period';
COMMENT ON COLUMN metering.usage_periods.valued IS 'events whose value the meter could use';
COMMENT ON COLUMN metering.usage_periods.sum IS 'sum of the values';
COMMENT ON COLUMN metering.usage_periods.min IS 'smallest value';
COMMENT ON COLUMN metering.usage_periods.max IS 'largest value';
COMMENT ON COLUMN metering.usage_periods.latest_time IS 'time of the latest valued event';
COMMENT ON COLUMN metering.usage_periods.latest_value IS 'its value (the largest of those at that time)';

CREATE FUNCTION metering._usage_period_end(kind text, start_time timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  -- in UTC wall-clock time: in the session's zone a day may have 23 hours
  SELECT ((start_time AT TIME ZONE 'UTC') + CASE kind WHEN 'DAILY' THEN interval '1 day' WHEN 'WEEKLY' THEN interval '7 days'
                                                      ELSE interval '1 month' END) AT TIME ZONE 'UTC'
$$;
COMMENT ON FUNCTION metering._usage_period_end(text, timestamptz) IS 'internal: the end of a usage period (the next one''s start)';

-- The three periods an instant is in.
CREATE FUNCTION metering._usage_periods_of(t timestamptz) RETURNS TABLE(kind text, start_time timestamptz, end_time timestamptz)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  -- truncated in UTC wall-clock time, whatever the session's zone
  SELECT k.kind, k.s AT TIME ZONE 'UTC', metering._usage_period_end(k.kind, k.s AT TIME ZONE 'UTC')
    FROM (SELECT t AT TIME ZONE 'UTC' AS u) x,
         LATERAL (VALUES ('DAILY', date_trunc('day', x.u)), ('WEEKLY', date_trunc('week', x.u)),
                         ('MONTHLY', date_trunc('month', x.u))) k(kind, s)
$$;
COMMENT ON FUNCTION metering._usage_periods_of(timestamptz) IS 'internal: the UTC day, week and month of an instant';

CREATE FUNCTION metering._usage_period_id(subject text, meter text, kind text, start_time timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT md5(subject || '|' || meter || '|' || kind || '|' || metering._search_format(start_time))::uuid
$$;
COMMENT ON FUNCTION metering._usage_period_id(text, text, text, timestamptz) IS
  'internal: the stable search result id of a (subject, meter, period)';

-- Recomputes a meter's periods from its rollups: all of them, or those of
-- the given (subject, instant) pairs.
CREATE FUNCTION metering._usage_periods_rebuild(meter text, subjects text[] DEFAULT NULL, times timestamptz[] DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  -- the touched periods, as three parallel arrays (NULL: all of them)
  t_subjects text[];
  t_kinds text[];
  t_starts timestamptz[];
BEGIN
  IF subjects IS NULL THEN
    DELETE FROM metering.usage_periods p WHERE p.meter = _usage_periods_rebuild.meter;
  ELSE
    SELECT array_agg(d.subject), array_agg(d.kind), array_agg(d.start_time) INTO t_subjects, t_kinds, t_starts
      FROM (SELECT DISTINCT x.subject, k.kind, k.start_time
              FROM unnest(subjects, times) x(subject, t) CROSS JOIN LATERAL metering._usage_periods_of(x.t) k) d;
    DELETE FROM metering.usage_periods p
     USING unnest(t_subjects, t_kinds, t_starts) k(subject, kind, start_time)
     WHERE p.meter = _usage_periods_rebuild.meter
       AND p.subject = k.subject AND p.kind = k.kind AND p.start_time = k.start_time;
  END IF;
  IF (SELECT m.aggregation FROM metering.meters m WHERE m.slug = _usage_periods_rebuild.meter) = 'UNIQUE_COUNT' THEN
    RETURN;
  END IF;
  -- (each touched period reads its own hours of rollups)
  INSERT INTO metering.usage_periods AS p
    (meter, subject, kind, start_time, end_time, id, events, valued, sum, min, max, latest_time, latest_value)
  SELECT _usage_periods_rebuild.meter, r.subject, k.kind, k.start_time, min(k.end_time),
         metering._usage_period_id(r.subject, _usage_periods_rebuild.meter, k.kind, k.start_time),
         sum(r.events), sum(r.valued), sum(r.sum), min(r.min), max(r.max),
         max(r.latest_time),
         (array_agg(r.latest_value ORDER BY r.latest_time DESC, r.latest_value DESC) FILTER (WHERE r.latest_time IS NOT NULL))[1]
    FROM (SELECT r.*, k.kind, k.start_time, k.end_time
            FROM metering.meter_rollups r CROSS JOIN LATERAL metering._usage_periods_of(r.bucket) k
           WHERE subjects IS NULL AND r.meter = _usage_periods_rebuild.meter
          UNION ALL
          SELECT r.*, t.kind, t.start_time, metering._usage_period_end(t.kind, t.start_time)
            FROM unnest(t_subjects, t_kinds, t_starts) t(subject, kind, start_time)
            JOIN metering.meter_rollups r
              ON r.meter = _usage_periods_rebuild.meter AND r.subject = t.subject
             AND r.bucket >= t.start_time AND r.bucket < metering._usage_period_end(t.kind, t.start_time)
           WHERE subjects IS NOT NULL) r
   CROSS JOIN LATERAL (SELECT r.kind, r.start_time, r.end_time) k
   GROUP BY r.subject, k.kind, k.start_time;
END $$;
COMMENT ON FUNCTION metering._usage_periods_rebuild(text, text[], timestamptz[]) IS
  'internal: recomputes a meter''s usage periods (all, or those of the given subjects and instants) from its rollups';

-- refresh_rollups() calls this once it has rolled up a meter's events in
-- (from_seq, to_seq]: a few events are added in, many rebuild from the rollups.
CREATE FUNCTION metering._usage_periods_add(meter text, from_seq bigint, to_seq bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  m metering.meters;
BEGIN
  SELECT * INTO m FROM metering.meters x WHERE x.slug = _usage_periods_add.meter;
  IF NOT FOUND OR m.aggregation = 'UNIQUE_COUNT' THEN
    RETURN;
  END IF;
  IF to_seq - from_seq > 100000 THEN
    PERFORM metering._usage_periods_rebuild(m.slug);
    RETURN;
  END IF;
  INSERT INTO metering.usage_periods AS p
    (meter, subject, kind, start_time, end_time, id, events, valued, sum, min, max, latest_time, latest_value)
  SELECT m.slug, e.subject, k.kind, k.start_time, min(k.end_time),
         metering._usage_period_id(e.subject, m.slug, k.kind, k.start_time),
         count(*), count(x.v), sum(x.v), min(x.v), max(x.v),
         max(e.time) FILTER (WHERE x.v IS NOT NULL),
         (array_agg(x.v ORDER BY e.time DESC, x.v DESC) FILTER (WHERE x.v IS NOT NULL))[1]
    FROM metering.events e
   CROSS JOIN LATERAL (SELECT CASE WHEN m.aggregation = 'COUNT' THEN NULL
                                   ELSE metering._meter_number(e.data, m.value_property) END AS v) x
   CROSS JOIN LATERAL metering._usage_periods_of(e.time) k
   WHERE e.type = m.event_type AND e.seq > from_seq AND e.seq <= to_seq
   GROUP BY e.subject, k.kind, k.start_time
  ON CONFLICT ON CONSTRAINT usage_periods_pkey DO UPDATE SET
    events = p.events + excluded.events,
    valued = p.valued + excluded.valued,
    sum = CASE WHEN p.sum IS NULL THEN excluded.sum WHEN excluded.sum IS NULL THEN p.sum ELSE p.sum + excluded.sum END,
    min = least(p.min, excluded.min),
    max = greatest(p.max, excluded.max),
    latest_time = CASE WHEN p.latest_time IS NULL OR (excluded.latest_time, excluded.latest_value) > (p.latest_time, p.latest_value)
                       THEN excluded.latest_time ELSE p.latest_time END,
    latest_value = CASE WHEN p.latest_time IS NULL OR (excluded.latest_time, excluded.latest_value) > (p.latest_time, p.latest_value)
                        THEN excluded.latest_value ELSE p.latest_value END;
END $$;
COMMENT ON FUNCTION metering._usage_periods_add(text, bigint, bigint) IS
  'internal: adds a meter''s newly rolled-up events to its usage periods';

-- Deleted events: their periods are recomputed from the rollups, which the
-- events_deleted trigger (it fires first: triggers fire by name) rebuilt.
CREATE FUNCTION metering._usage_periods_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT m.slug, array_agg(o.subject) AS subjects, array_agg(o.time) AS times
             FROM old_events o
             JOIN metering.meters m ON m.event_type = o.type
             JOIN metering.meter_rollup_state s ON s.meter = m.slug AND o.seq <= s.rolled_up_to
            GROUP BY m.slug LOOP
    PERFORM metering._usage_periods_rebuild(r.slug, r.subjects, r.times);
  END LOOP;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._usage_periods_deleted() IS 'internal: recomputes the usage periods of deleted events';
CREATE TRIGGER events_periods_deleted AFTER DELETE ON metering.events
  REFERENCING OLD TABLE AS old_events
  FOR EACH STATEMENT EXECUTE FUNCTION metering._usage_periods_deleted();
-- Who may see what: three roles (setup_roles), subjects assigned to roles
-- (subject_access), and row security that shows a role only its subjects
-- and their children.  Superusers and the extension owner see everything.

CREATE TABLE metering.subject_access (
  role_name  name NOT NULL,
  subject    text COLLATE "C" NOT NULL,
  created_at timestamptz NOT NULL DEFAULT metering.now(),
  PRIMARY KEY (role_name, subject)
);
COMMENT ON TABLE metering.subject_access IS
  'which subjects (and their children) a role may see; members of the role count; the subject need not exist in metering.subjects';
COMMENT ON COLUMN metering.subject_access.role_name IS 'the role (its members too)';
COMMENT ON COLUMN metering.subject_access.subject IS 'the subject key';
COMMENT ON COLUMN metering.subject_access.created_at IS 'when it was assigned';
SELECT pg_catalog.pg_extension_config_dump('metering.subject_access', '');

CREATE FUNCTION metering._outer_role() RETURNS oid
  AS 'MODULE_PATHNAME', 'metering_outer_role'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering._outer_role() IS
  'internal: the role the session acts as, also inside SECURITY DEFINER functions';

-- Whether a role sees every subject: superusers, roles that bypass row
-- security, the extension owner's members and metering_admin's members.
CREATE FUNCTION metering._sees_all_subjects(r oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce((SELECT a.rolsuper OR a.rolbypassrls FROM pg_roles a WHERE a.oid = r), false)
      OR pg_has_role(r, (SELECT extowner FROM pg_extension WHERE extname = 'metering'), 'MEMBER')
      OR (to_regrole('metering_admin') IS NOT NULL AND pg_has_role(r, 'metering_admin', 'MEMBER'))
$$;
COMMENT ON FUNCTION metering._sees_all_subjects(oid) IS
  'internal: whether a role may see every subject';

-- The subjects a role may see, or NULL for all of them.  SECURITY DEFINER:
-- it reads every assignment and the whole subject tree, whatever the
-- caller may see of them; so it answers about another role only to a role
-- that sees all (row security asks about current_user, which inside the
-- extension's own SECURITY DEFINER functions is the owner: it sees all).
CREATE FUNCTION metering._visible_subjects(who name) RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r pg_roles;
BEGIN
  SELECT * INTO r FROM pg_roles WHERE rolname = who;
  IF NOT FOUND THEN
    RETURN '{}';
  END IF;
  IF metering._sees_all_subjects(r.oid) THEN
    RETURN NULL;
  END IF;
  IF r.oid <> metering._outer_role() AND NOT metering._sees_all_subjects(metering._outer_role()) THEN
    RAISE EXCEPTION 'permission denied to see the subjects of role %', who USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN ARRAY(
    WITH RECURSIVE down(key) AS (
      SELECT a.subject FROM metering.subject_access a JOIN pg_roles g ON g.rolname = a.role_name
       WHERE pg_has_role(r.oid, g.oid, 'MEMBER')
      UNION
      SELECT s.key FROM metering.subjects s JOIN down ON s.parent_key = down.key)
    SELECT key FROM down);
END $$;
COMMENT ON FUNCTION metering._visible_subjects(name) IS
  'internal: the subjects a role may see (its assignments and their children), NULL when it may see all';

-- A function that takes a subject refuses one the caller may not see.
CREATE FUNCTION metering._require_subject(subject text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
  visible text[] := metering._visible_subjects(current_user);
BEGIN
  IF visible IS NOT NULL AND NOT (subject = ANY (visible)) THEN
    RAISE EXCEPTION 'permission denied for subject "%"', subject
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'You must be assigned to the subject, or to one above it (metering.subject_access).';
  END IF;
END $$;
COMMENT ON FUNCTION metering._require_subject(text) IS
  'internal: raises 42501 when the current role may not see the subject';

-- row security: the same rule on every table that names a subject
DO $$
DECLARE
  t record;
  visible text := '(SELECT metering._visible_subjects(current_user)) IS NULL OR %I = ANY (CAST((SELECT metering._visible_subjects(current_user)) AS text[]))';
BEGIN
  FOR t IN SELECT * FROM (VALUES ('events', 'subject'), ('meter_rollups', 'subject'), ('usage_periods', 'subject'), ('entitlements', 'subject'),
                                 ('subjects', 'key'), ('usage_records', 'customer_identifier'),
                                 ('customers', 'customer_identifier'), ('registrations', 'customer_identifier')) v(tab, col) LOOP
    EXECUTE format('ALTER TABLE metering.%I ENABLE ROW LEVEL SECURITY', t.tab);
    EXECUTE format('CREATE POLICY %I ON metering.%I USING (' || visible || ') WITH CHECK (true)',
                   t.tab || '_by_subject', t.tab, t.col, t.col);
    EXECUTE format('COMMENT ON POLICY %I ON metering.%I IS %L', t.tab || '_by_subject', t.tab,
                   'a role sees the rows of its subjects and their children (metering.subject_access); admins see all');
  END LOOP;
  FOR t IN SELECT * FROM (VALUES ('grants'), ('resets'), ('entitlement_snapshots'), ('entitlement_snapshot_queue')) v(tab) LOOP
    EXECUTE format('ALTER TABLE metering.%I ENABLE ROW LEVEL SECURITY', t.tab);
    EXECUTE format('CREATE POLICY %I ON metering.%I USING (entitlement_id IN (SELECT e.id FROM metering.entitlements e)) WITH CHECK (true)',
                   t.tab || '_by_subject', t.tab);
    EXECUTE format('COMMENT ON POLICY %I ON metering.%I IS %L', t.tab || '_by_subject', t.tab,
                   'a role sees the rows of the entitlements it may see');
  END LOOP;
END $$;
ALTER TABLE metering.subject_access ENABLE ROW LEVEL SECURITY;
CREATE POLICY subject_access_own ON metering.subject_access
  USING ((SELECT metering._visible_subjects(current_user)) IS NULL OR pg_has_role(role_name, 'MEMBER'))
  WITH CHECK (true);
COMMENT ON POLICY subject_access_own ON metering.subject_access IS 'a role sees its own assignments; admins see all';

-- views read their tables as the caller, so row security applies to them
ALTER VIEW metering.meter_rejected_values SET (security_invoker = true);

-- Usage comes in through these functions, which run as the extension's
-- owner: a writer may send usage for any subject without being allowed to
-- read any (INSERT ... ON CONFLICT would need it).  Everything they touch is
-- schema-qualified; the search path is pinned.
ALTER FUNCTION metering.ingest(jsonb) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION metering.ingest_batch(jsonb) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION metering.meter_usage(text, text, timestamptz, text, bigint, jsonb, boolean)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION metering.batch_meter_usage(jsonb) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION metering.resolve_customer(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- functions that change data are not for everyone
REVOKE EXECUTE ON FUNCTION
  metering.ingest(jsonb), metering.ingest_batch(jsonb),
  metering.meter_usage(text, text, timestamptz, text, bigint, jsonb, boolean), metering.batch_meter_usage(jsonb),
  metering.register_usage(text, text, integer, text), metering.resolve_customer(text), metering.rotate_signing_key(),
  metering._current_signing_key(), metering.refresh_rollups(text), metering.refresh_snapshots(uuid),
  metering._snapshot_meter(text, bigint, bigint), metering._snapshot_queue(),
  metering._events_changed(text, text[], timestamptz[]), metering._forget_snapshots(uuid, timestamptz),
  metering.create_feature(text, text, text, jsonb, jsonb), metering.archive_feature(text),
  metering.create_entitlement(text, text, metering.entitlement_type, interval, timestamptz, timestamptz, boolean, numeric, integer, boolean, jsonb, jsonb),
  metering.delete_entitlement(uuid),
  metering.create_grant(uuid, numeric, timestamptz, integer, interval, interval, timestamptz, numeric, numeric, jsonb),
  metering.void_grant(uuid), metering.reset_entitlement(uuid, timestamptz, boolean, boolean),
  metering.delete_hashmap_group(uuid, boolean)
FROM PUBLIC;

CREATE FUNCTION metering.setup_roles() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['metering_reader', 'metering_writer', 'metering_admin'] LOOP
    IF to_regrole(r) IS NULL THEN
      EXECUTE format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
  -- (GRANT of a role already granted says so in a notice: ask first)
  IF NOT pg_has_role('metering_writer', 'metering_reader', 'MEMBER') THEN
    GRANT metering_reader TO metering_writer;
  END IF;
  IF NOT pg_has_role('metering_admin', 'metering_writer', 'MEMBER') THEN
    GRANT metering_writer TO metering_admin;
  END IF;
  GRANT USAGE ON SCHEMA metering TO metering_reader;
  -- reader: every table and view (row security filters them), not the signing secret
  GRANT SELECT ON ALL TABLES IN SCHEMA metering TO metering_reader;
  REVOKE SELECT ON metering.signing_keys FROM metering_reader;
  -- writer: usage in, through the functions (they run as the owner)
  GRANT EXECUTE ON FUNCTION metering.ingest(jsonb), metering.ingest_batch(jsonb),
    metering.meter_usage(text, text, timestamptz, text, bigint, jsonb, boolean), metering.batch_meter_usage(jsonb),
    metering.register_usage(text, text, integer, text), metering.resolve_customer(text)
    TO metering_writer;
  -- admin: configuration, grants, resets, rules, maintenance
  GRANT ALL ON ALL TABLES IN SCHEMA metering TO metering_admin;
  GRANT ALL ON ALL SEQUENCES IN SCHEMA metering TO metering_admin;
  GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA metering TO metering_admin;
END $$;
COMMENT ON FUNCTION metering.setup_roles() IS
  'creates (if absent) metering_reader, metering_writer and metering_admin and grants them their rights; run it as a superuser or the extension owner with CREATEROLE, again after adding tables';
REVOKE EXECUTE ON FUNCTION metering.setup_roles() FROM PUBLIC;
-- pg_dump keeps the rows of every user table (derived tables such as
-- meter_rollups start empty and are rebuilt by metering.refresh_rollups()).
SELECT pg_catalog.pg_extension_config_dump('metering.meters', '');
SELECT pg_catalog.pg_extension_config_dump('metering.events', '');
-- the sequence too: restored events keep their numbers, and new ones must follow them
SELECT pg_catalog.pg_extension_config_dump('metering.events_seq', '');
SELECT pg_catalog.pg_extension_config_dump('metering.signing_keys', '');
SELECT pg_catalog.pg_extension_config_dump('metering.products', '');
SELECT pg_catalog.pg_extension_config_dump('metering.product_dimensions', '');
SELECT pg_catalog.pg_extension_config_dump('metering.customers', '');
SELECT pg_catalog.pg_extension_config_dump('metering.usage_records', '');
SELECT pg_catalog.pg_extension_config_dump('metering.registrations', '');
-- Comments for the objects that come with tables: triggers (after what
-- their function does), constraints and indexes (after their definition).
-- Tables, columns, functions, types and views carry hand-written comments.
DO $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT t.oid, t.tgname, c.oid AS rel, t.tgfoid
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
            WHERE c.relnamespace = 'metering'::regnamespace AND NOT t.tgisinternal
              AND obj_description(t.oid, 'pg_trigger') IS NULL LOOP
    EXECUTE format('COMMENT ON TRIGGER %I ON %s IS %L', r.tgname, r.rel::regclass,
                   'runs ' || r.tgfoid::regproc || ': ' || coalesce(obj_description(r.tgfoid, 'pg_proc'), ''));
  END LOOP;
  FOR r IN SELECT con.conname, con.conrelid, pg_get_constraintdef(con.oid) AS def
             FROM pg_constraint con
            WHERE con.connamespace = 'metering'::regnamespace AND con.conrelid <> 0
              AND obj_description(con.oid, 'pg_constraint') IS NULL LOOP
    EXECUTE format('COMMENT ON CONSTRAINT %I ON %s IS %L', r.conname, r.conrelid::regclass, r.def);
  END LOOP;
  FOR r IN SELECT i.indexrelid::regclass AS idx, pg_get_indexdef(i.indexrelid) AS def
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE c.relnamespace = 'metering'::regnamespace
              AND obj_description(i.indexrelid, 'pg_class') IS NULL LOOP
    EXECUTE format('COMMENT ON INDEX %s IS %L', r.idx, regexp_replace(r.def, '^CREATE ', ''));
  END LOOP;
END $$;
