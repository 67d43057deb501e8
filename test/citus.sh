#!/bin/sh
# Scale-out on Citus: a coordinator and two workers on loopback ports
# (tools/citus-cluster), metering.distribute(), and the same data in the
# cluster and in a database of one node (test/citus/data.sql); then every
# question of test/citus/queries.sql gets the same answers from both, the
# events are spread over both workers, the dedup key is (subject, source,
# id), what would read a worker's own (empty) configuration refuses to,
# a dump of the coordinator restores as a database of one node,
# a batch whose worker is killed half-way is all or nothing, and an
# isolation spec ingests one event from two coordinator sessions at once.
# Emits TAP; skips when Citus is not installed (tools/citus installs it).
# Needs root or the right to start servers as the current user.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-pg_config}
if [ -n "${METERING_CITUS_BUILD_FAILED:-}" ]; then
  echo "1..1"
  echo "not ok 1 - Citus builds from the vendored source (see the output of tools/citus above)"
  exit 1
fi
if [ ! -f "$("$PG_CONFIG" --pkglibdir)/citus.so" ]; then
  echo "1..0 # SKIP Citus is not installed (tools/citus builds it from ../shared/vendor/citus)"
  exit 0
fi
bindir=$("$PG_CONFIG" --bindir)
dir=$(mktemp -d /tmp/metering-citus.XXXXXX)
port=${CITUS_TEST_PORT:-57410}
tmp=$dir/tmp
n=1
failed=0
cleanup() { "$here/tools/citus-cluster" stop "$dir" >/dev/null 2>&1; rm -rf "$dir"; }
trap cleanup EXIT
say() { echo "# $*"; }
ok() {  # description, condition status
  if [ "$2" = 0 ]; then echo "ok $n - $1"; else echo "not ok $n - $1"; failed=$((failed + 1)); fi
  n=$((n + 1))
}
check() {  # description, got, expected
  if [ "$2" = "$3" ]; then echo "ok $n - $1"
  else echo "not ok $n - $1"; echo "#   got: $2"; echo "#   expected: $3"; failed=$((failed + 1)); fi
  n=$((n + 1))
}
# psql as the servers' superuser, on the coordinator
sql() {  # database, query
  "$bindir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d "$1" -c "$2" 2>"$tmp.err"
}
errcode() {  # database, statements: the SQLSTATE they fail with, or "none"
  e=$("$bindir/psql" -X -A -t -q -v VERBOSITY=sqlstate -h "$dir" -p "$port" -U postgres -d "$1" -c "$2" 2>&1 >/dev/null |
      sed -n 's/^ERROR: *//p' | head -1)
  echo "${e:-none}"
}

"$here/tools/citus-cluster" start "$dir" "$port" m || { echo "Bail out! the Citus cluster did not start"; exit 1; }
[ "$(id -u)" = 0 ] && chown postgres "$dir"
w1=$((port + 1))
w2=$((port + 2))
sql postgres "CREATE DATABASE single" && sql single "CREATE EXTENSION metering" ||
  { echo "Bail out! no single-node database"; exit 1; }
sql postgres "CREATE DATABASE lonely" && sql lonely "SET client_min_messages = warning; CREATE EXTENSION citus; CREATE EXTENSION metering" ||
  { echo "Bail out! no database without workers"; exit 1; }

say "distribute(): 55000 without Citus or without workers; idempotent"
check "distribute() where Citus is not installed" "$(errcode single 'SELECT metering.distribute()')" 55000
check "distribute() on a coordinator without workers" "$(errcode lonely 'SELECT metering.distribute()')" 55000
# the library is updated before ALTER EXTENSION UPDATE: with Citus in the database and the SQL of 0.2.0, it is a single node
sql postgres "CREATE DATABASE older" && sql older "SET client_min_messages = warning; CREATE EXTENSION citus; CREATE EXTENSION metering VERSION '0.2.0'" &&
  sql older "INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('calls', 'api.call', 'COUNT');
             SELECT metering.ingest('{\"specversion\": \"1.0\", \"id\": \"o1\", \"source\": \"t\", \"type\": \"api.call\", \"subject\": \"s1\"}');
             SELECT metering.create_feature('api', 'API', 'calls'); SELECT metering.create_entitlement('s1', 'api', usage_period => '1 month')" >/dev/null
check "with Citus in the database and the SQL of 0.2.0, the new library refreshes as a single node, and entitlement_value asks for the update (55000)" \
  "$(sql older "SELECT metering.refresh_rollups()") $(errcode older "SELECT metering.entitlement_value('s1', 'api')")" "1 55000"
sql m "SELECT metering.distribute(8)" >/dev/null && sql m "SELECT metering.distribute(8)" >/dev/null
check "distribute() twice: the events, rollups, usage periods, entitlements and what is theirs, AWS usage records and registrations distributed, co-located by subject; subjects, their access, AWS products and customers and the configuration copies replicated" \
  "$(sql m "SELECT string_agg(logicalrelid::text || ':' || partmethod::text, ' ' ORDER BY logicalrelid::text) || ' ' || count(DISTINCT colocationid)
              FROM pg_dist_partition WHERE logicalrelid::text LIKE 'metering.%'")" \
  "metering.config_copies:n metering.customers:n metering.entitlement_snapshot_queue:h metering.entitlement_snapshots:h metering.entitlement_turns:h metering.entitlements:h metering.events:h metering.grants:h metering.meter_rollups:h metering.notification_events:h metering.product_dimensions:n metering.products:n metering.registrations:h metering.reservations:h metering.resets:h metering.subject_access:n metering.subjects:n metering.usage_periods:h metering.usage_records:h 2"

