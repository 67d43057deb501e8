-- The configuration on every node (distributed mode, 80_distribute.sql).
-- The coordinator's configuration tables stay plain tables, written and
-- checked there as on one node (their triggers, cascades and fresh ids run
-- once).  Each change is copied, row by row as the coordinator stored it,
-- into metering.config_copies, a reference table once distributed, in the
-- transaction that made it; the copy of that table on each worker writes
-- the row into the worker's own table of the same name.  A worker then
-- rates with the coordinator's rules, and a change reaches every node or
-- none.  Copied: the rating rules, which the workers rate with, and the
-- meters, features, prices and alert rules, which every node holds for the
-- work that runs where a subject's rows are.

CREATE TABLE metering.config_copies (
  tab name NOT NULL,
  key jsonb NOT NULL,
  "row" jsonb NOT NULL,
  PRIMARY KEY (tab, key)
);
COMMENT ON TABLE metering.config_copies IS
  'derived: (distributed mode) the coordinator''s configuration rows, which every worker copies into its own tables; written by the configuration tables'' triggers and metering.distribute(), never by hand';
COMMENT ON COLUMN metering.config_copies.tab IS 'the configuration table, in schema metering';
COMMENT ON COLUMN metering.config_copies.key IS 'the row''s primary key, as a JSON object of its columns';
COMMENT ON COLUMN metering.config_copies."row" IS 'the row as the coordinator stored it (to_jsonb)';
REVOKE ALL ON metering.config_copies FROM PUBLIC;

-- the tables copied, and their primary keys
CREATE FUNCTION metering._config_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
RETURN ARRAY['meters', 'features', 'prices', 'notification_rules',
             'hashmap_services', 'hashmap_fields', 'hashmap_groups', 'hashmap_mappings', 'hashmap_thresholds'];
COMMENT ON FUNCTION metering._config_tables() IS
  'internal (distributed mode): the configuration tables whose rows every node holds';

CREATE FUNCTION metering._config_key(tab text) RETURNS text[]
LANGUAGE sql STABLE STRICT SET search_path = pg_catalog, pg_temp
RETURN (SELECT array_agg(a.attname::text ORDER BY k.n)
          FROM pg_catalog.pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = pg_catalog.to_regclass('metering.' || pg_catalog.quote_ident(_config_key.tab)) AND i.indisprimary);
COMMENT ON FUNCTION metering._config_key(text) IS
  'internal (distributed mode): the primary key columns of a configuration table';

-- On the coordinator (created by distribute()): the rows a statement
-- changed, copied into config_copies as they are when it ends (not as the
-- transition tables have them: a later part of the same query, a row
-- trigger of a writable CTE, may have changed them again).  Owner-run:
-- whoever may write the rules may not write config_copies.
CREATE FUNCTION metering._config_copy() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  keys text[];
  key_sql text := '(SELECT pg_catalog.jsonb_object_agg(k, pg_catalog.to_jsonb(r) -> k) FROM pg_catalog.unnest($1) k)';
  old_keys jsonb[];
  new_keys jsonb[];
  gone jsonb[];
  here_keys jsonb[];
  here_rows jsonb[];
BEGIN
  -- only on the tables distribute() puts it on
  IF NOT (TG_TABLE_NAME = ANY (metering._config_tables()))
     OR TG_RELID IS DISTINCT FROM pg_catalog.to_regclass('metering.' || pg_catalog.quote_ident(TG_TABLE_NAME)) THEN
    RAISE EXCEPTION 'metering._config_copy() copies the configuration tables of metering only'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  keys := metering._config_key(TG_TABLE_NAME);
  IF TG_OP = 'TRUNCATE' THEN
    DELETE FROM metering.config_copies WHERE tab = TG_TABLE_NAME;
    RETURN NULL;
  END IF;
  IF TG_OP <> 'INSERT' THEN
    EXECUTE 'SELECT pg_catalog.array_agg(' || key_sql || ') FROM old_rows r' INTO old_keys USING keys;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    EXECUTE 'SELECT pg_catalog.array_agg(' || key_sql || ') FROM new_rows r' INTO new_keys USING keys;
  END IF;
  -- each key's row now, or none
  EXECUTE format('SELECT pg_catalog.array_agg(u.k) FILTER (WHERE t.%1$I IS NULL), '
                 'pg_catalog.array_agg(u.k) FILTER (WHERE t.%1$I IS NOT NULL), '
                 'pg_catalog.array_agg(pg_catalog.to_jsonb(t)) FILTER (WHERE t.%1$I IS NOT NULL) '
                 'FROM (SELECT DISTINCT x.k FROM pg_catalog.unnest($1) x(k)) u '
                 'CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::metering.%2$I, u.k) k '
                 'LEFT JOIN metering.%2$I t ON %3$s',
                 keys[1], TG_TABLE_NAME, (SELECT string_agg(format('t.%I = k.%I', c, c), ' AND ') FROM unnest(keys) c))
    INTO gone, here_keys, here_rows USING coalesce(old_keys, '{}') || coalesce(new_keys, '{}');
  IF gone IS NOT NULL THEN
    DELETE FROM metering.config_copies WHERE tab = TG_TABLE_NAME AND key = ANY (gone);
  END IF;
  IF here_keys IS NOT NULL THEN
    INSERT INTO metering.config_copies AS c (tab, key, "row")
    SELECT TG_TABLE_NAME, u.k, u.r FROM unnest(here_keys, here_rows) AS u(k, r)
    ON CONFLICT (tab, key) DO UPDATE SET "row" = excluded."row";
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._config_copy() IS
  'internal (distributed mode): copies a statement''s changes to a configuration table of the coordinator into config_copies';
