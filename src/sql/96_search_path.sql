-- No function of the extension reaches an object by the caller's
-- search_path (the lesson of CVE-2018-1058 and CVE-2020-14350): a schema
-- that comes first in it, or PUBLIC's CREATE on public, must not let a
-- role's own function, operator or type stand in for a built-in inside our
-- code, least of all when a superuser or the owner runs it.
--
--   * SQL functions are written with SQL-standard bodies (RETURN or BEGIN
--     ATOMIC): they are parsed once, here, and keep the objects they named.
--   * plpgsql functions say SET search_path = pg_catalog, pg_temp where they
--     are defined (functions are never looked up in pg_temp), so their
--     bodies and dynamic SQL resolve in pg_catalog and in metering (which
--     every body names explicitly); C functions that run SQL get the same
--     setting here, and so would any function defined without it.
--   * Except the C functions below, which run no SQL (or pin the path
--     themselves, as the rating cache does) and are called once per row,
--     where a SET clause would cost: they stay as they are.
-- This file runs last, so it reaches every function; run again by each
-- upgrade.
DO $$
DECLARE
  f record;
  runs_no_sql constant text[] := ARRAY[
    'now', 'uuid_v7', 'uuid_v7_time', '_valid_time_zone', '_meter_number', '_meter_text',
    '_meter_groups', '_meter_path_problem', '_parse_events', '_hmac_sha256', '_base64url',
    '_jwt_hs256', '_random_bytes', '_rfc3339', '_usage_max_age', '_note_created', '_created_here', '_outer_role',
    'calendar_step', '_calendar_index', '_minute', '_time_in_range', '_interval_at_least', 'rollover',
    '_burndown_trans', '_burndown_final', 'rate', 'rate_explain', '_rated_total_trans',
    '_hashmap_invalidate', '_price_fee'];
BEGIN
  FOR f IN SELECT p.oid::regprocedure AS fn, l.lanname, p.proname, p.prosqlbody IS NOT NULL AS parsed
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
            WHERE p.pronamespace = 'metering'::regnamespace AND p.prokind IN ('f', 'p')
              AND NOT coalesce(p.proconfig, '{}') @> ARRAY['search_path=pg_catalog, pg_temp'] LOOP
    IF f.lanname = 'sql' AND f.parsed THEN
      CONTINUE;
    END IF;
    IF f.lanname = 'c' AND f.proname = ANY (runs_no_sql) THEN
      CONTINUE;
    END IF;
    IF f.lanname = 'c' OR f.lanname = 'plpgsql' OR f.lanname = 'sql' THEN
      EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f.fn);
    ELSE
      RAISE EXCEPTION 'function % is in language %: pin its search_path by hand', f.fn, f.lanname;
    END IF;
  END LOOP;
END $$;
