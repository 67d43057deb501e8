-- The burndown engine: the OpenMeter examples of the issue, then our own edge cases.
-- t0 = 2024-01-01 00:00 UTC; unless stated, an entitlement is measured from t0 with a
-- yearly period anchored at t0, and metering.now is after every instant used.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
  VALUES ('u', 'use', 'SUM', '$.n', '{"model": "$.model"}');
SELECT metering.create_feature('f', 'F', 'u') IS NOT NULL AS feature;

-- usage: n units for a subject at an instant
CREATE FUNCTION pg_temp.use(subject text, at timestamptz, n numeric, model text DEFAULT 'm1') RETURNS boolean
LANGUAGE sql AS $$
  SELECT metering.ingest(regress.ev(gen_random_uuid()::text, subject, 'use',
                                    to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                                    jsonb_build_object('n', n, 'model', model)))
$$;
CREATE FUNCTION pg_temp.ent(subject text, period interval DEFAULT '1 year', preserve boolean DEFAULT false,
                            soft boolean DEFAULT false, issue numeric DEFAULT NULL) RETURNS uuid
LANGUAGE sql AS $$
  SELECT metering.create_entitlement(subject, 'f', usage_period => period, usage_period_anchor => '2024-01-01',
                                     measure_usage_from => '2024-01-01', preserve_overage_at_reset => preserve,
                                     is_soft_limit => soft, issue_after_reset => issue)
$$;
-- the whole answer at an instant
CREATE FUNCTION pg_temp.v(subject text, at timestamptz)
RETURNS TABLE(has_access boolean, balance numeric, usage numeric, overage numeric, total numeric, period_start timestamptz)
LANGUAGE sql AS $$
  SELECT has_access, balance, usage, overage, total_available_grant_amount, start_of_period
    FROM metering.entitlement_value(subject, 'f', at)
