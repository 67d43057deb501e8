#!/bin/sh
# What a balance read costs as the events not rolled up yet pile up: every
# entitlement_value (and so every consume) walks the whole tail above the
# rollups' watermark through the (seq, subject) btree, whoever's events they
# are, and keeps its subject's.  The background refresh rolls the tail up
# every metering.refresh_interval, and sooner once it reaches
# metering.refresh_tail events (10,000 by default): this is why.
# On the data bench/holds.sql leaves (1,000 subjects): pgbench 3 s runs of
# entitlement_value of a random subject, 1 client, with a tail of 0, 10,000,
# 100,000 and 300,000 events of random subjects; the latency and its ratio
# to the read with no tail.
#   psql -d metering_bench -f bench/holds.sql && sh bench/tail_length.sh   (make bench runs both)
set -e
db=${BENCH_DB:-metering_bench}
pgbench=/usr/lib/postgresql/15/bin/pgbench
[ -x "$pgbench" ] || pgbench=pgbench
here=$(cd "$(dirname "$0")" && pwd)
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$db" -c "$1"; }
if [ "$(q "SELECT count(*) FROM metering.features WHERE key = 'hb-llm'" 2>/dev/null)" != 1 ]; then
  echo "bench/tail_length.sh: run bench/holds.sql in $db first; skipped"
  exit 0
fi
refresh() { q "SELECT metering.refresh_rollups(), brin_summarize_new_values('metering.events_seq_time_brin')" >/dev/null; }
trap refresh EXIT
refresh
# series TITLE PGBENCH_FILE SUBJECT_SQL TAILS...: the read's latency as the
# tail grows to each of TAILS events of the subjects SUBJECT_SQL names (n)
series() {
  title=$1; file=$2; subject=$3; shift 3
  k=$((${k:-0} + 1))
  printf "%-18s %12s %14s\n" "$title" "latency ms" "ratio to none"
  have=0
  base=""
  for tail in "$@"; do
    q "INSERT INTO metering.events (id, source, subject, type, time, data)
       SELECT 'tail-$$-$k-' || n, 'hb', $subject, 'hb.tokens', metering.now() - interval '1 second', '{\"n\": 1}'
         FROM generate_series($have + 1, $tail) n"
    have=$tail
    ms=$(PGOPTIONS='-c synchronous_commit=off' "$pgbench" -n -c 1 -j 1 -T 3 -f "$file" "$db" 2>&1 |
         awk '/latency average/ { print $4 }')
    [ -z "$base" ] && base=$ms
    printf "%-18s %12s %14s\n" "$tail" "$ms" "$(echo "$ms $base" | awk '{ printf "%.1f", $1 / $2 }')"
  done
}
series "tail (events)" "$here/holds/value.pgbench" "'c' || (1 + n % 1000)" 0 10000 100000 300000
# One subject's own events: a read of it reads them (a hot entitlement's
# checks), which metering.refresh_subject_tail (500 by default) bounds.
refresh
own="${TMPDIR:-/tmp}/tail_length_c1.pgbench"
echo "SELECT * FROM metering.entitlement_value('c1', 'hb-llm');" >"$own"
series "c1's own (events)" "$own" "'c1'" 0 1000 10000
rm -f "$own"
