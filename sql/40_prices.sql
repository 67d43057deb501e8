-- Prices and billing periods: the five models with the worked examples of
-- Stripe's and Lago's documentation, the rules of the prices table (as the
-- hashmap rules: validity, audit, soft delete), price_quote, price_usage
-- with tier detail, minimum true-ups and bill => overage.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-01-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('api', 'api', 'SUM', '$.n', '{"region": "$.region"}'),
  ('pay', 'pay', 'SUM', '$.amount', '{}'),
  ('storage', 'storage', 'SUM', '$.gb', '{}'),
  ('lat', 'lat', 'AVG', '$.ms', '{}');
INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('calls', 'call', 'COUNT');
-- the quote of a price defined inline (rolled back)
CREATE FUNCTION pg_temp.quote(cols text, vals text, q numeric) RETURNS TABLE(amount numeric, details jsonb)
LANGUAGE plpgsql AS $$
DECLARE
  id uuid;
  a numeric;
  d jsonb;
BEGIN
  BEGIN
    EXECUTE format('INSERT INTO metering.prices (meter_slug, %s) VALUES (''api'', %s) RETURNING id', cols, vals) INTO id;
    SELECT r.amount, r.details INTO a, d FROM metering.price_quote(id, q) r;
    RAISE EXCEPTION 'undo' USING ERRCODE = 'P0001';
  EXCEPTION WHEN raise_exception THEN
    NULL;
  END;
  amount := a;
  details := d;
  RETURN NEXT;
END $$;
-- one price's amount for several quantities
CREATE FUNCTION pg_temp.amounts(cols text, vals text, qs numeric[]) RETURNS TABLE(quantity numeric, amount numeric)
LANGUAGE sql AS $$
  SELECT q, (pg_temp.quote(cols, vals, q)).amount FROM unnest(qs) q
$$;

-- Stripe, "Set up tiered pricing": fonts at 7 USD (1-5), 6.5 USD (6-10), 6 USD (11+)
SELECT * FROM pg_temp.amounts('model, tiers', $$'volume', '[{"up_to": 5, "unit_amount": 7}, {"up_to": 10, "unit_amount": 6.5}, {"up_to": null, "unit_amount": 6}]'$$,
                              '{0, 1, 5, 6, 20, 25}');
SELECT * FROM pg_temp.amounts('model, tiers', $$'graduated', '[{"up_to": 5, "unit_amount": 7}, {"up_to": 10, "unit_amount": 6.5}, {"up_to": null, "unit_amount": 6}]'$$,
                              '{0, 1, 5, 6, 20, 25}');
-- Lago, graduated: 1 USD per call for the first 100, 0.50 for the next 100, 0.10 above: 250 calls are 155 USD
SELECT * FROM pg_temp.amounts('model, tiers', $$'graduated', '[{"up_to": 100, "unit_amount": 1}, {"up_to": 200, "unit_amount": 0.5}, {"up_to": null, "unit_amount": 0.1}]'$$,
                              '{250}');
-- Lago, volume: 0.0010 / 0.0008 / 0.0006 / 0.0004 per call, each tier 10 USD flat: 65,000 calls are 49 USD
SELECT * FROM pg_temp.amounts('model, tiers', $$'volume', '[{"up_to": 10000, "unit_amount": 0.001, "flat_amount": 10}, {"up_to": 50000, "unit_amount": 0.0008, "flat_amount": 10}, {"up_to": 100000, "unit_amount": 0.0006, "flat_amount": 10}, {"up_to": null, "unit_amount": 0.0004, "flat_amount": 10}]'$$,
                              '{0, 10000, 10001, 65000}');
-- Lago, package: 5 USD per 100 calls, the first 100 free: 201 calls are 10 USD
SELECT * FROM pg_temp.amounts('model, package_size, package_amount, free_units', $$'package', 100, 5, 100$$,
                              '{0, 100, 101, 200, 201}');
-- Stripe's card fee through Lago's percentage model: 2.9 % + 0.30 a payment
SELECT * FROM pg_temp.amounts('model, rate, fixed_amount_per_event', $$'percentage', 0.029, 0.30$$, '{100, 10.50}');
-- unit
SELECT * FROM pg_temp.amounts('model, unit_amount', $$'unit', 0.002$$, '{0, 1, 1000000, -5}');