say "the same data in both"
for db in single m; do
  "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d $db \
    -f "$here/test/citus/data.sql" >"$tmp.load.$db" 2>&1 || { sed 's/^/#   /' "$tmp.load.$db"; echo "Bail out! loading $db failed"; exit 1; }
done
diff "$tmp.load.single" "$tmp.load.m" >"$tmp.diff"
ok "loading the data answers the same (ingest, ingest_batch, meter_usage, reserve, commit, consume)" $?
sed 's/^/#   /' "$tmp.diff"

say "every question, the same answers"
# one file per question
awk -v out="$tmp.q" '/^-- q:/ { k++; sub(/^-- q: */, ""); print > (out "." k ".name"); next }
                     k { print > (out "." k ".sql") }' "$here/test/citus/queries.sql"
k=1
while [ -f "$tmp.q.$k.sql" ]; do
  for db in single m; do
    { echo "SET metering.now = '2026-03-04 12:00:00+00';"; cat "$tmp.q.$k.sql"; } |
      "$bindir/psql" -X -A -t -q -h "$dir" -p "$port" -U postgres -d $db >"$tmp.a.$db" 2>&1
  done
  if cmp -s "$tmp.a.single" "$tmp.a.m" && ! grep -q ERROR "$tmp.a.single"; then
    echo "ok $n - $(cat "$tmp.q.$k.name") ($(wc -l <"$tmp.a.m") rows)"
  else
    echo "not ok $n - $(cat "$tmp.q.$k.name")"; failed=$((failed + 1))
    diff "$tmp.a.single" "$tmp.a.m" | head -20 | sed 's/^/#   /'
  fi
  n=$((n + 1)); k=$((k + 1))
done

say "the refresh rolls up each shard's events on its worker"
# new events in both, then a refresh: the coordinator sends each shard one
# INSERT ... SELECT of its events into its rollups (and usage periods), and
# no event comes back to it
new="SELECT count(*) FROM metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', 'w' || i, 'source', 'gw',
       'type', 'llm.tokens', 'subject', 's' || (1 + i % 40), 'time', '2026-03-04 11:00:00+00'::timestamptz + i * interval '7 seconds',
       'data', jsonb_build_object('tokens', i % 50, 'model', CASE WHEN i % 3 = 0 THEN 'big' ELSE 'small' END))) FROM generate_series(1, 300) i))"
sql single "$new" >/dev/null && sql single "SELECT metering.refresh_rollups()" >"$tmp.refresh.single" && sql m "$new" >/dev/null &&
  "$bindir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d m \
    -c "SET citus.log_remote_commands = on" -c "SELECT metering.refresh_rollups()" >"$tmp.refresh.m" 2>"$tmp.refresh.log"
ok "the same events refreshed on one node and on the cluster" $?
pushed=$(grep -c 'issuing INSERT INTO metering\.meter_rollups_[0-9]* AS r .* FROM metering\.events_[0-9]* e WHERE' "$tmp.refresh.log")
got="$([ "$pushed" -gt 0 ] && echo pushed) $(grep -c 'issuing INSERT INTO metering\.meter_rollups_' "$tmp.refresh.log" | sed "s/^$pushed\$/only/") \
$(grep -c 'issuing \(SELECT\|COPY\)[^(]* \(subject\|data\)\(,\| AS\).* FROM metering\.events_[0-9]' "$tmp.refresh.log")"
check "the refresh sends each shard an INSERT ... SELECT of its own events into its rollups, and no other write of them, nor a read of the events' rows" \
  "$got" "pushed only 0"
[ "$got" = "pushed only 0" ] || grep 'issuing' "$tmp.refresh.log" | grep -v 'BEGIN\|COMMIT\|PREPARE\|SAVEPOINT' | head -5 | cut -c1-200 | sed 's/^/#   /'
check "... and it rolls up the same (meter, event) pairs, into the same rollups and usage periods as one node" \
  "$(cat "$tmp.refresh.m") $(sql m "SELECT md5(string_agg(r::text, '|' ORDER BY r::text)) FROM (SELECT meter, subject, bucket, groups, events, valued, sum, min, max, first_time, last_time, latest_time, latest_value, groups_key FROM metering.meter_rollups) r")
 $(sql m "SELECT md5(string_agg(p::text, '|' ORDER BY p::text)) FROM metering.usage_periods p")" \
  "$(cat "$tmp.refresh.single") $(sql single "SELECT md5(string_agg(r::text, '|' ORDER BY r::text)) FROM (SELECT meter, subject, bucket, groups, events, valued, sum, min, max, first_time, last_time, latest_time, latest_value, groups_key FROM metering.meter_rollups) r")
 $(sql single "SELECT md5(string_agg(p::text, '|' ORDER BY p::text)) FROM metering.usage_periods p")"

# a refresh of more than 100,000 events rebuilds a meter's usage periods
# from its rollups, every subject's at once
periods="SELECT metering._usage_periods_rebuild(slug) FROM metering.meters ORDER BY slug; SELECT md5(string_agg(p::text, '|' ORDER BY p::text)) FROM metering.usage_periods p"
check "the whole rebuild of the usage periods (a refresh of more than 100,000 events) runs on the shards and makes the rows one node makes" \
  "$(sql m "$periods" | tail -1)" "$(sql single "$periods" | tail -1)"

