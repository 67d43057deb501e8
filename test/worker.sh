#!/bin/sh
# The background refresh (metering in shared_preload_libraries): a database
# that turns it on is refreshed without anyone calling refresh_rollups(),
# rounds are recorded, a tail of metering.refresh_tail events (or of
# metering.refresh_subject_tail events of one subject) is rolled up before
# the interval is over (without snapshots), a meter whose watermark another session holds is
# skipped while the others go on and caught up afterwards, the worker killed
# with kill -9 (a crash of the server) comes back, a dump taken while it
# runs restores to the same answers, and DROP DATABASE does not wait for it.
# Emits TAP; needs PGHOST/PGPORT/PGUSER of a server with the preload and
# metering.refresh_interval 0 (tools/test starts one), and root (kill -9).
db=metering_worker
copy=metering_worker_copy
dump=$(mktemp)
n=1
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$db" -c "$1" 2>/dev/null; }
check() {  # description, got, expected
  if [ "$2" = "$3" ]; then echo "ok $n - $1"; else echo "not ok $n - $1"; echo "#   got: $2"; echo "#   expected: $3"; fi
  n=$((n + 1))
}
# waits (at most $2 seconds) until the query $1 answers t
wait_for() {
  i=0
  while [ $i -lt "$2" ]; do
    [ "$(q "$1")" = "t" ] && return 0
    sleep 1; i=$((i + 1))
  done
  return 1
}
batch() {  # id prefix, subject, type, count
  echo "SELECT metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', '$1' || n,
          'source', 's', 'type', '$3', 'subject', '$2', 'time', '2024-06-01T10:00:00Z', 'data', jsonb_build_object('v', n)))
          FROM generate_series(1, $4) n))"
}
hold() {  # meter, seconds: another session holds its watermark (in the background: $!)
  psql -X -q -d $db -c "BEGIN; SELECT 1 FROM metering.meter_rollup_state WHERE meter = '$1' FOR UPDATE; SELECT pg_sleep($2); COMMIT;" >/dev/null 2>&1 &
}
caught_up() {  # meter, event type: the query whether its watermark is at the type's last event
  echo "SELECT rolled_up_to >= (SELECT max(seq) FROM metering.events WHERE type = '$2') FROM metering.meter_rollup_state WHERE meter = '$1'"
}
# every meter's watermark is at the last event of its type
current="SELECT bool_and(s.rolled_up_to >= coalesce((SELECT max(e.seq) FROM metering.events e WHERE e.type = m.event_type), 0))
           FROM metering.meters m JOIN metering.meter_rollup_state s ON s.meter = m.slug WHERE m.deleted_at IS NULL"
# query_meter agrees with the events, meter by meter
answers="SELECT string_agg(m.slug || '=' || coalesce((SELECT sum(value) FROM metering.query_meter(m.slug))::text, '-'), ' ' ORDER BY m.slug)
           FROM metering.meters m WHERE m.deleted_at IS NULL"
oracle="SELECT string_agg(m.slug || '=' || coalesce((SELECT CASE m.aggregation WHEN 'COUNT' THEN count(*)::numeric
                                                              ELSE sum((e.data ->> 'v')::numeric) END
                                                     FROM metering.events e WHERE e.type = m.event_type)::text, '-'), ' ' ORDER BY m.slug)
           FROM metering.meters m WHERE m.deleted_at IS NULL"

echo "1..20"
if [ "$(psql -X -A -t -q -d postgres -c "SELECT current_setting('shared_preload_libraries') ~ 'metering'")" != t ]; then
  for i in $(seq 1 20); do echo "ok $i # skip metering is not in shared_preload_libraries"; done
  exit 0
fi
dropdb --if-exists $db >/dev/null 2>&1; dropdb --if-exists $copy >/dev/null 2>&1
createdb $db
psql -X -q -v ON_ERROR_STOP=1 -d $db >/dev/null <<SQL
CREATE EXTENSION metering;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES
  ('a', 'ea', 'SUM', '\$.v'), ('b', 'eb', 'COUNT', NULL);
