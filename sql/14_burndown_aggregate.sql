-- The burndown aggregate: usage rows burnt through a grant set given as JSON,
-- without tables (a what-if, or usage kept elsewhere).
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
CREATE TEMP TABLE usage_rows (at timestamptz, amount numeric);
INSERT INTO usage_rows VALUES
  ('2024-01-01 01:00+00', 30), ('2024-01-01 02:00+00', 50.5), ('2024-01-01 05:00+00', 40),
  ('2024-01-02 01:00+00', 25), ('2024-01-03 12:00+00', 0.25);
-- two grants: priority 1 burns first; the second refills daily
SELECT jsonb_pretty(metering.burndown(at, amount, '[
    {"id": "01a2138f-fb08-7164-94b7-f9375b039481", "amount": 100, "priority": 1, "effective_at": "2024-01-01T00:00:00Z"},
    {"id": "01a2138f-fb08-7164-94b7-f9375b039482", "amount": 20, "priority": 2, "effective_at": "2024-01-01T00:00:00Z",
     "recurrence": "1 day"}
  ]' ORDER BY at)) FROM usage_rows;
-- the same grants without ids are named by their position
SELECT metering.burndown(at, amount, '[{"amount": 100, "priority": 1, "effective_at": "2024-01-01T00:00:00Z"},
                                       {"amount": 20, "priority": 2, "effective_at": "2024-01-01T00:00:00Z", "recurrence": "1 day"}]'
                         ORDER BY at) FROM usage_rows;
-- until: only rows before it count, and the balances are those at that instant
-- (the daily refill at 2024-01-02 00:00 has happened)
SELECT metering.burndown(at, amount, '[{"amount": 100, "priority": 1, "effective_at": "2024-01-01T00:00:00Z"},
                                       {"amount": 20, "priority": 2, "effective_at": "2024-01-01T00:00:00Z", "recurrence": "1 day"}]',
                         '2024-01-02 00:00+00' ORDER BY at) FROM usage_rows;
-- expiry forfeits, a later grant pays the overage first
SELECT metering.burndown(at, amount, '[{"amount": 50, "effective_at": "2024-01-01T00:00:00Z", "expires_at": "2024-01-01T03:00:00Z"},
                                       {"amount": 500, "effective_at": "2024-01-01T04:00:00Z"}]' ORDER BY at) FROM usage_rows;
-- exact: 0.3 - 0.1 - 0.2 = 0
SELECT metering.burndown(at, amount, '[{"amount": 0.3, "effective_at": "2024-01-01T00:00:00Z"}]' ORDER BY at)
  FROM (VALUES ('2024-01-01 01:00+00'::timestamptz, 0.1), ('2024-01-01 02:00+00', 0.2)) v(at, amount);
-- integers past int64 stay exact
SELECT metering.burndown(at, amount, '[{"amount": 1, "effective_at": "2024-01-01T00:00:00Z"}]' ORDER BY at)
  FROM (VALUES ('2024-01-01 01:00+00'::timestamptz, 9223372036854775807::numeric), ('2024-01-01 02:00+00', 9223372036854775807)) v(at, amount);
-- no rows: NULL; NULL rows are skipped
SELECT metering.burndown(at, amount, '[]') FROM usage_rows WHERE false;
SELECT metering.burndown(at, amount, '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z"}]' ORDER BY at)
  FROM (VALUES ('2024-01-01 01:00+00'::timestamptz, NULL::numeric), (NULL, 1), ('2024-01-01 02:00+00', 2)) v(at, amount);
-- the rules, one error each
CREATE FUNCTION pg_temp.err(grants text, extra text DEFAULT '') RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('SELECT metering.burndown(at, amount, %L ORDER BY at) FROM usage_rows %s', grants, extra);
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT g, pg_temp.err(g) FROM unnest(ARRAY[
  '{}', '[1]', '[{"effective_at": "2024-01-01T00:00:00Z"}]', '[{"amount": 0, "effective_at": "2024-01-01T00:00:00Z"}]',
  '[{"amount": "5", "effective_at": "2024-01-01T00:00:00Z"}]', '[{"amount": 5}]',
  '[{"amount": 5, "effective_at": "2024-01-01 00:00"}]', '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z", "priority": 256}]',
  '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z", "priority": 1.5}]',
  '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z", "priority": "1"}]',
  '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z", "recurrence": "30 minutes"}]',
  '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z", "recurrence": "soon"}]',
  '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z", "recurrence_anchor": "2024-01-01T00:00:00Z"}]',
  '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z", "id": "not-a-uuid"}]',
  '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z", "id": "00000000-0000-0000-0000-000000000001"}, {"amount": 1, "effective_at": "2024-01-01T00:00:00Z"}]'
]) g;
SELECT pg_temp.err(NULL);
-- usage must come in time order (ORDER BY inside the call), and be a finite number
SELECT metering.burndown(at, amount, '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z"}]')
  FROM (VALUES ('2024-01-01 02:00+00'::timestamptz, 1::numeric), ('2024-01-01 01:00+00', 1)) v(at, amount);
SELECT metering.burndown(at, amount, '[{"amount": 5, "effective_at": "2024-01-01T00:00:00Z"}]' ORDER BY at)
  FROM (VALUES ('2024-01-01 01:00+00'::timestamptz, 'NaN'::numeric)) v(at, amount);
-- per group, like any aggregate
SELECT s, metering.burndown(at, n, '[{"amount": 10, "effective_at": "2024-01-01T00:00:00Z"}]' ORDER BY at) -> 'overage' AS overage
  FROM (VALUES ('a', '2024-01-01 01:00+00'::timestamptz, 4), ('b', '2024-01-01 01:00+00', 12), ('a', '2024-01-01 02:00+00', 7)) v(s, at, n)
 GROUP BY s ORDER BY s;