say "pg_dump of the coordinator"
# Citus reads a distributed table's rows from its shards for COPY TO, so the
# dump holds every event; restored elsewhere it is a database of one node.
# Restored in one transaction: the distributed entitlements keep no foreign
# key to the features (nor their notifications to the rules), by which
# pg_dump would order the rows of the extension's tables; those keys are
# checked at commit
"$bindir/pg_dump" -h "$dir" -p "$port" -U postgres -Fc -f "$tmp.dump" m 2>"$tmp.dump.err" &&
  sql postgres "CREATE DATABASE restored" &&
  "$bindir/pg_restore" --single-transaction -h "$dir" -p "$port" -U postgres -d restored "$tmp.dump" 2>"$tmp.restore.err"
ok "pg_dump of the coordinator restores without an error (pg_restore --single-transaction)" $?
sed 's/^/#   /' "$tmp.restore.err"
sql restored "SELECT metering.refresh_rollups()" >/dev/null
answers() {  # database: the events, entitlement values and a meter's answer
  "$bindir/psql" -X -A -t -q -h "$dir" -p "$port" -U postgres -d "$1" <<'SQL' 2>&1
SET metering.now = '2026-03-04 12:00:00+00';
SELECT count(*), sum(length(data::text)), count(DISTINCT (subject, source, id)) FROM metering.events;
WITH e AS MATERIALIZED (SELECT subject, feature_key FROM metering.entitlements)
SELECT e.subject, e.feature_key, v.* FROM e, metering.entitlement_value(e.subject, e.feature_key) v ORDER BY 1, 2;
SELECT * FROM metering.query_meter('tokens', '2026-03-01', '2026-03-05', 'DAY', 'UTC', NULL, '{model}', NULL) ORDER BY 1, 2, 3, 4;
SELECT count(*) FROM metering.reservations;
SELECT count(*) FROM metering.notification_events;
SELECT customer_identifier, dimension, usage_hour, quantity FROM metering.usage_records ORDER BY 1, 2, 3;
SELECT customer_identifier, registration_token_used_at FROM metering.customers ORDER BY 1;
SELECT customer_identifier, nonce, calls FROM metering.registrations ORDER BY 1, 2;
SQL
}
answers m >"$tmp.ans.m"
answers restored >"$tmp.ans.restored"
cmp -s "$tmp.ans.m" "$tmp.ans.restored" && ! grep -q ERROR "$tmp.ans.m"
ok "... and the restored database answers as the cluster ($(wc -l <"$tmp.ans.m") rows: events, entitlement values, query_meter, holds, alerts, AWS records)" $?
diff "$tmp.ans.m" "$tmp.ans.restored" | head -10 | sed 's/^/#   /'
# the same dump into a cluster database that has data when it is distributed
for p in $port $w1 $w2; do
  "$bindir/psql" -X -q -h "$dir" -p "$p" -U postgres -d postgres -c "CREATE DATABASE redist" >/dev/null &&
    "$bindir/psql" -X -q -h "$dir" -p "$p" -U postgres -d redist -c "SET client_min_messages = warning; CREATE EXTENSION citus" >/dev/null
done
sql redist "SELECT citus_set_coordinator_host('127.0.0.1', $port); SELECT citus_add_node('127.0.0.1', $w1); SELECT citus_add_node('127.0.0.1', $w2)" >/dev/null &&
  "$bindir/pg_restore" --single-transaction -h "$dir" -p "$port" -U postgres -d redist "$tmp.dump" 2>"$tmp.restore.err" &&
  sql redist "SELECT metering.distribute(4); SELECT metering.refresh_rollups()" >/dev/null
ok "the dump restored into a cluster and distributed with its rows" $?
sed 's/^/#   /' "$tmp.restore.err" "$tmp.err"
answers redist >"$tmp.ans.redist"
check "... answers as before, and the coordinator keeps no copy of the rows it moved" \
  "$(cmp -s "$tmp.ans.m" "$tmp.ans.redist" && echo same) $(sql redist "SELECT sum(pg_relation_size(('metering.' || t)::regclass)) FROM unnest(ARRAY['events', 'subjects', 'usage_records', 'customers', 'products', 'registrations', 'entitlements', 'grants', 'resets', 'reservations', 'notification_events']) t")" "same 0"
diff "$tmp.ans.m" "$tmp.ans.redist" | head -10 | sed 's/^/#   /'

say "where the events are"
check "the events are on both workers, each shard on a worker" \
  "$(sql m "SELECT string_agg(nodeport || ':' || (r.result::bigint > 0), ' ' ORDER BY nodeport)
              FROM (SELECT p.nodeport, sum(x.result::bigint) AS result
                      FROM run_command_on_shards('metering.events', 'SELECT count(*) FROM %s') x
                      JOIN pg_dist_shard_placement p USING (shardid) GROUP BY p.nodeport) r")" \
  "$w1:true $w2:true"
