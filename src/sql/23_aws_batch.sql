-- BatchMeterUsage in the AWS JSON shape.

CREATE FUNCTION metering._aws_batch_timestamp(ts jsonb, what text) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t timestamptz;
  secs numeric;
BEGIN
  -- the SDKs send epoch seconds; people and other tools send RFC 3339
  IF jsonb_typeof(ts) = 'number' AND (ts #>> '{}')::numeric BETWEEN -1e11 AND 1e11 THEN
    secs := (ts #>> '{}')::numeric;
    -- exactly, to the microsecond: no detour through double precision
    RETURN timestamptz 'epoch' + (trunc(secs)::text || ' seconds')::interval
           + (round((secs - trunc(secs)) * 1000000)::text || ' microseconds')::interval;
  ELSIF jsonb_typeof(ts) = 'string' THEN
    t := metering._rfc3339(ts #>> '{}');
    IF t IS NOT NULL THEN
      RETURN t;
    END IF;
  END IF;
  RAISE EXCEPTION '%Timestamp must be an RFC 3339 date-time or epoch seconds, not %', what, coalesce(ts::text, 'missing')
    USING ERRCODE = 'invalid_parameter_value';
END $$;
COMMENT ON FUNCTION metering._aws_batch_timestamp(jsonb, text) IS
  'internal: a BatchMeterUsage Timestamp (RFC 3339 string or epoch seconds)';

CREATE FUNCTION metering.batch_meter_usage(request jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  product text;
  rec jsonb;
  i integer;
  n integer;
  what text;
  customers text[] := '{}';
  times timestamptz[] := '{}';
  quantities bigint[] := '{}';
  customer text;
  q bigint;
  res record;
  results jsonb := '[]';
  result jsonb;
BEGIN
  IF request IS NULL OR jsonb_typeof(request) <> 'object' THEN
    RAISE EXCEPTION 'request must be a JSON object with ProductCode and UsageRecords'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF octet_length(request::text) > 1048576 THEN
    RAISE EXCEPTION 'request is larger than 1 MB' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(request -> 'ProductCode') IS DISTINCT FROM 'string' THEN
    PERFORM metering._aws_error('InvalidProductCode', '22023', 'ProductCode must be a string');
  END IF;
  product := request ->> 'ProductCode';
  PERFORM metering._aws_check_product(product);
  IF jsonb_typeof(request -> 'UsageRecords') IS DISTINCT FROM 'array' THEN
    RAISE EXCEPTION 'UsageRecords must be an array' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  n := jsonb_array_length(request -> 'UsageRecords');
  IF n > 25 THEN
    RAISE EXCEPTION 'UsageRecords has % records; at most 25 are accepted', n
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- First every record is validated: one bad record rejects the batch.
  FOR i IN 0 .. n - 1 LOOP
    rec := request -> 'UsageRecords' -> i;
    what := format('UsageRecords[%s]: ', i);
    IF jsonb_typeof(rec) <> 'object' THEN
      RAISE EXCEPTION '%a usage record must be a JSON object', what USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (rec ? 'CustomerIdentifier') = (rec ? 'CustomerAWSAccountId') THEN
      RAISE EXCEPTION '%exactly one of CustomerIdentifier and CustomerAWSAccountId is required', what
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(coalesce(rec -> 'CustomerIdentifier', rec -> 'CustomerAWSAccountId')) <> 'string' THEN
      RAISE EXCEPTION '%CustomerIdentifier and CustomerAWSAccountId must be strings', what
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(rec -> 'Dimension') IS DISTINCT FROM 'string' THEN
      PERFORM metering._aws_error('InvalidUsageDimension', '22023', what || 'Dimension must be a string');
    END IF;
    PERFORM metering._aws_check_dimension(product, rec ->> 'Dimension', what);
    q := CASE WHEN rec ? 'Quantity'
              THEN metering._aws_check_quantity(rec -> 'Quantity', what, 'Quantity') ELSE 0 END;
    times := times || metering._aws_batch_timestamp(rec -> 'Timestamp', what);
    PERFORM metering._aws_check_timestamp(times[i + 1], true, what);
    PERFORM metering._aws_check_allocations(rec -> 'UsageAllocations', q, what);
    quantities := quantities || q;
    IF rec ? 'CustomerIdentifier' THEN
      customers := customers || (rec ->> 'CustomerIdentifier');
    ELSE
      customers := customers || (SELECT c.customer_identifier FROM metering.customers c
                                  WHERE c.product_code = product
                                    AND c.customer_aws_account_id = rec ->> 'CustomerAWSAccountId'
                                  ORDER BY c.subscribed_at DESC NULLS LAST LIMIT 1);
    END IF;
  END LOOP;

  -- Then each record, in order, gets its status.
  FOR i IN 0 .. n - 1 LOOP
    rec := request -> 'UsageRecords' -> i;
    res := metering._aws_record(product, customers[i + 1], rec ->> 'Dimension', times[i + 1],
                                quantities[i + 1], nullif(rec -> 'UsageAllocations', 'null'), false);
    result := jsonb_build_object('UsageRecord', rec, 'Status', res.status);
    IF res.record_id IS NOT NULL THEN
      result := result || jsonb_build_object('MeteringRecordId', res.record_id::text);
    END IF;
    results := results || jsonb_build_array(result);
  END LOOP;
  RETURN jsonb_build_object('Results', results, 'UnprocessedRecords', '[]'::jsonb);
END $$;
COMMENT ON FUNCTION metering.batch_meter_usage(jsonb) IS
  'BatchMeterUsage: takes the AWS request body (ProductCode, UsageRecords) and returns the AWS response body (Results with Status Success, CustomerNotSubscribed or DuplicateRecord, UnprocessedRecords)';
