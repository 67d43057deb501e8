-- Real-time enforcement and alerts under pgbench (issue 10): consume, and
-- reserve then commit_reservation, on one hot entitlement and on distinct
-- ones (1,000 subjects), at 1, 2, 4 and 8 clients, against entitlement_value
-- asked the same way; and ingest_batch (100 events of random subjects a
-- call) with a rule covering 10% of the subjects against no rule.
-- Goals: consume's mean latency within 2x of entitlement_value's; ingest_batch
-- with the rule at least 0.8 of its rate without.  Runs of 3 s (this is a
-- shared 2-core machine); the rollups are refreshed (and the events' BRIN
-- index summarized) before each run, as the background worker and
-- autovacuum would keep them; synchronous_commit is off in the pgbench
-- sessions, so that the figures are the CPU cost of the calls and not the
-- WAL flush that every write transaction (ingest too) waits for on this disk.
-- `ingest` (one event, random subject) is the reference for a write.  A
-- consume reads the balance of a table that receives writes (its own): the
-- events above the rollups' watermark are read by every entitlement_value,
-- so `value_writes` asks entitlement_value while as many ingests of one
-- event run beside it (pgbench -f value -f ingest; the latency is value's),
-- the fair baseline for consume.
--   psql -X -d metering_bench -f bench/holds.sql          (make bench runs it)
\set ON_ERROR_STOP 1
SELECT current_database() LIKE 'metering_bench%' AS bench_db \gset
\if :bench_db
\else
\echo 'bench: run me in a database named metering_bench* (I replace the data of metering tables); make bench does'
\quit
\endif
\pset footer off
SET client_min_messages = warning;
TRUNCATE metering.events, metering.meters, metering.meter_rollups, metering.meter_rollup_state,
         metering.features, metering.entitlements, metering.grants, metering.resets,
         metering.entitlement_snapshots, metering.reservations, metering.entitlement_turns,
         metering.notification_events, metering.notification_rules CASCADE;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('hb-tok', 'hb.tokens', 'SUM', '$.n');
SELECT metering.create_feature('hb-llm', 'LLM', 'hb-tok') IS NOT NULL AS feature;
SELECT metering.create_feature('hb-watched', 'LLM, watched', 'hb-tok') IS NOT NULL AS feature;
-- 1,000 subjects with a monthly entitlement to hb-llm; 100 of them (10%) also to hb-watched
SELECT count(metering.create_entitlement('c' || n, 'hb-llm', usage_period => '1 month')) AS entitlements
  FROM generate_series(1, 1000) n;
SELECT count(metering.create_entitlement('c' || n, 'hb-watched', usage_period => '1 month')) AS watched
  FROM generate_series(1, 1000, 10) n;
SELECT count(metering.create_grant(id, 1e12, metering.now())) AS grants FROM metering.entitlements;
-- 100 events per subject of history in the period
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'h' || s || '-' || k, 'hb', 'c' || s, 'hb.tokens', metering.now() - interval '1 second', '{"n": 3}'
  FROM generate_series(1, 1000) s, generate_series(1, 100) k;
SELECT metering.refresh_rollups() > 0 AS refreshed;
VACUUM ANALYZE metering.events, metering.meter_rollups, metering.entitlements, metering.reservations;

-- the pgbench scripts are in bench/holds/ (run from the repository's root)
\set benchdir 'bench/holds'
\set pgbench `for p in /usr/lib/postgresql/15/bin/pgbench "$(pg_config --bindir 2>/dev/null)/pgbench"; do if [ -x "$p" ]; then echo "$p"; exit; fi; done; echo pgbench`
\set conn ' -h ' :HOST ' -p ' :PORT ' -U ' :USER ' ' :DBNAME
\set refresh 'psql -X -q -A -t ' :conn ' -c "SELECT metering.refresh_rollups(), brin_summarize_new_values(''metering.events_seq_time_brin'')" >/dev/null'
\echo running 28 x 3 s of pgbench (entitlement_value alone and among as many ingests, ingest, consume and reserve+commit, hot and distinct, at 1 2 4 8 clients)...
\set out `for c in 1 2 4 8; do for w in value value_writes ingest consume_hot consume_distinct hold_hot hold_distinct; do :refresh; echo "### $w $c"; if [ $w = value_writes ]; then f="-f :'benchdir'/value.pgbench -f :'benchdir'/ingest.pgbench"; else f="-f :'benchdir'/$w.pgbench"; fi; PGOPTIONS='-c synchronous_commit=off' :pgbench -n -c $c -j $c -T 3 $f :conn 2>&1; done; done`
-- ingest_batch: without a live rule, then with a rule on hb-watched (10% of subjects), four times
-- in turn, so that the machine's load drifting between runs moves both sides alike; each time the
-- rule goes live, 1 s of warm-up first (the first write of each watched entitlement evaluates it in full).
-- Each run adds about 300,000 events: autovacuum would start on the events table in the middle of
-- one run or another (on two cores, a third of the machine), so it is held off during these runs
-- and the table is vacuumed before each instead.
\echo running 4 x (3 s without a rule, 1 s + 3 s with it) of pgbench (ingest_batch of 100 events, 2 clients)...
INSERT INTO metering.notification_rules (name, feature_key, thresholds, disabled_at, created_at)
VALUES ('watched', 'hb-watched', '[{"type": "USAGE_PERCENT", "value": 80}, {"type": "USAGE_VALUE", "value": 1e15}]',
        metering.now(), metering.now());
ALTER TABLE metering.events SET (autovacuum_enabled = off);
\set rule_on 'psql -X -q ' :conn ' -c ''UPDATE metering.notification_rules SET disabled_at = NULL'' >/dev/null'
\set rule_off 'psql -X -q ' :conn ' -c ''UPDATE metering.notification_rules SET disabled_at = now()'' >/dev/null'
\set vacuum 'psql -X -q ' :conn ' -c ''VACUUM metering.events'' >/dev/null'
\set batch 'PGOPTIONS=''-c synchronous_commit=off'' ' :pgbench ' -n -c 2 -j 2 -f ' :benchdir '/batch.pgbench ' :conn
\set out2 `for r in 1 2 3 4; do :rule_off; :refresh; :vacuum; echo "### batch_off 2"; :batch -T 3 2>&1; :rule_on; :refresh; :batch -T 1 >/dev/null 2>&1; :refresh; :vacuum; echo "### batch_on 2"; :batch -T 3 2>&1; done; :rule_off`
ALTER TABLE metering.events RESET (autovacuum_enabled);
CREATE TEMP TABLE runs (n integer, what text, clients integer, latency_ms numeric, tps numeric, output text);
INSERT INTO runs
SELECT n, split_part(split_part(chunk, E'\n', 1), ' ', 1), split_part(split_part(chunk, E'\n', 1), ' ', 2)::integer,
       -- value_writes: the latency of its first script, entitlement_value
       coalesce(substring(chunk FROM 'SQL script 1:.*?latency average = ([0-9.]+) ms'),
                substring(chunk FROM 'latency average = ([0-9.]+) ms'))::numeric,
       substring(chunk FROM 'tps = ([0-9.]+) ')::numeric, chunk
  FROM regexp_split_to_table(:'out' || :'out2', '### ') WITH ORDINALITY AS c(chunk, n)
 WHERE chunk <> '';
DO $$
DECLARE
  failed text;
BEGIN
  SELECT output INTO failed FROM runs WHERE latency_ms IS NULL OR output ~ 'ERROR|aborted' LIMIT 1;
  IF failed IS NOT NULL OR (SELECT count(*) FROM runs) <> 36 THEN
    RAISE EXCEPTION 'pgbench failed: %', coalesce(failed, (SELECT string_agg(output, '') FROM runs));
  END IF;
END $$;
SELECT what, string_agg(clients || ': ' || latency_ms || ' ms, ' || round(tps) || ' tps', '; ' ORDER BY clients) AS per_clients
  FROM runs WHERE what NOT LIKE 'batch%' GROUP BY what ORDER BY min(n);
SELECT clients,
       round(avg(latency_ms) FILTER (WHERE what = 'consume_hot') / avg(latency_ms) FILTER (WHERE what = 'value'), 2) AS consume_hot_over_value,
       round(avg(latency_ms) FILTER (WHERE what = 'consume_distinct') / avg(latency_ms) FILTER (WHERE what = 'value_writes'), 2) AS consume_distinct_over_value_writes,
       round(avg(latency_ms) FILTER (WHERE what = 'consume_distinct') / avg(latency_ms) FILTER (WHERE what = 'value'), 2) AS consume_distinct_over_value,
       round(avg(latency_ms) FILTER (WHERE what = 'hold_hot') / avg(latency_ms) FILTER (WHERE what = 'value'), 2) AS reserve_commit_hot_over_value,
       round(avg(latency_ms) FILTER (WHERE what = 'hold_distinct') / avg(latency_ms) FILTER (WHERE what = 'value'), 2) AS reserve_commit_distinct_over_value
  FROM runs WHERE what NOT LIKE 'batch%' GROUP BY clients ORDER BY clients;
-- each run with the rule against the run without it just before
SELECT round(avg(tps) FILTER (WHERE what = 'batch_off')) AS batch_tps_without_rules,
       round(avg(tps) FILTER (WHERE what = 'batch_on')) AS batch_tps_with_rule_on_10pct,
       round(avg(tps) FILTER (WHERE what = 'batch_on') / avg(tps) FILTER (WHERE what = 'batch_off'), 2) AS ratio,
       (SELECT string_agg(round(b.tps / a.tps, 2)::text, ' ' ORDER BY a.n)
          FROM runs a JOIN runs b ON b.n = a.n + 1 AND b.what = 'batch_on'
         WHERE a.what = 'batch_off') AS ratio_of_each_pair
  FROM runs;
SELECT count(*) AS notifications FROM metering.notification_events;
