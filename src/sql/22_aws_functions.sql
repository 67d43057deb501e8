-- AWS Marketplace Metering Service calls: ResolveCustomer, RegisterUsage,
-- MeterUsage and BatchMeterUsage.  Errors carry the AWS exception name at
-- the start of the message ("TimestampOutOfBounds: ...").

CREATE FUNCTION metering._aws_error(name text, sqlstate text, message text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RAISE EXCEPTION '%: %', name, message USING ERRCODE = sqlstate;
END $$;
COMMENT ON FUNCTION metering._aws_error(text, text, text) IS
  'internal: raises an error named after an AWS exception';

CREATE FUNCTION metering._aws_check_product(product text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF product IS NULL OR NOT EXISTS (SELECT 1 FROM metering.products p WHERE p.product_code = product) THEN
    PERFORM metering._aws_error('InvalidProductCode', '22023',
      format('product code %s does not exist', coalesce(quote_literal(product), 'NULL')));
  END IF;
END $$;
COMMENT ON FUNCTION metering._aws_check_product(text) IS 'internal: InvalidProductCode unless the product exists';

CREATE FUNCTION metering._aws_check_dimension(product text, dim text, what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF dim IS NULL OR NOT EXISTS (SELECT 1 FROM metering.product_dimensions d
                                 WHERE d.product_code = product AND d.dimension = dim) THEN
    PERFORM metering._aws_error('InvalidUsageDimension', '22023',
      format('%susage dimension %s is not a dimension of product %s', what,
             coalesce(quote_literal(dim), 'NULL'), quote_literal(product)));
  END IF;
END $$;
COMMENT ON FUNCTION metering._aws_check_dimension(text, text, text) IS
  'internal: InvalidUsageDimension unless the product meters the dimension';

-- Timestamps are judged as given (not yet rounded to the hour): not in the
-- future, and not more than max_age in the past, the bound included.
CREATE FUNCTION metering._aws_check_timestamp(ts timestamptz, batch boolean, what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  max_age interval := metering._usage_max_age(batch);
BEGIN
  IF ts > metering.now() THEN
    PERFORM metering._aws_error('TimestampOutOfBounds', '22023',
      format('%stimestamp %s is in the future (now is %s)', what, ts, metering.now()));
  END IF;
  IF ts < metering.now() - max_age THEN
    PERFORM metering._aws_error('TimestampOutOfBounds', '22023',
      format('%stimestamp %s is more than %s in the past (now is %s)', what, ts, max_age, metering.now()));
  END IF;
END $$;
COMMENT ON FUNCTION metering._aws_check_timestamp(timestamptz, boolean, text) IS
  'internal: TimestampOutOfBounds unless the timestamp is within the MeterUsage or BatchMeterUsage window';

CREATE FUNCTION metering._usage_max_age(batch boolean) RETURNS interval
  AS 'MODULE_PATHNAME', 'metering_max_age'
  LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._usage_max_age(boolean) IS
  'internal: the settings metering.meter_usage_max_age (false) and metering.batch_meter_usage_max_age (true)';

CREATE FUNCTION metering._aws_check_quantity(q jsonb, what text, field text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF jsonb_typeof(q) <> 'number' OR (q #>> '{}')::numeric <> trunc((q #>> '{}')::numeric)
     OR (q #>> '{}')::numeric NOT BETWEEN 0 AND 2147483647 THEN
    RAISE EXCEPTION '%', format('%s%s must be an integer from 0 to 2147483647, not %s', what, field, q)
      USING ERRCODE = 'numeric_value_out_of_range';
  END IF;
  RETURN (q #>> '{}')::bigint;
END $$;
COMMENT ON FUNCTION metering._aws_check_quantity(jsonb, text, text) IS
  'internal: a JSON quantity as AWS accepts it (an integer from 0 to 2147483647)';

-- UsageAllocations: 1..2500 allocations whose quantities add up to the
-- record's; each with 1..5 tags (key 1..100, value 1..256 characters, AWS's
-- published pattern); no two allocations with the same tag set.
CREATE FUNCTION metering._aws_check_allocations(allocations jsonb, quantity bigint, what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  a jsonb;
  t jsonb;
  i integer := 0;
  total numeric := 0;
  tagsets text[] := '{}';
  tagset text;
  keys text[];
  tag_pattern constant text := '^[a-zA-Z0-9+ -=._:\/@]+$';
BEGIN
  IF allocations IS NULL OR jsonb_typeof(allocations) = 'null' THEN
    RETURN;
  END IF;
  IF jsonb_typeof(allocations) <> 'array' OR jsonb_array_length(allocations) NOT BETWEEN 1 AND 2500 THEN
    PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
      format('%sUsageAllocations must be an array of 1 to 2500 allocations', what));
  END IF;
  FOR a IN SELECT value FROM jsonb_array_elements(allocations) LOOP
    IF jsonb_typeof(a) <> 'object' OR NOT a ? 'AllocatedUsageQuantity' THEN
      PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
        format('%sUsageAllocations[%s] must be an object with AllocatedUsageQuantity and Tags', what, i));
    END IF;
    BEGIN
      total := total + metering._aws_check_quantity(a -> 'AllocatedUsageQuantity', what,
                                                    format('UsageAllocations[%s].AllocatedUsageQuantity', i));
    EXCEPTION WHEN numeric_value_out_of_range THEN
      PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
        format('%sUsageAllocations[%s].AllocatedUsageQuantity must be an integer from 0 to 2147483647, not %s',
               what, i, a -> 'AllocatedUsageQuantity'));
    END;
    IF jsonb_typeof(a -> 'Tags') IS DISTINCT FROM 'array' OR jsonb_array_length(a -> 'Tags') NOT BETWEEN 1 AND 5 THEN
      PERFORM metering._aws_error('InvalidTag', '22023',
        format('%sUsageAllocations[%s].Tags must be an array of 1 to 5 tags', what, i));
    END IF;
    keys := '{}';
    FOR t IN SELECT value FROM jsonb_array_elements(a -> 'Tags') LOOP
      IF jsonb_typeof(t) <> 'object'
         OR jsonb_typeof(t -> 'Key') IS DISTINCT FROM 'string'
         OR jsonb_typeof(t -> 'Value') IS DISTINCT FROM 'string' THEN
        PERFORM metering._aws_error('InvalidTag', '22023',
          format('%sUsageAllocations[%s]: a tag must be an object with string Key and Value, not %s', what, i, t));
      END IF;
      IF char_length(t ->> 'Key') NOT BETWEEN 1 AND 100 OR (t ->> 'Key') !~ tag_pattern THEN
        PERFORM metering._aws_error('InvalidTag', '22023',
          format('%sUsageAllocations[%s]: tag key %s must be 1 to 100 characters matching %s',
                 what, i, quote_literal(t ->> 'Key'), tag_pattern));
      END IF;
      IF char_length(t ->> 'Value') NOT BETWEEN 1 AND 256 OR (t ->> 'Value') !~ tag_pattern THEN
        PERFORM metering._aws_error('InvalidTag', '22023',
          format('%sUsageAllocations[%s]: tag value %s must be 1 to 256 characters matching %s',
                 what, i, quote_literal(t ->> 'Value'), tag_pattern));
      END IF;
      IF (t ->> 'Key') = ANY (keys) THEN
        PERFORM metering._aws_error('InvalidTag', '22023',
          format('%sUsageAllocations[%s]: tag key %s appears twice', what, i, quote_literal(t ->> 'Key')));
      END IF;
      keys := keys || (t ->> 'Key');
    END LOOP;
    tagset := (SELECT string_agg(quote_literal(x ->> 'Key') || '=' || quote_literal(x ->> 'Value'), ','
                                 ORDER BY x ->> 'Key')
                 FROM jsonb_array_elements(a -> 'Tags') x);
    IF tagset = ANY (tagsets) THEN
      PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
        format('%sUsageAllocations[%s] repeats the tag set of an earlier allocation', what, i));
    END IF;
    tagsets := tagsets || tagset;
    i := i + 1;
  END LOOP;
  IF total <> quantity THEN
    PERFORM metering._aws_error('InvalidUsageAllocations', '22023',
      format('%sthe allocated quantities add up to %s, not to the quantity %s', what, total, quantity));
  END IF;
END $$;
COMMENT ON FUNCTION metering._aws_check_allocations(jsonb, bigint, text) IS
  'internal: InvalidUsageAllocations or InvalidTag unless the allocations are valid for the quantity';

CREATE FUNCTION metering._aws_subscribed(customer text, product text, at timestamptz) RETURNS boolean
LANGUAGE sql STABLE
BEGIN ATOMIC
  SELECT EXISTS (
    SELECT 1 FROM metering.customers c
     WHERE c.customer_identifier = customer AND c.product_code = product
       AND (c.subscribed_at IS NULL OR c.subscribed_at <= at)
       AND (c.unsubscribed_at IS NULL OR at < c.unsubscribed_at));
END;
COMMENT ON FUNCTION metering._aws_subscribed(text, text, timestamptz) IS
  'internal: whether the customer is subscribed to the product at an instant';

-- The record space both calls share: one record per (customer, product,
-- dimension, UTC hour).  An identical repeat returns the stored record; a
-- different quantity or allocation is a duplicate.
CREATE FUNCTION metering._aws_record(p_product text, p_customer text, p_dimension text,
  p_timestamp timestamptz, p_quantity bigint, p_allocations jsonb, p_dry_run boolean,
  OUT status text, OUT record_id uuid)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  hour timestamptz := date_trunc('hour', p_timestamp, 'UTC');
  r metering.usage_records;
BEGIN
  FOR attempt IN 1..2 LOOP
    SELECT * INTO r FROM metering.usage_records u
     WHERE u.customer_identifier = p_customer AND u.product_code = p_product
       AND u.dimension = p_dimension AND u.usage_hour = hour;
    IF FOUND THEN
      IF r.quantity = p_quantity AND r.allocations IS NOT DISTINCT FROM p_allocations THEN
        status := 'Success';
        record_id := r.metering_record_id;
      ELSE
        status := 'DuplicateRecord';
      END IF;
      RETURN;
    END IF;
    IF p_customer IS NULL OR NOT metering._aws_subscribed(p_customer, p_product, p_timestamp) THEN
      status := 'CustomerNotSubscribed';
      RETURN;
    END IF;
    IF p_dry_run THEN
      status := 'Success';
      RETURN;
    END IF;
    INSERT INTO metering.usage_records AS u
      (customer_identifier, product_code, dimension, usage_hour, quantity, allocations, usage_timestamp)
    VALUES (p_customer, p_product, p_dimension, hour, p_quantity, p_allocations, p_timestamp)
    ON CONFLICT (customer_identifier, product_code, dimension, usage_hour) DO NOTHING
    RETURNING u.metering_record_id INTO record_id;
    IF FOUND THEN
      INSERT INTO metering.events (id, source, subject, type, time, data)
      VALUES (record_id::text, 'aws-marketplace/' || p_product, p_customer, p_dimension, hour,
              jsonb_strip_nulls(jsonb_build_object('quantity', p_quantity, 'product_code', p_product,
                                                   'allocations', p_allocations)));
      status := 'Success';
      RETURN;
    END IF;
    -- another session stored the record first: read it on the next pass
  END LOOP;
  RAISE EXCEPTION 'could not serialize access to metering record of % / % / % at %',
    p_customer, p_product, p_dimension, hour
    USING ERRCODE = 'serialization_failure';
END $$;
COMMENT ON FUNCTION metering._aws_record(text, text, text, timestamptz, bigint, jsonb, boolean) IS
  'internal: stores or finds the usage record of (customer, product, dimension, hour); status Success, CustomerNotSubscribed or DuplicateRecord';

CREATE FUNCTION metering.resolve_customer(registration_token text)
RETURNS TABLE(customer_identifier text, product_code text, customer_aws_account_id text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  c metering.customers;
BEGIN
  SELECT * INTO c FROM metering.customers cu
   WHERE cu.registration_token = resolve_customer.registration_token
   FOR UPDATE;
  IF NOT FOUND OR resolve_customer.registration_token IS NULL THEN
    PERFORM metering._aws_error('InvalidToken', '22023', 'the registration token is not valid');
  END IF;
  IF c.registration_token_used_at IS NOT NULL THEN
    PERFORM metering._aws_error('ExpiredToken', '22023',
      format('the registration token was already used at %s', c.registration_token_used_at));
  END IF;
  IF c.registration_token_expires_at <= metering.now() THEN
    PERFORM metering._aws_error('ExpiredToken', '22023',
      format('the registration token expired at %s', c.registration_token_expires_at));
  END IF;
  UPDATE metering.customers cu SET registration_token_used_at = metering.now()
   WHERE cu.customer_identifier = c.customer_identifier;
  customer_identifier := c.customer_identifier;
  product_code := c.product_code;
  customer_aws_account_id := c.customer_aws_account_id;
  RETURN NEXT;
END $$;
COMMENT ON FUNCTION metering.resolve_customer(text) IS
  'ResolveCustomer: exchanges a one-time registration token for the customer identifier, product code and AWS account id';

-- SECURITY DEFINER: it signs with the database's secret, which the caller
-- must not be able to read (or it could forge signatures).
CREATE FUNCTION metering.register_usage(product_code text, customer_identifier text,
  public_key_version integer, nonce text DEFAULT NULL)
RETURNS TABLE(signature text, public_key_rotation_timestamp timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  p_product text := register_usage.product_code;
  p_customer text := register_usage.customer_identifier;
  p_version integer := register_usage.public_key_version;
  p_nonce text := register_usage.nonce;
  cur metering.signing_keys;
  k metering.signing_keys;
  seen boolean;
  now timestamptz := metering.now();
BEGIN
  PERFORM metering._aws_check_product(p_product);
  cur := metering._current_signing_key();
  IF p_version IS NULL OR p_version < 1 OR p_version > cur.version THEN
    PERFORM metering._aws_error('InvalidPublicKeyVersion', '22023',
      format('public key version %s is not a version from 1 to %s', coalesce(p_version::text, 'NULL'), cur.version));
  END IF;
  IF p_customer IS NULL OR p_customer = '' THEN
    RAISE EXCEPTION 'customer_identifier is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF char_length(p_nonce) > 255 THEN
    RAISE EXCEPTION 'nonce must be at most 255 characters' USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- AWS checks the subscription at the first call of a task or pod only.
  seen := p_nonce IS NOT NULL AND EXISTS (
    SELECT 1 FROM metering.registrations r
     WHERE r.customer_identifier = p_customer AND r.product_code = p_product AND r.nonce = p_nonce);
  IF NOT seen AND NOT metering._aws_subscribed(p_customer, p_product, now) THEN
    PERFORM metering._aws_error('CustomerNotEntitled', '55000',
      format('customer %s is not subscribed to product %s', quote_literal(p_customer), quote_literal(p_product)));
  END IF;
  INSERT INTO metering.registrations AS r
    (product_code, customer_identifier, nonce, public_key_version, first_registered_at, last_registered_at)
  VALUES (p_product, p_customer, p_nonce, p_version, now, now)
  ON CONFLICT (customer_identifier, product_code, nonce) DO UPDATE
    SET public_key_version = excluded.public_key_version,
        last_registered_at = excluded.last_registered_at,
        calls = r.calls + 1;

  SELECT * INTO STRICT k FROM metering.signing_keys sk WHERE sk.version = p_version;
  signature := metering._jwt_hs256(
    jsonb_build_object('alg', 'HS256', 'typ', 'JWT', 'kid', p_version::text)::text,
    jsonb_build_object('productCode', p_product, 'customerIdentifier', p_customer,
                       'nonce', p_nonce, 'publicKeyVersion', p_version,
                       'iat', floor(extract(epoch FROM now))::bigint)::text,
    k.secret);
  public_key_rotation_timestamp := CASE WHEN p_version < cur.version THEN cur.created_at END;
  RETURN NEXT;
END $$;
COMMENT ON FUNCTION metering.register_usage(text, text, integer, text) IS
  'RegisterUsage: checks the subscription at the first call of a nonce, records the call and returns an HS256 JWT with productCode, customerIdentifier, nonce, publicKeyVersion and iat';

CREATE FUNCTION metering.meter_usage(product_code text, customer_identifier text,
  usage_timestamp timestamptz, usage_dimension text, usage_quantity bigint DEFAULT 0,
  usage_allocations jsonb DEFAULT NULL, dry_run boolean DEFAULT false)
RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  res record;
BEGIN
  PERFORM metering._aws_check_product(meter_usage.product_code);
  PERFORM metering._aws_check_dimension(meter_usage.product_code, meter_usage.usage_dimension, '');
  IF usage_quantity IS NULL OR usage_quantity NOT BETWEEN 0 AND 2147483647 THEN
    RAISE EXCEPTION 'usage_quantity must be an integer from 0 to 2147483647, not %', coalesce(usage_quantity::text, 'NULL')
      USING ERRCODE = 'numeric_value_out_of_range';
  END IF;
  IF usage_timestamp IS NULL THEN
    RAISE EXCEPTION 'usage_timestamp is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM metering._aws_check_timestamp(usage_timestamp, false, '');
  PERFORM metering._aws_check_allocations(usage_allocations, usage_quantity, '');
  IF meter_usage.customer_identifier IS NULL THEN
    RAISE EXCEPTION 'customer_identifier is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;

  res := metering._aws_record(meter_usage.product_code, meter_usage.customer_identifier,
                              usage_dimension, usage_timestamp, usage_quantity,
                              nullif(usage_allocations, 'null'), coalesce(dry_run, false));
  IF res.status = 'CustomerNotSubscribed' THEN
    PERFORM metering._aws_error('CustomerNotEntitled', '55000',
      format('customer %s is not subscribed to product %s at %s',
             quote_literal(meter_usage.customer_identifier), quote_literal(meter_usage.product_code), usage_timestamp));
  ELSIF res.status = 'DuplicateRecord' THEN
    PERFORM metering._aws_error('DuplicateRequest', '23505',
      format('a record of customer %s, dimension %s in the hour of %s was already metered with another quantity or allocation',
             quote_literal(meter_usage.customer_identifier), quote_literal(usage_dimension),
             date_trunc('hour', usage_timestamp, 'UTC')));
  END IF;
  RETURN res.record_id;
END $$;
COMMENT ON FUNCTION metering.meter_usage(text, text, timestamptz, text, bigint, jsonb, boolean) IS
  'MeterUsage: records the usage of a customer for a dimension and hour, idempotently; returns the metering record id (NULL on a dry run of a new record)';
