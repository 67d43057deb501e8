-- Fuzz of every definition column of metering.prices: random and mutated
-- JSON tiers, random numbers (negative, zero, huge, NaN, infinities),
-- models, currencies, bills, filters, subjects and validity.  Each attempt
-- is a clean accept or a reject with 22023 (23503 for an unknown meter),
-- never another error or a crash; every accepted price then quotes random
-- quantities without an error but 22003 (an amount beyond numeric).
BEGIN;
SELECT plan(6);
SELECT setseed(0.77);
SET LOCAL timezone = 'UTC';
SET LOCAL metering.now = '2024-01-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('f', 'f', 'SUM', '$.n', '{"k": "$.k"}'), ('g', 'g', 'MAX', '$.n', '{}');
INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('h', 'h', 'COUNT');

CREATE FUNCTION pg_temp.pick(a anyarray) RETURNS anyelement
LANGUAGE sql AS $$ SELECT a[1 + floor(random() * cardinality(a))::integer] $$;
-- a random number, sometimes absurd
CREATE FUNCTION pg_temp.num() RETURNS numeric
LANGUAGE sql AS $$
  SELECT CASE WHEN random() < 0.4 THEN NULL
              ELSE pg_temp.pick(ARRAY[0, 1, -1, 0.5, 100, 1e-30, 1e300, -1e300, 'NaN', 'Infinity', '-Infinity',
                                      round((random() * 1000)::numeric, 3), round((random() * 10 - 5)::numeric, 2)]::numeric[]) END
$$;
-- a parameter: mostly given for the models that take it, mostly NULL for the others
CREATE FUNCTION pg_temp.par(model text, takes text[]) RETURNS numeric
LANGUAGE sql AS $$
  SELECT CASE WHEN (model = ANY (takes)) = (random() < 0.93) THEN coalesce(pg_temp.num(), round((random() * 100)::numeric, 2)) END
$$;
-- a random JSON value
CREATE FUNCTION pg_temp.junk() RETURNS jsonb
LANGUAGE sql AS $$
  SELECT pg_temp.pick(ARRAY['null', '1', '-1', '0', '"5"', 'true', '[]', '{}', '[1]', '{"a": 1}', '1e400', '-0', '0.000001',
                            '12345678901234567890', '"x"', '[null]', '{"up_to": null}']::jsonb[])
$$;
-- a valid tiers array, then mutated
CREATE FUNCTION pg_temp.tiers() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  n integer := 1 + floor(random() * 4)::integer;
  r jsonb := '[]';
  b numeric := 0;
  t jsonb;
  i integer;
  keys text[] := ARRAY['up_to', 'unit_amount', 'flat_amount', 'extra'];
BEGIN
  IF random() < 0.1 THEN
    RETURN pg_temp.junk();
  END IF;
  FOR j IN 1..n LOOP
    b := b + 1 + floor(random() * 100);
    r := r || jsonb_build_array(jsonb_build_object('up_to', CASE WHEN j = n THEN NULL ELSE b END,
                                                   'unit_amount', round((random())::numeric, 3), 'flat_amount', 0));
  END LOOP;
  FOR m IN 1..floor(random() * 3)::integer LOOP
    i := floor(random() * n)::integer;
    t := r->i;
    CASE floor(random() * 6)::integer
      WHEN 0 THEN t := t - pg_temp.pick(keys);
      WHEN 1 THEN t := jsonb_set(t, ARRAY[pg_temp.pick(keys)], pg_temp.junk());
      WHEN 2 THEN t := pg_temp.junk();
      WHEN 3 THEN r := r || jsonb_build_array(t);            -- a duplicate at the end
      WHEN 4 THEN r := jsonb_build_array(t) || r;            -- out of order
      ELSE t := t || jsonb_build_object('up_to', round((random() * 200 - 20)::numeric, 1));
    END CASE;
    IF jsonb_typeof(r) = 'array' AND i < jsonb_array_length(r) THEN
      r := jsonb_set(r, ARRAY[i::text], t);
    END IF;
  END LOOP;
  RETURN r;
END $$;

CREATE TEMP TABLE attempts (n integer, state text, message text, id uuid);
DO $$
DECLARE
  id uuid;
