-- The price engine against an oracle: an independent reading of the rules,
-- unit by unit (each unit k = 1..q finds its tier; a tier's flat fee comes
-- with its first unit; a package is counted at its first unit), written in
-- plain SQL, over random tiers, packages, percentages and quantities.  Then
-- price_usage over random events, from rollups and from raw events, against
-- the oracle fed with the events themselves.
BEGIN;
SELECT plan(11);
SELECT setseed(0.12);
SET LOCAL timezone = 'UTC';
SET LOCAL metering.now = '2024-01-01 00:00:00+00';

INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('o', 'o', 'SUM', '$.n', '{"k": "$.k"}'), ('t', 't', 'SUM', '$.v', '{}');

-- the oracle for integer quantities
CREATE FUNCTION pg_temp.tier_of(tiers jsonb, k numeric) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
  SELECT min(i)::integer FROM jsonb_array_elements(tiers) WITH ORDINALITY t(x, i)
   WHERE x->'up_to' = 'null' OR (x->>'up_to')::numeric >= k
$$;
CREATE FUNCTION pg_temp.oracle(p metering.prices, q numeric) RETURNS numeric
LANGUAGE sql AS $$
  SELECT CASE p.model
    WHEN 'unit' THEN q * p.unit_amount
    WHEN 'graduated' THEN
      coalesce((SELECT sum(coalesce((p.tiers->(pg_temp.tier_of(p.tiers, k) - 1)->>'unit_amount')::numeric, 0))
                FROM generate_series(1, q::bigint) k), 0)
      + coalesce((SELECT sum(coalesce((p.tiers->(t - 1)->>'flat_amount')::numeric, 0))
                  FROM (SELECT DISTINCT pg_temp.tier_of(p.tiers, k) t FROM generate_series(1, q::bigint) k) d), 0)
    WHEN 'volume' THEN
      CASE WHEN q <= 0 THEN 0 ELSE
        q * coalesce((p.tiers->(pg_temp.tier_of(p.tiers, q) - 1)->>'unit_amount')::numeric, 0)
          + coalesce((p.tiers->(pg_temp.tier_of(p.tiers, q) - 1)->>'flat_amount')::numeric, 0) END
    WHEN 'package' THEN
      p.package_amount * (SELECT count(*) FROM generate_series(1, (q - coalesce(p.free_units, 0))::bigint) k
                           WHERE (k - 1) % p.package_size::bigint = 0)
  END
$$;
-- random tiers: 1 to 5, integer bounds, amounts with up to 4 decimals, some flat fees, some flat only
CREATE FUNCTION pg_temp.random_tiers() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  n integer := 1 + floor(random() * 5)::integer;
  bound integer := 0;
  r jsonb := '[]';
  t jsonb;
BEGIN
  FOR i IN 1..n LOOP
    bound := bound + 1 + floor(random() * 300)::integer;
    t := jsonb_build_object('up_to', CASE WHEN i = n THEN NULL ELSE bound END);
    IF random() < 0.9 THEN
      t := t || jsonb_build_object('unit_amount', round((random() * 2)::numeric, floor(random() * 5)::integer));
    END IF;
    IF random() < 0.4 OR NOT t ? 'unit_amount' THEN
      t := t || jsonb_build_object('flat_amount', round((random() * 50)::numeric, 2));
    END IF;
    r := r || jsonb_build_array(t);
  END LOOP;
  RETURN r;
END $$;

CREATE TEMP TABLE cases AS
SELECT c, m, CASE WHEN m IN ('graduated', 'volume') THEN pg_temp.random_tiers() END AS tiers,
       round((random() * 0.01)::numeric, 6) AS unit_amount,
       1 + floor(random() * 50) AS package_size, round((random() * 10)::numeric, 2) AS package_amount,
       CASE WHEN random() < 0.5 THEN floor(random() * 100) END AS free_units
  FROM generate_series(1, 60) c, unnest(ARRAY['unit', 'graduated', 'volume', 'package']) m;
