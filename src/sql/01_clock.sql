-- The clock and identifiers every other part uses.

CREATE FUNCTION metering.now() RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_now'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering.now() IS
  'the extension''s present: the setting metering.now when set (by a superuser or the extension owner), else the start of the current transaction';

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
