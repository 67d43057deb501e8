#!/bin/sh
# One node against a Citus coordinator with two workers, on this machine
# (tools/citus-cluster; the same PostgreSQL, settings and data): ingest_batch
# of 1,000-event batches (random subjects of 1,000) and entitlement_value of
# a random subject (100 events each above the refreshed rollups), pgbench
# 10 s at 2 clients each, then refresh_rollups() of what the batches
# stored; the coordinator keeps 8 connections per worker
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
# (no autovacuum during the runs: a vacuum of one database's events would
# count as CPU of the next run, on its node)
for p in $port $((port + 1)) $((port + 2)); do
  "$bindir/psql" -X -A -t -q -h "$dir" -p $p -U postgres -d postgres -c "ALTER SYSTEM SET autovacuum = off" -c "SELECT pg_reload_conf()" >/dev/null
done
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
-- (the ids read first: distributed, Citus would call the function on the shards)
WITH e AS MATERIALIZED (SELECT id FROM metering.entitlements) SELECT count(metering.create_grant(id, 1e12, metering.now())) FROM e;
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
# the CPU seconds a node has used so far: its postmaster, the children it
# has reaped (cutime, cstime) and the live ones (Linux /proc and procps'
# ps; elsewhere 0, and the CPU lines say so).  Sampled a second after a
# run, once its backends have exited and been reaped: one reaped between
# the two reads would be counted in neither.
node_cpu() {  # data directory
  pm=$(head -n 1 "$1/postmaster.pid" 2>/dev/null) && [ -r "/proc/$pm/stat" ] || { echo 0; return; }
  { cat "/proc/$pm/stat"; for c in $(ps -o pid= --ppid "$pm"); do cat "/proc/$c/stat" 2>/dev/null; done; } |
    awk -v hz="$(getconf CLK_TCK)" -v pm="$pm" '{ sub(/^.*\) /, ""); t += $12 + $13; if (NR == 1) t += $14 + $15 }
                                             END { printf "%.3f", t / hz }'
}
run() {  # database, script: "tps latency"
  "$bindir/pgbench" -n -c 2 -j 2 -T "$secs" -h "$dir" -p "$port" -U postgres -f "$dir/$2.pgbench" "$1" 2>&1 |
    awk '/latency average/ { l = $4 } /^tps/ { t = $3 } END { print t, l }'
}
workers_cpu() { echo "$(node_cpu "$dir/n$((port + 1))") $(node_cpu "$dir/n$((port + 2))")" | awk '{ print $1 + $2 }'; }
per_batch() {  # CPU seconds before, after, batches/s: CPU ms a batch (0: not measured)
  echo "$1 $2 $3 $secs" | awk '{ printf "%.2f", ($3 > 0 ? ($2 - $1) * 1000 / ($3 * $4) : 0) }'
}
# (the reads first: the batches leave events above the rollups, which a read
# adds up); the CPU the nodes use during the batches
for db in metering_bench_single metering_bench_citus; do
  name=${db#metering_bench_}
  set -- $(run $db value); eval "${name}_value=$2"
  # (in read-only sessions, whose reads start no distributed transaction for
  # the clock: README, One clock per transaction)
  set -- $(PGOPTIONS='-c default_transaction_read_only=on' run $db value); eval "${name}_value_ro=$2"
  sleep 1; c0=$(node_cpu "$dir/n$port"); w0=$(workers_cpu)
  set -- $(run $db batch); eval "${name}_batch=$1"
  sleep 1
  eval "${name}_cpu=$(per_batch "$c0" "$(node_cpu "$dir/n$port")" "$1")"
  eval "${name}_wcpu=$(per_batch "$w0" "$(workers_cpu)" "$1")"
done
# the refresh of what the batches stored: on the cluster the coordinator
# sends each shard an INSERT ... SELECT of its events, which its worker runs
# (README, Scaling out on Citus); (meter, event) pairs a second, and the CPU
# each side spent per 1,000 of them
now_s() { date +%s.%N; }
for db in metering_bench_single metering_bench_citus; do
  name=${db#metering_bench_}
  sleep 1; c0=$(node_cpu "$dir/n$port"); w0=$(workers_cpu); t0=$(now_s)
  pairs=$(q $db "SELECT metering.refresh_rollups()")
  t1=$(now_s); sleep 1
  eval "${name}_refresh=$(echo "$pairs $t0 $t1" | awk '{ printf "%.0f", $1 / ($3 - $2) }')"
  eval "${name}_rcpu=$(per_batch "$c0" "$(node_cpu "$dir/n$port")" "$(echo "$pairs $secs" | awk '{ print $1 / 1000 / $2 }')")"
  eval "${name}_rwcpu=$(per_batch "$w0" "$(workers_cpu)" "$(echo "$pairs $secs" | awk '{ print $1 / 1000 / $2 }')")"
  eval "${name}_pairs=$pairs"
done
awk -v sr="$single_refresh" -v cr="$citus_refresh" -v sp="$single_pairs" -v cp="$citus_pairs" \
    -v sc="$single_rcpu" -v cc="$citus_rcpu" -v cw="$citus_rwcpu" 'BEGIN {
  printf "refresh_rollups() of the batches: one node %d pairs at %.0f a second, coordinator + 2 workers %d at %.0f a second (ratio %.2f)\n", sp, sr, cp, cr, cr / sr
  if (sc > 0 && cc > 0) printf "CPU per 1,000 pairs refreshed: one node %.1f ms; coordinator %.1f ms, the workers %.1f ms in all\n", sc, cc, cw }'
awk -v sb="$single_batch" -v cb="$citus_batch" -v sv="$single_value" -v cv="$citus_value" \
    -v svr="$single_value_ro" -v cvr="$citus_value_ro" 'BEGIN {
  printf "ingest_batch of 1,000 events, 2 clients: one node %.0f events/s, coordinator + 2 workers %.0f events/s (ratio %.2f)\n", sb * 1000, cb * 1000, cb / sb
  printf "entitlement_value, 2 clients: one node %.3f ms, coordinator + 2 workers %.3f ms (ratio %.2f)\n", sv, cv, cv / sv
  printf "entitlement_value in read-only sessions, 2 clients: one node %.3f ms, coordinator + 2 workers %.3f ms (ratio %.2f)\n", svr, cvr, cvr / svr }'
# Where the work of ingestion goes: CPU ms per 1,000 events (a batch) on one
# node, on the coordinator and on the two workers together.  Extrapolated
# to nodes of 16 cores, taking the workers' total to stay what two workers
# spend (an assumption: more workers and shards mean more round trips): W
# workers take W * 16 / workers_ms batches a millisecond at most and the
# coordinator 16 / coordinator_ms, and the rate is the smaller.  No waits
# and no network are in it (README, Scaling out on Citus).
awk -v s="$single_cpu" -v c="$citus_cpu" -v w="$citus_wcpu" 'BEGIN {
  if (s <= 0 || c <= 0 || w <= 0) { print "CPU per 1,000 events: not measured here (needs Linux /proc)"; exit }
  printf "CPU per 1,000 events: one node %.1f ms; coordinator %.1f ms, the workers %.1f ms in all\n", s, c, w
  printf "extrapolated CPU bound, events/s with 16 cores a node: one node %.0f", 16 * 1e6 / s
  for (n = 2; n <= 16; n *= 2) { r = 16 * 1e6 / c; if (n * 16 * 1e6 / w < r) r = n * 16 * 1e6 / w; printf "; %d workers %.0f", n, r }
  printf "\n" }'
