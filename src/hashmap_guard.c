/*
 * hashmap_guard.c: metering._hashmap_unchanged_since_snapshot(parent), the
 * REPEATABLE READ half of "one rule per key at any instant" and "no live
 * rule under a deleted service, field or group".
 *
 * Rule writers lock the rule's service or field (and group); deleters of a
 * service, field or group update its row.  At REPEATABLE READ the one who
 * comes second may not see what the first committed, so it compares the
 * parent's rules (and a service's fields) under both snapshots.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"

#include "metering.h"

PG_FUNCTION_INFO_V1(metering_hashmap_unchanged_since_snapshot);
Datum
metering_hashmap_unchanged_since_snapshot(PG_FUNCTION_ARGS)
{
	static const char *sql =
	"WITH r AS ("
	"  SELECT id, start, \"end\", group_id, deleted_at FROM metering.hashmap_mappings"
	"   WHERE service_id = $1 OR field_id = $1 OR group_id = $1"
	"      OR field_id IN (SELECT id FROM metering.hashmap_fields WHERE service_id = $1)"
	"  UNION ALL"
	"  SELECT id, start, \"end\", group_id, deleted_at FROM metering.hashmap_thresholds"
	"   WHERE service_id = $1 OR field_id = $1 OR group_id = $1"
	"      OR field_id IN (SELECT id FROM metering.hashmap_fields WHERE service_id = $1)) "
	"SELECT coalesce((SELECT string_agg(concat_ws('/', id, start, coalesce(\"end\"::text, '-'), coalesce(group_id::text, '-'), coalesce(deleted_at::text, '-')), ',' ORDER BY id)"
	"                   FROM r), '') || '|' ||"
	"       coalesce((SELECT string_agg(concat_ws('/', id, coalesce(deleted_at::text, '-')), ',' ORDER BY id)"
	"                   FROM metering.hashmap_fields WHERE service_id = $1), '')";
	Oid			types[1] = {UUIDOID};
	Datum		args[1] = {PG_GETARG_DATUM(0)};

	MeteringErrorIfChangedSinceSnapshot(sql, 1, types, args, "the hashmap rules");
	PG_RETURN_BOOL(true);
}
