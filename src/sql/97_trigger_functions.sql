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
-- update, so that it reaches every trigger function; setup_roles() keeps
-- them from metering_admin.
DO $$
DECLARE
  f record;
BEGIN
  -- (from every grantee: PUBLIC, and the roles 0.2.0's setup_roles() or a
  -- default privilege granted every function of the schema)
  FOR f IN SELECT p.oid::pg_catalog.regprocedure AS fn, a.grantee
             FROM pg_catalog.pg_proc p,
                  LATERAL pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
            WHERE p.pronamespace = 'metering'::regnamespace AND p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype
              AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner LOOP
    EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM %s', f.fn,
      CASE WHEN f.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(f.grantee)) END);
  END LOOP;
END $$;
