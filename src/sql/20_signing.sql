-- Per-database signing secrets (JWTs of register_usage, signed cursors).

CREATE TABLE metering.signing_keys (
  version    integer PRIMARY KEY CHECK (version >= 1),
  secret     bytea NOT NULL CHECK (octet_length(secret) >= 32),
  created_at timestamptz NOT NULL DEFAULT metering.now()
);
REVOKE ALL ON metering.signing_keys FROM PUBLIC;
COMMENT ON TABLE metering.signing_keys IS
  'HMAC-SHA256 secrets of this database, by version; the highest version is current; made on first use, rotated with metering.rotate_signing_key()';
COMMENT ON COLUMN metering.signing_keys.version IS 'key version (AWS PublicKeyVersion), from 1';
COMMENT ON COLUMN metering.signing_keys.secret IS 'the secret, at least 32 random bytes';
COMMENT ON COLUMN metering.signing_keys.created_at IS 'when the key was made: the rotation instant of the key before it';

CREATE FUNCTION metering._hmac_sha256(message text, key bytea) RETURNS bytea
  AS 'MODULE_PATHNAME', 'metering_hmac_sha256'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._hmac_sha256(text, bytea) IS 'internal: HMAC-SHA256 of a message';

CREATE FUNCTION metering._base64url(data bytea) RETURNS text
  AS 'MODULE_PATHNAME', 'metering_base64url'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._base64url(bytea) IS 'internal: base64url without padding';

CREATE FUNCTION metering._jwt_hs256(header text, claims text, secret bytea) RETURNS text
  AS 'MODULE_PATHNAME', 'metering_jwt_hs256'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._jwt_hs256(text, text, bytea) IS 'internal: a compact HS256 JWT over the given JSON header and claims';

CREATE FUNCTION metering._random_bytes(n integer) RETURNS bytea
  AS 'MODULE_PATHNAME', 'metering_random_bytes'
  LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._random_bytes(integer) IS 'internal: bytes from the server''s strong random source';

CREATE FUNCTION metering._rfc3339(value text) RETURNS timestamptz
  AS 'MODULE_PATHNAME', 'metering_rfc3339'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._rfc3339(text) IS 'internal: an RFC 3339 date-time, or NULL when the text is not one';

-- The current key, made on first use rather than at CREATE EXTENSION, so
-- that a restored dump brings back the same secret instead of clashing
-- with a new one.
CREATE FUNCTION metering._current_signing_key() RETURNS metering.signing_keys
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  k metering.signing_keys;
BEGIN
  SELECT * INTO k FROM metering.signing_keys ORDER BY version DESC LIMIT 1;
  IF NOT FOUND THEN
    INSERT INTO metering.signing_keys (version, secret)
    VALUES (1, metering._random_bytes(32))
    ON CONFLICT (version) DO NOTHING;
    SELECT * INTO STRICT k FROM metering.signing_keys ORDER BY version DESC LIMIT 1;
  END IF;
  RETURN k;
END $$;
COMMENT ON FUNCTION metering._current_signing_key() IS 'internal: the current signing key, made on first use';
REVOKE EXECUTE ON FUNCTION metering._current_signing_key() FROM PUBLIC;

CREATE FUNCTION metering.rotate_signing_key() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v integer;
BEGIN
  LOCK TABLE metering.signing_keys IN SHARE ROW EXCLUSIVE MODE;
  v := (metering._current_signing_key()).version + 1;
  INSERT INTO metering.signing_keys (version, secret) VALUES (v, metering._random_bytes(32));
  RETURN v;
END $$;
COMMENT ON FUNCTION metering.rotate_signing_key() IS
  'makes a new current signing key and returns its version; older versions keep verifying';
