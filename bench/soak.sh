#!/bin/sh
# Soak: a pgbench mix of ingest, ingest_batch, entitlement_value, rate and
# refresh_rollups (bench/soak/*.pgbench) at 2, 4 and 8 clients, 10 minutes
# each.  Passes when no transaction fails, no client aborts, no deadlock is
# counted, and at every client count the p99 latency of the last minute is
# within 1.5x of the first minute's.  Prints the figures.
#   bench/soak.sh [seconds per client count, default 600]
# Environment: PGHOST, PGPORT, PGUSER of a running server with metering
# installed; SOAK_CLIENTS ("2 4 8"); SOAK_WINDOW (seconds per latency window:
# 60, or a third of the duration when that is under 3 minutes).
# It replaces the database metering_bench_soak (SOAK_DB may name another
# database, but only one whose name starts with metering_bench_soak).
set -eu
cd "$(dirname "$0")/.."
duration=${1:-600}
clients=${SOAK_CLIENTS:-2 4 8}
db=${SOAK_DB:-metering_bench_soak}
case $db in
  metering_bench_soak*) ;;
  *) echo "soak: the database must be named metering_bench_soak* (it is dropped and made again), not $db" >&2; exit 2 ;;
esac
if [ -n "${SOAK_WINDOW:-}" ]; then window=$SOAK_WINDOW
elif [ "$duration" -ge 180 ]; then window=60
else window=$((duration / 3)); fi
out=$(mktemp -d /tmp/metering-soak.XXXXXX)
# per 1,000 transactions: 450 ingest, 40 batches of 100, 400 entitlement_value,
# 109 rate and one refresh_rollups (every few seconds, as a deployment would
# run it every minute or so; more often, its own latency would dominate p99)
mix="-f bench/soak/ingest.pgbench@450 -f bench/soak/ingest_batch.pgbench@40 -f bench/soak/entitlement_value.pgbench@400
     -f bench/soak/rate.pgbench@109 -f bench/soak/refresh_rollups.pgbench@1"

echo "== soak: $duration s per client count ($clients), p99 per $window s window; logs in $out"
dropdb --if-exists "$db" >/dev/null 2>&1
createdb "$db"
psql -X -q -v ON_ERROR_STOP=1 -d "$db" >/dev/null <<'EOF'
CREATE EXTENSION metering;
-- three meters on the events, one feature with an entitlement and two
-- grants (one refilled every day) for each of 1,000 subjects
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('calls', 'call', 'COUNT', NULL, '{}'), ('bytes', 'call', 'SUM', '$.v', '{}'),
  ('bytes_by_region', 'call', 'SUM', '$.v', '{"region": "$.r"}');
SELECT metering.create_feature('f', 'F', 'bytes');
-- made two hours ago, as a deployment's are: the run measures the steady
-- state (in the first hour after a period starts inside an hour, reads of
-- that hour cost more: README, Performance)
SELECT set_config('metering.now', (now() - interval '2 hours')::text, false);
SELECT metering.create_entitlement('s' || i, 'f', usage_period => '1 day') FROM generate_series(0, 999) i;
SELECT metering.create_grant(id, 100000, metering.now(), recurrence => '1 day') FROM metering.entitlements;
SELECT metering.create_grant(id, 1000000, metering.now(), priority => 5) FROM metering.entitlements;
RESET metering.now;
-- rating rules: a service mapping, a field with three values, a volume
-- threshold, and tenant rules for five of the twenty tenants
INSERT INTO metering.hashmap_services (name) VALUES ('compute');
INSERT INTO metering.hashmap_fields (service_id, name) SELECT id, 'flavor' FROM metering.hashmap_services;
INSERT INTO metering.hashmap_groups (name) VALUES ('instance'), ('volume');
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type)
SELECT s.id, g.id, 0.01, 'flat' FROM metering.hashmap_services s, metering.hashmap_groups g WHERE g.name = 'volume';
INSERT INTO metering.hashmap_mappings (field_id, group_id, value, cost, map_type)
SELECT f.id, g.id, v.value, v.cost, 'flat' FROM metering.hashmap_fields f, metering.hashmap_groups g,
       (VALUES ('m1', 0.5), ('m2', 1.0), ('m3', 2.0)) v(value, cost) WHERE g.name = 'instance';