REVOKE EXECUTE ON FUNCTION metering._config_copy() FROM PUBLIC;

-- Writes one row of config_copies into this node's table (row NULL:
-- removes the key's; key NULL too: every row).  The rows were checked
-- where they were written: the node's own triggers stay quiet (replica),
-- but for those that are ENABLE ALWAYS, the caches' invalidation.
CREATE FUNCTION metering._config_write(tab text, key jsonb, "row" jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  keys text[];
  role text := pg_catalog.current_setting('session_replication_role');
BEGIN
  IF NOT (tab = ANY (metering._config_tables())) THEN
    RAISE EXCEPTION 'config_copies: "%" is not a configuration table', tab USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM pg_catalog.set_config('session_replication_role', 'replica', true);
  IF key IS NULL THEN
    EXECUTE format('DELETE FROM metering.%I', tab);
  ELSE
    keys := metering._config_key(tab);
    EXECUTE format('DELETE FROM metering.%I t USING pg_catalog.jsonb_populate_record(NULL::metering.%I, $1) k WHERE %s',
                   tab, tab, (SELECT string_agg(format('t.%I = k.%I', c, c), ' AND ') FROM unnest(keys) c))
      USING key;
  END IF;
  IF "row" IS NOT NULL THEN
    EXECUTE format('INSERT INTO metering.%I SELECT * FROM pg_catalog.jsonb_populate_record(NULL::metering.%I, $1)', tab, tab)
      USING "row";
  END IF;
  PERFORM pg_catalog.set_config('session_replication_role', role, true);
END $$;
COMMENT ON FUNCTION metering._config_write(text, jsonb, jsonb) IS
  'internal (distributed mode): writes a row of the coordinator''s configuration into this node''s table, or removes it';
REVOKE EXECUTE ON FUNCTION metering._config_write(text, jsonb, jsonb) FROM PUBLIC;

-- On every copy of config_copies: a worker writes what changed into its own
-- table (the coordinator's tables are where the rows come from); emptied,
-- it empties them.
CREATE FUNCTION metering._config_apply() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t text;
BEGIN
  PERFORM metering._require_own_table(TG_TABLE_SCHEMA, TG_NAME);
  IF NOT metering._on_worker() THEN
    RETURN NULL;
  END IF;
  IF TG_OP = 'TRUNCATE' THEN
    FOREACH t IN ARRAY metering._config_tables() LOOP
      PERFORM metering._config_write(t, NULL, NULL);
    END LOOP;
  ELSIF coalesce(NEW.tab, OLD.tab) = '_readers' THEN
    -- who may read a copied table (_config_grants; a row is never deleted
    -- but with all of them, above); Citus hands the warning to the
    -- coordinator's client
    IF TG_OP <> 'DELETE'
       AND metering._config_readers(NEW.key ->> 'tab', ARRAY(SELECT pg_catalog.jsonb_array_elements_text(NEW."row"))) > 0 THEN
      RAISE WARNING 'a role that may read metering.% on the coordinator is not on this worker, so it cannot read it here', NEW.key ->> 'tab'
        USING HINT = 'Make roles through the coordinator with Citus''s propagation of roles on (it makes them on every node), or on each worker, and run SELECT metering.setup_roles() again.';
    END IF;
  ELSIF TG_OP = 'DELETE' THEN
    PERFORM metering._config_write(OLD.tab, OLD.key, NULL);
  ELSE
    IF TG_OP = 'UPDATE' AND (OLD.tab, OLD.key) IS DISTINCT FROM (NEW.tab, NEW.key) THEN
      PERFORM metering._config_write(OLD.tab, OLD.key, NULL);
    END IF;
    PERFORM metering._config_write(NEW.tab, NEW.key, NEW."row");
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._config_apply() IS
  'internal (distributed mode): on a worker, writes a changed row of config_copies into the node''s own table';
REVOKE EXECUTE ON FUNCTION metering._config_apply() FROM PUBLIC;
CREATE TRIGGER config_copies_apply AFTER INSERT OR UPDATE OR DELETE ON metering.config_copies
  FOR EACH ROW EXECUTE FUNCTION metering._config_apply();
CREATE TRIGGER config_copies_emptied AFTER TRUNCATE ON metering.config_copies
  FOR EACH STATEMENT EXECUTE FUNCTION metering._config_apply();

-- What reads configuration on a worker first checks that the node holds
-- it as the coordinator does: the same rows, value for value, as its copy
-- of config_copies (a worker added after distributing holds none until
-- distribute() runs again: Citus copies config_copies to it, but without
-- writing the rows into its tables).  It reads this node's copy of
-- config_copies itself: a query of the reference table would be a
-- distributed one, which Citus refuses inside a shard's query.  (Asked
-- when a cache of the rules is made, not for each row.)
CREATE FUNCTION metering._require_config(what text) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t text;
  placement regclass;
  differ boolean;
BEGIN
  IF NOT metering._on_worker() THEN
    RETURN;
  END IF;
  EXECUTE 'SELECT pg_catalog.to_regclass(pg_catalog.shard_name(''metering.config_copies''::regclass, s.shardid)) '
          'FROM pg_catalog.pg_dist_shard s WHERE s.logicalrelid = ''metering.config_copies''::regclass'
    INTO placement;
  FOREACH t IN ARRAY metering._config_tables() LOOP
    IF placement IS NULL THEN
      differ := true;
    ELSE
      -- (compared as text: a jsonpath has no equality)
      EXECUTE format('WITH here AS (SELECT h::text AS r FROM metering.%1$I h), '
                     'there AS (SELECT r::text AS r FROM %2$s c, pg_catalog.jsonb_populate_record(NULL::metering.%1$I, c."row") r WHERE c.tab = $1) '
                     'SELECT EXISTS (SELECT * FROM here EXCEPT ALL SELECT * FROM there) '
                     '    OR EXISTS (SELECT * FROM there EXCEPT ALL SELECT * FROM here)', t, placement)
        INTO differ USING t;
    END IF;
    IF differ THEN
      RAISE EXCEPTION '% on this worker: its copy of metering.% is not the coordinator''s', what, t
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'Run SELECT metering.distribute() on the coordinator: it copies the configuration to every worker again.';
    END IF;
  END LOOP;
END $$;
COMMENT ON FUNCTION metering._require_config(text) IS
  'internal (distributed mode): 55000 on a worker whose copy of the configuration tables is not complete';

-- distribute()'s part (first and every later call): config_copies a
-- reference table, the coordinator's configuration tables copying their
-- changes into it, and its rows, with every worker's tables, made again
-- from the coordinator's
CREATE FUNCTION metering._config_distribute() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t text;
BEGIN
  -- the copies are made from the rows as they are: no older snapshot, and
  -- no writer meanwhile (until this transaction ends)
  IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'distribute: run it at READ COMMITTED (it copies the configuration as it is), not %',
      pg_catalog.current_setting('transaction_isolation')
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  FOREACH t IN ARRAY metering._config_tables() LOOP
    EXECUTE format('LOCK TABLE metering.%I IN SHARE ROW EXCLUSIVE MODE', t);
  END LOOP;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = 'metering.config_copies'::regclass) THEN
    PERFORM create_reference_table('metering.config_copies');
  END IF;
  -- (a worker added since has the other reference tables only once asked)
  PERFORM replicate_reference_tables();
  FOREACH t IN ARRAY metering._config_tables() LOOP
    EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER INSERT ON metering.%I REFERENCING NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION metering._config_copy()', t || '_copy_insert', t);
    EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER UPDATE ON metering.%I REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION metering._config_copy()', t || '_copy_update', t);
    EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER DELETE ON metering.%I REFERENCING OLD TABLE AS old_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION metering._config_copy()', t || '_copy_delete', t);
    EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER TRUNCATE ON metering.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION metering._config_copy()', t || '_copy_truncate', t);
    -- (also what a replica-mode session writes, a logical replication into the coordinator)
    EXECUTE format('ALTER TABLE metering.%I ENABLE ALWAYS TRIGGER %I, ENABLE ALWAYS TRIGGER %I, '
                   'ENABLE ALWAYS TRIGGER %I, ENABLE ALWAYS TRIGGER %I',
                   t, t || '_copy_insert', t || '_copy_update', t || '_copy_delete', t || '_copy_truncate');
  END LOOP;
  -- every node's copies made again, in this transaction: emptied (which
  -- empties each worker's tables), then every row (which each writes)
  TRUNCATE metering.config_copies;
  FOREACH t IN ARRAY metering._config_tables() LOOP
    EXECUTE format('INSERT INTO metering.config_copies (tab, key, "row") '
                   'SELECT $1, (SELECT pg_catalog.jsonb_object_agg(k, pg_catalog.to_jsonb(r) -> k) FROM pg_catalog.unnest($2) k), '
                   'pg_catalog.to_jsonb(r) FROM metering.%I r', t)
      USING t, metering._config_key(t);
  END LOOP;
  PERFORM metering._config_grants();
