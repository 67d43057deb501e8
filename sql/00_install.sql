-- The extension installs with a plain CREATE EXTENSION (pg_regress ran it
-- with --load-extension), and this is everything it owns.  A change to the
-- object list shows up here; later versions walk the upgrade path from it.
\dx metering
\dx+ metering

-- every object has a comment
SELECT classid::regclass AS catalog, pg_describe_object(classid, objid, 0) AS object
  FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'metering')
   AND deptype = 'e'
   AND obj_description(objid, classid::regclass::name) IS NULL
 ORDER BY 2;
-- and every table and view column
SELECT c.relname, a.attname
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
 WHERE c.relnamespace = 'metering'::regnamespace AND c.relkind IN ('r', 'v')
   AND a.attnum > 0 AND NOT a.attisdropped
   AND col_description(c.oid, a.attnum) IS NULL
 ORDER BY 1, 2;

-- and every trigger, constraint and index
SELECT 'trigger' AS kind, tgname AS name FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'metering'::regnamespace AND NOT t.tgisinternal AND obj_description(t.oid, 'pg_trigger') IS NULL
UNION ALL
SELECT 'constraint', conname FROM pg_constraint
 WHERE connamespace = 'metering'::regnamespace AND obj_description(oid, 'pg_constraint') IS NULL
UNION ALL
SELECT 'index', relname FROM pg_class
 WHERE relnamespace = 'metering'::regnamespace AND relkind = 'i' AND obj_description(oid, 'pg_class') IS NULL;
SELECT obj_description('metering.events_seq_time_brin'::regclass, 'pg_class') AS an_index_comment;

-- pg_dump keeps the rows of every user table
SELECT d AS dumped FROM pg_extension, unnest(extconfig::regclass[]) d WHERE extname = 'metering' ORDER BY d::text;
-- every table is dumped or is derived (its comment says so, and the
-- extension rebuilds it)
SELECT c.oid::regclass AS neither_dumped_nor_derived
  FROM pg_class c
 WHERE c.relnamespace = 'metering'::regnamespace AND c.relkind IN ('r', 'S')
   AND c.oid <> ALL ((SELECT extconfig FROM pg_extension WHERE extname = 'metering')::oid[])
   AND coalesce(obj_description(c.oid, 'pg_class'), '') NOT LIKE 'derived:%';

-- the extension is not relocatable and lives in its own schema
SELECT extrelocatable, extnamespace::regnamespace, extversion FROM pg_extension WHERE extname = 'metering';

-- Test helpers for the other files (they share this database).
CREATE SCHEMA regress;
-- runs a statement and shows its SQLSTATE and message instead of failing
CREATE FUNCTION regress.err(statement text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE statement;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
-- empties every table of the extension
CREATE FUNCTION regress.reset() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  TRUNCATE metering.events, metering.meter_rollups, metering.meter_rollup_state, metering.meters,
           metering.usage_records, metering.registrations, metering.customers,
           metering.product_dimensions, metering.products, metering.signing_keys,
           metering.features, metering.entitlements, metering.grants, metering.resets,
           metering.entitlement_snapshots, metering.entitlement_snapshot_queue,
           metering.hashmap_mappings, metering.hashmap_thresholds, metering.hashmap_fields,
           metering.hashmap_services, metering.hashmap_groups, metering.subjects, metering.prices,
           metering.reservations, metering.entitlement_turns, metering.notification_events,
           metering.notification_rules;
END $$;
-- a CloudEvents object
CREATE FUNCTION regress.ev(id text, subject text, type text, "time" text, data jsonb DEFAULT '{}',
                           source text DEFAULT 'test')
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('specversion', '1.0', 'id', id, 'source', source, 'subject', subject,
                            'type', type, 'time', "time", 'data', data)
$$;
