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
echo "1..15"
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
SELECT metering.register_usage('p', 'c', 1, 'n1');
SET metering.now = '2024-06-01 00:00:00+00';
SELECT metering.create_feature('f', 'F', 't');
SELECT metering.create_entitlement('acme', 'f', usage_period => '1 day', issue_after_reset => 40, preserve_overage_at_reset => true);
SELECT metering.create_grant(id, 30, '2024-06-01 01:00+00', priority => 2, recurrence => '6 hours') FROM metering.entitlements;
SELECT metering.create_grant(id, 7, '2024-06-01 02:00+00', priority => 3) FROM metering.entitlements;
SET metering.now = '2024-06-01 08:00:00+00';
SELECT metering.void_grant(id) FROM metering.grants WHERE amount = 7;
SELECT metering.reset_entitlement(id, '2024-06-01 07:30+00') FROM metering.entitlements;
SELECT metering.create_feature('old', 'Old', 't');
SELECT metering.create_entitlement('acme', 'old', usage_period => '1 hour');
SELECT metering.create_entitlement('gone', 'old', 'boolean');
SELECT metering.delete_entitlement(id) FROM metering.entitlements WHERE subject = 'gone';
SELECT metering.archive_feature('old');
SELECT metering.create_feature('old', 'Old again');
SET metering.now = '2024-06-01 12:00:00+00';
SELECT metering.refresh_rollups();
INSERT INTO metering.hashmap_services (name) VALUES ('e'), ('gone');
INSERT INTO metering.hashmap_fields (service_id, name) SELECT id, 'k' FROM metering.hashmap_services WHERE name = 'e';
INSERT INTO metering.hashmap_groups (name) VALUES ('g');
INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type)
SELECT s.id, g.id, 0.5, 'flat' FROM metering.hashmap_services s, metering.hashmap_groups g WHERE s.name = 'e';
INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type) SELECT id, 'a', 2, 'flat' FROM metering.hashmap_fields;
INSERT INTO metering.hashmap_thresholds (service_id, group_id, level, cost, map_type, tenant_id)
SELECT s.id, g.id, 10, 0.5, 'rate', 't' FROM metering.hashmap_services s, metering.hashmap_groups g WHERE s.name = 'e';
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type) SELECT id, 1, 'flat' FROM metering.hashmap_services WHERE name = 'gone';
DELETE FROM metering.hashmap_services WHERE name = 'gone';
SET metering.now = '2024-06-01 11:00:00+00';
INSERT INTO metering.hashmap_groups (name) VALUES ('old');
INSERT INTO metering.hashmap_mappings (field_id, group_id, value, cost, map_type)
SELECT f.id, g.id, 'b', 3, 'flat' FROM metering.hashmap_fields f, metering.hashmap_groups g WHERE g.name = 'old';
SET metering.now = '2024-06-01 12:00:00+00';
SELECT metering.delete_hashmap_group(id) FROM metering.hashmap_groups WHERE name = 'old';" >/dev/null
before=$(q $src "SELECT value FROM metering.query_meter('t')")
answers="SELECT string_agg(format('%s %s/%s/%s', at, v.balance, v.usage, v.overage), ', ' ORDER BY at)
  FROM generate_series('2024-06-01 00:00+00'::timestamptz, '2024-06-01 12:00+00', '1 hour') at,
       LATERAL metering.entitlement_value('acme', 'f', at) v"
values=$(q $src "$answers")
prices="SELECT string_agg(metering.rate(s, q, '{\"k\": \"a\"}', t, '2024-06-01 12:00+00')::text, ',' ORDER BY s, q, t)
  FROM unnest(ARRAY['e', 'gone']) s, unnest(ARRAY[5, 20]::numeric[]) q, unnest(ARRAY['t', 'u']) t"
rated=$(q $src "$prices")
grants=$(q $src "SELECT string_agg(format('%s %s %s', amount, voided_at, created_at), ', ' ORDER BY amount) FROM metering.grants")
secret=$(q $src "SELECT encode(secret, 'hex') FROM metering.signing_keys")
pg_dump -Fc -f "$dump" $src
pg_restore -d $dst "$dump"
check "events come back" "$(q $dst "SELECT count(*) FROM metering.events")" "101"
check "the meter answers the same" "$(q $dst "SELECT value FROM metering.query_meter('t')")" "$before"
check "the signing secret comes back" "$(q $dst "SELECT encode(secret, 'hex') FROM metering.signing_keys")" "$secret"
check "usage records come back" "$(q $dst "SELECT count(*) FROM metering.usage_records")" "1"
check "grants come back as they were (no second issue_after_reset grant)" \
  "$(q $dst "SELECT string_agg(format('%s %s %s', amount, voided_at, created_at), ', ' ORDER BY amount) FROM metering.grants")" "$grants"
check "features (archived too), entitlements (deleted too) and resets come back" \
  "$(q $dst "SELECT (SELECT count(*) FROM metering.features) || ' ' || (SELECT count(*) FROM metering.entitlements) || ' ' || (SELECT count(*) FROM metering.resets)")" \
  "$(q $src "SELECT (SELECT count(*) FROM metering.features) || ' ' || (SELECT count(*) FROM metering.entitlements) || ' ' || (SELECT count(*) FROM metering.resets)")"
check "rating rules come back (deleted ones too) and price the same" "$(q $dst "$prices")" "$rated"
check "every rating rule comes back, ended ones of a deleted group too" \
  "$(q $dst "SELECT count(*) FROM metering.hashmap_mappings") $(q $dst "SELECT count(*) FROM metering.hashmap_thresholds")" \
  "$(q $src "SELECT count(*) FROM metering.hashmap_mappings") $(q $src "SELECT count(*) FROM metering.hashmap_thresholds")"
check "snapshots are not dumped" "$(q $dst "SELECT count(*) FROM metering.entitlement_snapshots")" "0"
check "entitlements answer the same" "$(q $dst "$answers")" "$values"
q $dst "SELECT metering.ingest('{\"specversion\": \"1.0\", \"id\": \"new\", \"source\": \"s\", \"type\": \"e\", \"subject\": \"acme\", \"time\": \"2024-06-01T10:00:00Z\", \"data\": {\"v\": 1000}}')" >/dev/null
check "a new event is numbered after the restored ones" \
  "$(q $dst "SELECT seq > (SELECT max(seq) FROM metering.events WHERE id <> 'new') FROM metering.events WHERE id = 'new'")" "t"
q $dst "SELECT metering.refresh_rollups()" >/dev/null
check "after a refresh the answer includes the new event" "$(q $dst "SELECT value FROM metering.query_meter('t')")" "$((before + 1000))"
# a dump may leave the secrets out; the restored database then makes a new one
dropdb $dst; createdb $dst
pg_dump -Fc --exclude-table-data=metering.signing_keys -f "$dump" $src
check "--exclude-table-data=metering.signing_keys leaves the secret out of the dump" \
  "$(pg_restore -f - -a "$dump" | grep -c "$secret")" "0"
pg_restore -d $dst "$dump"
check "and the restore has no secret" "$(q $dst "SELECT count(*) FROM metering.signing_keys")" "0"
q $dst "SELECT (metering._current_signing_key()).version" >/dev/null
check "until the first use makes a new one" \
  "$(q $dst "SELECT count(*) || ' ' || bool_and(encode(secret, 'hex') <> '$secret') FROM metering.signing_keys")" "1 true"
dropdb $src; dropdb $dst; rm -f "$dump"
