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
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
  SELECT coalesce((SELECT a.rolsuper OR a.rolbypassrls FROM pg_roles a WHERE a.oid = r), false)
      OR pg_has_role(r, (SELECT extowner FROM pg_extension WHERE extname = 'metering'), 'MEMBER')
      OR (to_regrole('metering_admin') IS NOT NULL AND pg_has_role(r, 'metering_admin', 'MEMBER'));
END;
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
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  visible text[] := metering._visible_subjects(current_user);
BEGIN
  -- (every per-subject report asks first; a Citus worker holds none of the
  -- configuration they read)
  PERFORM metering._require_coordinator('a report of metering');
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
                                 ('customers', 'customer_identifier'), ('registrations', 'customer_identifier'),
                                 ('reservations', 'subject'), ('notification_events', 'subject'),
                                 ('grants', 'subject'), ('resets', 'subject'), ('entitlement_snapshots', 'subject'),
                                 ('entitlement_snapshot_queue', 'subject'), ('entitlement_turns', 'subject')) v(tab, col) LOOP
    EXECUTE format('ALTER TABLE metering.%I ENABLE ROW LEVEL SECURITY', t.tab);
    EXECUTE format('CREATE POLICY %I ON metering.%I USING (' || visible || ') WITH CHECK (true)',
                   t.tab || '_by_subject', t.tab, t.col, t.col);
    EXECUTE format('COMMENT ON POLICY %I ON metering.%I IS %L', t.tab || '_by_subject', t.tab,
                   'a role sees the rows of its subjects and their children (metering.subject_access); admins see all');
  END LOOP;
END $$;
ALTER TABLE metering.subject_access ENABLE ROW LEVEL SECURITY;
CREATE POLICY subject_access_own ON metering.subject_access
  -- (a row may name a role that was dropped since: it is nobody's)
  USING ((SELECT metering._visible_subjects(current_user)) IS NULL
         OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles g
                     WHERE g.rolname = role_name AND pg_catalog.pg_has_role(g.oid, 'MEMBER')))
  WITH CHECK (true);
COMMENT ON POLICY subject_access_own ON metering.subject_access IS 'a role sees its own assignments; admins see all';

-- views read their tables as the caller, so row security applies to them
ALTER VIEW metering.meter_rejected_values SET (security_invoker = true);

-- Usage comes in through these functions, which run as the extension's
-- owner: a writer may send usage for any subject without being allowed to
-- read any (INSERT ... ON CONFLICT would need it).  Everything they touch is
-- schema-qualified; the search path is pinned (96_search_path.sql).
ALTER FUNCTION metering.ingest(jsonb) SECURITY DEFINER;
ALTER FUNCTION metering.ingest_batch(jsonb) SECURITY DEFINER;
ALTER FUNCTION metering.meter_usage(text, text, timestamptz, text, bigint, jsonb, boolean) SECURITY DEFINER;
ALTER FUNCTION metering.batch_meter_usage(jsonb) SECURITY DEFINER;
ALTER FUNCTION metering.resolve_customer(text) SECURITY DEFINER;

-- Derived data (rollups, watermarks, usage periods, snapshots and their
-- queue) is written only by owner-run code, so no role needs, or gets, a
-- right to write it: the refreshes, and what the triggers of the tables a
-- role may write call to keep it right.  The refreshes run as the owner
-- for a second reason: row security must hide nothing from them, or a
-- watermark would move past events the caller cannot see.
ALTER FUNCTION metering.refresh_rollups(text) SECURITY DEFINER;
ALTER FUNCTION metering.refresh_snapshots(uuid) SECURITY DEFINER;
ALTER FUNCTION metering._meters_after_insert() SECURITY DEFINER;
ALTER FUNCTION metering._meters_after_delete_mark() SECURITY DEFINER;
ALTER FUNCTION metering._meter_deleted() SECURITY DEFINER;
ALTER FUNCTION metering._events_deleted() SECURITY DEFINER;
ALTER FUNCTION metering._forget_snapshots(uuid, text, timestamptz) SECURITY DEFINER;
ALTER FUNCTION metering._events_changed(text, text[], timestamptz[]) SECURITY DEFINER;
-- and the signing secret is read and written only by owner-run code
ALTER FUNCTION metering.rotate_signing_key() SECURITY DEFINER;

-- functions that change data are not for everyone
REVOKE EXECUTE ON FUNCTION
  metering.ingest(jsonb), metering.ingest_batch(jsonb),
  metering.meter_usage(text, text, timestamptz, text, bigint, jsonb, boolean), metering.batch_meter_usage(jsonb),
  metering.register_usage(text, text, integer, text), metering.resolve_customer(text), metering.rotate_signing_key(),
  metering._current_signing_key(), metering.refresh_rollups(text), metering.refresh_snapshots(uuid),
  metering._snapshot_meter(text, bigint, bigint), metering._snapshot_queue(),
  metering._events_changed(text, text[], timestamptz[]), metering._forget_snapshots(uuid, text, timestamptz),
  metering._usage_periods_rebuild(text, text[], timestamptz[]), metering._usage_periods_add(text, bigint, bigint),
  metering.create_feature(text, text, text, jsonb, jsonb), metering.archive_feature(text),
  metering.create_entitlement(text, text, metering.entitlement_type, interval, timestamptz, timestamptz, boolean, numeric, integer, boolean, jsonb, jsonb),
  metering.delete_entitlement(uuid),
  metering.create_grant(uuid, numeric, timestamptz, integer, interval, interval, timestamptz, numeric, numeric, jsonb),
  metering.void_grant(uuid), metering.reset_entitlement(uuid, timestamptz, boolean, boolean),
  metering.delete_hashmap_group(uuid, boolean)