# each subject's entitlement rows on the worker of its events
spread() {  # table: the rows per worker, and the subjects whose rows are on another worker than their events
  sql m "SELECT string_agg(nodeport || ':' || (r.result::bigint > 0), ' ' ORDER BY nodeport)
           FROM (SELECT p.nodeport, sum(x.result::bigint) AS result
                   FROM run_command_on_shards('metering.$1', 'SELECT count(*) FROM %s') x
                   JOIN pg_dist_shard_placement p USING (shardid) GROUP BY p.nodeport) r"
  sql m "WITH s AS MATERIALIZED (SELECT DISTINCT subject FROM metering.$1)
         SELECT count(*) FROM s
          WHERE (SELECT nodeport FROM pg_dist_shard_placement WHERE shardid = get_shard_id_for_distribution_column('metering.$1', s.subject))
                IS DISTINCT FROM
                (SELECT nodeport FROM pg_dist_shard_placement WHERE shardid = get_shard_id_for_distribution_column('metering.events', s.subject))"
}
check "the entitlements, grants, snapshots and notifications are on both workers; every subject's rows of these, its holds and resets are on the worker of its events" \
  "$(for t in entitlements grants entitlement_snapshots notification_events; do spread $t; done | tr '\n' ' ')$(spread reservations | tail -1) $(spread resets | tail -1)" \
  "$w1:true $w2:true 0 $w1:true $w2:true 0 $w1:true $w2:true 0 $w1:true $w2:true 0 0 0"
sql m "SELECT metering.ingest('{\"specversion\": \"1.0\", \"id\": \"same\", \"source\": \"dup\", \"type\": \"api.call\", \"subject\": \"s1\"}'),
              metering.ingest('{\"specversion\": \"1.0\", \"id\": \"same\", \"source\": \"dup\", \"type\": \"api.call\", \"subject\": \"s2\"}'),
              metering.ingest('{\"specversion\": \"1.0\", \"id\": \"same\", \"source\": \"dup\", \"type\": \"api.call\", \"subject\": \"s2\"}')" >"$tmp.dup"
check "distributed, the dedup key is (subject, source, id): a repeat is stored once, another subject's is another event" \
  "$(tr '\n' ' ' <"$tmp.dup")$(sql m "SELECT count(*) FROM metering.events WHERE source = 'dup'")" "t|t|f 2"

say "what reads a node's own configuration runs on the coordinator only"
check "DELETE of distributed events is refused (their rollups would be rebuilt on the workers)" \
  "$(errcode m "DELETE FROM metering.events WHERE subject = 's1'")" 0A000
say "the rating rules on every node"
digest="SELECT string_agg(t || ':' || (SELECT count(*) FROM metering.config_copies c WHERE c.tab = t), ' ' ORDER BY t) FROM unnest(metering._config_tables()) t"
rules="SELECT md5(string_agg(x, '|' ORDER BY x)) FROM (
         SELECT 's' || to_jsonb(r)::text AS x FROM metering.hashmap_services r UNION ALL SELECT 'f' || to_jsonb(r)::text FROM metering.hashmap_fields r
         UNION ALL SELECT 'g' || to_jsonb(r)::text FROM metering.hashmap_groups r UNION ALL SELECT 'm' || to_jsonb(r)::text FROM metering.hashmap_mappings r
         UNION ALL SELECT 't' || to_jsonb(r)::text FROM metering.hashmap_thresholds r
         UNION ALL SELECT 'M' || to_jsonb(r)::text FROM metering.meters r UNION ALL SELECT 'F' || to_jsonb(r)::text FROM metering.features r
         UNION ALL SELECT 'P' || to_jsonb(r)::text FROM metering.prices r UNION ALL SELECT 'N' || to_jsonb(r)::text FROM metering.notification_rules r) q"
same_rules() {  # the coordinator's rules, and whether each worker's own tables hold the same rows
  c=$(sql m "$rules")
  echo "$(sql m "SELECT string_agg(DISTINCT (result = '$c')::text, ',') FROM run_command_on_workers(\$\$$rules\$\$)")"
}
check "the rating rules, meters, features, prices and alert rules are in config_copies, and each worker's own tables hold the coordinator's rows, value for value" \
  "$(sql m "$digest") $(same_rules)" \
  "features:3 hashmap_fields:0 hashmap_groups:1 hashmap_mappings:1 hashmap_services:1 hashmap_thresholds:1 meters:7 notification_rules:1 prices:1 true"
check "rated_total is pushed down to the shards, whose workers rate with their copy" \
  "$(sql m "EXPLAIN (VERBOSE, COSTS OFF) SELECT subject, metering.rated_total(type, (data->>'tokens')::numeric, data, subject, time) FROM metering.events GROUP BY subject" | grep -c 'Query: SELECT .*rated_total')" 1
# the same changes in both databases: a service with a field and rules, a group deleted (its running rules go on
# as new rows with new ids), a rule ended; then the same answers
change="SET metering.now = '2026-03-04 12:00:00+00';
  INSERT INTO metering.hashmap_services (name) VALUES ('api.call');
  INSERT INTO metering.hashmap_fields (service_id, name) SELECT id, 'route' FROM metering.hashmap_services WHERE name = 'api.call';
  INSERT INTO metering.hashmap_mappings (field_id, value, cost, map_type, start)
  SELECT f.id, '/r1', 0.5, 'flat', '2026-03-01' FROM metering.hashmap_fields f;
  INSERT INTO metering.hashmap_mappings (service_id, cost, map_type, start)
  SELECT id, 0.25, 'flat', '2026-03-01' FROM metering.hashmap_services WHERE name = 'api.call'"
for db in m single; do
  sql $db "SET metering.allow_backdated_rules = on; $change" >/dev/null && sql $db "SET metering.now = '2026-03-04 12:00:00+00'; DELETE FROM metering.hashmap_groups" >/dev/null ||
    echo "# the rule changes failed in $db: $(cat "$tmp.err")"
done
# (the events of the dedup check above are the cluster's only)
rated="SELECT subject, metering.rated_total(type, coalesce((data->>'tokens')::numeric, 1), data, subject, time) FROM metering.events WHERE source <> 'dup' GROUP BY subject ORDER BY 1"
check "rule changes reach every worker's copy in their transaction (new rows, deleted ones, a group's rules moved with new ids)" \
  "$(sql m "$digest" | tr ' ' '\n' | grep -c ':0') $(same_rules)" "0 true"
