-- entitlement_value latency: one metered entitlement with 20 grants (mixed
-- priorities and expiries, one refilled daily) on a monthly usage period,
-- 1,000,000 usage events of its subject in the current period, rollups
-- refreshed (so snapshots are written), asked under pgbench with 2 clients.
-- Two subjects with the same grants and the same current-period events, asked
-- alternately in the same run:
--   (a) acme-a: the entitlement starts with the period (2024-06-01);
--   (b) acme-b: it started two years earlier, with 24 months x 200,000 events
--       (4.8 M) of history before the period: a twelfth of the current rate,
--       enough to show whether the history is read (the full 24 M would only
--       make the load slower).
-- Target: mean latency under 1 ms and (b)/(a) within 1.10.  As a baseline,
-- the plain SELECT sum(...) over (a)'s events of the period, also under
-- pgbench.  1,000,000 events of 1,000 other subjects in the period are
-- background.  The clock is pinned (metering.now = 2024-06-20 12:30 UTC) in
-- this session and, through PGOPTIONS, in pgbench's entitlement_value
-- sessions; the plain sum names the instant and runs without it.
--   psql -X -d metering_bench -f bench/entitlement_value.sql          (make bench runs it)
-- Needs pgbench: /usr/lib/postgresql/15/bin/pgbench, else the one beside
-- pg_config, else the one on PATH.
\set ON_ERROR_STOP 1
-- it empties metering tables: only in a database made for it
SELECT current_database() LIKE 'metering_bench%' AS bench_db \gset
\if :bench_db
\else
\echo 'bench: run me in a database named metering_bench* (I replace the data of metering tables); make bench does'
\quit
\endif
\pset footer off
SET client_min_messages = warning;
SELECT setseed(0.75);
SET metering.now = '2024-06-20 12:30:00+00';
TRUNCATE metering.events, metering.meters, metering.meter_rollups, metering.meter_rollup_state,
         metering.features, metering.entitlements, metering.grants, metering.resets,
         metering.entitlement_snapshots CASCADE;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property)
VALUES ('bench-tokens', 'llm.tokens', 'SUM', '$.tokens');
SELECT metering.create_feature('bench-tokens', 'LLM tokens', 'bench-tokens') IS NOT NULL AS feature_created;

-- The 20 grants, the same for both entitlements: the daily refill starts with
-- the entitlement (`since`), the others in the current period (a few start
-- later, one after now); priorities 0..9, expiries at odd minutes, some never.
CREATE FUNCTION pg_temp.bench_grants(ent uuid, since timestamptz) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  g record;
  n integer := 0;
BEGIN
  PERFORM metering.create_grant(ent, 1500000, since, priority => 0, recurrence => '1 day');
  FOR g IN SELECT * FROM (VALUES
      (2000000, 1, '2024-06-01 00:00+00', '3 days'),
      (3000000, 1, '2024-06-01 00:00+00', '1 month'),
      (5000000, 2, '2024-06-01 00:00+00', NULL),
      (1000000, 2, '2024-06-02 07:13+00', '5 days'),
      (4000000, 3, '2024-06-03 06:15+00', '2 months'),
      (2500000, 3, '2024-06-04 18:41+00', '10 days'),
      (1200000, 4, '2024-06-05 09:00+00', '1 day'),
      (3300000, 4, '2024-06-06 22:30+00', NULL),
      (2700000, 5, '2024-06-08 11:11+00', '14 days'),
      (1800000, 5, '2024-06-10 14:45+00', '3 months'),
      (6000000, 6, '2024-06-11 03:27+00', NULL),
      ( 900000, 6, '2024-06-12 16:05+00', '2 days'),
      (2200000, 7, '2024-06-13 00:00+00', '1 month'),
      (3100000, 7, '2024-06-14 12:34+00', '20 days'),
      (1600000, 8, '2024-06-15 08:20+00', NULL),
      (2400000, 8, '2024-06-16 19:55+00', '6 weeks'),
      (5500000, 9, '2024-06-18 05:05+00', '1 year'),
      (4200000, 9, '2024-06-19 23:59+00', NULL),
      (1000000, 0, '2024-06-25 00:00+00', '7 days')) v(amount, priority, effective_at, expiration)
  LOOP
    PERFORM metering.create_grant(ent, g.amount, g.effective_at::timestamptz, priority => g.priority,
                                  expiration => g.expiration::interval);
    n := n + 1;
  END LOOP;
  RETURN n + 1;
