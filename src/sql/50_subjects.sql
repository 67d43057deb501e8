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
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- the table the trigger fired on: on a Citus node that is this node's
  -- copy of the reference table (80_distribute.sql), which the others'
  -- triggers mark the same way
  IF OLD.deleted_at IS NULL THEN
    EXECUTE format('UPDATE %I.%I SET deleted_at = metering.now() WHERE key = $1', TG_TABLE_SCHEMA, TG_TABLE_NAME)
      USING OLD.key;
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._subjects_soft_delete() IS 'internal: DELETE keeps the subject and marks it deleted';
CREATE TRIGGER subjects_soft_delete BEFORE DELETE ON metering.subjects
  FOR EACH ROW EXECUTE FUNCTION metering._subjects_soft_delete();

-- a subject and everything below it (PL/pgSQL: Citus plans no SQL function
-- with a parameter that reads its tables, and subjects is one once
-- distributed)
CREATE FUNCTION metering.subject_tree(subject text) RETURNS SETOF text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN QUERY
  WITH RECURSIVE down(key) AS (
    SELECT subject_tree.subject COLLATE "C"
    UNION
    SELECT s.key FROM metering.subjects s JOIN down ON s.parent_key = down.key)
  SELECT down.key FROM down;
END $$;
COMMENT ON FUNCTION metering.subject_tree(text) IS 'a subject and its children, their children, and so on';

-- (the known keys first: distributed events do not join the coordinator's
-- subjects directly, they are sent the keys)
CREATE VIEW metering.unknown_subjects WITH (security_invoker = true) AS
WITH known AS MATERIALIZED (SELECT s.key FROM metering.subjects s)
SELECT e.subject, count(*) AS events, min(e.time) AS first_seen, max(e.time) AS last_seen
  FROM metering.events e
 WHERE NOT EXISTS (SELECT 1 FROM known k WHERE k.key = e.subject)
 GROUP BY e.subject;
COMMENT ON VIEW metering.unknown_subjects IS
  'subjects that events name but metering.subjects does not know (their usage is stored all the same); reads every event';
COMMENT ON COLUMN metering.unknown_subjects.subject IS 'the subject key events use';
COMMENT ON COLUMN metering.unknown_subjects.events IS 'how many events name it';
COMMENT ON COLUMN metering.unknown_subjects.first_seen IS 'the time of its first event';
COMMENT ON COLUMN metering.unknown_subjects.last_seen IS 'the time of its last event';

SELECT pg_catalog.pg_extension_config_dump('metering.subjects', '');
