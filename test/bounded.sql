-- Bounded work (src/burndown.h: BD_MAX_CUTS, BD_MAX_WORK, BD_MAX_ROWS):
-- every reader-callable evaluation either answers or is refused with 54000,
-- a message that names the limit; inputs just inside the limits still
-- answer, and answer right.  The statement timeout is only a safety net (no
-- timing is asserted).
BEGIN;
SELECT plan(20);
SET LOCAL timezone = 'UTC';
SET LOCAL statement_timeout = '120s';
SET LOCAL metering.now = '2024-06-01 00:00:00+00';

INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('bw', 'bw', 'SUM', '$.n');
SELECT metering.create_feature('weekly', 'Weekly', 'bw');
SELECT metering.create_feature('hourly', 'Hourly', 'bw');
SELECT metering.create_feature('daily', 'Daily', 'bw');
SELECT metering.create_feature('many', 'Many grants', 'bw');
SELECT metering.create_entitlement('acme', 'weekly', usage_period => '1 week', usage_period_anchor => '2024-06-01') AS weekly \gset
SELECT metering.create_entitlement('acme', 'hourly', usage_period => '1 hour', usage_period_anchor => '2024-06-01') AS hourly \gset
SELECT metering.create_entitlement('acme', 'daily', usage_period => '1 day', usage_period_anchor => '2024-06-01') AS daily \gset
SELECT metering.create_entitlement('acme', 'many', usage_period => '1000 years', usage_period_anchor => '2024-06-01') AS many \gset
SELECT count(metering.create_grant(id, 100, '2024-06-01')) FROM metering.entitlements WHERE subject = 'acme' AND feature_key <> 'many';
-- 400 hourly grants on 60 distinct minute grids: 60 cuts an hour, each over 400 grants
SELECT count(metering.create_grant(:'many', 5, '2024-06-01', recurrence => '1 hour',
                                   recurrence_anchor => timestamptz '2024-06-01' + (n % 60) * interval '1 minute'))
  FROM generate_series(0, 399) n;

-- 1-2. the histories of a century or more: refused at once (the rows are estimated)
SELECT throws_ok(format($$SELECT * FROM metering.burndown_history(%L, '2024-06-01', '9999-12-31')$$, :'weekly'),
                 '54000', 'the burndown history would have more than 100000 rows',
                 'burndown_history of a weekly entitlement to the year 9999 is refused (54000)');
SELECT throws_ok(format($$SELECT * FROM metering.burndown_history(%L, '2024-06-01', '2124-06-01')$$, :'hourly'),
                 '54000', 'the burndown history would have more than 100000 rows',
                 'burndown_history of an hourly entitlement over 100 years is refused (54000)');
-- 3. rows past the limit that the estimate does not see (a rollover segment per boundary): the hard count
SELECT throws_ok(format($$SELECT * FROM metering.burndown_history(%L, '2024-06-01', %L)$$, :'daily',
                        timestamptz '2024-06-01' + interval '60000 days'),
                 '54000', 'the burndown history would have more than 100000 rows',
                 'burndown_history past 100,000 segments is stopped (54000)');
-- 4-5. balance_history over too long a range
SELECT throws_ok(format($$SELECT * FROM metering.balance_history(%L, '2024-06-01', '2124-06-01', 'HOUR')$$, :'hourly'),
                 '54000', 'the balance history would have more than 100000 rows',
                 'balance_history of 100 years of HOUR windows is refused (54000)');
SELECT throws_ok(format($$SELECT * FROM metering.balance_history(%L, '2024-06-01', '2324-06-01', 'DAY')$$, :'daily'),
                 '54000', 'the balance history would have more than 100000 rows',
                 'balance_history of 300 years of DAY windows is refused (54000)');

-- 6-7. a huge overage paid back by 5 every hour for 10 years: too many steps on a 131071-digit number
SELECT throws_ok($$SELECT metering.burndown(t, 1e131071, '[{"amount": 5, "effective_at": "2024-06-01T00:00:00Z", "recurrence": "1 hour"}]', '2034-06-01')
                     FROM (VALUES (timestamptz '2024-06-01 00:30+00')) v(t)$$,
                 '54000', 'the burndown would take more than 50000000 steps',
                 'the aggregate refuses an hourly pay-back of a 131071-digit overage over 10 years (54000)');
SELECT throws_ok($$SELECT metering.burndown(t, 1e131071, '[{"amount": 5, "effective_at": "2024-06-01T00:00:00Z", "recurrence": "1 hour"}]')
                     FROM (VALUES (timestamptz '2024-06-01 00:30+00'), (timestamptz '2034-06-01')) v(t)$$,
                 '54000', 'the burndown would take more than 50000000 steps',
                 'the aggregate refuses the same gap between two rows (54000)');