INSERT INTO metering.hashmap_mappings (field_id, group_id, value, cost, map_type, tenant_id)
SELECT f.id, g.id, 'm1', 0.4, 'flat', 't' || i FROM metering.hashmap_fields f, metering.hashmap_groups g,
       generate_series(0, 4) i WHERE g.name = 'instance';
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type)
SELECT s.id, g.id, 100, 0.9, 'rate' FROM metering.hashmap_services s, metering.hashmap_groups g WHERE g.name = 'volume';
-- 100,000 events of the last hour, rolled up
SELECT * FROM metering.ingest_batch((
  SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', i::text, 'source', 'seed', 'type', 'call',
           'subject', 's' || (i % 1000),
           'time', to_char((now() - interval '1 hour' + i * interval '35 milliseconds') AT TIME ZONE 'UTC',
                           'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'data', jsonb_build_object('v', i % 1000, 'r', (ARRAY['eu', 'us', 'ap'])[1 + i % 3])))
    FROM generate_series(1, 100000) i));
SELECT metering.refresh_rollups();
VACUUM ANALYZE;
EOF

status=0
summary=$out/summary
: > "$summary"
for c in $clients; do
  deadlocks0=$(psql -X -A -t -d "$db" -c "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
  echo "== $c clients, $duration s"
  rc=0
  # shellcheck disable=SC2086
  pgbench -n -c "$c" -j "$c" -T "$duration" --failures-detailed -l --log-prefix="$out/c$c" \
    $mix "$db" >"$out/c$c.out" 2>&1 || rc=$?
  deadlocks=$(( $(psql -X -A -t -d "$db" -c "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()") - deadlocks0 ))
  grep -E "^(number of transactions actually processed|number of failed|number of serialization|number of deadlock|latency average|tps)" "$out/c$c.out" | sed 's/^/   /'
  aborted=$(grep -c "aborted\|ERROR" "$out/c$c.out" || true)
  [ "$aborted" = 0 ] || { echo "   errors:"; grep "aborted\|ERROR" "$out/c$c.out" | sort | uniq -c | head -10 | sed 's/^/   /'; }
  # per-window p99 from the per-transaction logs (client, tx, latency us,
  # script, epoch s, us; a failed transaction has a word for the latency)
  cat "$out"/c$c.[0-9]* 2>/dev/null | grep -v '^[a-z]' | python3 -c '
import sys, math
window, duration, c = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
names = ["ingest", "ingest_batch", "entitlement_value", "rate", "refresh_rollups"]
rows, failed = [], 0
for line in sys.stdin:
    f = line.split()
    if len(f) < 6: continue
    if not f[2].isdigit(): failed += 1; continue
    rows.append((int(f[4]) + int(f[5]) / 1e6, int(f[3]), int(f[2]) / 1000.0))
if not rows: print("   no transactions logged"); sys.exit(1)
t0 = min(r[0] - r[2] / 1000 for r in rows)
def p99(xs):
    xs = sorted(xs); return xs[max(0, math.ceil(0.99 * len(xs)) - 1)] if xs else float("nan")
wins = {}
for t, s, ms in rows:
    w = min(int((t - t0) // window), duration // window - 1)
    wins.setdefault(w, []).append((s, ms))
ws = sorted(wins)
line = "   p99 ms per %d s window:" % window
for w in ws: line += " %.1f" % p99([ms for s, ms in wins[w]])
print(line)
first, last = p99([ms for s, ms in wins[ws[0]]]), p99([ms for s, ms in wins[ws[-1]]])
ratio = last / first
for i, n in enumerate(names):
    a = [ms for s, ms in wins[ws[0]] if s == i]; b = [ms for s, ms in wins[ws[-1]] if s == i]
    print("   %-18s p99 first %8.2f ms, last %8.2f ms, %6d calls" % (n, p99(a), p99(b), sum(len([1 for s, ms in wins[w] if s == i]) for w in ws)))
verdict = "ok" if ratio <= 1.5 and failed == 0 else "FAIL"
print("   p99 first window %.2f ms, last %.2f ms: x%.2f (limit 1.5), failed %d: %s" % (first, last, ratio, failed, verdict))
open(sys.argv[4], "a").write("%s clients: %d tx, p99 first %.2f ms last %.2f ms (x%.2f), failed %d, %s\n"
    % (c, len(rows), first, last, ratio, failed, verdict))
sys.exit(0 if verdict == "ok" else 1)
' "$window" "$duration" "$c" "$summary" || status=1
  echo "   deadlocks: $deadlocks"
  [ "$rc" = 0 ] && [ "$aborted" = 0 ] && [ "$deadlocks" = 0 ] || { status=1; echo "   FAIL: pgbench status $rc, $aborted error lines, $deadlocks deadlocks"; }
done
echo "== summary"
cat "$summary"
[ $status = 0 ] && echo "soak: ok" || echo "soak: FAIL"
exit $status