END $$;
COMMENT ON FUNCTION metering._config_distribute() IS
  'internal (distributed mode): puts the configuration on every node and keeps it there (distribute() calls it)';
REVOKE EXECUTE ON FUNCTION metering._config_distribute() FROM PUBLIC;

-- Who may read the copied tables on a worker: who may read them on the
-- coordinator (Citus does not carry grants on plain tables to the
-- workers); nobody may write them there.  distribute() and setup_roles()
-- write the readers into config_copies (tab '_readers'); a grant made by
-- hand reaches the workers at their next call.
CREATE FUNCTION metering._config_readers(tab text, readers text[]) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r text;
  missing integer := 0;
BEGIN
  IF NOT (tab = ANY (metering._config_tables())) THEN
    RAISE EXCEPTION 'config_copies: "%" is not a configuration table', tab USING ERRCODE = 'invalid_parameter_value';
  END IF;
  EXECUTE format('REVOKE ALL ON metering.%I FROM PUBLIC', tab);
  FOR r IN SELECT g.rolname FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
             JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
            WHERE c.oid = pg_catalog.to_regclass('metering.' || pg_catalog.quote_ident(tab)) AND a.grantee <> c.relowner LOOP
    EXECUTE format('REVOKE ALL ON metering.%I FROM %I', tab, r);
  END LOOP;
  FOREACH r IN ARRAY readers LOOP
    IF r = 'PUBLIC' THEN
      EXECUTE format('GRANT SELECT ON metering.%I TO PUBLIC', tab);
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.pg_roles g WHERE g.rolname = r) THEN
      EXECUTE format('GRANT SELECT ON metering.%I TO %I', tab, r);
    ELSE
      missing := missing + 1;
    END IF;
  END LOOP;
  RETURN missing;