END $$;

-- grants before the current period only in the entitlement's own transaction
BEGIN;
SELECT metering.create_entitlement('acme-a', 'bench-tokens', usage_period => '1 month',
         usage_period_anchor => '2022-06-01 00:00+00', measure_usage_from => '2024-06-01 00:00+00') AS ent_a \gset
SELECT pg_temp.bench_grants(:'ent_a', '2024-06-01 00:00+00') AS grants_a;
COMMIT;
BEGIN;
SELECT metering.create_entitlement('acme-b', 'bench-tokens', usage_period => '1 month',
         usage_period_anchor => '2022-06-01 00:00+00', measure_usage_from => '2022-06-01 00:00+00') AS ent_b \gset
SELECT pg_temp.bench_grants(:'ent_b', '2022-06-01 00:00+00') AS grants_b;
COMMIT;

-- loaded in time order the way they would arrive: first acme-b's history
-- (2022-06-01 .. 2024-06-01), then the period up to now (2024-06-20 12:30),
-- where acme-a and acme-b get the same 1,000,000 events and one background
-- event of a random other subject comes with each
\echo loading 4,800,000 history events and 3,000,000 events of the period...
DO $$
DECLARE
  h0 float8 := extract(epoch FROM timestamptz '2022-06-01 00:00+00');
  hspan float8 := extract(epoch FROM timestamptz '2024-06-01 00:00+00') - extract(epoch FROM timestamptz '2022-06-01 00:00+00');
  p0 float8 := extract(epoch FROM timestamptz '2024-06-01 00:00+00');
  pspan float8 := extract(epoch FROM timestamptz '2024-06-20 12:30+00') - extract(epoch FROM timestamptz '2024-06-01 00:00+00');
BEGIN
  FOR chunk IN 0 .. 23 LOOP
    INSERT INTO metering.events (id, source, subject, type, time, data)
    SELECT 'h' || n, 'bench', 'acme-b', 'llm.tokens',
           to_timestamp(h0 + (n + random()) * hspan / 4800000),
           jsonb_build_object('tokens', 1 + floor(random() * 100)::int)
      FROM generate_series(chunk * 200000, chunk * 200000 + 199999) n;
    COMMIT;
  END LOOP;
  FOR chunk IN 0 .. 9 LOOP
    INSERT INTO metering.events (id, source, subject, type, time, data)
    SELECT e.id, 'bench', e.subject, 'llm.tokens', e.time, jsonb_build_object('tokens', e.tokens)
      FROM (SELECT n, to_timestamp(p0 + (n + random()) * pspan / 1000000) AS time,
                   1 + floor(random() * 100)::int AS tokens,
                   to_timestamp(p0 + (n + random()) * pspan / 1000000) AS bg_time,
                   'customer-' || floor(random() * 1000)::int AS bg_subject,
                   1 + floor(random() * 100)::int AS bg_tokens
              FROM generate_series(chunk * 100000, chunk * 100000 + 99999) n) s
     CROSS JOIN LATERAL (VALUES ('a' || s.n, 'acme-a', s.time, s.tokens),
                                ('b' || s.n, 'acme-b', s.time, s.tokens),
                                ('x' || s.n, s.bg_subject, s.bg_time, s.bg_tokens)) e(id, subject, time, tokens)
     ORDER BY e.time;
    COMMIT;
  END LOOP;
END $$;
\echo refreshing rollups (writes the snapshots)...
SELECT metering.refresh_rollups() AS rolled_up_events;
VACUUM ANALYZE metering.events, metering.meter_rollups, metering.entitlement_snapshots;