-- the issue's own example, with the tier detail: the first 1,000 calls free,
-- then 0.002, above 100,000 0.001 and 5 once past 100,000
SELECT jsonb_pretty(details) FROM pg_temp.quote('model, tiers',
  $$'graduated', '[{"up_to": 1000, "unit_amount": 0}, {"up_to": 100000, "unit_amount": 0.002}, {"up_to": null, "unit_amount": 0.001, "flat_amount": 5}]'$$, 150000);
-- exactly on a boundary: the tier's own, and the next tier's flat fee not yet
SELECT * FROM pg_temp.amounts('model, tiers',
  $$'graduated', '[{"up_to": 1000, "unit_amount": 0}, {"up_to": 100000, "unit_amount": 0.002}, {"up_to": null, "unit_amount": 0.001, "flat_amount": 5}]'$$,
  '{1000, 1001, 100000, 100001, 0.5}');
-- a tier with only a flat fee (graduated and volume)
SELECT * FROM pg_temp.amounts('model, tiers', $$'graduated', '[{"up_to": 10, "flat_amount": 20}, {"up_to": null, "unit_amount": 1}]'$$, '{0, 1, 10, 11}');
SELECT * FROM pg_temp.amounts('model, tiers', $$'volume', '[{"up_to": 10, "flat_amount": 20}, {"up_to": null, "unit_amount": 1}]'$$, '{0, 1, 10, 11}');
SELECT details FROM pg_temp.quote('model, tiers', $$'volume', '[{"up_to": 10, "flat_amount": 20}, {"up_to": null, "unit_amount": 1}]'$$, 11);
SELECT details FROM pg_temp.quote('model, package_size, package_amount, free_units', $$'package', 100, 5, 100$$, 201);
-- a percentage quote is one paying event: bounded by min and max
SELECT * FROM pg_temp.amounts('model, rate, fixed_amount_per_event, min_per_event, max_per_event', $$'percentage', 0.01, 0.5, 1, 10$$,
                              '{0, 10, 100, 500, 2000, -300}');
-- exact, however many digits
SELECT * FROM pg_temp.amounts('model, unit_amount', $$'unit', 0.000000000000000001$$, '{123456789012345678901234567890}');

-- bad definitions: 22023 naming the field
SELECT regress.err(format('INSERT INTO metering.prices (meter_slug, %s) VALUES (%s)', c, v)) FROM (VALUES
  ('model', $$'api', NULL$$),
  ('model, unit_amount', $$'api', 'tiered', 1$$),
  ('model', $$'api', 'unit'$$),
  ('model, unit_amount, tiers', $$'api', 'unit', 1, '[{"up_to": null, "unit_amount": 1}]'$$),
  ('model', $$'api', 'graduated'$$),
  ('model, tiers, unit_amount', $$'api', 'volume', '[{"up_to": null, "unit_amount": 1}]', 2$$),
  ('model, tiers', $$'api', 'graduated', '[{"up_to": 10, "unit_amount": 1}, {"up_to": 5, "unit_amount": 1}, {"up_to": null, "unit_amount": 1}]'$$),
  ('model, tiers', $$'api', 'graduated', '[{"up_to": 10, "unit_amount": 1}, {"up_to": 10, "unit_amount": 1}, {"up_to": null, "unit_amount": 1}]'$$),
  ('model, tiers', $$'api', 'graduated', '[{"up_to": null, "unit_amount": 1}, {"up_to": 10, "unit_amount": 1}]'$$),
  ('model, tiers', $$'api', 'graduated', '[{"up_to": 10, "unit_amount": 1}]'$$),
  ('model, tiers', $$'api', 'graduated', '[{"up_to": 0, "unit_amount": 1}, {"up_to": null, "unit_amount": 1}]'$$),
  ('model, tiers', $$'api', 'graduated', '[{"up_to": 10, "unit_amount": -1}, {"up_to": null, "unit_amount": 1}]'$$),
  ('model, tiers', $$'api', 'volume', '[{"up_to": null, "flat_amount": "5"}]'$$),
  ('model, tiers', $$'api', 'volume', '[{"up_to": null}]'$$),
  ('model, tiers', $$'api', 'volume', '[{"unit_amount": 1}]'$$),
  ('model, tiers', $$'api', 'volume', '[{"up_to": null, "unit_amount": 1, "per": 2}]'$$),
  ('model, tiers', $$'api', 'volume', '[]'$$),
  ('model, tiers', $$'api', 'volume', '{"up_to": null}'$$),
  ('model, tiers', $$'api', 'volume', '[1]'$$),
  ('model, unit_amount', $$'api', 'unit', -0.01$$),
  ('model, unit_amount', $$'api', 'unit', 'NaN'$$),
  ('model, package_size, package_amount', $$'api', 'package', 0, 5$$),
  ('model, package_size', $$'api', 'package', 100$$),
  ('model, package_size, package_amount, free_units', $$'api', 'package', 100, 5, -1$$),
  ('model, unit_amount, free_units', $$'api', 'unit', 1, 10$$),
  ('model', $$'pay', 'percentage'$$),
  ('model, rate, free_events', $$'pay', 'percentage', 0.01, -1$$),
  ('model, rate, min_per_event, max_per_event', $$'pay', 'percentage', 0.01, 5, 1$$),
  ('model, rate', $$'calls', 'percentage', 0.01$$),
  ('model, rate, bill', $$'pay', 'percentage', 0.01, 'overage'$$),
  ('model, unit_amount, minimum_amount', $$'api', 'unit', 1, -10$$),
  ('model, unit_amount', $$'lat', 'unit', 1$$),
  ('model, unit_amount', $$'nope', 'unit', 1$$),
  ('model, unit_amount, currency', $$'api', 'unit', 1, 'usd'$$),
  ('model, unit_amount, bill', $$'api', 'unit', 1, 'everything'$$),
  ('model, unit_amount, subject', $$'api', 'unit', 1, ''$$),
  ('model, unit_amount, meter_group_by_filters', $$'api', 'unit', 1, '{"zone": "a"}'$$),
  ('model, unit_amount, meter_group_by_filters', $$'api', 'unit', 1, '{"region": ["eu"]}'$$),
  ('model, unit_amount, start', $$'api', 'unit', 1, '2023-12-31'$$),
  ('model, unit_amount, start, "end"', $$'api', 'unit', 1, '2024-02-01', '2024-01-15'$$)
) x(c, v);

