-- AWS Marketplace: BatchMeterUsage, request and response in the AWS JSON shape.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-02 00:00:00+00';

INSERT INTO metering.products (product_code) VALUES ('prod-1');
INSERT INTO metering.product_dimensions (product_code, dimension) VALUES ('prod-1', 'requests'), ('prod-1', 'gb');
INSERT INTO metering.customers (customer_identifier, product_code, customer_aws_account_id, subscribed_at, unsubscribed_at) VALUES
  ('cust-a', 'prod-1', '111122223333', '2024-01-01', NULL),
  ('cust-b', 'prod-1', '444455556666', '2024-01-01', '2024-06-01 09:30:00'),
  ('cust-c', 'prod-1', NULL, '2024-06-01 20:00:00', NULL);

-- one record of each status; results follow the order of UsageRecords and echo each record
SELECT jsonb_pretty(r - 'Results') AS rest,
       jsonb_path_query_array(r, '$.Results[*].Status') AS statuses,
       jsonb_path_query_array(r, '$.Results[*].UsageRecord') = (
         '[{"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 5, "Timestamp": "2024-06-01T10:15:00Z"},
           {"CustomerIdentifier": "cust-b", "Dimension": "requests", "Quantity": 5, "Timestamp": 1717236000},
           {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 6, "Timestamp": "2024-06-01T10:45:00+00:00"},
           {"CustomerIdentifier": "cust-a", "Dimension": "gb", "Timestamp": 1717236000.5}]'::jsonb) AS echoed,
       jsonb_path_query_array(r, '$.Results[*].MeteringRecordId') AS ids
  FROM metering.batch_meter_usage('{"ProductCode": "prod-1", "UsageRecords": [
    {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 5, "Timestamp": "2024-06-01T10:15:00Z"},
    {"CustomerIdentifier": "cust-b", "Dimension": "requests", "Quantity": 5, "Timestamp": 1717236000},
    {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 6, "Timestamp": "2024-06-01T10:45:00+00:00"},
    {"CustomerIdentifier": "cust-a", "Dimension": "gb", "Timestamp": 1717236000.5}]}') r
 \gset
SELECT :'rest' AS rest, :'statuses' AS statuses, :'echoed' AS echoed,
       jsonb_array_length(:'ids') AS ids_returned;
SELECT customer_identifier, dimension, usage_hour, quantity FROM metering.usage_records ORDER BY dimension, usage_hour;

-- an identical retry returns the same ids and stores nothing new; MeterUsage shares the records
SELECT jsonb_path_query_array(r, '$.Results[*].MeteringRecordId') = :'ids' AS same_ids,
       jsonb_path_query_array(r, '$.Results[*].Status') AS statuses
  FROM metering.batch_meter_usage('{"ProductCode": "prod-1", "UsageRecords": [
    {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 5, "Timestamp": "2024-06-01T10:15:00Z"},
    {"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 0, "Timestamp": "2024-06-01T10:00:00Z"}]}') r;
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 23:00:00+00', 'requests', 5) IS NOT NULL AS stored;
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 23:59:00+00', 'requests', 7)$$);
SELECT jsonb_path_query_array(r, '$.Results[*].Status') AS statuses
  FROM metering.batch_meter_usage('{"ProductCode": "prod-1", "UsageRecords": [
    {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 5, "Timestamp": "2024-06-01T23:30:00Z"},
    {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 9, "Timestamp": "2024-06-01T23:30:00Z"}]}') r;
SELECT count(*) AS records FROM metering.usage_records;

-- customers: unknown, not yet subscribed, found by AWS account id
SELECT jsonb_path_query_array(r, '$.Results[*].Status') AS statuses
  FROM metering.batch_meter_usage('{"ProductCode": "prod-1", "UsageRecords": [
    {"CustomerIdentifier": "nobody", "Dimension": "requests", "Quantity": 1, "Timestamp": "2024-06-01T12:00:00Z"},
    {"CustomerIdentifier": "cust-c", "Dimension": "requests", "Quantity": 1, "Timestamp": "2024-06-01T19:59:00Z"},
    {"CustomerIdentifier": "cust-c", "Dimension": "requests", "Quantity": 1, "Timestamp": "2024-06-01T20:00:00Z"},
    {"CustomerAWSAccountId": "111122223333", "Dimension": "requests", "Quantity": 3, "Timestamp": "2024-06-01T12:00:00Z"},
    {"CustomerAWSAccountId": "999999999999", "Dimension": "requests", "Quantity": 3, "Timestamp": "2024-06-01T12:00:00Z"}]}') r;
-- allocations travel with the record
SELECT r #>> '{Results,0,Status}' AS status, r #>> '{Results,0,MeteringRecordId}' AS allocated_id
  FROM metering.batch_meter_usage('{"ProductCode": "prod-1", "UsageRecords": [
    {"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 3, "Timestamp": "2024-06-01T05:00:00Z",
     "UsageAllocations": [{"AllocatedUsageQuantity": 1, "Tags": [{"Key": "account_group", "Value": "dev"}]},
                          {"AllocatedUsageQuantity": 2, "Tags": [{"Key": "account_group", "Value": "ops"}]}]}]}') r
 \gset