check "... and the workers' caches see them: rated_total over the distributed events answers as one node" \
  "$(sql m "$rated" | md5sum) $(sql m "$rated" | grep -c '|')" "$(sql single "$rated" | md5sum) 40"
sql m "INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('copied', 'copied.call', 'COUNT');
        SELECT metering.create_feature('copied-f', 'Copied', 'copied');
        INSERT INTO metering.notification_rules (name, feature_key, thresholds) VALUES ('copied', 'copied-f', '[{\"type\": \"USAGE_VALUE\", \"value\": 5}]');
        DELETE FROM metering.notification_rules WHERE name = 'copied';
        DELETE FROM metering.features WHERE key = 'copied-f'; DELETE FROM metering.meters WHERE slug = 'copied'" >/dev/null
check "a new meter, feature and alert rule, each deleted again, reach every worker's copy as the coordinator stored them" \
  "$(same_rules) $("$bindir/psql" -X -A -t -q -h "$dir" -p "$w1" -U postgres -d m -c "SELECT count(*) FILTER (WHERE deleted_at IS NOT NULL) FROM metering.meters WHERE slug = 'copied'")" "true 1"
rollups="SELECT count(*) || ' ' || sum(sum) || ' ' || sum(valued) FROM metering.meter_rollups"
before=$(sql m "$rollups")
check "a worker, which holds the meters now, refreshes nothing: the coordinator rolls up every shard (its watermarks follow its sequence)" \
  "$("$bindir/psql" -X -A -t -q -h "$dir" -p "$w1" -U postgres -d m -c "SELECT metering.refresh_rollups()") $(sql m "$rollups")" "0 $before"
check "a change rolled back reaches no node" \
  "$(sql m "BEGIN; INSERT INTO metering.hashmap_services (name) VALUES ('rolled.back'); ROLLBACK; SELECT count(*) FROM metering.config_copies WHERE \"row\"->>'name' = 'rolled.back'") $(same_rules)" "0 true"
# a writable CTE whose first part's row triggers change the rows its second part changed (the group's running rules
# end and go on as copies): the copies are the rows as the query left them
for db in m single; do
  sql $db "INSERT INTO metering.hashmap_services (name) VALUES ('cte.call');
           WITH g AS (INSERT INTO metering.hashmap_groups (name) VALUES ('g2') RETURNING id)
           INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type) SELECT s.id, g.id, 3, 'flat'
             FROM metering.hashmap_services s, g WHERE s.name = 'cte.call'" >/dev/null
done
for db in m single; do
  sql $db "WITH g AS (UPDATE metering.hashmap_groups SET deleted_at = now() WHERE name = 'g2' RETURNING id)
           UPDATE metering.hashmap_mappings m SET \"end\" = '2099-01-01' FROM g WHERE m.group_id = g.id" >/dev/null