FROM PUBLIC;

CREATE FUNCTION metering.setup_roles() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r text;
  t record;
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
  -- Distributed, a grant on the AWS reference tables, which have foreign
  -- keys between them, must not follow the parallel grants on the shards in
  -- this transaction (Citus refuses): one connection per node throughout
  IF metering._distributed() THEN
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
  END IF;
  -- Nobody but the owner holds TRIGGER, TRUNCATE or REFERENCES, a right on
  -- a sequence, or CREATE in the schema: each would let a role's own code
  -- run inside the owner-run functions, or the rows of the derived tables
  -- disagree with the events.  (A second run takes back what 0.2.0 granted.)
  REVOKE ALL ON ALL TABLES IN SCHEMA metering FROM metering_reader, metering_writer, metering_admin;
  REVOKE ALL ON ALL SEQUENCES IN SCHEMA metering FROM metering_reader, metering_writer, metering_admin;
  REVOKE CREATE ON SCHEMA metering FROM metering_reader, metering_writer, metering_admin;
  GRANT USAGE ON SCHEMA metering TO metering_reader;
  -- reader: every table and view (row security filters them), not the signing secret
  GRANT SELECT ON ALL TABLES IN SCHEMA metering TO metering_reader;
  REVOKE SELECT ON metering.signing_keys FROM metering_reader;
  -- (the copies of a distributed install's configuration, for every subject)
  REVOKE SELECT ON metering.config_copies FROM metering_reader;
  -- writer: usage in, through the functions (they run as the owner)
  GRANT EXECUTE ON FUNCTION metering.ingest(jsonb), metering.ingest_batch(jsonb),
    metering.meter_usage(text, text, timestamptz, text, bigint, jsonb, boolean), metering.batch_meter_usage(jsonb),
    metering.register_usage(text, text, integer, text), metering.resolve_customer(text),
    metering.reserve(text, text, numeric, interval, text), metering.commit_reservation(uuid, jsonb),
    metering.release_reservation(uuid), metering.consume(jsonb, text)
    TO metering_writer;
  -- admin: configuration, grants, resets, rules, subjects, maintenance.  It
  -- writes the tables that people write; derived tables, usage records,
  -- registrations and the secret only change through owner-run functions.
  FOR t IN SELECT c.oid::regclass AS rel, c.relname FROM pg_catalog.pg_class c
            WHERE c.relnamespace = 'metering'::regnamespace AND c.relkind IN ('r', 'p')
              AND c.relname <> ALL (ARRAY['meter_rollups', 'meter_rollup_state', 'usage_periods', 'refresh_rounds',
                                          'entitlement_snapshots', 'entitlement_snapshot_queue',
                                          'usage_records', 'registrations', 'signing_keys', 'events',
                                          'reservations', 'entitlement_turns', 'notification_events',
                                          'config_copies']) LOOP
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO metering_admin', t.rel);
  END LOOP;
  -- holds and notifications are written by the functions alone (they take the entitlement's turn)
  -- events: stored or deleted, never given their number (seq) by hand
  GRANT INSERT (id, source, subject, type, time, data, ingested_at), DELETE ON metering.events TO metering_admin;
  GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA metering TO metering_admin;
  REVOKE EXECUTE ON FUNCTION metering._current_signing_key(), metering._revoke_trigger_functions() FROM metering_admin;
  -- (nor the trigger functions: attached to a table of its own, one would
  -- run as the owner over rows the admin chose; 97_trigger_functions.sql)
  PERFORM metering._revoke_trigger_functions();
  -- (the alert evaluators trust what they are handed, and the turns are the
  -- enforcing functions' own)
  REVOKE EXECUTE ON FUNCTION metering._alerts_for_events(text[], text[], timestamptz[], jsonb[]),
    metering._evaluate_alerts(uuid, text, timestamptz, boolean), metering._take_turn(uuid, text, "char", timestamptz)
    FROM metering_admin;
  -- (the copies of the configuration are the coordinator's triggers' alone)
  REVOKE EXECUTE ON FUNCTION metering._config_copy(), metering._config_apply(), metering._config_write(text, jsonb, jsonb),
    metering._config_distribute(), metering._config_readers(text, text[]), metering._config_grants() FROM metering_admin;
  -- a distributed install: the workers' copies of the rules, readable as here
  PERFORM metering._config_grants();
END $$;
COMMENT ON FUNCTION metering.setup_roles() IS
  'creates (if absent) metering_reader, metering_writer and metering_admin and grants them their rights; run it as a superuser or the extension owner with CREATEROLE, again after adding tables';
REVOKE EXECUTE ON FUNCTION metering.setup_roles() FROM PUBLIC;
