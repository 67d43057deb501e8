#!/bin/sh
# pg_dump and restore keep what users stored: events (and their sequence),
# meters, AWS records and the signing secrets; derived rollups are rebuilt.
# Emits TAP; needs PGHOST/PGPORT/PGUSER of a running server.
set -e
src=metering_dump_src
dst=metering_dump_dst
dump=$(mktemp)
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$1" -c "$2"; }
check() {  # description, got, expected
  if [ "$2" = "$3" ]; then echo "ok $n - $1"; else echo "not ok $n - $1"; echo "#   got: $2"; echo "#   expected: $3"; fi
  n=$((n + 1))
}
n=1
echo "1..6"
dropdb --if-exists $src >/dev/null 2>&1; dropdb --if-exists $dst >/dev/null 2>&1
createdb $src; createdb $dst
q $src "CREATE EXTENSION metering" >/dev/null
q $src "
SET metering.now = '2024-06-01 12:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('t', 'e', 'SUM', '\$.v');
SELECT metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', n::text, 'source', 's',
         'type', 'e', 'subject', 'acme', 'time', '2024-06-01T10:00:00Z', 'data', jsonb_build_object('v', n)))
         FROM generate_series(1, 100) n));
SELECT metering.refresh_rollups();
INSERT INTO metering.products VALUES ('p'); INSERT INTO metering.product_dimensions VALUES ('p', 'd');
INSERT INTO metering.customers (customer_identifier, product_code, subscribed_at) VALUES ('c', 'p', '2024-01-01');
SELECT metering.meter_usage('p', 'c', '2024-06-01 11:00:00+00', 'd', 5);
SELECT metering.register_usage('p', 'c', 1, 'n1');" >/dev/null
before=$(q $src "SELECT value FROM metering.query_meter('t')")
secret=$(q $src "SELECT encode(secret, 'hex') FROM metering.signing_keys")
pg_dump -Fc -f "$dump" $src
pg_restore -d $dst "$dump"
check "events come back" "$(q $dst "SELECT count(*) FROM metering.events")" "101"
check "the meter answers the same" "$(q $dst "SELECT value FROM metering.query_meter('t')")" "$before"
check "the signing secret comes back" "$(q $dst "SELECT encode(secret, 'hex') FROM metering.signing_keys")" "$secret"
check "usage records come back" "$(q $dst "SELECT count(*) FROM metering.usage_records")" "1"
q $dst "SELECT metering.ingest('{\"specversion\": \"1.0\", \"id\": \"new\", \"source\": \"s\", \"type\": \"e\", \"subject\": \"acme\", \"time\": \"2024-06-01T10:00:00Z\", \"data\": {\"v\": 1000}}')" >/dev/null
check "a new event is numbered after the restored ones" \
  "$(q $dst "SELECT seq > (SELECT max(seq) FROM metering.events WHERE id <> 'new') FROM metering.events WHERE id = 'new'")" "t"
q $dst "SELECT metering.refresh_rollups()" >/dev/null
check "after a refresh the answer includes the new event" "$(q $dst "SELECT value FROM metering.query_meter('t')")" "$((before + 1000))"
dropdb $src; dropdb $dst; rm -f "$dump"