END $$;
COMMENT ON FUNCTION metering._config_readers(text, text[]) IS
  'internal (distributed mode): on a worker, lets exactly these roles read its copy of a configuration table; returns how many of them the node does not know';
REVOKE EXECUTE ON FUNCTION metering._config_readers(text, text[]) FROM PUBLIC;

CREATE FUNCTION metering._config_grants() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT metering._distributed() OR metering._on_worker() THEN
    RETURN;
  END IF;
  -- through config_copies, in this transaction: each worker grants when the
  -- row reaches it, and sees a role this transaction made (Citus makes it
  -- on every node in the same transaction), which a session of its own
  -- would not until the commit
  INSERT INTO metering.config_copies AS c (tab, key, "row")
  SELECT '_readers', pg_catalog.jsonb_build_object('tab', t),
         pg_catalog.to_jsonb(ARRAY(
           SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE g.rolname::text END
             FROM pg_catalog.pg_class r CROSS JOIN LATERAL pg_catalog.aclexplode(r.relacl) a
             LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
            WHERE r.oid = pg_catalog.to_regclass('metering.' || pg_catalog.quote_ident(t))
              AND a.privilege_type = 'SELECT' AND a.grantee <> r.relowner
            ORDER BY 1))
    FROM pg_catalog.unnest(metering._config_tables()) t
  ON CONFLICT (tab, key) DO UPDATE SET "row" = excluded."row";
END $$;
COMMENT ON FUNCTION metering._config_grants() IS
  'internal (distributed mode): gives each worker''s copies of the configuration tables the coordinator''s readers';
REVOKE EXECUTE ON FUNCTION metering._config_grants() FROM PUBLIC;