done
check "... also where a later part of the same query changed them again (a writable CTE: the group's rule ended, its copy runs on)" \
  "$(same_rules) $(sql m "SELECT count(*) FILTER (WHERE group_id IS NOT NULL AND \"end\" IS NOT NULL) || '/' || count(*) FILTER (WHERE group_id IS NULL)
                           FROM metering.hashmap_mappings WHERE cost = 3")" "true 1/1"
check "... and what a session in replica mode writes" \
  "$(sql m "SET session_replication_role = replica; UPDATE metering.hashmap_mappings SET name = 'replica write' WHERE name IS NULL" | tail -1; same_rules)" "true"
check "... (it wrote)" "$(sql m "SELECT count(*) > 0 FROM metering.hashmap_mappings WHERE name = 'replica write'")" t
check "distribute() refuses an older snapshot than the rows' (REPEATABLE READ)" \
  "$(errcode m "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT metering.distribute()")" 55000
"$bindir/psql" -X -q -h "$dir" -p "$w1" -U postgres -d m -c "SET session_replication_role = replica; DELETE FROM metering.hashmap_thresholds" >/dev/null
check "a worker whose copy of the rules is not whole refuses to rate (55000), and distribute() copies it again" \
  "$(errcode m "$rated") $(sql m "SELECT metering.distribute()" >/dev/null; same_rules) $(sql m "$rated" | md5sum | cut -c1-8)" \
  "55000 true $(sql single "$rated" | md5sum | cut -c1-8)"
sql m "TRUNCATE metering.hashmap_thresholds" >/dev/null
check "TRUNCATE of a rule table on the coordinator empties its copies" \
  "$(sql m "SELECT count(*) FROM metering.config_copies WHERE tab = 'hashmap_thresholds'") $(same_rules)" "0 true"
check "entitlement_value, grant_balances and price_usage pushed down to the workers refuse instead of answering from their empty configuration" \
  "$(errcode m "SELECT subject, (metering.entitlement_value(subject, 'gpt')).has_access FROM metering.events WHERE subject = 's3' GROUP BY subject") $(errcode m "SELECT subject, (SELECT count(*) FROM metering.grant_balances(metering.uuid_v7())) FROM metering.events WHERE subject = 's3' GROUP BY subject") $(errcode m "SELECT subject, (SELECT count(*) FROM metering.price_usage(subject, '2024-01-01', '2024-02-01')) FROM metering.events WHERE subject = 's3' GROUP BY subject")" \
  "0A000 0A000 0A000"
sql m "CREATE ROLE citus_reader LOGIN" >/dev/null 2>&1
# (in the cluster first: roles made there are made on every node)
for db in m single; do
  sql $db "SELECT metering.setup_roles(); GRANT metering_reader TO citus_reader;
           INSERT INTO metering.subject_access (role_name, subject) VALUES ('citus_reader', 's3')" >/dev/null ||
    { sed 's/^/#   /' "$tmp.err"; echo "Bail out! setup_roles() failed in $db"; exit 1; }
  [ $db = m ] && cp "$tmp.err" "$tmp.warn"
done
readers_rows="SET ROLE citus_reader; SELECT count(DISTINCT subject) || ' ' || min(subject) || ' ' || count(*) FROM metering.events;
              SELECT string_agg(customer_identifier || ':' || quantity, ' ') FROM metering.usage_records;
              SELECT string_agg(customer_identifier, ' ') FROM metering.customers;
              SELECT string_agg(customer_identifier || ':' || calls, ' ') FROM metering.registrations"
for t in entitlements grants resets entitlement_snapshots entitlement_snapshot_queue reservations entitlement_turns notification_events; do
  readers_rows="$readers_rows; SELECT '$t ' || count(*) || ' ' || coalesce(min(subject) || '-' || max(subject), '') FROM metering.$t"
done
check "row security on the workers: a role that sees one subject reads its events, usage records, customer, registrations, entitlements and all that is theirs only, as on one node" \
  "$(sql m "$readers_rows" | tr '\n' ' ')" "$(sql single "$readers_rows" | tr '\n' ' ')"
check "... and the functions answer it as on one node" \
  "$(sql m "SET ROLE citus_reader; SELECT balance || ' ' || (SELECT count(*) FROM metering.entitlement_value('s4', 'gpt')) FROM metering.entitlement_value('s3', 'gpt')")" \
  "$(sql single "SET ROLE citus_reader; SELECT balance || ' ' || (SELECT count(*) FROM metering.entitlement_value('s4', 'gpt')) FROM metering.entitlement_value('s3', 'gpt')")"
# (the same rates computed on the coordinator: the rows read in a materialized CTE)
readers_rate="SET ROLE citus_reader; SELECT subject, metering.rated_total(type, coalesce((data->>'tokens')::numeric, 1), data, subject, time)
                FROM metering.events GROUP BY subject ORDER BY 1"
readers_rate_here="SET ROLE citus_reader; WITH e AS MATERIALIZED (SELECT * FROM metering.events)
                     SELECT subject, metering.rated_total(type, coalesce((data->>'tokens')::numeric, 1), data, subject, time) FROM e GROUP BY subject ORDER BY 1"
check "a reader rates on the workers, its own subjects only, as the coordinator does (the workers' copies take the coordinator's readers, from the setup_roles() that made the roles, without a warning)" \
  "$(sql m "$readers_rate" | tr '\n' ' ')$(grep -c WARNING "$tmp.warn")" "$(sql m "$readers_rate_here" | grep '^s3|' | tr '\n' ' ')0"
# a reader made on the coordinator alone (Citus's propagation of roles off): the workers cannot grant it, and say so
sql m "SET citus.enable_create_role_propagation = off; CREATE ROLE coordinator_only_reader; GRANT SELECT ON metering.hashmap_groups TO coordinator_only_reader" >/dev/null 2>&1
sql m "SELECT metering.setup_roles()" >/dev/null; cp "$tmp.err" "$tmp.warn"
check "a reader the workers do not know is named in a warning from each worker, and the others are granted there all the same" \
  "$(grep -c 'is not on this worker' "$tmp.warn") $(sql m "SET ROLE citus_reader; SELECT count(*) > 0 FROM (SELECT subject, metering.rated_total(type, 1, data, subject, time) FROM metering.events GROUP BY subject) r")" "2 t"
sql m "DROP ROLE coordinator_only_reader" >/dev/null 2>&1 || sql m "REVOKE SELECT ON metering.hashmap_groups FROM coordinator_only_reader; DROP ROLE coordinator_only_reader" >/dev/null 2>&1
forged() {  # role, statement after a hand-set identifier: whether the identifier was set, and the refusal
  out=$(sql m "SET ROLE $1; BEGIN; SELECT count(*) FROM (SELECT assign_distributed_transaction_id(0, 12345, '2020-01-01+00')) x; $2")
  echo "$out $(grep -c 'identifier was not assigned on this node' "$tmp.err")"
}
check "on the coordinator, a distributed transaction identifier set by hand is not a clock: read directly, or inside an owner-run function, by a reader or a superuser" \
  "$(forged citus_reader "SELECT metering.now()"), $(forged citus_reader "SELECT balance FROM metering.entitlement_value('s3', 'gpt')"), $(forged postgres "SELECT metering.now()")" \
  "1 1, 1 1, 1 1"
sql m "CREATE ROLE citus_other; GRANT metering_reader TO citus_other;
       INSERT INTO metering.subject_access (role_name, subject) VALUES ('citus_other', 's5')" >/dev/null
check "the policies' function answers a role about itself, and not about another role" \
  "$(sql m "SET ROLE citus_reader; SELECT metering._visible_subjects_once('citus_reader')") $(errcode m "SET ROLE citus_reader; SELECT metering._visible_subjects_once('citus_other')")" \
  "{s3} 42501"
# (the policies' answer is kept for one query: the next query of the same
# statement asks again, after a change by its own transaction or one that
# another transaction committed meanwhile; subjects is a reference table,
# read on the coordinator itself)
check "a revocation by the same transaction is seen by the next query of the same function" \
  "$(sql m "BEGIN;
    CREATE FUNCTION pg_temp.seen() RETURNS text LANGUAGE plpgsql AS \$\$
    DECLARE a bigint; b bigint;
    BEGIN
      EXECUTE 'SET ROLE citus_reader';
      SELECT count(*) INTO a FROM metering.subjects;
      EXECUTE 'RESET ROLE';
      DELETE FROM metering.subject_access WHERE role_name = 'citus_reader';
      EXECUTE 'SET ROLE citus_reader';
      SELECT count(*) INTO b FROM metering.subjects;
      EXECUTE 'RESET ROLE';
      RETURN a || ' ' || b;
    END \$\$;
    SELECT pg_temp.seen(); ROLLBACK")" "1 0"
( sql m "CREATE FUNCTION pg_temp.watch() RETURNS text LANGUAGE plpgsql AS \$\$
    DECLARE r text := '';
    BEGIN
      FOR i IN 1..3 LOOP
        r := r || (SELECT count(*) FROM metering.subjects) || ' ';
        PERFORM pg_sleep(1);
      END LOOP;
      RETURN r;
    END \$\$;
    SET ROLE citus_reader; SELECT pg_temp.watch()" 2>"$tmp.watch.err" >"$tmp.watch" ) &
i=0  # (revoked once the watcher's first query is done: it sleeps)
while [ $i -lt 200 ] && ! sql m "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%pg_temp.watch()%' AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()" | grep -q 1; do
  sleep 0.05; i=$((i + 1))
done
sql m "DELETE FROM metering.subject_access WHERE role_name = 'citus_reader'" >/dev/null
wait
sql m "INSERT INTO metering.subject_access (role_name, subject) VALUES ('citus_reader', 's3')" >/dev/null
check "a revocation committed by another session is seen by the next query of a running function" \
  "$(sed 's/ *$//' "$tmp.watch" "$tmp.watch.err")" "1 0 0"
check "... and within one query the policies ask for the visible subjects once, not for each row" \
  "$(sql m "BEGIN; SET LOCAL track_functions = 'pl'; SET ROLE citus_reader;
              SELECT count(*) FROM metering.subjects WHERE key LIKE 's%'; RESET ROLE;
              SELECT calls <= 2 FROM pg_stat_xact_user_functions WHERE funcname = '_visible_subjects'; COMMIT")" "1
t"
sql m "CREATE ROLE citus_admin; GRANT metering_admin TO citus_admin" >/dev/null
check "only the extension's own writers hand stored events to the alerts (not a reader, not an admin)" \
  "$(errcode m "SET ROLE citus_reader; SELECT metering._alerts_for_events(ARRAY['s3'], ARRAY['llm.tokens'], ARRAY[now()], ARRAY['{}'::jsonb])") $(errcode m "SET ROLE citus_admin; SELECT metering._alerts_for_events(ARRAY['s3'], ARRAY['llm.tokens'], ARRAY[now()], ARRAY['{}'::jsonb])")" \
  "42501 42501"
sql m "DELETE FROM metering.subjects WHERE key = 's40'" >/dev/null
check "a subject deleted on the coordinator is deleted on every node" \
  "$(sql m "SELECT string_agg(DISTINCT x.result, ',') FROM run_command_on_placements('metering.subjects',
              'SELECT count(*) FILTER (WHERE deleted_at IS NOT NULL) || ''/'' || count(*) FROM %s') x")" "1/42"
check "... at one instant on every node: a transaction's metering.now() is its distributed transaction's, the same on each node" \
  "$(sql m "SELECT count(DISTINCT x.result) || ' ' || count(*) FROM run_command_on_placements('metering.subjects',
              'SELECT deleted_at FROM %s WHERE key = ''s40''') x")" "1 3"
check "metering.now() is read once per transaction, before and after its first distributed statement, and every shard's part reads it too" \
  "$(sql m "BEGIN; CREATE TEMP TABLE clock AS SELECT metering.now() AS t, pg_sleep(0.01)::text AS slept;
              WITH e AS MATERIALIZED (SELECT metering.now() AS n FROM metering.events)
              SELECT count(DISTINCT e.n) || ' ' || bool_and(e.n = c.t) || ' ' || bool_and(metering.now() = c.t) FROM e, clock c; COMMIT")" "1 true true"
clock_id="SELECT (metering.now() = transaction_timestamp()) || ' ' || ((get_current_transaction_id()).transaction_number = 0)"
check "a read-only statement outside a transaction block starts no distributed transaction for the clock (it reads its start); a read-only block does" \
  "$(PGOPTIONS='-c default_transaction_read_only=on' sql m "$clock_id") / $(sql m "BEGIN READ ONLY; $clock_id; COMMIT")" "true true / false false"
check "TRUNCATE empties the events and what is derived from them" \
  "$(sql m "BEGIN; TRUNCATE metering.events;
              SELECT (SELECT count(*) FROM metering.events) + (SELECT count(*) FROM metering.meter_rollups)
                     + (SELECT count(*) FROM metering.usage_periods); ROLLBACK")" 0

say "a worker killed in the middle of a batch: all or nothing"
before=$(sql m "SELECT count(*) FROM metering.events")
( sql m "SELECT metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', 'k' || i, 'source', 'kill',
          'type', 'llm.tokens', 'subject', 's' || (1 + i % 40), 'data', jsonb_build_object('tokens', 1)))
          FROM generate_series(1, 300000) i))" >"$tmp.kill" 2>&1; echo $? >"$tmp.kill.rc" ) &