BEGIN
  FOR n IN 1..3000 LOOP
    BEGIN
      INSERT INTO metering.prices (meter_slug, meter_group_by_filters, subject, model, currency, unit_amount, tiers,
                                   package_size, package_amount, free_units, rate, fixed_amount_per_event, free_events,
                                   min_per_event, max_per_event, minimum_amount, bill, start, "end")
      SELECT pg_temp.pick(ARRAY['f', 'f', 'f', 'f', 'f', 'g', 'h', 'nope']),
             CASE WHEN random() < 0.8 THEN NULL ELSE pg_temp.pick(ARRAY['{"k": "a"}', '{"k": 1}', '{"x": "a"}', '{"k": null}', '[]', '"k"', '{}']::jsonb[]) END,
             's' || n, m,
             CASE WHEN random() < 0.9 THEN 'USD' ELSE pg_temp.pick(ARRAY['usd', 'EURO', '', 'JPY', 'X1Z']) END,
             pg_temp.par(m, '{unit}'),
             CASE WHEN (m IN ('graduated', 'volume')) = (random() < 0.93) THEN pg_temp.tiers() END,
             pg_temp.par(m, '{package}'), pg_temp.par(m, '{package}'), pg_temp.par(m, '{package}'),
             pg_temp.par(m, '{percentage}'), pg_temp.par(m, '{percentage}'),
             CASE WHEN (m = 'percentage') = (random() < 0.93) THEN pg_temp.pick(ARRAY[0, 1, 5, -1, 9223372036854775807]::bigint[]) END,
             pg_temp.par(m, '{percentage}'), pg_temp.par(m, '{percentage}'),
             CASE WHEN random() < 0.7 THEN NULL ELSE pg_temp.num() END,
             CASE WHEN random() < 0.9 THEN 'usage' ELSE pg_temp.pick(ARRAY['overage', 'all', '']) END,
             CASE WHEN random() < 0.9 THEN '2024-01-01' ELSE pg_temp.pick(ARRAY['2023-01-01', 'infinity', '2030-01-01']::timestamptz[]) END,
             CASE WHEN random() < 0.8 THEN NULL ELSE pg_temp.pick(ARRAY['2023-06-01', '2025-01-01', 'infinity', '2024-01-01']::timestamptz[]) END
        FROM (SELECT pg_temp.pick(ARRAY['unit', 'graduated', 'volume', 'package', 'percentage', 'unit', 'graduated', 'volume', 'package', 'percentage', 'Unit', '', 'tiered']) AS m) mm
      RETURNING prices.id INTO id;
      INSERT INTO attempts VALUES (n, 'ok', NULL, id);
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO attempts VALUES (n, SQLSTATE, SQLERRM, NULL);
    END;
  END LOOP;
END $$;

SELECT is(ARRAY(SELECT DISTINCT state || ': ' || message FROM attempts WHERE state NOT IN ('ok', '22023', '23503') LIMIT 5),
          '{}'::text[], 'every definition is accepted or refused with 22023 (23503: unknown meter)');
SELECT cmp_ok((SELECT count(*) FROM attempts WHERE state = 'ok'), '>', 100::bigint, 'many random definitions are accepted');
SELECT cmp_ok((SELECT count(DISTINCT message) FROM attempts WHERE state = '22023'), '>', 30::bigint,
              'the refusals name many different fields');
SELECT lives_ok($$SELECT metering._price_check(p) FROM metering.prices p$$,
                'every stored price passes the checks again');

CREATE TEMP TABLE quotes (state text, message text);
DO $$
DECLARE
  p record;
  q numeric;
  a numeric;
BEGIN
  FOR p IN SELECT id FROM metering.prices LOOP
    FOREACH q IN ARRAY ARRAY[0, 1, -1, 0.5, 99, 100, 101, 1e6, -1e6, 1e-20, 1e120, round((random() * 1000)::numeric, 4)]::numeric[] LOOP
      BEGIN
        SELECT r.amount INTO a FROM metering.price_quote(p.id, q) r;
        INSERT INTO quotes VALUES ('ok', NULL);
      EXCEPTION WHEN OTHERS THEN
        INSERT INTO quotes VALUES (SQLSTATE, SQLERRM);
      END;
    END LOOP;
  END LOOP;
END $$;
SELECT is(ARRAY(SELECT DISTINCT state || ': ' || message FROM quotes WHERE state NOT IN ('ok', '22003') LIMIT 5),
          '{}'::text[], 'every accepted price quotes any quantity (22003 only beyond numeric)');
-- and the period's pricing of every stored price runs too
SELECT lives_ok($$SELECT count(*) FROM metering.prices p, metering.price_usage(p.subject, '2024-01-01', '2024-02-01')$$,
                'price_usage runs over every accepted price');

SELECT * FROM finish();
ROLLBACK;