SELECT :'status' AS status, e.data -> 'allocations' AS allocations FROM metering.events e WHERE e.id = :'allocated_id';
-- an empty batch is fine
SELECT metering.batch_meter_usage('{"ProductCode": "prod-1", "UsageRecords": []}');

-- one bad record rejects the batch and stores nothing
SELECT count(*) AS records_before FROM metering.usage_records;
SELECT regress.err(format('SELECT metering.batch_meter_usage(%L)', b))
  FROM unnest(ARRAY[
    -- 24 hours back is the limit for batches, and the future is out
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": "2024-06-01T23:00:00Z"},
                                                {"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": "2024-05-31T23:59:59Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": "2024-06-01T23:00:00Z"},
                                                {"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": "2024-06-02T00:00:01Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": "2024-06-01T23:00:00Z"},
                                                {"CustomerIdentifier": "cust-a", "Dimension": "seats", "Quantity": 1, "Timestamp": "2024-06-01T23:00:00Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": "2024-06-01T23:00:00Z"},
                                                {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 2, "Timestamp": "2024-06-01T22:00:00Z",
                                                 "UsageAllocations": [{"AllocatedUsageQuantity": 1, "Tags": [{"Key": "k", "Value": "v"}]}]}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": "2024-06-01T23:00:00Z"},
                                                {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 1, "Timestamp": "2024-06-01T22:00:00Z",
                                                 "UsageAllocations": [{"AllocatedUsageQuantity": 1, "Tags": [{"Key": "k", "Value": "v?"}]}]}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": -1, "Timestamp": "2024-06-01T23:00:00Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": "1", "Timestamp": "2024-06-01T23:00:00Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": "yesterday"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1, "Timestamp": 1e20}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Dimension": "gb", "Quantity": 1}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"Dimension": "gb", "Quantity": 1, "Timestamp": "2024-06-01T23:00:00Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "CustomerAWSAccountId": "111122223333", "Dimension": "gb", "Timestamp": "2024-06-01T23:00:00Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": 5, "Dimension": "gb", "Timestamp": "2024-06-01T23:00:00Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": [{"CustomerIdentifier": "cust-a", "Timestamp": "2024-06-01T23:00:00Z"}]}',
    '{"ProductCode": "prod-1", "UsageRecords": ["cust-a"]}',
    '{"ProductCode": "prod-1", "UsageRecords": {}}',
    '{"ProductCode": "prod-1"}',
    '{"ProductCode": "prod-9", "UsageRecords": []}',
    '{"ProductCode": 1, "UsageRecords": []}',
    '{"UsageRecords": []}',
    '[]'
  ]) b;
-- at most 25 records and 1 MB
SELECT regress.err(format('SELECT metering.batch_meter_usage(%L)', jsonb_build_object('ProductCode', 'prod-1', 'UsageRecords',
  (SELECT jsonb_agg(jsonb_build_object('CustomerIdentifier', 'cust-a', 'Dimension', 'gb', 'Quantity', 1,
                                       'Timestamp', to_char(timestamptz '2024-06-01 00:00:00+00' + n * interval '1 hour', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
     FROM generate_series(0, 25) n))));
SELECT regress.err(format('SELECT metering.batch_meter_usage(%L)', jsonb_build_object('ProductCode', 'prod-1', 'UsageRecords', '[]'::jsonb,
  'Padding', repeat('x', 1048576))));
SELECT count(*) AS records_after FROM metering.usage_records;

-- 25 records are fine, and the window is a setting
SET metering.batch_meter_usage_max_age = '30h';
-- (two of the hours already hold a gb record with another quantity)
SELECT x ->> 'Status' AS status, count(*)
  FROM jsonb_array_elements((SELECT r -> 'Results' FROM metering.batch_meter_usage(jsonb_build_object('ProductCode', 'prod-1', 'UsageRecords',
    (SELECT jsonb_agg(jsonb_build_object('CustomerIdentifier', 'cust-a', 'Dimension', 'gb', 'Quantity', n,
                                         'Timestamp', extract(epoch FROM timestamptz '2024-06-01 23:00:00+00' - n * interval '1 hour')))
       FROM generate_series(0, 24) n))) r)) x
 GROUP BY 1 ORDER BY 1;
RESET metering.batch_meter_usage_max_age;

-- a null UsageAllocations is no allocation, as in AWS
SELECT jsonb_path_query_array(r, '$.Results[*].Status') AS statuses
  FROM metering.batch_meter_usage('{"ProductCode": "prod-1", "UsageRecords": [
    {"CustomerIdentifier": "cust-a", "Dimension": "requests", "Quantity": 4, "Timestamp": "2024-06-01T21:00:00Z", "UsageAllocations": null}]}') r;
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 21:10:00+00', 'requests', 4, 'null') IS NOT NULL AS same_with_meter_usage;
-- epoch seconds are exact to the microsecond
SELECT metering._aws_batch_timestamp('1717236000.123456', '') AS epoch;