$(batch a acme ea 2000);
$(batch b acme eb 2000);
SET metering.now = '2024-06-01 00:00+00';
SELECT metering.create_feature('fa', 'A', 'a');
SELECT metering.create_entitlement('acme', 'fa', usage_period => '1 day', issue_after_reset => 1000000);
-- a count(numeric) of a schema that a database setting puts before
-- pg_catalog (as a database owner could): the worker must not run it
CREATE TABLE public.trojan_calls (who text);
CREATE FUNCTION public.trojan_count(bigint, numeric) RETURNS bigint LANGUAGE plpgsql
  AS \$\$BEGIN INSERT INTO public.trojan_calls VALUES (current_user); RETURN \$1 + 1; END\$\$;
CREATE AGGREGATE public.count(numeric) (SFUNC = public.trojan_count, STYPE = bigint, INITCOND = '0');
ALTER DATABASE $db SET search_path = public, pg_catalog;
SQL
check "with the refresh off, nothing is rolled up" "$(q "SELECT sum(rolled_up_to) FROM metering.meter_rollup_state")" "0"

q "ALTER DATABASE $db SET metering.refresh_interval = '1s'" >/dev/null
# the launcher tries a database again a minute after its worker last left
wait_for "$current" 120
check "turned on for the database, the worker rolls up every meter" "$(q "$current")" "t"
check "its rounds are in refresh_status" \
  "$(q "SELECT count(*) > 0 AND sum(events) = 4000 AND bool_and(failed = 0) FROM metering.refresh_status")" "t"
check "and it wrote the entitlement's snapshot" "$(q "SELECT count(*) > 0 FROM metering.entitlement_snapshots")" "t"
check "the answers are those of the events" "$(q "$answers")" "$(q "$oracle")"
check "the worker's statements name pg_catalog's functions, whatever the database's search_path" \
  "$(q "SELECT count(*) FROM public.trojan_calls")" "0"

# between two rounds an hour apart, the tail: fewer events than
# metering.refresh_tail wait, as many are rolled up within seconds, by a
# round that queues the snapshots for the next full one, which writes them
# (the whole tail alone: each batch is of one subject)
q "ALTER DATABASE $db SET metering.refresh_interval = '1h'" >/dev/null
q "ALTER DATABASE $db SET metering.refresh_tail = 1000" >/dev/null
q "ALTER DATABASE $db SET metering.refresh_subject_tail = 0" >/dev/null
sleep 3
since=$(q "SELECT clock_timestamp()")
q "$(batch t1 acme ea 600)" >/dev/null
sleep 4
check "fewer events than refresh_tail wait for the interval" "$(q "$current")" "f"
q "$(batch t2 acme ea 600)" >/dev/null
wait_for "$current" 20
check "as many are rolled up within seconds" "$(q "$current") $(q "$answers")" "t $(q "$oracle")"
check "by rounds that queue the snapshots for the next full one" \
  "$(q "SELECT count(*) > 0 AND bool_and(snapshots = 0) AND sum(events) = 1200 FROM metering.refresh_rounds WHERE started_at >= '$since'") $(q "SELECT count(*) FROM metering.entitlement_snapshot_queue")" \
  "t 1"
# a meter whose watermark another session holds fails its step (10 s): the
# rounds the tail starts leave it to the next full round and go on for the others
since2=$(q "SELECT clock_timestamp()")
hold a 30
holder=$!
sleep 1
q "$(batch t3 acme ea 600)" >/dev/null
q "$(batch t4 acme eb 600)" >/dev/null
wait_for "SELECT count(*) > 0 FROM metering.refresh_rounds WHERE started_at >= '$since2' AND failed > 0" 25
q "$(batch t5 acme eb 1100)" >/dev/null
wait_for "$(caught_up b eb)" 8
check "a meter that failed waits for the next full round; the tail's rounds go on for the others" \
  "$(q "$(caught_up b eb)") $(q "$(caught_up a ea)")" "t f"
wait "$holder"
q "ALTER DATABASE $db RESET metering.refresh_tail" >/dev/null
q "ALTER DATABASE $db SET metering.refresh_interval = '1s'" >/dev/null
wait_for "SELECT count(*) = 0 FROM metering.entitlement_snapshot_queue" 20
check "the next full round writes the queued snapshots" \
  "$(q "SELECT count(*) FROM metering.entitlement_snapshot_queue") $(q "SELECT sum(snapshots) > 0 FROM metering.refresh_rounds WHERE started_at >= '$since'")" "0 t"

