-- metering: usage metering, entitlements, credit grants and rating.
\echo Use "CREATE EXTENSION metering" to load this file. \quit

COMMENT ON SCHEMA metering IS
  'usage metering, entitlements, credit grants and rating (the metering extension)';

-- Internal helpers (names starting with _) are not part of the public
-- surface; nobody but the extension owner may run them.

-- The owner-run trigger functions act only on the extension's own tables:
-- schema metering, where no role but the owner may create one.  Attached
-- to a table of a role's own, they would act with the owner's rights on
-- rows that role chose (97_trigger_functions.sql keeps roles from
-- attaching them; this refuses a trigger attached before it did).
CREATE FUNCTION metering._require_own_table(table_schema name, trigger_name name) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF table_schema <> 'metering' THEN
    RAISE EXCEPTION 'trigger "%" runs an internal function of metering on a table outside schema metering', trigger_name
      USING ERRCODE = 'insufficient_privilege';
  END IF;
END $$;
COMMENT ON FUNCTION metering._require_own_table(name, name) IS
  'internal: 42501 when an owner-run trigger function fires on a table outside schema metering';
