-- Entitlements in bulk and under fuzzing: 10,000 grants on one entitlement
-- against a running-sum oracle, and random input to every function that
-- creates or changes features, entitlements, grants and resets, to the
-- burndown aggregate and to the history functions.  Every input is accepted
-- or rejected with the expected SQLSTATE; nothing is half-written; nothing
-- crashes.
BEGIN;
SELECT plan(15);
SELECT setseed(0.3);
SET LOCAL timezone = 'UTC';
SET LOCAL metering.now = '2024-01-01 00:00:00+00';

INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('b', 'b', 'SUM', '$.n', '{"k": "$.k"}');
SELECT metering.create_feature('bulk', 'Bulk', 'b');

-- 1. 10,000 grants, all active at the query instant: the burn is one pass in
-- burn order (priority, expiry, creation, id), so each grant's balance is its
-- amount less what the running sum before it leaves of the usage
SELECT metering.create_entitlement('big', 'bulk', usage_period => '1 year') AS e \gset
SELECT metering.create_grant(:'e', round((1 + random() * 100)::numeric, 2), '2024-01-01',
                             priority => floor(random() * 256)::int,
                             expiration => CASE WHEN random() < 0.5 THEN floor(10 + random() * 300) * interval '1 day' END)
  FROM generate_series(1, 10000);
SELECT metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object(
         'specversion', '1.0', 'id', 'u' || i, 'source', 'bulk', 'type', 'b', 'subject', 'big',
         'time', to_char('2024-01-01'::timestamptz + i * interval '1 minute', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
         'data', jsonb_build_object('n', round((random() * 100)::numeric, 3))))
       FROM generate_series(1, 5000) i));