-- the prices of this session: a general graduated price with a minimum, a
-- subject's own volume price, a percentage price, an overage price, and a
-- storage price that ends in the middle of history
INSERT INTO metering.prices (meter_slug, model, tiers, minimum_amount, name) VALUES
  ('api', 'graduated', '[{"up_to": 1000, "unit_amount": 0}, {"up_to": 100000, "unit_amount": 0.002}, {"up_to": null, "unit_amount": 0.001, "flat_amount": 5}]', 50, 'API calls');
INSERT INTO metering.prices (meter_slug, subject, model, tiers, name) VALUES
  ('api', 'bigco', 'volume', '[{"up_to": 100000, "unit_amount": 0.0015}, {"up_to": null, "unit_amount": 0.001}]', 'API calls (bigco)');
INSERT INTO metering.prices (meter_slug, model, rate, fixed_amount_per_event, free_events, min_per_event, max_per_event, currency, name) VALUES
  ('pay', 'percentage', 0.01, 0.25, 2, 0.5, 20, 'EUR', 'payments');
INSERT INTO metering.prices (meter_slug, model, unit_amount, bill, name) VALUES
  ('calls', 'unit', 0.1, 'overage', 'calls beyond the plan');
INSERT INTO metering.prices (meter_slug, model, unit_amount, "end", currency, name) VALUES
  ('storage', 'unit', 0.333, '2024-02-15', 'JPY', 'storage until mid-February');
SELECT name, model, subject, currency, bill, start, "end", created_at, created_by = current_user AS by_me, updated_at, deleted_at
  FROM metering.prices ORDER BY name;
-- one price per meter, filters and subject at any instant (23505)
SELECT regress.err($$INSERT INTO metering.prices (meter_slug, model, unit_amount) VALUES ('api', 'unit', 1)$$);
SELECT regress.err($$INSERT INTO metering.prices (meter_slug, subject, model, unit_amount) VALUES ('api', 'bigco', 'unit', 1)$$);
SELECT regress.err($$INSERT INTO metering.prices (meter_slug, model, unit_amount, start) VALUES ('storage', 'unit', 1, '2024-02-01')$$);
-- other filters are another key; a price from the other's end is its next period
INSERT INTO metering.prices (meter_slug, meter_group_by_filters, model, unit_amount, start, name) VALUES
  ('api', '{"region": "eu"}', 'unit', 0.5, '2024-06-01', 'EU calls, from June');
INSERT INTO metering.prices (meter_slug, model, unit_amount, start, currency, name) VALUES
  ('storage', 'unit', 0.5, '2024-02-15', 'JPY', 'storage from mid-February');