# the batch is running once it has written to the workers
i=0
while [ $i -lt 100 ]; do
  sql m "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE '%ingest_batch%' AND state = 'active' AND pid <> pg_backend_pid()" | grep -q t && break
  sleep 0.1; i=$((i + 1))
done
sleep 2
if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$bindir/pg_ctl" -D "$dir/n$w2" -m immediate stop >/dev/null 2>&1
else "$bindir/pg_ctl" -D "$dir/n$w2" -m immediate stop >/dev/null 2>&1; fi
wait
check "the batch failed when its worker went away" "$(cat "$tmp.kill.rc")" 1
if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$bindir/pg_ctl" -D "$dir/n$w2" -l "$dir/n$w2.log" -w start >/dev/null
else "$bindir/pg_ctl" -D "$dir/n$w2" -l "$dir/n$w2.log" -w start >/dev/null; fi
sql m "SELECT recover_prepared_transactions()" >/dev/null
check "after the worker's recovery, none of the batch is stored, and nothing else is lost" \
  "$(sql m "SELECT count(*) FILTER (WHERE source = 'kill') || ' ' || (count(*) = $before) FROM metering.events")" "0 true"
check "ingest works again" \
  "$(sql m "SELECT accepted FROM metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', 'r' || i,
              'source', 'again', 'type', 'api.call', 'subject', 's' || i)) FROM generate_series(1, 40) i))")" 40

