-- AWS Marketplace: MeterUsage.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 12:00:00+00';

INSERT INTO metering.products (product_code) VALUES ('prod-1'), ('prod-2');
INSERT INTO metering.product_dimensions (product_code, dimension) VALUES
  ('prod-1', 'requests'), ('prod-1', 'gb'), ('prod-2', 'seats');
INSERT INTO metering.customers (customer_identifier, product_code, subscribed_at, unsubscribed_at) VALUES
  ('cust-a', 'prod-1', '2024-01-01', NULL),
  ('cust-b', 'prod-1', '2024-01-01', '2024-06-01 09:30:00'),
  ('cust-c', 'prod-1', '2024-06-01 10:00:00', NULL);
-- a meter over the records, to see them as events
INSERT INTO metering.meters (slug, event_type, aggregation, value_property)
VALUES ('requests', 'requests', 'SUM', '$.quantity');

CREATE TEMP TABLE ids (name text PRIMARY KEY, id uuid);
INSERT INTO ids SELECT 'first', metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:15:00+00', 'requests', 40);
-- the same customer, dimension and hour with the same quantity is the same record,
-- whatever the minute
INSERT INTO ids SELECT 'retry', metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:59:59+00', 'requests', 40);
SELECT (SELECT id FROM ids WHERE name = 'first') = (SELECT id FROM ids WHERE name = 'retry') AS same_record;
-- with another quantity it is a DuplicateRequest
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:30:00+00', 'requests', 41)$$);
-- another hour or dimension is another record
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 11:00:00+00', 'requests', 41) <> (SELECT id FROM ids WHERE name = 'first') AS new_hour;
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:15:00+00', 'gb') IS NOT NULL AS new_dimension;
SELECT customer_identifier, product_code, dimension, usage_hour, quantity, allocations, usage_timestamp
  FROM metering.usage_records ORDER BY usage_hour, dimension;
-- each record is an event: subject the customer, type the dimension, time the hour
SELECT e.source, e.subject, e.type, e.time, e.data, e.id = r.metering_record_id::text AS id_is_record
  FROM metering.events e JOIN metering.usage_records r ON r.metering_record_id::text = e.id ORDER BY e.time, e.type;
SELECT window_start, value FROM metering.query_meter('requests', window_size => 'HOUR');

-- the time window: not in the future, at most 6 hours back (exactly 6 is fine),
-- judged on the timestamp as given
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 06:00:00+00', 'requests', 1) IS NOT NULL AS six_hours_ago;
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 05:59:59.999999+00', 'requests', 1)$$);
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 12:00:00+00', 'requests', 1) IS NOT NULL AS now;
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 12:00:00.000001+00', 'requests', 1)$$);
-- the window is a setting
SET metering.meter_usage_max_age = '1h';
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:15:00+00', 'requests', 40)$$);
RESET metering.meter_usage_max_age;

-- subscriptions are judged at the usage time
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-b', '2024-06-01 09:45:00+00', 'requests', 1)$$);
SELECT metering.meter_usage('prod-1', 'cust-b', '2024-06-01 09:15:00+00', 'requests', 1) IS NOT NULL AS before_unsubscribing;
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-c', '2024-06-01 09:59:00+00', 'requests', 1)$$);
SELECT metering.meter_usage('prod-1', 'cust-c', '2024-06-01 10:00:00+00', 'requests', 1) IS NOT NULL AS after_subscribing;
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'nobody', '2024-06-01 10:00:00+00', 'requests', 1)$$);
SELECT regress.err($$SELECT metering.meter_usage('prod-2', 'cust-a', '2024-06-01 10:00:00+00', 'seats', 1)$$);

-- validation
SELECT regress.err($$SELECT metering.meter_usage('prod-9', 'cust-a', '2024-06-01 10:00:00+00', 'requests', 1)$$);
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:00:00+00', 'seats', 1)$$);
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:00:00+00', NULL, 1)$$);
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:00:00+00', 'requests', -1)$$);
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:00:00+00', 'requests', 2147483648)$$);
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 07:00:00+00', 'requests', 2147483647) IS NOT NULL AS max_quantity;
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 08:00:00+00', 'requests') IS NOT NULL AS default_quantity_0;
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', NULL, 'requests', 1)$$);
SELECT regress.err($$SELECT metering.meter_usage('prod-1', NULL, '2024-06-01 10:00:00+00', 'requests', 1)$$);

-- dry run: everything is checked, nothing is stored
SELECT count(*) AS records_before FROM metering.usage_records;
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 09:00:00+00', 'requests', 5, dry_run => true) AS new_record_dry_run;
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:00:00+00', 'requests', 40, dry_run => true)
       = (SELECT id FROM ids WHERE name = 'first') AS existing_record_dry_run;
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:00:00+00', 'requests', 7, dry_run => true)$$);
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-b', '2024-06-01 11:00:00+00', 'requests', 7, dry_run => true)$$);
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 01:00:00+00', 'requests', 7, dry_run => true)$$);
SELECT count(*) AS records_after FROM metering.usage_records;