SET LOCAL metering.now = '2024-01-06 00:00:00+00';
CREATE TEMP TABLE oracle AS
WITH u AS (SELECT sum((data->>'n')::numeric) AS usage FROM metering.events WHERE subject = 'big')
SELECT id, greatest(0, least(amount, amount - (u.usage - before))) AS balance
  FROM (SELECT g.id, g.amount,
               coalesce(sum(g.amount) OVER (ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id
                                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
          FROM metering.grants g WHERE g.entitlement_id = :'e') x, u;
SELECT is((SELECT count(*) FROM metering.grant_balances(:'e')), 10000::bigint, '10,000 active grants listed');
SELECT is((SELECT count(*) FROM metering.grant_balances(:'e') b JOIN oracle o ON o.id = b.grant_id AND o.balance = b.balance),
          10000::bigint, 'every grant''s balance equals the running-sum oracle');
SELECT is((SELECT balance FROM metering.entitlement_value('big', 'bulk')), (SELECT sum(balance) FROM oracle),
          'the balance is the sum of the grants');
SELECT is((SELECT usage FROM metering.entitlement_value('big', 'bulk')),
          (SELECT sum((data->>'n')::numeric) FROM metering.events WHERE subject = 'big'), 'usage');
SELECT ok((SELECT count(*) FROM metering.burndown_history(:'e')) >= 1, 'history over 10,000 grants');
-- half of them expire over the following year: the answer a year on is the oracle's too
SET LOCAL metering.now = '2024-12-31 00:00:00+00';
SELECT is((SELECT balance FROM metering.entitlement_value('big', 'bulk')),
          (SELECT sum(o.balance) FROM oracle o JOIN metering.grants g ON g.id = o.id
            WHERE g.expires_at IS NULL OR g.expires_at > '2024-12-31'),
          'expired grants drop out of the balance');
SET LOCAL metering.now = '2024-01-01 00:00:00+00';

-- random values of every type the functions take: valid seven times in
-- ten, else something wrong (NaN, infinities, out-of-range times, negative
-- or mixed-sign intervals, the wrong JSON type)
CREATE FUNCTION pg_temp.junk() RETURNS boolean LANGUAGE sql VOLATILE AS $$ SELECT random() < 0.3 $$;
CREATE FUNCTION pg_temp.rand_text() RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT pg_temp.junk() THEN 'ok-' || floor(random() * 20)::int
    ELSE (ARRAY['', repeat('x', 300), 'Caps', 'a--b', '-a', 'a_b', 'é', E'a\nb', 'a b', '中', NULL,
                chr(32 + floor(random() * 95)::int) || chr(32 + floor(random() * 95)::int)])[1 + floor(random() * 12)::int] END
$$;
CREATE FUNCTION pg_temp.rand_num() RETURNS numeric LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT pg_temp.junk() THEN round((random() * 1000)::numeric, floor(random() * 6)::int) + 0.01
    ELSE (ARRAY[NULL, 'NaN', 'Infinity', '-Infinity', 0, -5.5, 1e200, 1e-30])[1 + floor(random() * 8)::int] END
$$;
CREATE FUNCTION pg_temp.rand_time() RETURNS timestamptz LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT pg_temp.junk() THEN '2024-01-01'::timestamptz + (random() * 120 - 60) * interval '1 day'
    ELSE (ARRAY[NULL, 'infinity', '-infinity', '4713-01-01 00:00:00+00 BC', '294276-12-31 00:00:00+00',
                '2024-01-01'::timestamptz + (random() * 800 - 400) * interval '1 day'])[1 + floor(random() * 6)::int]::timestamptz END
$$;
CREATE FUNCTION pg_temp.rand_interval() RETURNS interval LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT pg_temp.junk()
    THEN (ARRAY['1 hour', '1 day', '1 month', '1 year', '7 days 3 hours', '31 days'])[1 + floor(random() * 6)::int]::interval
    ELSE (ARRAY[NULL, '0', '-1 day', '1 month -30 days', '100000 years', '59 minutes 59.999999 seconds'])[1 + floor(random() * 6)::int]::interval END
$$;
CREATE FUNCTION pg_temp.rand_json() RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT pg_temp.junk() THEN (ARRAY[NULL, '{}', '{"k": "a"}'])[1 + floor(random() * 3)::int]
    ELSE (ARRAY['[]', '"s"', '{"k": ["a", "b"]}', '{"nope": "a"}', '{"k": {"x": 1}}', '3'])[1 + floor(random() * 6)::int] END::jsonb
$$;

CREATE TEMP TABLE outcomes (kind text, sqlstate text, message text);
CREATE FUNCTION pg_temp.try(kind text, sql text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE sql;
  INSERT INTO outcomes VALUES (kind, NULL, NULL);
EXCEPTION WHEN OTHERS THEN
  INSERT INTO outcomes VALUES (kind, SQLSTATE, SQLERRM);
END $$;

-- 2. features
SELECT pg_temp.try('feature', format('SELECT metering.create_feature(%L, %L, %L, %L, %L)',
                   pg_temp.rand_text(), pg_temp.rand_text(),
                   (ARRAY[NULL, 'b', 'nope', ''])[1 + floor(random() * 4)::int],
                   pg_temp.rand_json(), pg_temp.rand_json()))
  FROM generate_series(1, 500);
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind = 'feature'),
          ARRAY['22023', '23503', '23505', 'ok'], 'features: created or rejected as invalid, unknown meter or duplicate');
SELECT metering.create_feature('bulk2', 'Bulk two', 'b');

-- 3. entitlements of every type, with random periods, anchors and amounts
SELECT pg_temp.try('entitlement', format(
         'SELECT metering.create_entitlement(%L, %L, %L, %L, %L, %L, %L, %L, %L, %L, %L, %L)',
         pg_temp.rand_text(), (ARRAY['bulk', 'bulk2', 'nope', NULL, 'bulk', 'bulk2'])[1 + floor(random() * 6)::int],
         (ARRAY['metered', 'boolean', 'static', 'metered', 'metered', NULL])[1 + floor(random() * 6)::int],
         pg_temp.rand_interval(), CASE WHEN random() < 0.5 THEN pg_temp.rand_time() END,
         CASE WHEN random() < 0.5 THEN pg_temp.rand_time() END, random() < 0.2,
         CASE WHEN random() < 0.3 THEN pg_temp.rand_num() END, (ARRAY[NULL, -1, 0, 1, 255, 256])[1 + floor(random() * 6)::int],
         random() < 0.3, CASE WHEN random() < 0.2 THEN pg_temp.rand_json() END, pg_temp.rand_json()))
  FROM generate_series(1, 1500);
-- and boolean and static ones made the right way, to have some of each
SELECT pg_temp.try('entitlement', format('SELECT metering.create_entitlement(%L, %L, %L, config => %L)',
                   'kind-' || i, 'bulk', (ARRAY['boolean', 'static'])[1 + i % 2], CASE WHEN i % 2 = 1 THEN '{"seats": 3}' END))
  FROM generate_series(1, 10) i;
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind = 'entitlement'),
          ARRAY['22023', '23505', 'P0002', 'ok'], 'entitlements: created or rejected as invalid, duplicate or unknown feature');