-- 8. 400 hourly grants on distinct grids over 100 days: cuts x grants
SELECT throws_ok($$SELECT metering.burndown(t, 1, (SELECT jsonb_agg(jsonb_build_object('amount', 5, 'effective_at', '2024-06-01T00:00:00Z',
                       'recurrence', '1 hour', 'recurrence_anchor',
                       to_char(timestamptz '2024-06-01' + n * interval '7 seconds', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
                     FROM generate_series(0, 399) n), '2024-09-09')
                     FROM (VALUES (timestamptz '2024-06-01 00:30+00')) v(t)$$,
                 '54000', 'the burndown would take more than 50000000 steps',
                 'the aggregate refuses 400 hourly grants on distinct grids over 100 days (54000)');
-- 9-12. the same for an entitlement, through every reader
SELECT throws_ok($$SELECT * FROM metering.entitlement_value('acme', 'many', '2024-09-09')$$,
                 '54000', 'the burndown would take more than 50000000 steps',
                 'entitlement_value of 400 hourly grants over 100 days is refused (54000)');
SELECT throws_ok(format($$SELECT * FROM metering.grant_balances(%L, '2024-09-09')$$, :'many'),
                 '54000', 'the burndown would take more than 50000000 steps',
                 'grant_balances of 400 hourly grants over 100 days is refused (54000)');
SELECT throws_ok(format($$SELECT * FROM metering.burndown_history(%L, '2024-06-01', '2024-09-09')$$, :'many'),
                 '54000', NULL,
                 'burndown_history of 400 hourly grants over 100 days is refused (54000)');
SELECT throws_ok(format($$SELECT * FROM metering.balance_history(%L, '2024-06-01', '2024-09-09', 'DAY')$$, :'many'),
                 '54000', 'the burndown would take more than 50000000 steps',
                 'balance_history of 400 hourly grants over 100 days is refused (54000)');
-- 13. more than 1,000,000 instants is still its own error
SELECT throws_ok($$SELECT * FROM metering.entitlement_value('acme', 'hourly', '2144-06-01')$$,
                 '54000', 'the burndown would stop at more than 1000000 instants',
                 'entitlement_value past 1,000,000 instants is refused (54000)');

-- inside the limits: answers, and right ones
-- 14. 876,000 hourly periods: every period starts with the grant rolled over to 0
SELECT is((SELECT (balance, usage, overage, start_of_period)::text FROM metering.entitlement_value('acme', 'hourly', '2124-06-01 00:30')),
          (0::numeric, 0::numeric, 0::numeric, timestamptz '2124-06-01 00:00')::text,
          'entitlement_value over 876,000 hourly periods answers');
-- 15. 400 grants over a day: 60 cuts an hour
SELECT is((SELECT balance FROM metering.entitlement_value('acme', 'many', '2024-06-02 00:30')), 2000::numeric,
          'entitlement_value of 400 hourly grants over a day answers');
-- 16-17. 99,000 windows, 80,000 segments
SELECT is((SELECT count(*) FROM metering.balance_history(:'hourly', '2024-06-01', timestamptz '2024-06-01' + interval '99000 hours', 'HOUR')),
          99000::bigint, 'balance_history of 99,000 HOUR windows answers');
SELECT is((SELECT count(*) FROM metering.burndown_history(:'daily', '2024-06-01', timestamptz '2024-06-01' + interval '40000 days')),
          80000::bigint, 'burndown_history of 40,000 daily periods (80,000 segments) answers');

-- 18. the aggregate over 20,000 cuts against a recomputation: 6 usage an
-- hour against a grant of 5 refilled hourly leaves 1 more overage each hour
-- (the refill pays the carried overage first), so 20,000 after 20,000 hours
SELECT is((SELECT metering.burndown(t, 1, '[{"amount": 5, "effective_at": "2024-06-01T00:00:00Z", "recurrence": "1 hour"}]',
                                    timestamptz '2024-06-01' + interval '20000 hours' - interval '1 minute')
             FROM (SELECT timestamptz '2024-06-01' + n * interval '10 minutes' AS t FROM generate_series(0, 119999) n) u),
          '{"usage": 120000, "overage": 20000, "balances": {"00000000-0000-0000-0000-000000000000": 0}}'::jsonb,
          'the aggregate over 20,000 hourly refills matches the recomputation');
-- 19. 100 grants on distinct grids (7 s apart) over 5 days: 12,000 cuts x 100 grants.  Every
-- hour each grant is refilled to 1 and 10 usage arrives at :30: 100 available,
-- the last row's hour burns 10; before that all is burnt in turn, no overage
SELECT is((SELECT (metering.burndown(t, 10, (SELECT jsonb_agg(jsonb_build_object('amount', 1, 'effective_at', '2024-06-01T00:00:00Z',
                       'recurrence', '1 hour', 'recurrence_anchor',
                       to_char(timestamptz '2024-06-01' + n * interval '7 seconds', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
                     FROM generate_series(0, 99) n), '2024-06-06') ->> 'overage')::numeric
             FROM (SELECT timestamptz '2024-06-01 00:30' + n * interval '1 hour' AS t FROM generate_series(0, 119) n) u),
          0::numeric, 'the aggregate over 100 grants on distinct grids answers, without overage');
-- 20. a large number, but few cuts: answers exactly
SELECT is((SELECT (metering.burndown(t, 1e1000, '[{"amount": 5, "effective_at": "2024-06-01T00:00:00Z", "recurrence": "1 hour"}]', '2024-06-05') ->> 'overage')::numeric
             FROM (VALUES (timestamptz '2024-06-01 00:30+00')) v(t)),
          1e1000 - 5 * 97, 'a 1001-digit overage paid back hourly for 4 days is exact (96 refills and the first grant)');
ROLLBACK;
