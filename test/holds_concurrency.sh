#!/bin/sh
# Issue 10 under real concurrency: 20 psql processes reserve 75 each at once
# against a balance of 500 and exactly 6 are granted; 10 processes consume
# 7 at a time, 20 times each, against 500 and never store more than the
# balance; a session that has run LISTEN receives each alert once, and none
# from a transaction that rolled back.
# Emits TAP; needs PGHOST/PGPORT/PGUSER (a superuser) of a running server.
db=metering_holds_conc
tmp=$(mktemp -d)
n=1
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d $db -c "$1"; }
check() {  # description, got, expected
  if [ "$2" = "$3" ]; then echo "ok $n - $1"; else echo "not ok $n - $1"; echo "#   got: $2"; echo "#   expected: $3"; fi
  n=$((n + 1))
}
echo "1..9"
dropdb --if-exists $db >/dev/null 2>&1
createdb $db
q "CREATE EXTENSION metering" >/dev/null
q "INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('tok', 'tokens', 'SUM', '\$.n');
   SELECT metering.create_feature('llm', 'LLM', 'tok');
   SELECT metering.create_entitlement(s, 'llm', usage_period => '1 month') FROM unnest(ARRAY['acme', 'beta', 'gamma', 'delta']) s;
   SELECT metering.create_grant(id, 500, now()) FROM metering.entitlements;" >/dev/null

# 20 holds of 75 at once against 500
for i in $(seq 1 20); do
  psql -X -A -t -q -d $db -c "SELECT granted FROM metering.reserve('acme', 'llm', 75)" > $tmp/r$i 2>&1 &
done
wait
check "20 concurrent holds of 75 against 500: exactly 6 granted" "$(cat $tmp/r* | grep -c '^t$')" "6"
check "the others are denied, none failed" "$(cat $tmp/r* | grep -c '^f$')" "14"
check "the holds add up to 450" \
  "$(q "SELECT reserved || ' ' || available FROM metering.entitlement_value('acme', 'llm')")" "450 50"

# 10 consumers of 7, 20 times each, against 500 (each call its own transaction)
for i in $(seq 1 10); do
  for j in $(seq 1 20); do
    echo "SELECT granted FROM metering.consume(jsonb_build_object('specversion', '1.0', 'id', 'c$i-$j', 'source', 'conc', 'type', 'tokens', 'subject', 'beta', 'data', jsonb_build_object('n', 7)), 'llm');"
  done > $tmp/c$i.sql
  psql -X -A -t -q -d $db -f $tmp/c$i.sql > $tmp/c$i.out 2>&1 &
done
wait
granted=$(cat $tmp/c*.out | grep -c '^t$')
check "concurrent consumers: 71 of 200 consumes of 7 fit in 500" "$granted" "71"
check "what they stored is what was granted, within the balance" \
  "$(q "SELECT sum((data->>'n')::int) FROM metering.events WHERE subject = 'beta'") $(q "SELECT usage || ' ' || balance FROM metering.entitlement_value('beta', 'llm')")" \
  "497 497 3"

# alerts: a listener sees the crossing of 80% once, and nothing of a rollback
q "INSERT INTO metering.notification_rules (name, feature_key, thresholds, channel)
   VALUES ('eighty', 'llm', '[{\"type\": \"USAGE_PERCENT\", \"value\": 80}]', 'conc_alerts')" >/dev/null
psql -X -d $db -c "LISTEN conc_alerts" -c "SELECT pg_sleep(4)" -c "SELECT 1" > $tmp/listen.out 2>&1 &
listener=$!
sleep 1
ev() { echo "jsonb_build_object('specversion', '1.0', 'id', '$1', 'source', 'conc', 'type', 'tokens', 'subject', 'gamma', 'data', jsonb_build_object('n', $2))"; }
psql -X -q -d $db -c "BEGIN" -c "SELECT metering.ingest($(ev g0 450))" -c "ROLLBACK" >/dev/null
psql -X -q -d $db -c "SELECT metering.consume($(ev g1 300), 'llm')" >/dev/null
psql -X -q -d $db -c "SELECT metering.consume($(ev g2 150), 'llm')" >/dev/null
psql -X -q -d $db -c "SELECT metering.ingest($(ev g3 20))" >/dev/null
wait $listener
check "the listener received one notification" "$(grep -c 'Asynchronous notification "conc_alerts"' $tmp/listen.out)" "1"
check "it is the crossing, with the usage of the transaction that crossed" \
  "$(sed -n 's/.*"kind":"\([a-z]*\)".*"usage":\([0-9]*\),.*/\1 \2/p' $tmp/listen.out)" "crossed 450"
check "and one row of notification_events" "$(q "SELECT count(*) FROM metering.notification_events")" "1"

# 10 sessions store 50 each at once against 500: one of them crosses 80%, once
for i in $(seq 1 10); do
  psql -X -q -d $db -c "SELECT metering.ingest(jsonb_build_object('specversion', '1.0', 'id', 'd$i', 'source', 'conc', 'type', 'tokens', 'subject', 'delta', 'data', jsonb_build_object('n', 50)))" >/dev/null 2>&1 &
done
wait
check "10 concurrent ingests that cross 80% together: one notification" \
  "$(q "SELECT count(*) || ' ' || min(usage) FROM metering.notification_events WHERE subject = 'delta'")" "1 400"
rm -rf $tmp
dropdb $db
