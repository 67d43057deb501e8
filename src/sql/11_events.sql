-- Events (CloudEvents 1.0) and the hourly rollups derived from them.

CREATE TABLE metering.events (
  id          text NOT NULL,
  source      text NOT NULL,
  subject     text NOT NULL,
  type        text NOT NULL,
  time        timestamptz NOT NULL DEFAULT metering.now(),
  data        jsonb NOT NULL DEFAULT '{}',
  ingested_at timestamptz NOT NULL DEFAULT metering.now(),
  PRIMARY KEY (source, id),
  CONSTRAINT events_id_not_empty CHECK (id <> ''),
  CONSTRAINT events_source_not_empty CHECK (source <> ''),
  CONSTRAINT events_subject_not_empty CHECK (subject <> ''),
  CONSTRAINT events_type_not_empty CHECK (type <> ''),
  CONSTRAINT events_data_is_object CHECK (jsonb_typeof(data) = 'object')
);
CREATE INDEX events_subject_type_time_idx ON metering.events (subject, type, time);
COMMENT ON TABLE metering.events IS
  'usage events (CloudEvents 1.0); (source, id) is unique and a repeat is a duplicate; rows are immutable; a plain INSERT is as good as metering.ingest';
COMMENT ON COLUMN metering.events.id IS 'the CloudEvents id, unique per source';
COMMENT ON COLUMN metering.events.source IS 'the CloudEvents source';
COMMENT ON COLUMN metering.events.subject IS 'the metered party (customer, tenant, account)';
COMMENT ON COLUMN metering.events.type IS 'the CloudEvents type; meters select events by it';
COMMENT ON COLUMN metering.events.time IS 'when the usage happened';
COMMENT ON COLUMN metering.events.data IS 'the event payload, a JSON object';
COMMENT ON COLUMN metering.events.ingested_at IS 'when the event was stored (metering.now())';

CREATE TABLE metering.meter_rollups (
  meter        text NOT NULL,
  subject      text NOT NULL,
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
  'derived: per meter, subject, UTC hour and group values, the partial aggregates of its events; kept by triggers on metering.events and metering.meters, never written by hand';
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

CREATE FUNCTION metering._events_rollup() RETURNS trigger
  AS 'MODULE_PATHNAME', 'metering_events_rollup'
  LANGUAGE C;
COMMENT ON FUNCTION metering._events_rollup() IS
  'internal: keeps metering.meter_rollups in step with INSERT and DELETE on metering.events';

CREATE FUNCTION metering._rollup_backfill(meter text) RETURNS void
  AS 'MODULE_PATHNAME', 'metering_rollup_backfill'
  LANGUAGE C STRICT;
COMMENT ON FUNCTION metering._rollup_backfill(text) IS
  'internal: rolls up every stored event of a new meter''s type';

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
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._events_truncate() IS 'internal: TRUNCATE of events empties the rollups';

CREATE TRIGGER events_rollup_insert AFTER INSERT ON metering.events
  REFERENCING NEW TABLE AS new_events
  FOR EACH STATEMENT EXECUTE FUNCTION metering._events_rollup();
CREATE TRIGGER events_rollup_delete AFTER DELETE ON metering.events
  REFERENCING OLD TABLE AS old_events
  FOR EACH STATEMENT EXECUTE FUNCTION metering._events_rollup();
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
