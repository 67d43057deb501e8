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
-- the events of a time range for almost nothing per insert.  Per-subject
-- questions are answered from the rollups, which are indexed by subject; a
-- btree on (subject, type, time) here would cost a third of the ingest rate
-- (README, Scaling).
CREATE INDEX events_seq_time_brin ON metering.events USING brin (seq, time)
  WITH (pages_per_range = 32, autosummarize = on);
-- The events not rolled up yet (seq above the watermark), which every
-- balance read adds: a btree led by seq is only ever appended to at its
-- right edge (about a tenth of the rate of ingest_batch), finds them in
-- O(log n) however long the history (a BRIN scan reads a summary of every
-- range of the table), and checks the subject in the index entry, so one
-- subject's recent events cost a read of index entries, not of every
-- subject's rows.
CREATE INDEX events_seq_subject ON metering.events (seq, subject);
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
  groups_key   bytea NOT NULL,
  PRIMARY KEY (meter, subject, bucket, groups_key)
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
COMMENT ON COLUMN metering.meter_rollups.groups_key IS
  'sha256 of groups (its canonical text): the key, since group values taken from events may be longer than a btree entry holds';

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
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RAISE EXCEPTION 'events are immutable: cannot update event "%" of source "%"', OLD.id, OLD.source
    USING ERRCODE = 'object_not_in_prerequisite_state',
          HINT = 'Record a correcting event instead, or delete the event.';
END $$;
COMMENT ON FUNCTION metering._events_immutable() IS 'internal: events are never updated';

CREATE FUNCTION metering._events_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- distributed (80_distribute.sql): the coordinator's table fires this too
  -- and empties the derived tables; a shard's copy has nothing to add
  IF TG_RELID <> 'metering.events'::regclass THEN
    RETURN NULL;
  END IF;
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
