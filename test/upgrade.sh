#!/bin/sh
# The upgrade paths: a database made with any earlier release and updated
# with ALTER EXTENSION metering UPDATE has exactly the objects, definitions
# and comments of a fresh install of the current version, keeps its data, and
# works.  Walks 0.1.0 -> 0.2.0 -> 0.3.0 (one UPDATE walks the chain) and
# 0.2.0 -> 0.3.0, and checks that the kept 0.1.0 -> 0.2.0 script still makes
# what the kept 0.2.0 install script makes.
# Emits TAP; needs PGHOST/PGPORT/PGUSER of a running server.
set -e
old=metering_upgrade_old      # 0.1.0, updated
old2=metering_upgrade_old2    # 0.2.0, updated
mid=metering_upgrade_mid      # 0.1.0, updated to 0.2.0 only
roles=metering_upgrade_roles  # 0.2.0 with its setup_roles(), updated
new=metering_upgrade_new      # fresh install of the current version
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
  UNION ALL
  SELECT 'function acl ' || p.oid::regprocedure || ' ' || coalesce(p.proacl::text, '')
    FROM pg_proc p WHERE p.pronamespace = 'metering'::regnamespace
) facts ORDER BY line"
# compare_catalogs description updated-db fresh-db
compare_catalogs() {
  got=$(q $2 "$catalog")
  want=$(q $3 "$catalog")
  check "$1" "$(echo "$got" | md5sum)" "$(echo "$want" | md5sum)"
  if [ "$got" != "$want" ]; then
    echo "# differences (< updated, > fresh):"
    echo "$got" > /tmp/upgrade_got.$$; echo "$want" > /tmp/upgrade_want.$$
    diff /tmp/upgrade_got.$$ /tmp/upgrade_want.$$ | sed 's/^/# /' | head -40 || true
    rm -f /tmp/upgrade_got.$$ /tmp/upgrade_want.$$
  fi
}
events="
SET metering.now = '2024-06-01 12:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('t', 'e', 'SUM', '\$.v');
SELECT metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', n::text, 'source', 's',
         'type', 'e', 'subject', 'acme', 'time', '2024-06-01T10:00:00Z', 'data', jsonb_build_object('v', n)))
         FROM generate_series(1, 100) n));
SELECT metering.refresh_rollups();"
entitlement="
SET metering.now = '2024-06-01 12:00:00+00';
SELECT metering.create_feature('f', 'F', 't');
SELECT metering.create_entitlement('acme', 'f', usage_period => '1 day', measure_usage_from => '2024-06-01');
SELECT metering.create_grant(id, 10000, '2024-06-01') FROM metering.entitlements;"
late="SELECT metering.ingest('{\"specversion\": \"1.0\", \"id\": \"late\", \"source\": \"s\", \"type\": \"e\", \"subject\": \"acme\", \"time\": \"2024-06-01T11:00:00Z\", \"data\": {\"v\": 50}}')"
value() {  # db, instant: balance and usage of acme's entitlement to f
  q $1 "SELECT balance || ' ' || usage FROM metering.entitlement_value('acme', 'f', '$2')"
}
version() { q $1 "SELECT extversion FROM pg_extension WHERE extname = 'metering'"; }

echo "1..12"
for db in $old $old2 $mid $new $roles; do dropdb --if-exists $db >/dev/null 2>&1; createdb $db; done
q $new "CREATE EXTENSION metering"

# 0.1.0 -> 0.2.0 -> 0.3.0
q $old "CREATE EXTENSION metering VERSION '0.1.0'"
q $old "$events" >/dev/null
q $old "ALTER EXTENSION metering UPDATE"
check "the update from 0.1.0 reaches the current version" "$(version $old)" "$(version $new)"
compare_catalogs "0.1.0 updated and fresh installs have the same objects, definitions and comments" $old $new
check "the data of 0.1.0 is kept" "$(q $old "SELECT value FROM metering.query_meter('t')")" "5050"
q $old "$entitlement" >/dev/null
check "entitlements work after the update from 0.1.0" "$(value $old '2024-06-01 11:00+00')" "4950 5050"
q $old "$late" >/dev/null
check "the first refresh rebuilds the rollups (all 101 events) and saves their snapshots" \
  "$(q $old "SET metering.now = '2024-06-01 12:00:00+00'; SELECT metering.refresh_rollups(); SELECT count(*) FROM metering.entitlement_snapshots")" "101