-- what each question reads: the rollup hours after its snapshot, against all
-- of the entitlement's hours
SELECT e.subject, s.at AS snapshot_at,
       (SELECT count(*) FROM metering.meter_rollups r
         WHERE r.meter = 'bench-tokens' AND r.subject = e.subject
           AND r.bucket >= s.at AND r.bucket < metering.now()) AS rollup_rows_after_snapshot,
       (SELECT count(*) FROM metering.meter_rollups r
         WHERE r.meter = 'bench-tokens' AND r.subject = e.subject
           AND r.bucket >= e.measure_usage_from AND r.bucket < metering.now()) AS rollup_rows_since_start
  FROM metering.entitlements e
  LEFT JOIN LATERAL (SELECT max(at) AS at FROM metering.entitlement_snapshots s
                      WHERE s.entitlement_id = e.id) s ON true
 ORDER BY e.subject;

-- the same answer for both, and the usage is the plain sum, or the comparison means nothing
\set value_a 'SELECT * FROM metering.entitlement_value(''acme-a'', ''bench-tokens'')'
\set value_b 'SELECT * FROM metering.entitlement_value(''acme-b'', ''bench-tokens'')'
\set plain_sum 'SELECT sum((data ->> ''tokens'')::numeric) FROM metering.events WHERE subject = ''acme-a'' AND type = ''llm.tokens'' AND time >= ''2024-06-01 00:00+00'' AND time < ''2024-06-20 12:30+00'''
SELECT 'acme-a' AS subject, * FROM (:value_a) v UNION ALL SELECT 'acme-b', * FROM (:value_b) v;
DO $$
BEGIN
  IF (SELECT row(v.*)::text FROM metering.entitlement_value('acme-a', 'bench-tokens') v)
     IS DISTINCT FROM (SELECT row(v.*)::text FROM metering.entitlement_value('acme-b', 'bench-tokens') v)
     OR (SELECT usage FROM metering.entitlement_value('acme-a', 'bench-tokens'))
        IS DISTINCT FROM (SELECT sum((data ->> 'tokens')::numeric) FROM metering.events
                           WHERE subject = 'acme-a' AND type = 'llm.tokens'
                             AND time >= '2024-06-01 00:00+00' AND time < '2024-06-20 12:30+00') THEN
    RAISE EXCEPTION 'entitlement_value differs between the two setups, or from the plain sum';
  END IF;
END $$;

-- pgbench: 2 clients, 2 threads; six rounds of (a) and (b), 4 s a run, in
-- alternating order (a b, b a, ...), so the machine's noise falls on both
-- alike, and the plain sum (5 s) in rounds 3 and 6.  The latency average is
-- what pgbench prints (simple query protocol: it includes the round trip and
-- the parsing and planning of the SELECT).
\set benchdir `mktemp -d`
\set ignore `printf '%s;\n' :'value_a' > :'benchdir'/a.sql && printf '%s;\n' :'value_b' > :'benchdir'/b.sql && printf '%s;\n' :'plain_sum' > :'benchdir'/sum.sql`
\set pgbench `for p in /usr/lib/postgresql/15/bin/pgbench "$(pg_config --bindir 2>/dev/null)/pgbench"; do if [ -x "$p" ]; then echo "$p"; exit; fi; done; echo pgbench`
\set pgbench_cmd :pgbench ' -n -c 2 -j 2 -h ' :HOST ' -p ' :PORT ' -U ' :USER ' ' :DBNAME
\set clock 'PGOPTIONS=''-c metering.now=2024-06-20\\ 12:30:00+00'' '
\echo pgbench command: :clock:pgbench_cmd -T 4 -f <script> (the plain sum: -T 5, without PGOPTIONS)
\echo running 12 x 4 s + 2 x 5 s of pgbench...
\set out `for r in 1 2 3 4 5 6; do case $r in 1|3|5) o='a b';; *) o='b a';; esac; case $r in 3|6) o="$o sum";; esac; for w in $o; do echo "### $r $w"; if [ $w = sum ]; then :pgbench_cmd -T 5 -f :'benchdir'/sum.sql 2>&1; else :clock:pgbench_cmd -T 4 -f :'benchdir'/$w.sql 2>&1; fi; done; done`
\set ignore `rm -r :'benchdir'`
\set a '(a) entitlement_value, current month only'
\set b '(b) entitlement_value, with two years of history'
\set sum 'plain sum over (a)''s events of the period'
CREATE TEMP TABLE runs (n integer, round integer, what text, latency_ms numeric, tps numeric, output text);
INSERT INTO runs
SELECT n, split_part(chunk, ' ', 1)::integer,
       CASE split_part(split_part(chunk, E'\n', 1), ' ', 2) WHEN 'a' THEN :'a' WHEN 'b' THEN :'b' ELSE :'sum' END,
       substring(chunk FROM 'latency average = ([0-9.]+) ms')::numeric,
       substring(chunk FROM 'tps = ([0-9.]+) ')::numeric, chunk
  FROM regexp_split_to_table(:'out', '### ') WITH ORDINALITY AS c(chunk, n)
 WHERE chunk <> '';
