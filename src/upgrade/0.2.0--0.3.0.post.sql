-- metering 0.2.0 -> 0.3.0, after the new definitions: data they change.

-- usage period ids come from sha256 now (md5 is refused on FIPS builds)
UPDATE metering.usage_periods SET id = metering._usage_period_id(subject, meter, kind, start_time);

-- 0.2.0's setup_roles() granted metering_admin TRIGGER, TRUNCATE and
-- REFERENCES, rights on the sequence and writes to the derived tables:
-- where the roles exist, take those back at once (setup_roles(), run again
-- after the update, grants what 0.3.0 gives each role and nothing more)
DO $$
DECLARE
  g record;
BEGIN
  FOR g IN SELECT c.oid::regclass AS rel, c.relname, c.relkind, a.grantee::regrole AS who, a.privilege_type AS priv
             FROM pg_catalog.pg_class c CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
            WHERE c.relnamespace = 'metering'::regnamespace
              AND a.grantee IN (SELECT oid FROM pg_catalog.pg_roles
                                 WHERE rolname IN ('metering_reader', 'metering_writer', 'metering_admin'))
              AND (c.relkind = 'S' OR a.privilege_type IN ('TRIGGER', 'TRUNCATE', 'REFERENCES')
                   OR (a.privilege_type <> 'SELECT'
                       AND c.relname IN ('meter_rollups', 'meter_rollup_state', 'usage_periods', 'entitlement_snapshots',
                                         'entitlement_snapshot_queue', 'usage_records', 'registrations',
                                         'signing_keys', 'events'))) LOOP
    EXECUTE format('REVOKE %s ON %s FROM %s', g.priv, g.rel, g.who);
    -- events are stored by hand, but never given their number
    IF g.relname = 'events' AND g.priv = 'INSERT' THEN
      EXECUTE format('GRANT INSERT (id, source, subject, type, time, data, ingested_at) ON metering.events TO %s', g.who);
    END IF;
  END LOOP;
  IF to_regrole('metering_admin') IS NOT NULL
     AND has_function_privilege('metering_admin', 'metering._current_signing_key()', 'EXECUTE') THEN
    REVOKE EXECUTE ON FUNCTION metering._current_signing_key() FROM metering_admin;
  END IF;
END $$;

-- holds and notifications are seen by subject, as the other tables are
-- (60_access.sql makes these policies in a fresh install)
DO $$
DECLARE
  t record;
  visible text := '(SELECT metering._visible_subjects(current_user)) IS NULL OR %I = ANY (CAST((SELECT metering._visible_subjects(current_user)) AS text[]))';
BEGIN
  FOR t IN SELECT * FROM (VALUES ('reservations', 'subject'), ('notification_events', 'subject'),
                                 ('entitlement_turns', 'subject')) v(tab, col) LOOP
    EXECUTE format('ALTER TABLE metering.%I ENABLE ROW LEVEL SECURITY', t.tab);
    EXECUTE format('CREATE POLICY %I ON metering.%I USING (' || visible || ') WITH CHECK (true)',
                   t.tab || '_by_subject', t.tab, t.col, t.col);
    EXECUTE format('COMMENT ON POLICY %I ON metering.%I IS %L', t.tab || '_by_subject', t.tab,
                   'a role sees the rows of its subjects and their children (metering.subject_access); admins see all');
  END LOOP;
END $$;

-- the events' BRIN index has ranges of 32 pages and summarizes each as it
-- fills (src/sql/11_events.sql); its comment is its definition
DROP INDEX metering.events_seq_time_brin;
CREATE INDEX events_seq_time_brin ON metering.events USING brin (seq, time)
  WITH (pages_per_range = 32, autosummarize = on);
DO $$
BEGIN
  EXECUTE format('COMMENT ON INDEX metering.events_seq_time_brin IS %L',
                 regexp_replace(pg_catalog.pg_get_indexdef('metering.events_seq_time_brin'::regclass), '^CREATE ', ''));
END $$;

-- the events above the watermark, found by seq and subject (src/sql/11_events.sql)
CREATE INDEX events_seq_subject ON metering.events (seq, subject);
