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