-- before its start a price may change; once started only its end
UPDATE metering.prices SET unit_amount = 0.25, meter_group_by_filters = '{"region": "us"}' WHERE name = 'EU calls, from June';
SELECT regress.err($$UPDATE metering.prices SET unit_amount = 0.2 WHERE name = 'storage until mid-February'$$);
SELECT regress.err($$UPDATE metering.prices SET "end" = '2023-12-01' WHERE name = 'storage until mid-February'$$);
SELECT regress.err($$UPDATE metering.prices SET tiers = '[{"up_to": null}]' WHERE name = 'EU calls, from June'$$);
UPDATE metering.prices SET "end" = '2024-07-01' WHERE name = 'payments';
UPDATE metering.prices SET "end" = NULL WHERE name = 'payments';
-- a soft delete keeps the row
DELETE FROM metering.prices WHERE name = 'EU calls, from June';
SELECT name, meter_group_by_filters, unit_amount, updated_at, updated_by = current_user AS by_me, deleted_at, deleted_by = current_user AS deleted_by_me
  FROM metering.prices WHERE name IN ('EU calls, from June', 'payments') ORDER BY name;
SELECT regress.err($$UPDATE metering.prices SET "end" = '2024-09-01' WHERE name = 'EU calls, from June'$$);

-- usage from January to March
SET metering.now = '2024-04-01 00:00:00+00';
SELECT count(*) FROM (SELECT metering.ingest(regress.ev('a' || i, s, 'api', t, jsonb_build_object('n', n, 'region', 'eu')))
  FROM (VALUES ('acme', '2024-01-10T00:00:00Z', 60000), ('acme', '2024-01-20T00:00:00Z', 90000), ('bigco', '2024-01-15T00:00:00Z', 150000),
               ('acme', '2024-02-10T00:00:00Z', 1000), ('solo', '2024-01-10T00:00:00Z', 250)) v(s, t, n),
       LATERAL (SELECT s || t AS i) x) e;
SELECT count(*) FROM (SELECT metering.ingest(regress.ev('p' || i, 'acme', 'pay', format('2024-01-%sT00:00:00Z', lpad(i::text, 2, '0')), jsonb_build_object('amount', a)))
  FROM (VALUES (1, 100), (2, 5000), (3, 10), (4, 200), (5, 5000), (6, -300)) v(i, a)) e;
SELECT count(*) FROM (SELECT metering.ingest(regress.ev('s' || i, 'acme', 'storage', t, jsonb_build_object('gb', 10)))
  FROM (VALUES (1, '2024-01-05T00:00:00Z'), (2, '2024-02-05T00:00:00Z'), (3, '2024-02-20T00:00:00Z'), (4, '2024-03-05T00:00:00Z')) v(i, t)) e;
SELECT count(*) FROM (SELECT metering.ingest(regress.ev('c' || s || i, s, 'call', '2024-01-15T00:00:00Z'))
  FROM generate_series(1, 150) i, unnest(ARRAY['acme', 'solo', 'nogrants']) s) e;

-- a plan: acme's entitlement to calls has 100 a month; nogrants has one without grants
SET metering.now = '2024-01-01 00:00:00+00';
SELECT metering.create_feature('calls', 'Calls', 'calls') IS NOT NULL AS feature;
SELECT metering.create_grant(metering.create_entitlement('acme', 'calls', usage_period => '1 month'), 100, '2024-01-01', recurrence => '1 month') IS NOT NULL AS acme_grant;
SELECT metering.create_entitlement('nogrants', 'calls', usage_period => '1 month') IS NOT NULL AS nogrants_entitlement;
SET metering.now = '2024-04-01 00:00:00+00';

CREATE FUNCTION pg_temp.lines(s text, f timestamptz, t timestamptz)
RETURNS TABLE(name text, model text, currency text, quantity numeric, amount numeric, rounded numeric)
LANGUAGE sql AS $$
  SELECT p.name, u.model, u.currency, u.quantity, u.amount, u.rounded
    FROM metering.price_usage(s, f, t) u JOIN metering.prices p ON p.id = u.price_id
$$;
-- acme's January: graduated calls with tier detail, payments, calls beyond
-- its 100 granted (150 - 100), storage (yen have no decimals)
SELECT * FROM pg_temp.lines('acme', '2024-01-01', '2024-02-01');
SELECT t->>'from' AS "from", t->>'up_to' AS up_to, t->>'units' AS units, t->>'unit_amount' AS unit_amount,
       t->>'flat_amount' AS flat_amount, t->>'amount' AS amount
  FROM metering.price_usage('acme', '2024-01-01', '2024-02-01') u, jsonb_array_elements(u.details->'tiers') t
 WHERE u.model = 'graduated';
