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
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._meters_before_update() IS
  'internal: meters are immutable but for description and the soft delete';

CREATE FUNCTION metering._meters_after_delete_mark() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM metering.meter_rollup_state WHERE meter = NEW.slug;
  DELETE FROM metering.meter_rollups WHERE meter = NEW.slug;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._meters_after_delete_mark() IS
  'internal: drops the rollups of a deleted meter';

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
COMMENT ON COLUMN metering.meter_rollups.min IS 'smallest value (MIN meters)';
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
  UPDATE metering.meter_rollup_state SET rolled_up_to = 0;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._events_truncate() IS 'internal: TRUNCATE of events empties the rollups and resets their watermarks';

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