1"

# the kept scripts of 0.2.0 agree: 0.1.0 updated to 0.2.0 is a fresh 0.2.0
q $mid "CREATE EXTENSION metering VERSION '0.1.0'"
q $mid "ALTER EXTENSION metering UPDATE TO '0.2.0'"
q $old2 "CREATE EXTENSION metering VERSION '0.2.0'"
compare_catalogs "0.1.0 updated to 0.2.0 and a fresh 0.2.0 have the same objects, definitions and comments" $mid $old2

# 0.2.0 -> 0.3.0, with entitlements made in 0.2.0
q $old2 "$events" >/dev/null
q $old2 "$entitlement" >/dev/null
# the library is updated first: until the update it ingests and refreshes
# (writing no snapshot), and its entitlement readers ask for the update
q $old2 "SET metering.now = '2024-06-01 12:00:00+00'; SELECT metering.refresh_snapshots()" >/dev/null
q $old2 "SET metering.now = '2024-06-01 12:00:00+00';
         SELECT metering.ingest('{\"specversion\": \"1.0\", \"id\": \"before\", \"source\": \"s\", \"type\": \"e\", \"subject\": \"acme\", \"time\": \"2024-06-01T09:00:00Z\", \"data\": {\"v\": 7}}')" >/dev/null
check "before the update, the new library refreshes the 0.2.0 SQL (writing no snapshot) and its entitlement readers ask for the update (55000)" \
  "$(q $old2 "SET metering.now = '2024-06-01 12:00:00+00'; SELECT metering.refresh_rollups(); SELECT count(*) FROM metering.entitlement_snapshots") $(psql -X -A -t -q -d $old2 -v VERBOSITY=sqlstate -c "SELECT metering.entitlement_value('acme', 'f')" 2>&1 | sed -n 's/^ERROR: *//p')" \
  "1
0 55000"
q $old2 "DELETE FROM metering.events WHERE id = 'before'" >/dev/null
q $old2 "ALTER EXTENSION metering UPDATE"
check "the update from 0.2.0 reaches the current version" "$(version $old2)" "$(version $new)"
compare_catalogs "0.2.0 updated and fresh installs have the same objects, definitions and comments" $old2 $new
check "the data of 0.2.0 is kept" \
  "$(q $old2 "SELECT value FROM metering.query_meter('t')") $(value $old2 '2024-06-01 11:00+00')" "5050 4950 5050"
q $old2 "$late" >/dev/null
check "usage and entitlements work after the update from 0.2.0" \
  "$(q $old2 "SET metering.now = '2024-06-01 12:00:00+00'; SELECT metering.refresh_rollups(); SELECT value FROM metering.query_meter('t')") $(value $old2 '2024-06-01 11:30+00')" \
  "1
5100 4900 5100"
# 0.2.0's setup_roles() granted metering_admin every function: the update
# takes the trigger functions back from every role (97_trigger_functions.sql)
q $roles "CREATE EXTENSION metering VERSION '0.2.0'; SELECT metering.setup_roles()" >/dev/null
q $roles "ALTER EXTENSION metering UPDATE"
check "after the update from 0.2.0 and its setup_roles(), no role but the owner may execute a trigger function (the admin keeps the others)" \
  "$(q $roles "SELECT count(*) || ' ' || has_function_privilege('metering_admin', 'metering.ingest(jsonb)', 'EXECUTE')
                 FROM pg_proc p, pg_roles r
                WHERE p.pronamespace = 'metering'::regnamespace AND p.prorettype = 'trigger'::regtype
                  AND r.oid <> p.proowner AND NOT r.rolsuper AND has_function_privilege(r.oid, p.oid, 'EXECUTE')")" "0 true"
for db in $old $old2 $mid $new $roles; do dropdb $db; done
