#!/bin/sh
# The upgrade path: a database made with 0.1.0 and updated with ALTER
# EXTENSION metering UPDATE has exactly the objects, definitions and comments
# of a fresh install of the current version, keeps its data, and works.
# Emits TAP; needs PGHOST/PGPORT/PGUSER of a running server.
set -e
old=metering_upgrade_old
new=metering_upgrade_new
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$1" -c "$2"; }
n=1
check() {  # description, got, expected
  if [ "$2" = "$3" ]; then echo "ok $n - $1"; else echo "not ok $n - $1"; echo "#   got: $2" | head -c 3000; echo; echo "#   expected: $3" | head -c 3000; echo; fi
  n=$((n + 1))
}
# everything a user can see of the extension, one line per fact
catalog="
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'metering'),
members AS (
  SELECT d.classid, d.objid FROM pg_depend d, ext
   WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e')
SELECT line FROM (
  SELECT 'member ' || pg_describe_object(classid, objid, 0) || ' -- ' || coalesce(obj_description(objid, classid::regclass::name), '') AS line FROM members
  UNION ALL
  SELECT 'function ' || p.oid::regprocedure || ' ' || md5(pg_get_functiondef(p.oid))
    FROM pg_proc p WHERE p.pronamespace = 'metering'::regnamespace AND p.prokind <> 'a'
  UNION ALL
  SELECT 'aggregate ' || a.aggfnoid::regprocedure || ' ' || a.aggtransfn::regprocedure || ' ' || a.aggfinalfn::regproc
         || ' ' || a.aggcombinefn::regproc || ' ' || a.aggtranstype::regtype || ' ' || coalesce(a.agginitval, '')
         || ' ' || p.proparallel::text
    FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid WHERE p.pronamespace = 'metering'::regnamespace
  UNION ALL
  SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '') || ' -- ' || coalesce(col_description(c.oid, a.attnum), '')
    FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
    LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
   WHERE c.relnamespace = 'metering'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' -- ' || coalesce(obj_description(t.oid, 'pg_trigger'), '')
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
   WHERE c.relnamespace = 'metering'::regnamespace AND NOT t.tgisinternal
  UNION ALL
  SELECT 'constraint ' || con.conrelid::regclass || ' ' || con.conname || ' ' || pg_get_constraintdef(con.oid)
         || ' -- ' || coalesce(obj_description(con.oid, 'pg_constraint'), '')
    FROM pg_constraint con WHERE con.connamespace = 'metering'::regnamespace
  UNION ALL
  SELECT 'index ' || pg_get_indexdef(i.indexrelid) || ' -- ' || coalesce(obj_description(i.indexrelid, 'pg_class'), '')
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace = 'metering'::regnamespace
  UNION ALL
  SELECT 'dumped ' || x::regclass || ' ' || coalesce(w, '')
    FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(x, w) WHERE e.extname = 'metering'
  UNION ALL
  SELECT 'acl ' || c.relname || ' ' || coalesce(c.relacl::text, '') FROM pg_class c WHERE c.relnamespace = 'metering'::regnamespace
) facts ORDER BY line"
echo "1..5"
dropdb --if-exists $old >/dev/null 2>&1; dropdb --if-exists $new >/dev/null 2>&1
createdb $old; createdb $new
q $old "CREATE EXTENSION metering VERSION '0.1.0'"
q $old "
SET metering.now = '2024-06-01 12:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('t', 'e', 'SUM', '\$.v');
SELECT metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', n::text, 'source', 's',
         'type', 'e', 'subject', 'acme', 'time', '2024-06-01T10:00:00Z', 'data', jsonb_build_object('v', n)))
         FROM generate_series(1, 100) n));
SELECT metering.refresh_rollups();" >/dev/null
q $old "ALTER EXTENSION metering UPDATE"
q $new "CREATE EXTENSION metering"
check "the update reaches the current version" "$(q $old "SELECT extversion FROM pg_extension WHERE extname = 'metering'")" \
  "$(q $new "SELECT extversion FROM pg_extension WHERE extname = 'metering'")"
got=$(q $old "$catalog")
want=$(q $new "$catalog")
check "updated and fresh installs have the same objects, definitions and comments" \
  "$(echo "$got" | md5sum)" "$(echo "$want" | md5sum)"
if [ "$got" != "$want" ]; then
  echo "# differences (< updated, > fresh):"
  echo "$got" > /tmp/upgrade_got.$$; echo "$want" > /tmp/upgrade_want.$$
  diff /tmp/upgrade_got.$$ /tmp/upgrade_want.$$ | sed 's/^/# /' | head -40 || true
  rm -f /tmp/upgrade_got.$$ /tmp/upgrade_want.$$
fi
check "the data of 0.1.0 is kept" "$(q $old "SELECT value FROM metering.query_meter('t')")" "5050"
q $old "
SET metering.now = '2024-06-01 12:00:00+00';
SELECT metering.create_feature('f', 'F', 't');
SELECT metering.create_entitlement('acme', 'f', usage_period => '1 day', measure_usage_from => '2024-06-01');
SELECT metering.create_grant(id, 10000, '2024-06-01') FROM metering.entitlements;" >/dev/null
check "entitlements work after the update" \
  "$(q $old "SELECT balance || ' ' || usage FROM metering.entitlement_value('acme', 'f', '2024-06-01 11:00+00')")" "4950 5050"
q $old "SELECT metering.ingest('{\"specversion\": \"1.0\", \"id\": \"late\", \"source\": \"s\", \"type\": \"e\", \"subject\": \"acme\", \"time\": \"2024-06-01T11:00:00Z\", \"data\": {\"v\": 50}}')" >/dev/null
check "the first refresh rebuilds the rollups (all 101 events) and saves their snapshots" \
  "$(q $old "SET metering.now = '2024-06-01 12:00:00+00'; SELECT metering.refresh_rollups(); SELECT count(*) FROM metering.entitlement_snapshots")" "101
1"
dropdb $old; dropdb $new
