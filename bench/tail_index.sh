#!/bin/sh
# What the index on metering.events (seq, subject) buys real-time enforcement
# and costs ingestion.  Every entitlement_value (and so every consume) adds
# the subject's events above the rollups' watermark.  Without the index they
# are found through the BRIN index, which reads a summary of every range of
# the whole table and then every row of the ranges the recent events are in,
# whoever's they are: the read grows with the history and with everyone's
# writes since the last refresh.  The btree, led by seq, finds them in
# O(log n) and checks the subject in its entries.
# On the data bench/holds.sql leaves (1,000 subjects), pgbench 3 s runs,
# 1 client, synchronous_commit off, a refresh before each run:
# entitlement_value, consume and ingest_batch of 100 events with the index
# and without it (as 0.2.0 had it), then the same after 1,000,000 more
# events of history: the ratios without/with and after/before.
#   psql -d metering_bench -f bench/holds.sql && sh bench/tail_index.sh   (make bench runs both)
set -e
db=${BENCH_DB:-metering_bench}
more=${MORE_EVENTS:-1000000}
pgbench=/usr/lib/postgresql/15/bin/pgbench
[ -x "$pgbench" ] || pgbench=pgbench
here=$(cd "$(dirname "$0")" && pwd)
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$db" -c "$1"; }
if [ "$(q "SELECT count(*) FROM metering.features WHERE key = 'hb-llm'" 2>/dev/null)" != 1 ]; then
  echo "bench/tail_index.sh: run bench/holds.sql in $db first; skipped"
  exit 0
fi
# the index as the extension makes it, whatever happens to a run without it
restore() {
  q "SET client_min_messages = warning; CREATE INDEX IF NOT EXISTS events_seq_subject ON metering.events (seq, subject)"
  q "DO \$\$ BEGIN EXECUTE format('COMMENT ON INDEX metering.events_seq_subject IS %L',
       regexp_replace(pg_get_indexdef('metering.events_seq_subject'::regclass), '^CREATE ', '')); END \$\$"
}
trap restore EXIT
refresh() { q "SELECT metering.refresh_rollups(), brin_summarize_new_values('metering.events_seq_time_brin')" >/dev/null; }
run() {  # script: mean latency in ms
  refresh
  PGOPTIONS='-c synchronous_commit=off' "$pgbench" -n -c 1 -j 1 -T 3 -f "$here/holds/$1.pgbench" "$db" 2>&1 |
    awk '/latency average/ { print $4 }'
}
out=""
for history in before after; do
  if [ $history = after ]; then
    q "INSERT INTO metering.events (id, source, subject, type, time, data)
       SELECT 'more-$$-' || n, 'hb', 'c' || (1 + n % 1000), 'hb.tokens', metering.now() - interval '1 second', '{\"n\": 1}'
         FROM generate_series(1, $more) n"
    refresh
    q "VACUUM ANALYZE metering.events"
  fi
  for phase in with without; do
    [ $phase = without ] && q "DROP INDEX metering.events_seq_subject"
    for w in value consume_distinct batch; do
      out="$out $history $phase $w $(run $w)"
    done
    [ $phase = without ] && restore
  done
done
echo "events in the table: $(q "SELECT count(*) FROM metering.events")"
echo "$out" | awk '{
  for (i = 1; i + 3 <= NF + 1; i += 4) { v[$(i) "," $(i + 1) "," $(i + 2)] = $(i + 3) }
  printf "%-18s %-8s %10s %10s %16s\n", "what", "history", "with ms", "without ms", "without/with"
  split("value consume_distinct batch", ws, " ")
  split("before after", hs, " ")
  for (h = 1; h <= 2; h++) for (k = 1; k <= 3; k++) {
    a = v[hs[h] ",with," ws[k]]; b = v[hs[h] ",without," ws[k]]
    printf "%-18s %-8s %10.3f %10.3f %16.2f\n", ws[k], hs[h], a, b, b / a }
  for (k = 1; k <= 3; k++)
    printf "%s after/before the history: %.2f with the index, %.2f without\n", ws[k],
      v["after,with," ws[k]] / v["before,with," ws[k]], v["after,without," ws[k]] / v["before,without," ws[k]]
  printf "consume over entitlement_value: %.2f with the index, %.2f without (before the history)\n",
    v["before,with,consume_distinct"] / v["before,with,value"], v["before,without,consume_distinct"] / v["before,without,value"]
}'
