-- AWS Marketplace: ResolveCustomer and RegisterUsage.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 12:00:00+00';

INSERT INTO metering.products (product_code, name) VALUES ('prod-1', 'Widget'), ('prod-2', 'Gadget');
INSERT INTO metering.customers (customer_identifier, product_code, customer_aws_account_id,
                                subscribed_at, unsubscribed_at, registration_token, registration_token_expires_at)
VALUES ('cust-a', 'prod-1', '111122223333', '2024-01-01', NULL, 'token-a', '2024-06-02'),
       ('cust-b', 'prod-1', '444455556666', '2024-01-01', '2024-05-01', 'token-b', '2024-06-01 12:00:00'),
       ('cust-c', 'prod-2', '777788889999', '2024-07-01', NULL, 'token-c', NULL);

-- ResolveCustomer: a token is good once, until it expires
SELECT * FROM metering.resolve_customer('token-a');
SELECT regress.err($$SELECT * FROM metering.resolve_customer('token-a')$$);
SELECT regress.err($$SELECT * FROM metering.resolve_customer('token-b')$$);
SELECT regress.err($$SELECT * FROM metering.resolve_customer('no-such-token')$$);
SELECT regress.err($$SELECT * FROM metering.resolve_customer(NULL)$$);
SELECT * FROM metering.resolve_customer('token-c');
SELECT customer_identifier, registration_token_used_at FROM metering.customers ORDER BY 1;

-- RegisterUsage: a JWT any library verifies, signed with the per-database secret
CREATE FUNCTION regress.jwt_part(jwt text, n integer) RETURNS jsonb LANGUAGE sql AS $$
  SELECT convert_from(decode(translate(p, '-_', '+/') || repeat('=', (4 - length(p) % 4) % 4), 'base64'), 'UTF8')::jsonb
    FROM split_part(jwt, '.', n) p
$$;
-- HMAC-SHA256 (RFC 2104) from the built-in sha256(), to check the C code independently
CREATE FUNCTION regress.hmac_sha256(msg bytea, key bytea) RETURNS bytea LANGUAGE plpgsql AS $$
DECLARE
  k bytea := CASE WHEN length(key) > 64 THEN sha256(key) ELSE key END;
  ipad bytea := '\x' || repeat('36', 64);
  opad bytea := '\x' || repeat('5c', 64);
BEGIN
  k := k || ('\x' || repeat('00', 64 - length(k)))::bytea;
  FOR i IN 0 .. 63 LOOP
    ipad := set_byte(ipad, i, get_byte(ipad, i) # get_byte(k, i));
    opad := set_byte(opad, i, get_byte(opad, i) # get_byte(k, i));
  END LOOP;
  RETURN sha256(opad || sha256(ipad || msg));
END $$;
CREATE FUNCTION regress.jwt_verifies(jwt text, secret bytea) RETURNS boolean LANGUAGE sql AS $$
  SELECT split_part(jwt, '.', 3) = rtrim(translate(encode(
           regress.hmac_sha256(convert_to(split_part(jwt, '.', 1) || '.' || split_part(jwt, '.', 2), 'UTF8'), secret),
           'base64'), '+/', '-_'), '=')
$$;
-- RFC 4231 test case 2 checks the checker
SELECT encode(regress.hmac_sha256(convert_to('what do ya want for nothing?', 'UTF8'), convert_to('Jefe', 'UTF8')), 'hex');
SELECT encode(metering._hmac_sha256('what do ya want for nothing?', convert_to('Jefe', 'UTF8')), 'hex');
SELECT r.public_key_rotation_timestamp,
       regress.jwt_part(r.signature, 1) AS header,
       regress.jwt_part(r.signature, 2) AS claims
  FROM metering.register_usage('prod-1', 'cust-a', 1, 'task-1') r;
SELECT regress.jwt_verifies(r.signature, (SELECT secret FROM metering.signing_keys WHERE version = 1)) AS verifies,
       regress.jwt_verifies(r.signature, metering._random_bytes(32)) AS verifies_with_another_key
  FROM metering.register_usage('prod-1', 'cust-a', 1, 'task-2') r;
-- without a nonce the claim is null
SELECT regress.jwt_part(signature, 2) ->> 'nonce' IS NULL AS no_nonce
  FROM metering.register_usage('prod-1', 'cust-a', 1);

-- the subscription is checked at the first call of a nonce only
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', 'cust-b', 1, 'task-9')$$);
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-2', 'cust-c', 1, 'task-9')$$);
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-2', 'cust-a', 1, 'task-9')$$);
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', 'nobody', 1, 'task-9')$$);
UPDATE metering.customers SET unsubscribed_at = '2024-06-01 11:00:00' WHERE customer_identifier = 'cust-a';
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', 'cust-a', 1, 'task-1')$$) AS same_task;
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', 'cust-a', 1, 'task-3')$$) AS new_task;
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', 'cust-a', 1)$$) AS no_nonce;
SELECT product_code, customer_identifier, nonce, public_key_version, calls
  FROM metering.registrations ORDER BY nonce NULLS FIRST;

-- bad arguments
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-x', 'cust-a', 1, 'task-1')$$);
SELECT regress.err($$SELECT * FROM metering.register_usage(NULL, 'cust-a', 1, 'task-1')$$);
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', 'cust-a', 0, 'task-1')$$);
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', 'cust-a', 2, 'task-1')$$);
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', 'cust-a', NULL, 'task-1')$$);
SELECT regress.err($$SELECT * FROM metering.register_usage('prod-1', NULL, 1, 'task-1')$$);
SELECT regress.err(format('SELECT * FROM metering.register_usage(%L, %L, 1, %L)', 'prod-1', 'cust-a', repeat('n', 256)));

-- key rotation: an older version still signs with its own key, and says when it was rotated
SET metering.now = '2024-06-01 13:00:00+00';
SELECT metering.rotate_signing_key();
SELECT r.public_key_rotation_timestamp,
       regress.jwt_part(r.signature, 1) ->> 'kid' AS kid,
       regress.jwt_verifies(r.signature, (SELECT secret FROM metering.signing_keys WHERE version = 1)) AS verifies_v1
  FROM metering.register_usage('prod-1', 'cust-a', 1, 'task-1') r;
SELECT r.public_key_rotation_timestamp,
       regress.jwt_part(r.signature, 1) ->> 'kid' AS kid,
       regress.jwt_verifies(r.signature, (SELECT secret FROM metering.signing_keys WHERE version = 2)) AS verifies_v2
  FROM metering.register_usage('prod-1', 'cust-a', 2, 'task-1') r;
SELECT version, octet_length(secret), created_at FROM metering.signing_keys ORDER BY 1;