-- payments: 2 free, then 1 % + 0.25, at least 0.50 and at most 20 each
-- (100 and 5000 are free; 10: 0.50 (raised), 200: 2.25, 5000: 20 (capped), -300: 0.50 (raised))
SELECT details FROM metering.price_usage('acme', '2024-01-01', '2024-02-01') WHERE model = 'percentage';
SELECT details FROM metering.price_usage('acme', '2024-01-01', '2024-02-01') WHERE meter = 'calls';
-- February: below the minimum of 50, a 'minimum' line makes up the difference
SELECT * FROM pg_temp.lines('acme', '2024-02-01', '2024-03-01');
SELECT details FROM metering.price_usage('acme', '2024-02-01', '2024-03-01') WHERE model = 'minimum';
-- storage: the price valid at the period's start prices the whole period;
-- the period from mid-February sees the next price
SELECT * FROM pg_temp.lines('acme', '2024-02-15', '2024-03-15') WHERE name LIKE 'storage%';
SELECT * FROM pg_temp.lines('acme', '2024-03-01', '2024-04-01') WHERE name LIKE 'storage%';
-- bigco's own price replaces the general one: 150,000 in the volume tier above 100,000
SELECT * FROM pg_temp.lines('bigco', '2024-01-01', '2024-02-01') WHERE name LIKE 'API%';
-- quantity 0 still gives a line (and the minimum)
SELECT * FROM pg_temp.lines('nobody', '2024-01-01', '2024-02-01') WHERE name LIKE 'API%' OR model = 'minimum';
-- bill => overage: without an entitlement all usage; with one but no grants all usage
SELECT s, quantity, amount, details->>'usage' AS usage, details->>'entitlement' AS entitlement
  FROM unnest(ARRAY['acme', 'solo', 'nogrants']) s, metering.price_usage(s, '2024-01-01', '2024-02-01') u
 WHERE u.meter = 'calls' ORDER BY s;
-- rollups give the same answers as the events
SELECT metering.refresh_rollups() > 0 AS refreshed;
SELECT * FROM pg_temp.lines('acme', '2024-01-01', '2024-02-01');
-- a deleted price still prices the periods that started before its deletion
SET metering.now = '2024-03-10 00:00:00+00';
DELETE FROM metering.prices WHERE name = 'payments';
SET metering.now = '2024-04-01 00:00:00+00';
SELECT count(*) FILTER (WHERE model = 'percentage') AS percentage_lines
  FROM metering.price_usage('acme', '2024-03-01', '2024-04-01');
SELECT count(*) FILTER (WHERE model = 'percentage') AS percentage_lines
  FROM metering.price_usage('acme', '2024-03-15', '2024-04-01');

-- rounding: each line once, half away from zero, in the currency's minor unit
SELECT c, metering.currency_minor_unit(c), round(2.5005::numeric, metering.currency_minor_unit(c)) AS "2.5005",
       round(-2.5005::numeric, metering.currency_minor_unit(c)) AS "-2.5005"
  FROM unnest(ARRAY['USD', 'EUR', 'JPY', 'KRW', 'BHD', 'KWD', 'OMR']) c;

-- errors of the functions
SELECT regress.err($$SELECT * FROM metering.price_quote('01a2138f-fb08-7164-94b7-f9375b039482', 1)$$);
SELECT regress.err(format('SELECT * FROM metering.price_quote(%L, NULL)', (SELECT id FROM metering.prices WHERE name = 'API calls')));
SELECT regress.err(format('SELECT * FROM metering.price_quote(%L, ''NaN'')', (SELECT id FROM metering.prices WHERE name = 'API calls')));
SELECT regress.err($$SELECT * FROM metering.price_usage('acme', '2024-02-01', '2024-01-01')$$);
SELECT regress.err($$SELECT * FROM metering.price_usage('acme', NULL, '2024-01-01')$$);
-- overflow is an error, never a wrap
INSERT INTO metering.prices (meter_slug, subject, model, unit_amount, name) VALUES ('storage', 'whale', 'unit', 1e100, 'storage for whales');
SELECT regress.err(format('SELECT * FROM metering.price_quote(%L, 1e131000)', (SELECT id FROM metering.prices WHERE name = 'storage for whales')));
RESET metering.now;
