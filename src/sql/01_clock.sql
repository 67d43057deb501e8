-- The clock and identifiers every other part uses.

CREATE FUNCTION metering.now() RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_now'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering.now() IS
  'the extension''s present: the setting metering.now when set (by a superuser or the extension owner), else the start of the current transaction (in a database with Citus, of its distributed transaction: the same on every node)';

CREATE FUNCTION metering.uuid_v7() RETURNS uuid
  AS 'MODULE_PATHNAME', 'metering_uuid_v7'
  LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION metering.uuid_v7() IS
  'a new time-ordered uuid (RFC 9562 version 7), monotonic within a backend';

CREATE FUNCTION metering.uuid_v7_time(id uuid) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_uuid_v7_time'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering.uuid_v7_time(uuid) IS
  'the instant, to the millisecond, at which a version 7 uuid was made';

CREATE FUNCTION metering._valid_time_zone(zone text) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_valid_time_zone'
  LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._valid_time_zone(text) IS
  'internal: whether date_trunc and AT TIME ZONE accept this time zone name';

-- A row that carries its own created_at (not metering.now()) is a restored
-- one: pg_restore, a migration.  It skips the rules for new rows (it was
-- checked when it was made) and keeps its place in time (a grant's burn
-- order), so only who may move the clock brings it: a superuser, the
-- extension owner, or a session in which one of them turned on
-- metering.allow_backdated_rules.  True for a restored row, false for a
-- new one; 22023 for a restored row from anyone else.
CREATE FUNCTION metering._restored(what text, created_at timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF created_at IS NOT DISTINCT FROM metering.now() THEN
    RETURN false;
  END IF;
  IF coalesce(current_setting('metering.allow_backdated_rules', true), 'off')::boolean
     OR coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user), false)
     OR pg_catalog.pg_has_role(current_user,
          (SELECT x.extowner FROM pg_catalog.pg_extension x WHERE x.extname = 'metering'), 'USAGE') THEN
    RETURN true;
  END IF;
  RAISE EXCEPTION '%: created_at (%) is not now: only a restore brings rows made earlier', what, created_at
    USING ERRCODE = 'invalid_parameter_value',
          HINT = 'Leave created_at to its default; a superuser, the extension owner or metering.allow_backdated_rules may restore.';
END $$;
COMMENT ON FUNCTION metering._restored(text, timestamptz) IS
  'internal: whether a row is restored (created_at is not now); 22023 unless a superuser, the extension owner or metering.allow_backdated_rules brings it';