DO $$
DECLARE
  failed text;
BEGIN
  SELECT output INTO failed FROM runs WHERE latency_ms IS NULL LIMIT 1;
  IF failed IS NOT NULL OR (SELECT count(*) FROM runs) <> 14 THEN
    RAISE EXCEPTION 'pgbench failed: %', coalesce(failed, (SELECT string_agg(output, '') FROM runs));
  END IF;
END $$;

SELECT what, string_agg(latency_ms::text, ', ' ORDER BY round) AS latency_ms_per_run,
       round(avg(latency_ms), 3) AS mean_latency_ms, round(avg(tps)) AS tps
  FROM runs GROUP BY what ORDER BY min(n);
SELECT round(avg(latency_ms) FILTER (WHERE what = :'b') / avg(latency_ms) FILTER (WHERE what = :'a'), 3) AS ratio_b_over_a,
       round(avg(latency_ms) FILTER (WHERE what = :'sum') / avg(latency_ms) FILTER (WHERE what = :'a'), 1) AS plain_sum_over_a
  FROM runs;

-- Where the time goes, in this session (one client, no round trip): the
-- call itself, and the call when there is no snapshot (as after a grant
-- change, until the next refresh that sees the subject's events), where the
-- engine starts at measure_usage_from; the snapshots are deleted in a
-- transaction that is rolled back.
CREATE FUNCTION pg_temp.mean_ms(sql text, calls integer) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz;
BEGIN
  EXECUTE sql;                          -- warm the cache
  t0 := clock_timestamp();
  FOR i IN 1 .. calls LOOP
    EXECUTE sql;
  END LOOP;
  RETURN round((extract(epoch FROM clock_timestamp() - t0) * 1000 / calls)::numeric, 3);
END $$;
CREATE TEMP TABLE session_figures (what text, ms numeric);
INSERT INTO session_figures VALUES ('(a) in session, mean of 2,000 calls', pg_temp.mean_ms(:'value_a', 1000));
INSERT INTO session_figures VALUES ('(b) in session, mean of 2,000 calls', pg_temp.mean_ms(:'value_b', 1000));
UPDATE session_figures SET ms = round((ms + pg_temp.mean_ms(:'value_a', 1000)) / 2, 3) WHERE what LIKE '(a)%';
UPDATE session_figures SET ms = round((ms + pg_temp.mean_ms(:'value_b', 1000)) / 2, 3) WHERE what LIKE '(b)%';
BEGIN;
DELETE FROM metering.entitlement_snapshots;
SELECT pg_temp.mean_ms(:'value_a', 3) AS nosnap_a, pg_temp.mean_ms(:'value_b', 3) AS nosnap_b \gset
ROLLBACK;
INSERT INTO session_figures VALUES ('(a) in session, no snapshot, mean of 3 calls', :nosnap_a),
                                   ('(b) in session, no snapshot, mean of 3 calls', :nosnap_b);
SELECT what, ms FROM session_figures;