-- usage allocations
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 09:00:00+00', 'gb', 10,
  '[{"AllocatedUsageQuantity": 6, "Tags": [{"Key": "account_group", "Value": "dev"}, {"Key": "env", "Value": "a b/c:d@e.f-g_h=+"}]},
    {"AllocatedUsageQuantity": 4, "Tags": [{"Key": "account_group", "Value": "ops"}]}]') IS NOT NULL AS allocated;
SELECT data FROM metering.events WHERE type = 'gb' AND time = '2024-06-01 09:00:00+00';
-- the same record with other allocations is a different request
SELECT regress.err($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 09:00:00+00', 'gb', 10,
  '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "account_group", "Value": "dev"}]}]')$$);
SELECT regress.err(format($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 11:00:00+00', 'gb', 10, %L)$$, a))
  FROM unnest(ARRAY[
    '[]',
    '{"AllocatedUsageQuantity": 10}',
    '[{"AllocatedUsageQuantity": 6, "Tags": [{"Key": "k", "Value": "v"}]}]',
    '[{"AllocatedUsageQuantity": -1, "Tags": [{"Key": "k", "Value": "v"}]}, {"AllocatedUsageQuantity": 11, "Tags": [{"Key": "k", "Value": "w"}]}]',
    '[{"AllocatedUsageQuantity": 2.5, "Tags": [{"Key": "k", "Value": "v"}]}]',
    '[{"Tags": [{"Key": "k", "Value": "v"}]}]',
    '[5]',
    '[{"AllocatedUsageQuantity": 10}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": []}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "1"}, {"Key": "c", "Value": "1"}, {"Key": "d", "Value": "1"}, {"Key": "e", "Value": "1"}, {"Key": "f", "Value": "1"}]}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "", "Value": "v"}]}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "k", "Value": ""}]}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "k?", "Value": "v"}]}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "k", "Value": "v~"}]}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "k", "Value": "é"}]}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "k", "Value": 5}]}]',
    '[{"AllocatedUsageQuantity": 10, "Tags": [{"Key": "k", "Value": "v"}, {"Key": "k", "Value": "w"}]}]',
    '[{"AllocatedUsageQuantity": 5, "Tags": [{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}]}, {"AllocatedUsageQuantity": 5, "Tags": [{"Key": "b", "Value": "2"}, {"Key": "a", "Value": "1"}]}]'
  ]) a;
SELECT regress.err(format($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 11:00:00+00', 'gb', 10, %L)$$,
  jsonb_build_array(jsonb_build_object('AllocatedUsageQuantity', 10, 'Tags', jsonb_build_array(jsonb_build_object('Key', repeat('k', 101), 'Value', 'v'))))));
SELECT regress.err(format($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 11:00:00+00', 'gb', 10, %L)$$,
  jsonb_build_array(jsonb_build_object('AllocatedUsageQuantity', 10, 'Tags', jsonb_build_array(jsonb_build_object('Key', 'k', 'Value', repeat('v', 257)))))));
-- the bounds themselves are fine: 2500 allocations, keys of 100 and values of 256 characters
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 11:00:00+00', 'gb', 2500,
  (SELECT jsonb_agg(jsonb_build_object('AllocatedUsageQuantity', 1,
            'Tags', jsonb_build_array(jsonb_build_object('Key', repeat('k', 100), 'Value', lpad(n::text, 256, '0')))))
     FROM generate_series(1, 2500) n)) IS NOT NULL AS largest_allocations;
-- AWS's published tag pattern, taken as written: " -=" is a range (space to "="),
-- so "!" and "#" pass while "?" and "~" do not
SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 08:00:00+00', 'gb', 1,
  '[{"AllocatedUsageQuantity": 1, "Tags": [{"Key": "k!", "Value": "#1 (a, b); c<d"}]}]') IS NOT NULL AS range_in_pattern;
SELECT regress.err(format($$SELECT metering.meter_usage('prod-1', 'cust-a', '2024-06-01 10:00:00+00', 'gb', 2501, %L)$$,
  (SELECT jsonb_agg(jsonb_build_object('AllocatedUsageQuantity', 1,
            'Tags', jsonb_build_array(jsonb_build_object('Key', 'k', 'Value', n::text)))) FROM generate_series(1, 2501) n)));

-- records are immutable
SELECT regress.err($$UPDATE metering.usage_records SET quantity = 0$$);
SELECT regress.err($$DELETE FROM metering.usage_records$$);