# one subject's events: every read of it reads them, so as many as
# metering.refresh_subject_tail start a round while the whole tail is far
# below metering.refresh_tail (the most of one subject counts, not the sum)
q "ALTER DATABASE $db SET metering.refresh_interval = '1h'" >/dev/null
q "ALTER DATABASE $db SET metering.refresh_tail = 100000" >/dev/null
q "ALTER DATABASE $db RESET metering.refresh_subject_tail" >/dev/null   # the default: 500
sleep 3
q "$(batch h1 busy ea 300)" >/dev/null
q "$(batch h2 calm ea 400)" >/dev/null
sleep 4
check "fewer of each subject's events than refresh_subject_tail wait for the interval" "$(q "$current")" "f"
q "$(batch h3 busy ea 300)" >/dev/null
wait_for "$current" 20
check "as many of one subject's are rolled up within seconds" "$(q "$current") $(q "$answers")" "t $(q "$oracle")"
q "ALTER DATABASE $db RESET metering.refresh_tail" >/dev/null
q "ALTER DATABASE $db SET metering.refresh_interval = '1s'" >/dev/null

# another session holds meter a's watermark: a waits, b goes on
# (held for 40 s: b's new events may come just after a round began, and are
# then rolled up by the next one, after a has timed out twice: 10 s each)
hold a 40
holder=$!
sleep 1
q "$(batch a2 acme ea 500)" >/dev/null
q "$(batch b2 acme eb 500)" >/dev/null
wait_for "$(caught_up b eb)" 32
check "a meter held by another session does not hold up the others" \
  "$(q "SELECT (SELECT rolled_up_to FROM metering.meter_rollup_state WHERE meter = 'b') >= (SELECT max(seq) FROM metering.events WHERE type = 'eb')
              AND (SELECT rolled_up_to FROM metering.meter_rollup_state WHERE meter = 'a') < (SELECT max(seq) FROM metering.events WHERE type = 'ea')")" "t"
wait_for "SELECT count(*) > 0 FROM metering.refresh_status WHERE failed > 0 AND last_error LIKE '%meter \"a\"%'" 30
check "the round that could not refresh it says so" \
  "$(q "SELECT count(*) > 0 FROM metering.refresh_status WHERE failed > 0 AND last_error LIKE '%meter \"a\"%'")" "t"
wait "$holder"
wait_for "$current" 30
check "once it is free, the next round catches it up" "$(q "$current") $(q "$answers")" "t $(q "$oracle")"

# kill -9 of the worker: the server restarts everything, the worker comes back
pid=$(q "SELECT pid FROM pg_stat_activity WHERE backend_type = 'metering refresh' AND datname = '$db'")
q "$(batch c acme ea 1000)" >/dev/null &
[ -n "$pid" ] && kill -9 "$pid"
wait
i=0; until psql -X -q -d $db -c "SELECT 1" >/dev/null 2>&1 || [ $i -ge 60 ]; do sleep 1; i=$((i + 1)); done
q "$(batch d acme eb 700)" >/dev/null
wait_for "$current" 240
check "after kill -9 of the worker and crash recovery, it resumes" "$(q "$current")" "t"
check "and every answer is that of the events" "$(q "$answers")" "$(q "$oracle")"

# a dump taken while the worker runs restores to the same answers
q "$(batch e acme ea 3000)" >/dev/null
pg_dump -Fc -f "$dump" $db 2>/dev/null
createdb $copy
pg_restore -d $copy "$dump" 2>/dev/null
psql -X -A -t -q -d $copy -c "SELECT metering.refresh_rollups()" >/dev/null
check "a dump taken while the worker runs restores to the same answers" \
  "$(psql -X -A -t -q -d $copy -c "$answers")" "$(q "$oracle")"

check "DROP DATABASE does not wait for the worker" \
  "$(timeout 30 dropdb $db >/dev/null 2>&1 && echo dropped)" "dropped"
dropdb --if-exists $copy >/dev/null 2>&1; rm -f "$dump"