SELECT ok((SELECT count(*) FROM outcomes WHERE kind = 'entitlement' AND sqlstate IS NULL) > 30,
          'some random entitlements were valid');
SELECT is((SELECT count(*) FROM metering.entitlements e
            WHERE e.type = 'metered' AND e.issue_after_reset IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM metering.grants g WHERE g.entitlement_id = e.id)),
          0::bigint, 'every entitlement with issue_after_reset has its grant (nothing half-written)');

-- 4. grants, voids and resets on random entitlements, at random clocks
CREATE TEMP TABLE targets AS
SELECT id FROM metering.entitlements WHERE id <> :'e' ORDER BY random() LIMIT 40;
INSERT INTO targets VALUES ('01a2138f-fb08-7164-94b7-f9375b039482');
DO $$
DECLARE
  e uuid;
BEGIN
  FOR i IN 1 .. 2500 LOOP
    e := (SELECT id FROM targets ORDER BY random() LIMIT 1);
    PERFORM set_config('metering.now', ('2024-01-01'::timestamptz + random() * interval '60 days')::text, true);
    CASE floor(random() * 4)::int
      WHEN 0, 1 THEN
        PERFORM pg_temp.try('grant', format(
          'SELECT metering.create_grant(%L, %L, %L, %L, %L, %L, %L, %L, %L, %L)',
          e, pg_temp.rand_num(), pg_temp.rand_time(), (ARRAY[NULL, -1, 0, 3, 255, 256])[1 + floor(random() * 6)::int],
          pg_temp.rand_interval(), pg_temp.rand_interval(), pg_temp.rand_time(),
          pg_temp.rand_num(), pg_temp.rand_num(), pg_temp.rand_json()));
      WHEN 2 THEN
        PERFORM pg_temp.try('void', format('SELECT metering.void_grant(%L)',
          coalesce((SELECT id FROM metering.grants WHERE entitlement_id = e ORDER BY random() LIMIT 1), e)));
      ELSE
        PERFORM pg_temp.try('reset', format('SELECT metering.reset_entitlement(%L, %L, %L, %L)',
          e, pg_temp.rand_time(), random() < 0.5, CASE WHEN random() < 0.5 THEN random() < 0.5 END));
    END CASE;
  END LOOP;
END $$;
SELECT ok((SELECT array_agg(DISTINCT kind || ':' || coalesce(sqlstate, 'ok'))
             FROM outcomes WHERE kind IN ('grant', 'void', 'reset'))
          <@ ARRAY['grant:22023', 'grant:55000', 'grant:P0002', 'grant:ok',
                   'reset:22023', 'reset:55000', 'reset:P0002', 'reset:ok',
                   'void:55000', 'void:P0002', 'void:ok']
          AND (SELECT count(DISTINCT kind) FROM outcomes WHERE kind IN ('grant', 'void', 'reset') AND sqlstate IS NULL) = 3,
          'grants, voids and resets: done, or rejected with a documented SQLSTATE');

-- 5. every entitlement still answers, at random instants, through every function
SET LOCAL metering.now = '2024-03-15 00:00:00+00';
DO $$
DECLARE
  e record;
BEGIN
  FOR e IN SELECT id, subject FROM metering.entitlements WHERE subject <> 'big' LOOP
    FOR i IN 1 .. 3 LOOP
      PERFORM pg_temp.try('value', format('SELECT * FROM metering.entitlement_value(%L, %L, %L)',
                                          e.subject, e.id, pg_temp.rand_time()));
    END LOOP;
    PERFORM pg_temp.try('balances', format('SELECT * FROM metering.grant_balances(%L, %L)', e.id, pg_temp.rand_time()));
    PERFORM pg_temp.try('history', format('SELECT * FROM metering.burndown_history(%L, %L, %L)', e.id,
                                          '2024-01-01'::timestamptz + random() * interval '60 days',
                                          CASE WHEN random() < 0.2 THEN 'infinity' ELSE '2024-03-01'::timestamptz + random() * interval '14 days' END));
    PERFORM pg_temp.try('windows', format('SELECT * FROM metering.balance_history(%L, %L, %L, %L, %L)', e.id,
                                          '2024-02-01'::timestamptz + random() * interval '30 days', NULL,
                                          (ARRAY['HOUR', 'DAY', 'day', 'WEEK', NULL])[1 + floor(random() * 5)::int],
                                          (ARRAY['UTC', 'Asia/Kolkata', 'nowhere', NULL])[1 + floor(random() * 4)::int]));
  END LOOP;
