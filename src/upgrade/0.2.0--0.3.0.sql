\echo Use "ALTER EXTENSION metering UPDATE TO '0.3.0'" to load this file. \quit
-- metering 0.2.0 -> 0.3.0, the hand-written part: changes to what 0.2.0 made
-- that a fresh install does not express as a replaceable definition
-- (ALTER TABLE, DROP of a function whose signature or result type changes,
-- data fixes).  make appends the src/sql files 0.2.0 did not have (NEW_SQL),
-- the current definitions of the functions and views listed in
-- 0.2.0--0.3.0.objects (tools/sql-extract) and the files every update runs
-- again (FINAL_SQL) to build metering--0.2.0--0.3.0.sql.

-- a snapshot inside an hour keeps the usage of that hour before it
ALTER TABLE metering.entitlement_snapshots ADD COLUMN hour_usage_before numeric;
COMMENT ON TABLE metering.entitlement_snapshot_queue IS
  'derived: entitlements whose snapshots a grant, void or reset removed, or whose new ones the background refresh left to its next full round; the next refresh saves them';
COMMENT ON COLUMN metering.entitlement_snapshots.at IS 'the instant (a cut: period boundary, grant change or recurrence; or the last whole hour past the last cut)';
COMMENT ON COLUMN metering.entitlement_snapshots.hour_usage_before IS
  'the usage of the events of the UTC hour of `at` before `at` (NULL when `at` is a whole hour): a reader subtracts it from that hour''s rollup instead of reading the hour''s events';

-- restored rows of every table are checked by metering._restored now
DROP FUNCTION metering._hashmap_may_restore();

-- a subject_access row may name a role dropped since
DROP POLICY subject_access_own ON metering.subject_access;
CREATE POLICY subject_access_own ON metering.subject_access
  USING ((SELECT metering._visible_subjects(current_user)) IS NULL
         OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles g
                     WHERE g.rolname = role_name AND pg_catalog.pg_has_role(g.oid, 'MEMBER')))
  WITH CHECK (true);
COMMENT ON POLICY subject_access_own ON metering.subject_access IS 'a role sees its own assignments; admins see all';

-- the deletion of events rebuilds the usage periods in the events_deleted
-- trigger itself, after the rollups (it no longer relies on trigger order)
DROP TRIGGER events_periods_deleted ON metering.events;
DROP FUNCTION metering._usage_periods_deleted();

-- entitlement_value returns reserved and available too (holds, 34_holds.sql):
-- its result type changes, so it and the view over it are made again
DROP VIEW metering.entitlement_status;
DROP FUNCTION metering.entitlement_value(text, text, timestamptz);

