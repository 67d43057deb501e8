-- No role but the owner may attach the extension's trigger functions to a
-- table.  They run as the owner (most are SECURITY DEFINER) and trust what
-- the trigger hands them: attached to a table of a role's own, whose rows
-- it chooses (a NEW TABLE of made-up events of other subjects), one would
-- take other subjects' turns, spend their alerts' headroom or rebuild their
-- rollups with the owner's rights.  CREATE TRIGGER needs EXECUTE on the
-- function; firing the extension's own triggers does not.  (Each also
-- returns at once on any table but its own.)  Runs last, and again by each
-- upgrade, so that it reaches every trigger function; setup_roles() keeps
-- them from metering_admin.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'metering'::regnamespace AND p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype LOOP
    EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$;