END $$;
SELECT ok((SELECT array_agg(DISTINCT kind || ':' || coalesce(sqlstate, 'ok'))
             FROM outcomes WHERE kind IN ('value', 'balances', 'history', 'windows'))
          <@ ARRAY['balances:22023', 'balances:54000', 'balances:ok', 'history:22023', 'history:54000', 'history:ok',
                   'value:22023', 'value:54000', 'value:ok', 'windows:22023', 'windows:54000', 'windows:ok']
          AND (SELECT count(DISTINCT kind) FROM outcomes WHERE kind IN ('value', 'balances', 'history', 'windows') AND sqlstate IS NULL) = 4,
          'the read functions answer, or reject a bad range, window, time zone or a runaway span (54000)');

-- 6. the burndown aggregate with random grant lists: each field present or
-- not, of the right type or not, in range or not
CREATE FUNCTION pg_temp.rand_field() RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT CASE floor(random() * 10)::int
    WHEN 0 THEN 'null' WHEN 1 THEN '"x"' WHEN 2 THEN '-1' WHEN 3 THEN '300' WHEN 4 THEN '1.5'
    WHEN 5 THEN '1e40' WHEN 6 THEN '[]' WHEN 7 THEN '"2024-01-01 00:00"' WHEN 8 THEN '"1 day"'
    ELSE '"2024-13-01T00:00:00Z"' END::jsonb
$$;
CREATE FUNCTION pg_temp.rand_grant() RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT jsonb_strip_nulls(jsonb_build_object(
    'id', CASE WHEN random() < 0.2 THEN to_jsonb(gen_random_uuid()::text) WHEN random() < 0.1 THEN pg_temp.rand_field() END,
    'amount', CASE WHEN random() < 0.85 THEN to_jsonb(round((random() * 100)::numeric, 2)) ELSE pg_temp.rand_field() END,
    'priority', CASE WHEN random() < 0.4 THEN to_jsonb(floor(random() * 4)::int) WHEN random() < 0.2 THEN pg_temp.rand_field() END,
    'effective_at', CASE WHEN random() < 0.9 THEN to_jsonb(to_char('2024-01-01'::timestamptz + random() * interval '3 days', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))
                         ELSE pg_temp.rand_field() END,
    'expires_at', CASE WHEN random() < 0.3 THEN to_jsonb(to_char('2024-01-01'::timestamptz + random() * interval '5 days', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))
                       WHEN random() < 0.1 THEN pg_temp.rand_field() END,
    'recurrence', CASE WHEN random() < 0.3 THEN to_jsonb(pg_temp.rand_interval()::text) WHEN random() < 0.1 THEN pg_temp.rand_field() END,
    'recurrence_anchor', CASE WHEN random() < 0.1 THEN to_jsonb(to_char('2023-12-01'::timestamptz + random() * interval '60 days', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))
                              WHEN random() < 0.05 THEN pg_temp.rand_field() END))
$$;
DO $$
DECLARE
  grants jsonb;
BEGIN
  FOR i IN 1 .. 800 LOOP
    grants := CASE WHEN random() < 0.05 THEN pg_temp.rand_field()
                   ELSE (SELECT jsonb_agg(pg_temp.rand_grant()) FROM generate_series(1, 1 + floor(random() * 3)::int)) END;
    PERFORM pg_temp.try('aggregate', format(
      'SELECT metering.burndown(t, n, %L::jsonb%s ORDER BY t) FROM (SELECT %L::timestamptz + random() * interval ''4 days'' AS t, %s AS n FROM generate_series(1, 50)) v',
      grants, CASE WHEN random() < 0.3 THEN format(', %L::timestamptz', pg_temp.rand_time()) ELSE '' END,
      '2024-01-01', (ARRAY['round((random() * 10)::numeric, 2)', 'floor(random() * 10)::numeric', 'round((random() * 10)::numeric, 2)',
             '''NaN''::numeric', 'NULL::numeric', '-1::numeric'])[1 + floor(random() * 6)::int]));
  END LOOP;
END $$;
SELECT ok((SELECT count(*) FROM outcomes WHERE kind = 'aggregate' AND sqlstate IS NULL) > 100,
          'many random grant lists were valid');
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind = 'aggregate'),
          ARRAY['22023', 'ok'], 'the burndown aggregate answers or rejects its input with 22023');
SELECT is((SELECT count(*) FROM outcomes WHERE sqlstate LIKE 'XX%' OR sqlstate LIKE '42%' OR sqlstate LIKE '08%'),
          0::bigint, 'no internal error anywhere');
ROLLBACK;
