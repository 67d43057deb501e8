#!/bin/sh
# What the optional index on metering.events (subject, seq) buys real-time
# enforcement and costs ingestion.  Every entitlement_value (and so every
# consume) reads the subject's events above the rollups' watermark; without
# a per-subject index they are found through the BRIN index of all
# subjects' recent events, so the read grows with everyone's writes since
# the last refresh.  On the data bench/holds.sql leaves (1,000 subjects,
# pgbench 3 s runs, 1 and 2 clients, synchronous_commit off, a refresh
# before each run): entitlement_value, consume and ingest_batch of 100
# events, without the index and with it, and the ratios with/without.
#   psql -d metering_bench -f bench/holds.sql && sh bench/subject_index.sh   (make bench runs both)
set -e
db=${BENCH_DB:-metering_bench}
pgbench=/usr/lib/postgresql/15/bin/pgbench
[ -x "$pgbench" ] || pgbench=pgbench
here=$(cd "$(dirname "$0")" && pwd)
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$db" -c "$1"; }
if [ "$(q "SELECT count(*) FROM metering.features WHERE key = 'hb-llm'" 2>/dev/null)" != 1 ]; then
  echo "bench/subject_index.sh: run bench/holds.sql in $db first; skipped"
  exit 0
fi
run() {  # script, clients: mean latency in ms
  q "SELECT metering.refresh_rollups(), brin_summarize_new_values('metering.events_seq_time_brin')" >/dev/null
  PGOPTIONS='-c synchronous_commit=off' "$pgbench" -n -c "$2" -j "$2" -T 3 -f "$here/holds/$1.pgbench" "$db" 2>&1 |
    awk '/latency average/ { print $4 }'
}
q "SET client_min_messages = warning; DROP INDEX IF EXISTS metering.events_subject_seq"
out=""
for phase in without with; do
  [ $phase = with ] && q "CREATE INDEX events_subject_seq ON metering.events (subject, seq)"
  for c in 1 2; do
    for w in value consume_distinct batch; do
      out="$out $phase $c $w $(run $w $c)"
    done
  done
done
q "DROP INDEX metering.events_subject_seq"
echo "$out" | awk '{
  for (i = 1; i + 3 <= NF + 1; i += 4) { v[$(i) "," $(i + 1) "," $(i + 2)] = $(i + 3) }
  printf "%-18s %-8s %12s %12s %7s\n", "what", "clients", "without ms", "with ms", "ratio"
  split("value consume_distinct batch", ws, " ")
  for (c = 1; c <= 2; c++) for (k = 1; k <= 3; k++) {
    a = v["without," c "," ws[k]]; b = v["with," c "," ws[k]]
    printf "%-18s %-8d %12.3f %12.3f %7.2f\n", ws[k], c, a, b, b / a }
  printf "consume over entitlement_value, 1 client: %.2f without the index, %.2f with it\n",
    v["without,1,consume_distinct"] / v["without,1,value"], v["with,1,consume_distinct"] / v["with,1,value"]
}'
