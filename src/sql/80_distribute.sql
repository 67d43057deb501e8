-- Scale-out on Citus (opt-in): metering.distribute() turns the tables of a
-- coordinator into distributed and reference tables.  A single node never
-- calls anything here.

-- The row-security rule of distributed tables: Citus refuses subqueries in
-- their policies, and this function, which a shard evaluates per row,
-- answers once per query (src/visible_subjects.c).
CREATE FUNCTION metering._visible_subjects_once(who name) RETURNS text[]
  AS 'MODULE_PATHNAME', 'metering_visible_subjects_once'
  LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION metering._visible_subjects_once(name) IS
  'internal (distributed mode): metering._visible_subjects(who), asked once per query';

CREATE FUNCTION metering._role_is_mine(role_name name) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
-- (a row may name a role that was dropped since: it is nobody's)
RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_roles g
                WHERE g.rolname = _role_is_mine.role_name AND pg_catalog.pg_has_role(g.oid, 'MEMBER'));
COMMENT ON FUNCTION metering._role_is_mine(name) IS
  'internal (distributed mode): whether the current role is a member of the named role (false for a dropped one)';

-- Whether this database's metering tables are distributed (Citus holds
-- metering.events as a distributed table); false without Citus.
CREATE FUNCTION metering._distributed() RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  d boolean;
BEGIN
  IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
    RETURN false;
  END IF;
  EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = ''metering.events''::regclass)'
    INTO d;
  RETURN d;
END $$;
COMMENT ON FUNCTION metering._distributed() IS
  'internal: true when metering.distribute() has distributed this database''s tables';

-- Whether this session runs on a Citus worker of a distributed install:
-- there, the configuration tables (meters, rules, subjects, ...) are the
-- worker's own, empty copies, so whatever reads them must not run there.
CREATE FUNCTION metering._on_worker() RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  w boolean;
BEGIN
  IF NOT metering._distributed() THEN
    RETURN false;
  END IF;
  EXECUTE 'SELECT NOT pg_catalog.citus_is_coordinator()' INTO w;
  RETURN w;
END $$;
COMMENT ON FUNCTION metering._on_worker() IS
  'internal: true on a Citus worker of a distributed install (where the configuration tables are not the coordinator''s)';

