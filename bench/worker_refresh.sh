#!/bin/sh
# The background refresh keeps entitlement_value fast with nobody calling
# refresh_rollups(): 1,000,000 events of one subject in the current month,
# a metered entitlement with a few grants; the database turns the refresh on
# (metering.refresh_interval, default 1min) and the driver waits, without
# refreshing, until the worker has rolled everything up and written the
# entitlement's snapshot.  It prints how long that took (in refresh
# intervals) and entitlement_value's mean latency under pgbench with 2
# clients before the worker's refresh (the baseline: every event read) and
# after it, and their ratio.  Target: within two intervals, under 1 ms.
# Needs a server with metering in shared_preload_libraries (make bench).
#   sh bench/worker_refresh.sh [interval]
set -e
db=metering_bench_worker
interval=${1:-1min}
pgbench=/usr/lib/postgresql/15/bin/pgbench
[ -x "$pgbench" ] || pgbench=pgbench
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d $db -c "$1"; }
if [ "$(psql -X -A -t -q -d postgres -c "SELECT current_setting('shared_preload_libraries') ~ 'metering'")" != t ]; then
  echo "bench/worker_refresh.sh: metering is not in shared_preload_libraries; skipped"
  exit 0
fi
dropdb --if-exists $db >/dev/null 2>&1
createdb $db
psql -X -q -v ON_ERROR_STOP=1 -d $db >/dev/null <<'SQL'
CREATE EXTENSION metering;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('tokens', 'llm', 'SUM', '$.tokens');
SELECT metering.create_feature('tokens', 'Tokens', 'tokens');
-- the current month, up to a minute ago (the real clock: the worker has no other)
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'e' || n, 'bench', 'acme', 'llm',
       date_trunc('month', now(), 'UTC') + (now() - interval '1 minute' - date_trunc('month', now(), 'UTC')) * n / 1000000.0,
       jsonb_build_object('tokens', n % 100)
  FROM generate_series(1, 1000000) n;
SELECT metering.create_entitlement('acme', 'tokens', usage_period => '1 month',
                                   usage_period_anchor => date_trunc('month', now(), 'UTC'),
                                   measure_usage_from => date_trunc('month', now(), 'UTC'));
SELECT metering.create_grant(id, 10000000, date_trunc('month', now(), 'UTC'), priority => p, recurrence => r)
  FROM metering.entitlements, (VALUES (0, interval '1 day'), (1, NULL), (2, interval '1 week')) g(p, r);
ANALYZE;
SQL
echo "SELECT * FROM metering.entitlement_value('acme', 'tokens');" > /tmp/worker_refresh_bench.sql
latency() { "$pgbench" -n -c 2 -j 2 -T "$1" -f /tmp/worker_refresh_bench.sql $db 2>/dev/null | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p'; }
before=$(latency 10)

q "ALTER DATABASE $db SET metering.refresh_interval = '$interval'" >/dev/null
ms=$(q "SELECT (extract(epoch FROM interval '$interval') * 1000)::bigint")
start=$(date +%s)
limit=$(( ms * 3 / 1000 + 60 ))
until [ "$(q "SELECT (SELECT rolled_up_to FROM metering.meter_rollup_state) >= (SELECT max(seq) FROM metering.events)
                  AND EXISTS (SELECT 1 FROM metering.entitlement_snapshots)")" = t ]; do
  [ $(( $(date +%s) - start )) -gt $limit ] && { echo "bench/worker_refresh.sh: no refresh within ${limit} s"; exit 1; }
  sleep 1
done
took=$(( $(date +%s) - start ))
after=$(latency 10)
echo "worker refresh: rolled up and snapshotted ${took} s after ALTER DATABASE (interval ${interval}: $(awk "BEGIN { printf \"%.2f\", $took * 1000 / $ms }") intervals)"
echo "entitlement_value, 1 M events, pgbench 2 clients: before the refresh ${before} ms, after ${after} ms (ratio $(awk "BEGIN { printf \"%.4f\", $after / $before }"))"
dropdb $db