-- the quantities: 0, random, and every tier boundary with its neighbours
CREATE TEMP TABLE quantities AS
SELECT c.c, c.m, q::numeric AS q
  FROM cases c, LATERAL (SELECT 0 UNION SELECT 1 + floor(random() * 1500) UNION SELECT 1 + floor(random() * 40)
                          UNION SELECT (x->>'up_to')::numeric + d FROM jsonb_array_elements(c.tiers) x, unnest(ARRAY[-1, 0, 1]) d
                           WHERE x->'up_to' <> 'null') qs(q)
 WHERE q >= 0;

-- each case is a price (a subject of its own, so that they do not collide)
INSERT INTO metering.prices (meter_slug, subject, model, unit_amount, tiers, package_size, package_amount, free_units)
SELECT 'o', c.m || c.c, c.m, CASE WHEN c.m = 'unit' THEN c.unit_amount END, c.tiers,
       CASE WHEN c.m = 'package' THEN c.package_size END, CASE WHEN c.m = 'package' THEN c.package_amount END,
       CASE WHEN c.m = 'package' THEN c.free_units END
  FROM cases c;

CREATE TEMP TABLE results AS
SELECT p.model, q.q, p.tiers, (metering.price_quote(p.id, q.q)).amount AS engine, pg_temp.oracle(p, q.q) AS oracle
  FROM cases c JOIN metering.prices p ON p.subject = c.m || c.c JOIN quantities q ON q.c = c.c AND q.m = c.m;

SELECT is((SELECT count(*) FROM results WHERE model = m AND engine IS DISTINCT FROM oracle), 0::bigint,
          format('%s: the engine agrees with the unit-by-unit oracle on %s random cases', m,
                 (SELECT count(*) FROM results WHERE model = m)))
  FROM unnest(ARRAY['unit', 'graduated', 'volume', 'package']) m;
SELECT diag(format('%s q=%s tiers=%s engine=%s oracle=%s', model, q, tiers, engine, oracle))
  FROM results WHERE engine IS DISTINCT FROM oracle LIMIT 5;

-- fractional quantities: graduated is additive over its tiers, so pricing
-- q in one go equals the sum of the tiers' detail, and each tier's units
-- add up to q
SELECT is((SELECT count(*) FROM (
             SELECT p.id, x.q, (metering.price_quote(p.id, x.q)).*
               FROM metering.prices p, LATERAL (SELECT round((random() * 2000)::numeric, 3) AS q) x
              WHERE p.model = 'graduated') r
            WHERE r.amount <> (SELECT sum((t->>'amount')::numeric) FROM jsonb_array_elements(r.details->'tiers') t)
               OR r.q <> (SELECT sum((t->>'units')::numeric) FROM jsonb_array_elements(r.details->'tiers') t)), 0::bigint,
          'graduated: fractional quantities split exactly over the tiers');