CREATE FUNCTION metering._require_coordinator(what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF metering._on_worker() THEN
    RAISE EXCEPTION '% runs on the Citus coordinator only, and this query sent it to a worker', what
      USING ERRCODE = 'feature_not_supported',
            HINT = 'Read the distributed rows in a MATERIALIZED CTE and call it on them: WITH e AS MATERIALIZED (SELECT ... FROM metering.events ...) SELECT ... FROM e runs on the coordinator.';
  END IF;
END $$;
COMMENT ON FUNCTION metering._require_coordinator(text) IS
  'internal: 0A000 on a Citus worker of a distributed install';

-- A statement that changes a table before Citus converts it, run on the
-- coordinator and on every worker: the workers hold the extension's tables
-- too (Citus leaves the tables of an extension to it), and their
-- definitions must stay the same.  Each statement distribute() gives it can
-- run again, so a distribute() that failed half-way can.
CREATE FUNCTION metering._distribute_everywhere(stmt text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  failed text;
BEGIN
  EXECUTE stmt;
  EXECUTE 'SELECT string_agg(nodename || '':'' || nodeport || '': '' || result, ''; '') '
          'FROM run_command_on_workers($1) WHERE NOT success' INTO failed USING stmt;
  IF failed IS NOT NULL THEN
    RAISE EXCEPTION 'distribute: a worker could not run "%": %', stmt, failed
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
END $$;
COMMENT ON FUNCTION metering._distribute_everywhere(text) IS
  'internal (distributed mode): runs one of distribute()''s preparing statements on the coordinator and on every worker';
REVOKE ALL ON FUNCTION metering._distribute_everywhere(text) FROM PUBLIC;

-- What a group of tables needs before Citus takes them, on every node: the
-- primary key of one of them (key_table, unless NULL) with the distribution
-- column first (Citus wants it in every unique key), and the subquery-free row-security rule
-- (see _visible_subjects_once above) on each one's subject column.
CREATE FUNCTION metering._distribute_prepare(key_table text, key_columns text, tabs text[], col text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  tab text;
BEGIN
  IF key_table IS NOT NULL THEN
    PERFORM metering._distribute_everywhere(
      format('ALTER TABLE metering.%1$I DROP CONSTRAINT IF EXISTS %2$I, ADD CONSTRAINT %2$I PRIMARY KEY (%3$s)',
             key_table, key_table || '_pkey', key_columns));
  END IF;
  FOREACH tab IN ARRAY tabs LOOP
    PERFORM metering._distribute_everywhere(
      format('ALTER POLICY %I ON metering.%I USING (metering._visible_subjects_once(current_user) IS NULL '
             'OR %I = ANY (metering._visible_subjects_once(current_user)))', tab || '_by_subject', tab, col));
  END LOOP;
END $$;
COMMENT ON FUNCTION metering._distribute_prepare(text, text, text[], text) IS
  'internal (distributed mode): the primary key and row-security rules a group of tables needs before Citus takes them, on every node';
REVOKE ALL ON FUNCTION metering._distribute_prepare(text, text, text[], text) FROM PUBLIC;

-- Makes tables reference tables: the foreign keys that point at one of them
-- go on every node first (a reference table that a plain table references
-- would take that table into Citus's metadata with it, which the workers'
-- own copy of the table stops, and a table's key to itself would be made
-- twice on the workers), and come back once all are converted, between the
-- reference tables, where Citus puts them on every node.
CREATE FUNCTION metering._distribute_reference(referenced text, tabs text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  fkeys text[];
  stmt text;
  tab text;
BEGIN
  SELECT array_agg(format('ALTER TABLE %s ADD CONSTRAINT %I %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
                   ORDER BY conrelid, conname)
    INTO fkeys FROM pg_constraint
   WHERE confrelid = ('metering.' || referenced)::regclass AND contype = 'f';
  FOR stmt IN SELECT format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', conrelid::regclass, conname) FROM pg_constraint
               WHERE confrelid = ('metering.' || referenced)::regclass AND contype = 'f' LOOP
    PERFORM metering._distribute_everywhere(stmt);
  END LOOP;
  FOREACH tab IN ARRAY tabs LOOP
    EXECUTE 'SELECT create_reference_table($1)' USING ('metering.' || tab)::regclass;
  END LOOP;
  FOREACH stmt IN ARRAY coalesce(fkeys, '{}') LOOP
    EXECUTE stmt;
  END LOOP;
END $$;
COMMENT ON FUNCTION metering._distribute_reference(text, text[]) IS
  'internal (distributed mode): makes tables reference tables, with the foreign keys to one of them taken off and put back around it';
REVOKE ALL ON FUNCTION metering._distribute_reference(text, text[]) FROM PUBLIC;

-- The entitlements and what is theirs (grants, resets, snapshots, holds,
-- turns, notifications), distributed by subject beside the subject's events.
-- Their keys get the subject (Citus wants it in every unique key: an
-- entitlement's rows all name its subject, so the keys stay as unique as
-- they were), and their foreign keys become keys of (entitlement, subject),
-- which Citus checks on each shard; those to the configuration (features,
-- alert rules) go, since a distributed table can reference none of the
-- coordinator's plain tables: the functions that write them check both.
-- Two steps: the tables' new keys and policies on every node (statements
-- of their own on the workers, which must come before distribute()'s copy of
-- the configuration writes the workers' features in the transaction: they
-- would wait for it), then, once the features are on every node (the
-- triggers of the rows Citus copies into the shards read them), the
-- conversion.
CREATE FUNCTION metering._distribute_entitlements(convert boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  tabs text[] := ARRAY['entitlements', 'grants', 'resets', 'entitlement_snapshots', 'entitlement_snapshot_queue',
                       'reservations', 'entitlement_turns', 'notification_events'];
  stmt text;
  k record;
BEGIN
  IF convert THEN
    FOREACH stmt IN ARRAY tabs LOOP
      EXECUTE 'SELECT create_distributed_table($1, ''subject'', colocate_with => ''metering.events'')'
        USING ('metering.' || stmt)::regclass;
    END LOOP;
    FOREACH stmt IN ARRAY tabs[2:] LOOP
      IF stmt <> 'entitlement_turns' THEN
        EXECUTE format('ALTER TABLE metering.%I ADD CONSTRAINT %I FOREIGN KEY (entitlement_id, subject) '
                       'REFERENCES metering.entitlements (id, subject)', stmt, stmt || '_entitlement_fkey');
      END IF;
    END LOOP;
    -- the view of every entitlement's value reads the entitlements first:
    -- Citus would send its per-row calls to the shards, where no query of
    -- other shards may run (51_reports.sql has the one-node definition, which
    -- a filter by subject reaches through the index)
    CREATE OR REPLACE VIEW metering.entitlement_status WITH (security_invoker = true) AS
    WITH e AS MATERIALIZED (SELECT e.id, e.subject, e.feature_key, e.type FROM metering.entitlements e WHERE e.deleted_at IS NULL)
    SELECT e.subject, e.feature_key AS feature, e.type, v.has_access AS access, v.balance, v.usage, v.overage,
           v.start_of_period AS period_start,
           CASE WHEN e.type = 'metered' THEN metering._period_bound(e.id, e.subject, metering.now(), true) END AS period_end,
           v.config, e.id AS entitlement_id, v.reserved, v.available
      FROM e CROSS JOIN LATERAL metering.entitlement_value(e.subject, e.id::text, metering.now()) v;
    RETURN;
  END IF;
  FOR stmt IN SELECT format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', conrelid::regclass, conname)
                FROM pg_constraint
               WHERE contype = 'f' AND conrelid = ANY (SELECT ('metering.' || t)::regclass FROM unnest(tabs) t)
               ORDER BY conrelid, conname LOOP
    PERFORM metering._distribute_everywhere(stmt);
  END LOOP;
  FOR k IN SELECT * FROM (VALUES ('entitlements', 'id, subject'), ('grants', 'id, subject'), ('resets', 'id, subject'),
                                 ('entitlement_snapshots', 'entitlement_id, at, subject'),
                                 ('entitlement_snapshot_queue', 'entitlement_id, subject'),
                                 ('reservations', 'id, subject'), ('entitlement_turns', 'entitlement_id, purpose, subject'),
                                 ('notification_events', 'id, subject')) v(tab, cols) LOOP
    PERFORM metering._distribute_prepare(k.tab, k.cols, '{}', 'subject');
  END LOOP;
  PERFORM metering._distribute_everywhere(
    'ALTER TABLE metering.resets DROP CONSTRAINT IF EXISTS resets_entitlement_id_effective_at_key, '
    'ADD CONSTRAINT resets_entitlement_id_effective_at_key UNIQUE (entitlement_id, effective_at, subject)');
  PERFORM metering._distribute_everywhere('DROP INDEX IF EXISTS metering.reservations_idempotency');
  PERFORM metering._distribute_everywhere(
    'CREATE UNIQUE INDEX reservations_idempotency ON metering.reservations (entitlement_id, idempotency_key, subject) '
    'WHERE idempotency_key IS NOT NULL');
  PERFORM metering._distribute_prepare(NULL, NULL, tabs, 'subject');
END $$;
COMMENT ON FUNCTION metering._distribute_entitlements(boolean) IS
  'internal (distributed mode): the keys and policies the entitlements, grants, resets, snapshots, holds, turns and notifications need on every node, or (convert) their distribution by subject, co-located with the events';
REVOKE ALL ON FUNCTION metering._distribute_entitlements(boolean) FROM PUBLIC;

CREATE FUNCTION metering.distribute(shard_count integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  workers bigint;
  tab text;
  done boolean;
BEGIN
  IF to_regclass('pg_catalog.pg_dist_node') IS NULL THEN
    RAISE EXCEPTION 'distribute: Citus is not installed in this database'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Add citus to shared_preload_libraries, CREATE EXTENSION citus, and add the workers with citus_add_node().';
  END IF;
  EXECUTE 'SELECT count(*) FROM pg_catalog.pg_dist_node WHERE noderole = ''primary'' AND isactive AND groupid <> 0'
    INTO workers;
  IF workers = 0 THEN
    RAISE EXCEPTION 'distribute: the Citus cluster has no worker nodes'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Add them on the coordinator with citus_add_node(host, port).';
  END IF;
  IF shard_count IS NOT NULL AND (shard_count < 1 OR shard_count > 64000) THEN
    RAISE EXCEPTION 'distribute: shard_count must be from 1 to 64000, got %', shard_count
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM set_config('client_min_messages', 'warning', true);
  -- (the events keep their triggers: see the notes of 11_events.sql)
  PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);

  -- Each group of tables is converted once; a later call (after an update
  -- that added a group) converts the groups not converted yet.
  -- The events and what is derived from them, with the subjects:
  IF NOT metering._distributed() THEN
    -- (the dedup key names the distribution column)
    PERFORM metering._distribute_prepare('events', 'subject, source, id', ARRAY['events', 'meter_rollups', 'usage_periods'], 'subject');
    PERFORM metering._distribute_prepare(NULL, NULL, ARRAY['subjects'], 'key');
    PERFORM metering._distribute_everywhere(
      'ALTER POLICY subject_access_own ON metering.subject_access USING ('
      'metering._visible_subjects_once(current_user) IS NULL OR metering._role_is_mine(role_name))');
    -- row security on the workers reads who may see which subjects
    PERFORM metering._distribute_reference('subjects', ARRAY['subject_access', 'subjects']);
    EXECUTE 'SELECT create_distributed_table(''metering.events'', ''subject'', shard_count => $1)' USING shard_count;
    EXECUTE 'SELECT create_distributed_table(''metering.meter_rollups'', ''subject'', colocate_with => ''metering.events'')';
    EXECUTE 'SELECT create_distributed_table(''metering.usage_periods'', ''subject'', colocate_with => ''metering.events'')';
  END IF;

  -- AWS Marketplace: a customer's usage records and registrations beside its
  -- events; the products and customers on every node (the registration
  -- token is unique across customers, which no distributed table can check)
  EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = ''metering.usage_records''::regclass)'
    INTO done;
  IF NOT done THEN
    PERFORM metering._distribute_prepare('usage_records', 'customer_identifier, metering_record_id',
                                         ARRAY['customers', 'usage_records', 'registrations'], 'customer_identifier');
    PERFORM metering._distribute_reference('products', ARRAY['products', 'product_dimensions', 'customers']);
    EXECUTE 'SELECT create_distributed_table(''metering.usage_records'', ''customer_identifier'', colocate_with => ''metering.events'')';
    EXECUTE 'SELECT create_distributed_table(''metering.registrations'', ''customer_identifier'', colocate_with => ''metering.events'')';
  END IF;

  -- the entitlements and what is theirs: their keys first (see _distribute_entitlements)
  EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = ''metering.entitlements''::regclass)'
    INTO done;
  IF NOT done THEN
    PERFORM metering._distribute_entitlements(false);
  END IF;

  -- again on every call: the configuration onto every node, a worker added since too
  PERFORM metering._config_distribute();

  IF NOT done THEN
    PERFORM metering._distribute_entitlements(true);
  END IF;
  -- Citus copied the rows of a database that had some into the shards and
  -- left them in the coordinator's tables too, where nothing reads them any
  -- more: they go, without the events' TRUNCATE trigger, which would empty
  -- what is derived from them (now on the workers)
  FOREACH tab IN ARRAY ARRAY['events', 'meter_rollups', 'usage_periods', 'subjects', 'subject_access',
                             'products', 'product_dimensions', 'customers', 'usage_records', 'registrations',
                             'entitlements', 'grants', 'resets', 'entitlement_snapshots', 'entitlement_snapshot_queue',
                             'reservations', 'entitlement_turns', 'notification_events'] LOOP
    IF pg_relation_size(('metering.' || tab)::regclass) > 0 THEN
      PERFORM set_config('session_replication_role', 'replica', true);
      EXECUTE 'SELECT truncate_local_data_after_distributing_table($1)' USING ('metering.' || tab)::regclass;
    END IF;
  END LOOP;
  PERFORM set_config('session_replication_role', 'origin', true);
END $$;
COMMENT ON FUNCTION metering.distribute(integer) IS
  'on a Citus coordinator with workers: distributes the per-subject tables by subject (co-located: events, rollups, usage periods, entitlements, grants, resets, snapshots, holds, turns, notifications, AWS usage records and registrations) and replicates subjects, AWS products and customers and the configuration copies; idempotent, and converts what an update added; 55000 without Citus or workers';
REVOKE ALL ON FUNCTION metering.distribute(integer) FROM PUBLIC;