$$;
-- each active grant's balance, named by its priority and amount
CREATE FUNCTION pg_temp.gb(e uuid, at timestamptz) RETURNS TABLE(grant_label text, balance numeric)
LANGUAGE sql AS $$
  SELECT format('p%s/%s/%s', g.priority, g.amount, to_char(g.effective_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI')), b.balance
    FROM metering.grant_balances(e, at) b JOIN metering.grants g ON g.id = b.grant_id
   ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id
$$;

-- Example 1: priority 1 burns before priority 2
SELECT pg_temp.ent('ex1') AS e1 \gset
SELECT metering.create_grant(:'e1', 100, '2024-01-01', priority => 1) IS NOT NULL AS g,
       metering.create_grant(:'e1', 100, '2024-01-01', priority => 2) IS NOT NULL AS g;
SELECT pg_temp.use('ex1', '2024-01-01 01:00', 120);
SELECT * FROM pg_temp.v('ex1', '2024-01-02');
SELECT * FROM pg_temp.gb(:'e1', '2024-01-02');

-- Example 2: equal priority, the sooner expiry burns first
SELECT pg_temp.ent('ex2') AS e2 \gset
SELECT metering.create_grant(:'e2', 100, '2024-01-01', priority => 1, expiration => '100 years') IS NOT NULL AS g,
       metering.create_grant(:'e2', 100, '2024-01-01', priority => 1, expiration => '30 days') IS NOT NULL AS g;
SELECT pg_temp.use('ex2', '2024-01-01 01:00', 120);
SELECT g.expires_at, b.balance FROM metering.grant_balances(:'e2', '2024-01-02') b
  JOIN metering.grants g ON g.id = b.grant_id ORDER BY g.expires_at;

-- Example 3: a daily refill pays the overage first
SELECT pg_temp.ent('ex3') AS e3 \gset
SELECT metering.create_grant(:'e3', 100, '2024-01-01', recurrence => '1 day') IS NOT NULL AS g;
SELECT pg_temp.use('ex3', '2024-01-01 01:00', 120);
SELECT 't0+2h' AS at, * FROM pg_temp.v('ex3', '2024-01-01 02:00')
UNION ALL SELECT 't0+1d', * FROM pg_temp.v('ex3', '2024-01-02 00:00')
UNION ALL SELECT 't0+1d+1h', * FROM pg_temp.v('ex3', '2024-01-02 01:00');

-- Example 4: max rollover 50, a manual reset without preserved overage
SELECT pg_temp.ent('ex4') AS e4 \gset
SELECT metering.create_grant(:'e4', 100, '2024-01-01', max_rollover_amount => 50) IS NOT NULL AS g;
SELECT pg_temp.use('ex4', '2024-01-01 01:00', 10);
SELECT metering.reset_entitlement(:'e4', '2024-01-01 05:00', preserve_overage => false);
SELECT * FROM pg_temp.v('ex4', '2024-01-02');
SELECT segment_start, segment_end, balance_at_start, overage_at_start, usage, overage, terminations
  FROM metering.burndown_history(:'e4', '2024-01-01', '2024-01-02');

-- Example 5: min = max rollover 50, a reset that preserves overage
SELECT pg_temp.ent('ex5') AS e5 \gset
SELECT metering.create_grant(:'e5', 100, '2024-01-01', min_rollover_amount => 50, max_rollover_amount => 50) IS NOT NULL AS g;
SELECT pg_temp.use('ex5', '2024-01-01 01:00', 10), pg_temp.use('ex5', '2024-01-01 02:00', 100);
SELECT metering.reset_entitlement(:'e5', '2024-01-01 05:00', preserve_overage => true);
SELECT 'before' AS at, * FROM pg_temp.v('ex5', '2024-01-01 04:59')
UNION ALL SELECT 'at reset', * FROM pg_temp.v('ex5', '2024-01-01 05:00')
UNION ALL SELECT 'after', * FROM pg_temp.v('ex5', '2024-01-01 06:00');
SELECT segment_start, segment_end, balance_at_start, overage_at_start, usage, overage, grant_usages <> '{}' AS burnt, terminations
  FROM metering.burndown_history(:'e5', '2024-01-01', '2024-01-01 06:00');

-- Example 6: three grants over a day, hourly balance history
SELECT pg_temp.ent('ex6') AS e6 \gset
SELECT metering.create_grant(:'e6', 10000, t) IS NOT NULL AS g
  FROM unnest(ARRAY['2024-01-01 00:00', '2024-01-01 03:00', '2024-01-01 05:30']::timestamptz[]) t;
SELECT pg_temp.use('ex6', t, n) FROM (VALUES ('2024-01-01 00:01'::timestamptz, 100), ('2024-01-01 02:01', 100),
  ('2024-01-01 03:01', 100), ('2024-01-01 05:01', 100), ('2024-01-01 08:01', 1100)) v(t, n);
SELECT * FROM metering.balance_history(:'e6', '2024-01-01', '2024-01-01 09:00', 'HOUR');
-- the same, day by day in a time zone: the window opens at local midnight
SELECT * FROM metering.balance_history(:'e6', '2023-12-31', '2024-01-02', 'DAY', 'America/New_York');
SELECT regress.err(format('SELECT * FROM metering.balance_history(%L, NULL, NULL, %L)', :'e6', 'WEEK'));
SELECT regress.err(format('SELECT * FROM metering.balance_history(%L, NULL, NULL, %L, %L)', :'e6', 'DAY', 'Mars/Olympus'));

-- Exactness: 0.3 - 0.1 - 0.2 is 0
SELECT pg_temp.ent('exact') AS e_exact \gset
SELECT metering.create_grant(:'e_exact', 0.3, '2024-01-01') IS NOT NULL AS g;
SELECT pg_temp.use('exact', '2024-01-01 01:00', 0.1), pg_temp.use('exact', '2024-01-01 02:00', 0.2);
SELECT balance, balance = 0 AS exactly_zero, overage, usage FROM metering.entitlement_value('exact', 'f', '2024-01-02');
-- and big numbers stay exact
SELECT metering.create_grant(:'e_exact', 123456789012345678901234567890.123456789, '2024-01-01', priority => 9) IS NOT NULL AS g;
SELECT pg_temp.use('exact', '2024-01-01 03:00', 0.000000001);
SELECT balance FROM metering.entitlement_value('exact', 'f', '2024-01-02');

-- rollover is public
SELECT metering.rollover(b, mn, mx) FROM (VALUES (80, 0, 50), (10, 20, 50), (30, 20, 50), (0, 0, 0), (-5, 0, 10)) v(b, mn, mx);

-- Month-end anchors: monthly from Jan 31 gives Feb 29, Mar 31, Apr 30, never drifting
SET metering.now = '2024-01-31 00:00:00+00';
SELECT metering.create_entitlement('monthend', 'f', usage_period => '1 month') AS e_me \gset
SELECT metering.create_grant(:'e_me', 100, '2024-01-31', recurrence => '1 month') IS NOT NULL AS g,
       metering.create_grant(:'e_me', 7, '2024-01-31', priority => 5, expiration => '1 month') IS NOT NULL AS g;
SELECT expires_at FROM metering.grants WHERE entitlement_id = :'e_me' AND expiration IS NOT NULL;
SET metering.now = '2024-06-01 00:00:00+00';
SELECT pg_temp.use('monthend', t, 30) FROM unnest(ARRAY['2024-02-01', '2024-03-01', '2024-03-30', '2024-04-01']::timestamptz[]) t;
SELECT at, v.* FROM unnest(ARRAY['2024-02-28 23:59', '2024-02-29 00:00', '2024-03-30 12:00', '2024-03-31 00:00',
                                 '2024-04-29 00:00', '2024-04-30 00:00', '2024-05-31 00:00']::timestamptz[]) at,
  LATERAL pg_temp.v('monthend', at) v;
SELECT n, metering.calendar_step('2024-01-31', '1 month', n) FROM generate_series(-2, 4) n;

-- A void exactly at a phase boundary: the grant is inactive from that instant, its rest forfeited
SET metering.now = '2024-01-01 00:00:00+00';
SELECT pg_temp.ent('void') AS e_void \gset
SELECT metering.create_grant(:'e_void', 100, '2024-01-01', priority => 1) AS g_void \gset
SELECT metering.create_grant(:'e_void', 100, '2024-01-01 02:00', priority => 2) IS NOT NULL AS g;
SET metering.now = '2024-01-01 02:00:00+00';
SELECT metering.void_grant(:'g_void');
SET metering.now = '2024-06-01 00:00:00+00';
SELECT pg_temp.use('void', '2024-01-01 01:00', 50), pg_temp.use('void', '2024-01-01 02:00', 30);
SELECT at, v.* FROM unnest(ARRAY['2024-01-01 01:59', '2024-01-01 02:00', '2024-01-01 03:00']::timestamptz[]) at,
  LATERAL pg_temp.v('void', at) v;
SELECT * FROM pg_temp.gb(:'e_void', '2024-01-01 01:59');
SELECT * FROM pg_temp.gb(:'e_void', '2024-01-01 02:00');
-- a void before the grant's start: it never becomes active
SET metering.now = '2024-01-01 00:00:00+00';
SELECT pg_temp.ent('void2') AS e_void2 \gset
SELECT metering.create_grant(:'e_void2', 100, '2024-01-01 05:00') AS g_void2 \gset
SELECT metering.void_grant(:'g_void2');
SET metering.now = '2024-06-01 00:00:00+00';
SELECT * FROM pg_temp.v('void2', '2024-01-01 06:00');
-- a deleted grant stops at its deletion, like a void
SET metering.now = '2024-01-01 00:00:00+00';
SELECT pg_temp.ent('delg') AS e_delg \gset
SELECT metering.create_grant(:'e_delg', 100, '2024-01-01') AS g_delg \gset
SET metering.now = '2024-01-01 03:00:00+00';
DELETE FROM metering.grants WHERE id = :'g_delg';
SET metering.now = '2024-06-01 00:00:00+00';
SELECT at, v.* FROM unnest(ARRAY['2024-01-01 02:59', '2024-01-01 03:00']::timestamptz[]) at, LATERAL pg_temp.v('delg', at) v;

-- A recurrence at a reset: roll over, then refill, then burn the preserved overage (after the refill)
SELECT pg_temp.ent('recreset', period => '1 year', preserve => true) AS e_rr \gset
SELECT metering.create_grant(:'e_rr', 100, '2024-01-01', recurrence => '1 day', max_rollover_amount => 30) IS NOT NULL AS g;
SELECT pg_temp.use('recreset', '2024-01-01 01:00', 120);
SELECT metering.reset_entitlement(:'e_rr', '2024-01-02 00:00');
SELECT at, v.* FROM unnest(ARRAY['2024-01-01 23:59', '2024-01-02 00:00']::timestamptz[]) at, LATERAL pg_temp.v('recreset', at) v;
SELECT segment_start, segment_end, balance_at_start, overage_at_start, usage, overage, terminations
  FROM metering.burndown_history(:'e_rr', '2024-01-01', '2024-01-02 01:00');

-- issue_after_reset: every period opens with X, then the preserved overage burns from it
SELECT pg_temp.ent('iar', period => '1 day', preserve => true, issue => 100) AS e_iar \gset
SELECT amount, priority, effective_at, expires_at, min_rollover_amount, max_rollover_amount FROM metering.grants WHERE entitlement_id = :'e_iar';
SELECT pg_temp.use('iar', '2024-01-01 10:00', 130), pg_temp.use('iar', '2024-01-02 10:00', 20);
SELECT at, v.* FROM unnest(ARRAY['2024-01-01 23:59', '2024-01-02 00:00', '2024-01-02 12:00', '2024-01-03 00:00']::timestamptz[]) at,
  LATERAL pg_temp.v('iar', at) v;
-- without preserved overage the debt is forgiven at each boundary
SELECT pg_temp.ent('iar2', period => '1 day', issue => 100) IS NOT NULL AS e;
SELECT pg_temp.use('iar2', '2024-01-01 10:00', 130);
SELECT * FROM pg_temp.v('iar2', '2024-01-02 00:00');

-- A grant effective exactly at the query instant has already paid the carried overage
SELECT pg_temp.ent('atq') AS e_atq \gset
SELECT metering.create_grant(:'e_atq', 100, '2024-01-01') IS NOT NULL AS g,
       metering.create_grant(:'e_atq', 100, '2024-01-01 03:00') IS NOT NULL AS g;
SELECT pg_temp.use('atq', '2024-01-01 01:00', 150);
SELECT at, v.* FROM unnest(ARRAY['2024-01-01 02:59', '2024-01-01 03:00']::timestamptz[]) at, LATERAL pg_temp.v('atq', at) v;
SELECT * FROM pg_temp.gb(:'e_atq', '2024-01-01 03:00');
-- usage exactly at the query instant is not yet counted: [period start, at)
SELECT pg_temp.use('atq', '2024-01-01 04:00', 1);
SELECT at, v.usage FROM unnest(ARRAY['2024-01-01 04:00', '2024-01-01 04:00:00.000001']::timestamptz[]) at, LATERAL pg_temp.v('atq', at) v;

-- A manual reset on an automatic boundary replaces it: one reset, with its flags
SET metering.now = '2024-01-01 00:00:00+00';
SELECT pg_temp.ent('onboundary', period => '1 day', preserve => false) AS e_ob \gset
SELECT metering.create_grant(:'e_ob', 100, '2024-01-01', min_rollover_amount => 100, max_rollover_amount => 100) IS NOT NULL AS g;
SELECT pg_temp.use('onboundary', '2024-01-01 10:00', 120);
SET metering.now = '2024-01-02 00:30:00+00';
SELECT metering.reset_entitlement(:'e_ob', '2024-01-02 00:00', preserve_overage => true);
SET metering.now = '2024-06-01 00:00:00+00';
SELECT * FROM pg_temp.v('onboundary', '2024-01-02 01:00');
SELECT count(*) AS resets FROM metering.resets WHERE entitlement_id = :'e_ob';
SELECT segment_start, segment_end, overage_at_start, terminations
  FROM metering.burndown_history(:'e_ob', '2024-01-01 12:00', '2024-01-02 01:00');

-- retain_anchor keeps the old grid; without it the reset is the new anchor
SET metering.now = '2024-01-02 06:30:00+00';
SELECT pg_temp.ent('keep', period => '1 day') AS e_keep \gset
SELECT pg_temp.ent('move', period => '1 day') AS e_move \gset
SELECT metering.reset_entitlement(:'e_keep', '2024-01-02 06:00', retain_anchor => true);
SELECT metering.reset_entitlement(:'e_move', '2024-01-02 06:00', retain_anchor => false);
SET metering.now = '2024-06-01 00:00:00+00';
SELECT s, at, (SELECT start_of_period FROM metering.entitlement_value(s, 'f', at))
  FROM unnest(ARRAY['keep', 'move']) s,
       unnest(ARRAY['2024-01-02 05:00', '2024-01-02 07:00', '2024-01-03 01:00', '2024-01-03 07:00', '2024-01-05 07:00']::timestamptz[]) at
 ORDER BY s, at;

-- a soft limit keeps access with no balance; overage is the whole debt
SELECT pg_temp.ent('soft', soft => true) IS NOT NULL AS e;
SELECT pg_temp.use('soft', '2024-01-01 01:00', 42);
SELECT * FROM pg_temp.v('soft', '2024-01-02');
-- a hard limit without grants: no access
SELECT pg_temp.ent('hard') IS NOT NULL AS e;
SELECT * FROM pg_temp.v('hard', '2024-01-02');

-- the feature's meter filter: only gpt-4 usage counts
SELECT metering.create_feature('g4', 'GPT-4', 'u', '{"model": "gpt-4"}') IS NOT NULL AS feature;
SELECT metering.create_entitlement('filt', 'g4', usage_period => '1 month', measure_usage_from => '2024-01-01') IS NOT NULL AS e;
SELECT pg_temp.use('filt', '2024-01-01 01:00', 5, 'gpt-4'), pg_temp.use('filt', '2024-01-01 02:00', 7, 'gpt-3');
SELECT usage, overage FROM metering.entitlement_value('filt', 'g4', '2024-01-02');

-- measure_usage_from: earlier usage never counts; the entitlement answers for times after it
SELECT metering.create_entitlement('since', 'f', usage_period => '1 month', measure_usage_from => '2024-02-10 12:00',
                                   is_soft_limit => true) IS NOT NULL AS e;
SELECT pg_temp.use('since', '2024-02-10 11:00', 1000), pg_temp.use('since', '2024-02-11', 3);
SELECT at, v.* FROM unnest(ARRAY['2024-02-10 11:30', '2024-02-12', '2024-03-12']::timestamptz[]) at, LATERAL pg_temp.v('since', at) v;

-- deleted entitlements: active before the deletion, no access after; a new one can follow
SET metering.now = '2024-03-01 00:00:00+00';
SELECT metering.create_entitlement('del', 'f', usage_period => '1 month', measure_usage_from => '2024-01-01') AS e_del \gset
SELECT metering.create_grant(:'e_del', 10, '2024-03-01') IS NOT NULL AS g;
SET metering.now = '2024-03-05 00:00:00+00';
SELECT metering.delete_entitlement(:'e_del');
SET metering.now = '2024-03-10 00:00:00+00';
SELECT metering.create_entitlement('del', 'f', 'boolean') IS NOT NULL AS replacement;
SET metering.now = '2024-06-01 00:00:00+00';
SELECT at, v.* FROM unnest(ARRAY['2024-03-04 23:59', '2024-03-05 00:00', '2024-03-09', '2024-03-10']::timestamptz[]) at,
  LATERAL pg_temp.v('del', at) v;

-- boolean and static entitlements; no entitlement at all is an answer, not an error
SELECT metering.create_feature('sso', 'SSO') IS NOT NULL AS feature;
SELECT metering.create_feature('limits', 'Limits') IS NOT NULL AS feature;
SET metering.now = '2024-02-01 00:00:00+00';
SELECT metering.create_entitlement('acme', 'sso', 'boolean') IS NOT NULL AS e;
SELECT metering.create_entitlement('acme', 'limits', 'static', config => '{"seats": 5}') IS NOT NULL AS e;
SET metering.now = '2024-06-01 00:00:00+00';
SELECT f, at, v.* FROM unnest(ARRAY['sso', 'limits', 'nothing']) f,
       unnest(ARRAY['2024-01-31 23:59', '2024-02-01 00:00']::timestamptz[]) at,
       LATERAL metering.entitlement_value('acme', f, at) v ORDER BY f, at;
SELECT * FROM metering.entitlement_value('nobody', 'f');
-- the feature may also be named by the entitlement's id
SELECT balance, usage FROM metering.entitlement_value('ex1', :'e1', '2024-01-02');
