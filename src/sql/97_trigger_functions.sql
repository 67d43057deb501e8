-- No role but the owner may attach the extension's trigger functions to a
-- table.  Those that run as the owner (SECURITY DEFINER) trust what the
-- trigger hands them: attached to a table of a role's own, whose rows it
-- chooses (a NEW TABLE of made-up events of other subjects), one would take
-- other subjects' turns, spend their alerts' headroom or drop a meter's
-- rollups with the owner's rights.  CREATE TRIGGER needs EXECUTE on the
-- function; firing a trigger does not, so the owner-run ones also refuse a
-- table outside schema metering, where no role but the owner may create one
-- (metering._require_own_table; the events' by oid): a trigger a role
-- attached before this release does nothing.  Runs last, and again by each
-- update, so that it reaches every trigger function; setup_roles() calls it
-- again after granting metering_admin the schema's functions.
CREATE OR REPLACE FUNCTION metering._revoke_trigger_functions() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  f record;
BEGIN
  -- (from every grantee: PUBLIC, and the roles 0.2.0's setup_roles() or a
  -- default privilege granted every function of the schema)
  FOR f IN SELECT p.oid::regprocedure AS fn, a.grantee
             FROM pg_proc p, LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
            WHERE p.pronamespace = 'metering'::regnamespace AND p.prorettype = 'trigger'::regtype
              AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', f.fn,
                   CASE WHEN f.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(f.grantee)) END);
  END LOOP;
END $$;
COMMENT ON FUNCTION metering._revoke_trigger_functions() IS
  'internal: takes EXECUTE on the trigger functions of schema metering from every role but their owner';
REVOKE EXECUTE ON FUNCTION metering._revoke_trigger_functions() FROM PUBLIC;
SELECT metering._revoke_trigger_functions();