-- the functions that read an entitlement's rows are given its subject, by
-- which a distributed install finds their shard (80_distribute.sql)
DROP FUNCTION metering._period_start(uuid, timestamptz);
DROP FUNCTION metering._period_bound(uuid, timestamptz, boolean);
DROP FUNCTION metering._forget_snapshots(uuid, timestamptz);
DROP FUNCTION metering._lock_entitlement(uuid);
DROP FUNCTION metering._unchanged_since_snapshot(uuid);
-- which entitlements this transaction made is noted as they are made (a
-- distributed table's xmin cannot be read)
DROP FUNCTION metering._made_by_us(xid);
-- an entitlement's feature is checked at commit: a restore of a distributed
-- install's dump, in one transaction, may bring the features after it
ALTER TABLE metering.entitlements ALTER CONSTRAINT entitlements_feature_id_fkey DEFERRABLE INITIALLY DEFERRED;
-- (its comment, its definition, is made again: 95_object_comments.sql)
COMMENT ON CONSTRAINT entitlements_feature_id_fkey ON metering.entitlements IS NULL;

-- the alerts of a statement's events look up each subject's metered
-- entitlements (alerts_batch.c)
CREATE INDEX entitlements_metered_subject ON metering.entitlements USING hash (subject)
  WHERE deleted_at IS NULL AND type = 'metered';

-- the rollups are keyed by a hash of their group values: a value taken from
-- an event may be longer than a btree entry holds, and stopped the refresh
ALTER TABLE metering.meter_rollups ADD COLUMN groups_key bytea;
UPDATE metering.meter_rollups SET groups_key = pg_catalog.sha256(pg_catalog.textsend(groups::text));
ALTER TABLE metering.meter_rollups ALTER COLUMN groups_key SET NOT NULL,
  DROP CONSTRAINT meter_rollups_pkey, ADD PRIMARY KEY (meter, subject, bucket, groups_key);
COMMENT ON COLUMN metering.meter_rollups.groups_key IS
  'sha256 of groups (its canonical text): the key, since group values taken from events may be longer than a btree entry holds';

-- Two changes to tables that row security reads, made with their policies
-- dropped and then made again as a fresh install has them (60_access.sql):
-- customer identifiers are subjects, COLLATE "C" as the events' (a
-- distributed install co-locates the usage records with the events by
-- them); and the rows of an entitlement carry its subject (the key a
-- distributed install keeps them beside the subject's events by), which
-- their policies read.
ALTER TABLE metering.grants ADD COLUMN subject text COLLATE "C";
ALTER TABLE metering.resets ADD COLUMN subject text COLLATE "C";
ALTER TABLE metering.entitlement_snapshots ADD COLUMN subject text COLLATE "C";
ALTER TABLE metering.entitlement_snapshot_queue ADD COLUMN subject text COLLATE "C";
-- (grants and resets are immutable: their guards stand aside for the fill)
ALTER TABLE metering.grants DISABLE TRIGGER grants_before_update;
ALTER TABLE metering.resets DISABLE TRIGGER resets_immutable;
DO $$
DECLARE
  t record;
BEGIN
  FOR t IN SELECT * FROM (VALUES ('customers', 'customer_identifier'), ('usage_records', 'customer_identifier'),
                                 ('registrations', 'customer_identifier'), ('grants', 'subject'), ('resets', 'subject'),
                                 ('entitlement_snapshots', 'subject'), ('entitlement_snapshot_queue', 'subject')) v(tab, col) LOOP
    EXECUTE format('DROP POLICY %I ON metering.%I', t.tab || '_by_subject', t.tab);
    IF t.col = 'customer_identifier' THEN
      EXECUTE format('ALTER TABLE metering.%I ALTER COLUMN customer_identifier TYPE text COLLATE "C"', t.tab);
    ELSE
      EXECUTE format('UPDATE metering.%I x SET subject = e.subject FROM metering.entitlements e WHERE e.id = x.entitlement_id', t.tab);
      EXECUTE format('ALTER TABLE metering.%I ALTER COLUMN subject SET NOT NULL', t.tab);
    END IF;
    EXECUTE format('CREATE POLICY %I ON metering.%I USING ((SELECT metering._visible_subjects(current_user)) IS NULL '
                   'OR %I = ANY (CAST((SELECT metering._visible_subjects(current_user)) AS text[]))) '
                   'WITH CHECK (true)', t.tab || '_by_subject', t.tab, t.col);
    EXECUTE format('COMMENT ON POLICY %I ON metering.%I IS %L', t.tab || '_by_subject', t.tab,
                   'a role sees the rows of its subjects and their children (metering.subject_access); admins see all');
  END LOOP;
END $$;
ALTER TABLE metering.grants ENABLE TRIGGER grants_before_update;
ALTER TABLE metering.resets ENABLE TRIGGER resets_immutable;
COMMENT ON COLUMN metering.grants.subject IS 'the entitlement''s subject (filled in when not given; another is refused)';
COMMENT ON COLUMN metering.resets.subject IS 'the entitlement''s subject (filled in when not given; another is refused)';
COMMENT ON COLUMN metering.entitlement_snapshots.subject IS 'the entitlement''s subject';
COMMENT ON COLUMN metering.entitlement_snapshot_queue.subject IS 'the entitlement''s subject';
