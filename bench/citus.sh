#!/bin/sh
# One node against a Citus coordinator with two workers, on this machine
# (tools/citus-cluster; the same PostgreSQL, settings and data): ingest_batch
# of 1,000-event batches (random subjects of 1,000) and entitlement_value of
# a random subject (100 events each above the refreshed rollups), pgbench
# 10 s at 2 clients each; the coordinator keeps 8 connections per worker
# (tools/citus-cluster) and the events have 4 shards.  On loopback, with every node on the same cores,
# the ratio is the overhead of distribution, not its scaling (README,
# Scaling).  Skipped when Citus is not installed (tools/citus installs it).
#   sh bench/citus.sh [seconds]
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-pg_config}
secs=${1:-10}
if [ ! -f "$("$PG_CONFIG" --pkglibdir)/citus.so" ]; then
  echo "bench/citus.sh: Citus is not installed (tools/citus); skipped"
  exit 0
fi
bindir=$("$PG_CONFIG" --bindir)
dir=$(mktemp -d /tmp/metering-bench-citus.XXXXXX)
port=${CITUS_BENCH_PORT:-57510}
trap '"$here/tools/citus-cluster" stop "$dir" >/dev/null 2>&1; rm -rf "$dir"' EXIT
"$here/tools/citus-cluster" start "$dir" "$port" metering_bench_citus
[ "$(id -u)" = 0 ] && chown postgres "$dir"
q() { "$bindir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d "$1" -c "$2"; }
q postgres "CREATE DATABASE metering_bench_single"
q metering_bench_single "CREATE EXTENSION metering"
# a few shards per worker core (README, Scaling out on Citus)
q metering_bench_citus "SELECT metering.distribute(4)" >/dev/null
for db in metering_bench_single metering_bench_citus; do
  "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d $db >/dev/null <<'SQL'
SET client_min_messages = warning;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('tok', 'tok', 'SUM', '$.n');
SELECT metering.create_feature('llm', 'LLM', 'tok');
SELECT count(metering.create_entitlement('c' || n, 'llm', usage_period => '1 month')) FROM generate_series(1, 1000) n;
SELECT count(metering.create_grant(id, 1e12, metering.now())) FROM metering.entitlements;
SELECT metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', 'h' || s || '-' || k,
         'source', 'h', 'type', 'tok', 'subject', 'c' || s, 'data', jsonb_build_object('n', 3)))
    FROM generate_series(1, 1000) s, generate_series(1, 100) k));
SELECT metering.refresh_rollups();
SQL
done
cat >"$dir/batch.pgbench" <<'EOF'
\set r random(1, 2000000000)
SELECT * FROM metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', :client_id || '-' || :r || '-' || n, 'source', 'b', 'type', 'tok', 'subject', 'c' || (1 + floor(random() * 1000))::int, 'data', jsonb_build_object('n', 1))) FROM generate_series(1, 1000) n));
EOF
cat >"$dir/value.pgbench" <<'EOF'
\set s random(1, 1000)
SELECT * FROM metering.entitlement_value('c' || :s, 'llm');
EOF
run() {  # database, script: "tps latency"
  "$bindir/pgbench" -n -c 2 -j 2 -T "$secs" -h "$dir" -p "$port" -U postgres -f "$dir/$2.pgbench" "$1" 2>&1 |
    awk '/latency average/ { l = $4 } /^tps/ { t = $3 } END { print t, l }'
}
# (the reads first: the batches leave events above the rollups, which a read adds up)
for db in metering_bench_single metering_bench_citus; do
  set -- $(run $db value); eval "${db#metering_bench_}_value=\$2"
  set -- $(run $db batch); eval "${db#metering_bench_}_batch=\$1"
done
awk -v sb="$single_batch" -v cb="$citus_batch" -v sv="$single_value" -v cv="$citus_value" 'BEGIN {
  printf "ingest_batch of 1,000 events, 2 clients: one node %.0f events/s, coordinator + 2 workers %.0f events/s (ratio %.2f)\n", sb * 1000, cb * 1000, cb / sb
  printf "entitlement_value, 2 clients: one node %.3f ms, coordinator + 2 workers %.3f ms (ratio %.2f)\n", sv, cv, cv / sv }'