-- percentage: random events of random values (some negative), random
-- rate, fixed fee, bounds and free events; the oracle sorts the events itself
SET LOCAL metering.now = '2024-03-01 00:00:00+00';
CREATE TEMP TABLE ingested_1 AS SELECT count(*) FROM (SELECT metering.ingest(jsonb_build_object('specversion', '1.0', 'id', 'v' || s || '-' || i, 'source', 'o',
         'subject', 's' || s, 'type', 't', 'time', to_char(timestamptz '2024-01-01' + (random() * 45) * interval '1 day', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
         'data', jsonb_build_object('v', round((random() * 400 - 50)::numeric, 2))))
  FROM generate_series(1, 20) s, generate_series(1, 1 + floor(random() * 30)::integer) i) e;
SET LOCAL metering.allow_backdated_rules = on;
INSERT INTO metering.prices (meter_slug, subject, model, rate, fixed_amount_per_event, free_events, min_per_event, max_per_event, start)
SELECT 't', 's' || s, 'percentage', round((random() * 0.05)::numeric, 4),
       CASE WHEN random() < 0.7 THEN round((random())::numeric, 2) END,
       CASE WHEN random() < 0.5 THEN floor(random() * 5) END,
       CASE WHEN random() < 0.5 THEN 0.5 END, CASE WHEN random() < 0.5 THEN 3 END, '2023-12-01'
  FROM generate_series(1, 20) s;
SELECT is((SELECT count(*) FROM metering.prices p,
                  LATERAL (SELECT u.amount FROM metering.price_usage(p.subject, '2024-01-01', '2024-02-01') u WHERE u.price_id = p.id) u,
                  LATERAL (SELECT coalesce(sum(LEAST(GREATEST(p.rate * v + coalesce(p.fixed_amount_per_event, 0), coalesce(p.min_per_event, '-Infinity')),
                                                     coalesce(p.max_per_event, 'Infinity'))) FILTER (WHERE rn > coalesce(p.free_events, 0)), 0) AS amount
                             FROM (SELECT (e.data->>'v')::numeric v, row_number() OVER (ORDER BY e.time, e.seq) rn
                                     FROM metering.events e
                                    WHERE e.subject = p.subject AND e.type = 't' AND e.time >= '2024-01-01' AND e.time < '2024-02-01') x) o
            WHERE p.model = 'percentage' AND u.amount <> o.amount), 0::bigint,
          'percentage: price_usage agrees with the oracle over random events, rates, bounds and free events');

-- price_usage of the other models: the meter's value over the period, from
-- raw events and from rollups with events above the watermark
CREATE TEMP TABLE ingested_2 AS SELECT count(*) FROM (SELECT metering.ingest(jsonb_build_object('specversion', '1.0', 'id', 'q' || c.m || c.c || '-' || i, 'source', 'o',
         'subject', c.m || c.c, 'type', 'o', 'time', to_char(timestamptz '2024-01-01' + (random() * 45) * interval '1 day', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
         'data', jsonb_build_object('n', floor(random() * 100), 'k', CASE WHEN random() < 0.5 THEN 'a' ELSE 'b' END)))
  FROM cases c, generate_series(1, floor(random() * 20)::integer) i WHERE c.c <= 15) e;
CREATE FUNCTION pg_temp.mismatches(f timestamptz DEFAULT '2024-01-01', t timestamptz DEFAULT '2024-02-01') RETURNS bigint
LANGUAGE sql AS $$
  SELECT count(*) FROM metering.prices p,
         LATERAL (SELECT u.quantity, u.amount FROM metering.price_usage(p.subject, f, t) u
                   WHERE u.price_id = p.id AND u.model <> 'minimum') u,
         LATERAL (SELECT coalesce(sum((e.data->>'n')::numeric), 0) AS q FROM metering.events e
                   WHERE e.subject = p.subject AND e.type = 'o' AND e.time >= f AND e.time < t) e
   WHERE p.meter_slug = 'o' AND (u.quantity <> e.q OR u.amount <> pg_temp.oracle(p, e.q))
$$;
SELECT is(pg_temp.mismatches(), 0::bigint, 'price_usage from raw events agrees with the oracle');
SELECT ok(metering.refresh_rollups() > 0, 'rollups refreshed');
CREATE TEMP TABLE ingested_3 AS SELECT count(*) FROM (SELECT metering.ingest(jsonb_build_object('specversion', '1.0', 'id', 'late' || c.m || c.c, 'source', 'o',
         'subject', c.m || c.c, 'type', 'o', 'time', '2024-01-20T10:00:00Z', 'data', jsonb_build_object('n', 7)))
  FROM cases c WHERE c.c <= 15) e;
SELECT is(pg_temp.mismatches(), 0::bigint, 'price_usage from rollups plus events above the watermark agrees with the oracle');
SELECT is(pg_temp.mismatches('2024-01-03 10:17:00+00', '2024-01-20 10:30:05+00'), 0::bigint,
          'a period that starts and ends within hours: rollups, partial hours and late events agree with the oracle');
SELECT is((SELECT sum(pg_temp.mismatches(d + interval '10 minutes', d + interval '50 minutes'))
             FROM generate_series(timestamptz '2024-01-01', '2024-01-31', interval '1 day 1 hour') d), 0::numeric,
          'periods within one hour agree with the oracle');

SELECT * FROM finish();
ROLLBACK;