say "isolation: one event, and one AWS usage record, from two coordinator sessions at once"
mkdir -p "$dir/iso"
[ "$(id -u)" = 0 ] && chown postgres "$dir/iso"
isolation=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/isolation/pg_isolation_regress
if [ "$(id -u)" = 0 ]; then run="runuser -u postgres --"; else run=""; fi
sql m "SELECT citus_internal.replace_isolation_tester_func()" >/dev/null
$run "$isolation" --use-existing --host="$dir" --port="$port" --user=postgres --dbname=m \
  --inputdir="$here/test/citus" --outputdir="$dir/iso" citus_ingest_race citus_aws_race >"$tmp.iso" 2>&1
ok "isolation specs citus_ingest_race (one event from two sessions) and citus_aws_race (one AWS usage record from two sessions)" $?
sql m "SELECT citus_internal.restore_isolation_tester_func()" >/dev/null
grep -E "ok|FAILED|failed" "$tmp.iso" | sed 's/^/#   /'
[ -f "$dir/iso/regression.diffs" ] && sed 's/^/#   /' "$dir/iso/regression.diffs"
[ -n "${CITUS_TEST_KEEP:-}" ] && cp "$dir/iso/results/citus_ingest_race.out" "$CITUS_TEST_KEEP"

say "the background refresh, turned on in the database on every node"
# (the workers' logs from here on)
wlog1=$(wc -c <"$dir/n$w1.log")
wlog2=$(wc -c <"$dir/n$w2.log")
for p in $port $w1 $w2; do
  "$bindir/psql" -X -q -h "$dir" -p "$p" -U postgres -d postgres -c "ALTER DATABASE m SET metering.refresh_interval = '1s'" >/dev/null
done
sql m "SELECT metering.ingest_batch((SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', 'bg' || i, 'source', 'bg',
         'type', 'llm.tokens', 'subject', 's' || (1 + i % 40), 'time', '2026-03-04T11:00:00Z', 'data', jsonb_build_object('tokens', i, 'model', 'big')))
         FROM generate_series(1, 400) i))" >/dev/null
current="SELECT bool_and(s.rolled_up_to >= (SELECT max(e.seq) FROM metering.events e)) FROM metering.meter_rollup_state s
           JOIN metering.meters m ON m.slug = s.meter WHERE m.deleted_at IS NULL"
i=0
while [ $i -lt 90 ] && [ "$(sql m "$current")" != t ]; do sleep 1; i=$((i + 1)); done
check "the coordinator's refresh rolls up the distributed events without a call" "$(sql m "$current")" t
check "... and query_meter then answers from the rollups as the events say" \
  "$(sql m "SELECT sum(value) FROM metering.query_meter('tokens', '2026-03-04 11:00', '2026-03-04 12:00')")" \
  "$(sql m "SELECT sum((data->>'tokens')::numeric) FROM metering.events WHERE type = 'llm.tokens' AND time >= '2026-03-04 11:00' AND time < '2026-03-04 12:00'")"
# (a node's refresh starts within a minute of the setting: its launcher
# tries a database whose worker found the interval 0 again after 60 s)
rounds() { "$bindir/psql" -X -A -t -q -h "$dir" -p "$1" -U postgres -d m -c "SELECT count(*) FROM metering.refresh_rounds"; }
i=0
while [ $i -lt 90 ] && { [ "$(rounds $w1)" = 0 ] || [ "$(rounds $w2)" = 0 ]; }; do sleep 1; i=$((i + 1)); done
sleep 2
check "the workers' refresh rounds run without an error" \
  "$({ tail -c +$((wlog1 + 1)) "$dir/n$w1.log"; tail -c +$((wlog2 + 1)) "$dir/n$w2.log"; } | grep -c 'ERROR') $("$bindir/psql" -X -A -t -q -h "$dir" -p "$w1" -U postgres -d m \
      -c "SELECT count(*) > 0 AND bool_and(failed = 0) FROM metering.refresh_rounds")" "0 t"
echo "1..$((n - 1))"
exit $((failed > 0))
