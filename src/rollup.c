/*
 * rollup.c: hourly meter rollups, kept behind a watermark: the statement
 * that adds events to them, and the rebuild after DELETE on events.  The
 * refresh that moves the watermark is in refresh.c.
 *
 * For every live meter, metering.meter_rollups holds one row per
 * (meter, subject, UTC hour, group values) with the partial aggregates every
 * aggregation but UNIQUE_COUNT can be finished from: event count, valued
 * count, sum, min, max, first and last instant, and the latest value.
 *
 * Ingestion does no rollup work.  Every event gets a sequence number (seq)
 * when it is stored, and a meter's rollups hold exactly its events with
 * seq <= the meter's watermark (metering.meter_rollup_state).  Readers add
 * the events above the watermark themselves, so an answer is exact whether
 * or not the rollups are current; refresh_rollups() only moves work from
 * query time to a maintenance call.
 *
 * Events are added by one INSERT ... SELECT that aggregates them by
 * subject, hour and group values: on one node the executor does the work
 * (and spills to disk past work_mem), and where the events are distributed
 * Citus runs the same statement on each shard, next to its events, since
 * it groups by the distribution column.  DELETE rebuilds the touched hours
 * below the watermark (a min, max or latest value cannot be subtracted)
 * with the same statement, so the two cannot disagree.
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/jsonpath.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#include "metering.h"
#include "refresh.h"
#include "rollup.h"

static SPIPlanPtr meters_plan = NULL;

/*
 * Loads the live meters (or just one) in slug order with their watermarks,
 * locking the watermark rows FOR UPDATE: refreshes and the rebuilds of
 * DELETE take turns, meter by meter.  Must be called inside an SPI
 * connection.
 */
RollupMeter *
RollupLoadMeters(const char *only_slug, int *n)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1];
	char		argnulls[1];
	SPIPlanPtr	plan = MeteringPrepare(&meters_plan,
								 "SELECT m.slug, m.event_type, m.aggregation::text, m.value_property, m.group_by, s.rolled_up_to "
								 "FROM metering.meters m JOIN metering.meter_rollup_state s ON s.meter = m.slug "
								 "WHERE m.deleted_at IS NULL AND ($1 IS NULL OR m.slug = $1) "
								 "ORDER BY m.slug COLLATE \"C\" FOR UPDATE OF s",
								 1, argtypes);
	RollupMeter *meters;
	MemoryContext caller = CurrentMemoryContext;
	int			ret;

	args[0] = only_slug ? CStringGetTextDatum(only_slug) : (Datum) 0;
	argnulls[0] = only_slug ? ' ' : 'n';
	ret = SPI_execute_plan(plan, args, argnulls, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read metering.meters: %s", SPI_result_code_string(ret));

	*n = (int) SPI_processed;
	meters = MemoryContextAllocZero(caller, sizeof(RollupMeter) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		RollupMeter *m = &meters[i];
		MemoryContext old = MemoryContextSwitchTo(caller);
		bool		isnull;
		Datum		d;

		m->slug = SPI_getvalue(tup, desc, 1);
		m->event_type = SPI_getvalue(tup, desc, 2);
		m->agg = MeterAggregationFromName(SPI_getvalue(tup, desc, 3));
		d = SPI_getbinval(tup, desc, 4, &isnull);
		m->value_property = isnull ? (Datum) 0 : PointerGetDatum(DatumGetJsonPathPCopy(d));
		d = SPI_getbinval(tup, desc, 5, &isnull);
		m->group_by = PointerGetDatum(DatumGetJsonbPCopy(d));
		m->watermark = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
		MemoryContextSwitchTo(old);
	}
	SPI_freetuptable(SPI_tuptable);
	return meters;
}

/*
 * The statement that adds a meter's events to its rollups.  Parameters: $1
 * the meter's slug, $2 its event type, $3 its value_property, $4 its
 * group_by, $5 and $6 the range of seq (the refresh's; the rebuild reads its
 * own).  `with` comes before the INSERT and `where` selects the events
 * (alias e) besides their type.  The partial aggregates follow the
 * aggregation:
 *   events      every event; first and last instant over every event
 *   valued      COUNT: every event; UNIQUE_COUNT: those whose value_property
 *               selects a value; others: those where it is a usage number
 *   sum         SUM, AVG (0 when none)
 *   min         SUM (entitlements read a bucket with a negative value event
 *               by event), MIN
 *   max         MAX
 *   latest      LATEST: the greatest metering._latest_key (the last instant,
 *               a tie to the larger value, then to more decimals): constant
 *               memory, and the plan may hash the groups, which an ordered
 *               aggregate forbids.  (Before the update to 0.3.0 the SQL has
 *               no _latest_key: the old rule, without the decimals.)
 * A merge with a row already there combines them the same way.  The groups
 * are grouped as the text of their jsonb (canonical, so equal values are
 * equal text, and text hashes faster).  No ORDER BY: it would make the
 * planner sort every event to group them, where a hash of the groups is
 * faster.
 */
/*
 * a LATEST row merged with the one there: the later by _latest_key wins; new
 * events without a value (latest_time NULL) leave it as it is
 */
#define LATEST_MERGE(later) \
	", latest_time = CASE WHEN r.latest_time IS NULL OR (excluded.latest_time IS NOT NULL AND " later ") " \
	"  THEN excluded.latest_time ELSE r.latest_time END, " \
	"latest_value = CASE WHEN r.latest_time IS NULL OR (excluded.latest_time IS NOT NULL AND " later ") " \
	"  THEN excluded.latest_value ELSE r.latest_value END"

static char *
RollupSql(MeterAggregation agg, bool keyed, const char *with, const char *where)
{
	bool		numeric = agg != METER_COUNT && agg != METER_UNIQUE_COUNT;
	const char *valued = agg == METER_COUNT ? "count(*)"
		: agg == METER_UNIQUE_COUNT ? "count(metering._meter_text(x.data, $3))"
		: "count(x.v)";

	return psprintf("%s"
					"INSERT INTO metering.meter_rollups AS r "
					"(meter, subject, bucket, groups, events, valued, sum, min, max, "
					" first_time, last_time, latest_time, latest_value%s) "
					"SELECT $1, x.subject, x.bucket, x.groups::jsonb, count(*), %s, %s, %s, %s, "
					" min(x.time), max(x.time), %s, %s%s "
					"FROM (SELECT e.subject, date_trunc('hour', e.time, 'UTC') AS bucket, e.time, e.data, "
					"             metering._meter_groups(e.data, $4)::text AS groups, %s AS v "
					"        FROM metering.events e WHERE e.type = $2 AND %s) x "
					"GROUP BY x.subject, x.bucket, x.groups "
					"ON CONFLICT (meter, subject, bucket, %s) DO UPDATE SET "
					" events = r.events + excluded.events, "
					" valued = r.valued + excluded.valued, "
					" sum = r.sum + excluded.sum, "
					" min = least(r.min, excluded.min), "
					" max = greatest(r.max, excluded.max), "
					" first_time = least(r.first_time, excluded.first_time), "
					" last_time = greatest(r.last_time, excluded.last_time)%s",
					with,
					keyed ? ", groups_key" : "",
					valued,
					agg == METER_SUM || agg == METER_AVG ? "coalesce(sum(x.v), 0)" : "NULL::numeric",
					agg == METER_SUM || agg == METER_MIN ? "min(x.v)" : "NULL::numeric",
					agg == METER_MAX ? "max(x.v)" : "NULL::numeric",
					agg == METER_LATEST ? "max(x.time) FILTER (WHERE x.v IS NOT NULL)" : "NULL::timestamptz",
					agg != METER_LATEST ? "NULL::numeric"
					: keyed ? "(max(metering._latest_key(x.time, x.v)) FILTER (WHERE x.v IS NOT NULL))[2]"
					: "(max(ARRAY[extract(epoch FROM x.time), x.v]) FILTER (WHERE x.v IS NOT NULL))[2]",
					keyed ? ", pg_catalog.sha256(pg_catalog.textsend(x.groups))" : "",
					numeric ? "metering._meter_number(e.data, $3)" : "NULL::numeric",
					where,
					keyed ? "groups_key" : "groups",
					agg != METER_LATEST ? ""
					: keyed ? LATEST_MERGE("metering._latest_key(excluded.latest_time, excluded.latest_value) > "
										   "metering._latest_key(r.latest_time, r.latest_value)")
					: LATEST_MERGE("(excluded.latest_time, excluded.latest_value) > (r.latest_time, r.latest_value)"));
}

static Oid	add_argtypes[6] = {TEXTOID, TEXTOID, JSONPATHOID, JSONBOID, INT8OID, INT8OID};

static void
RollupArgs(RollupMeter *m, int64 from, int64 to, Datum *args, char *nulls)
{
	args[0] = CStringGetTextDatum(m->slug);
	args[1] = CStringGetTextDatum(m->event_type);
	args[2] = m->value_property;
	args[3] = m->group_by;
	args[4] = Int64GetDatum(from);
	args[5] = Int64GetDatum(to);
	memset(nulls, ' ', 6);
	nulls[2] = m->value_property == (Datum) 0 ? 'n' : ' ';
}

/*
 * 0.3.0 keys the rollups by a hash of their groups (a group value may be
 * longer than a btree entry holds); until ALTER EXTENSION ... UPDATE has
 * run, the library writes 0.2.0's table, keyed by the groups themselves.
 */
static bool
RollupKeyed(void)
{
	return MeteringSqlCurrent();
}

/*
 * (planned for each call, to its range of seq: a generic plan cannot tell a
 * tail of a few events, read through the btree on (seq, subject), from a
 * first refresh of the whole table, read sequentially)
 */
int64
RollupAdd(RollupMeter *m, int64 upto)
{
	Datum		args[6];
	char		nulls[6];
	int			ret;

	RollupArgs(m, m->watermark, upto, args, nulls);
	ret = SPI_execute_with_args(RollupSql(m->agg, RollupKeyed(), "", "e.seq > $5 AND e.seq <= $6"),
								6, add_argtypes, args, nulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not write metering.meter_rollups: %s", SPI_result_code_string(ret));
	return (int64) SPI_processed;
}

/*
 * Whether the installed SQL keeps what depends on the events (entitlement
 * snapshots and usage periods, 0.2.0 and later): the library is upgraded
 * before ALTER EXTENSION metering UPDATE runs, and must keep working with
 * the SQL of 0.1.0 until then.
 */
bool
RollupHasDerivedData(void)
{
	return MeteringInstalledVersion() >= 200;
}

/*
 * DELETE: rebuilds, for every meter, the touched hours below its watermark
 * from the events that remain there.  The hours are found in SQL over the
 * transition table, so a large DELETE is deduplicated by the executor (which
 * can spill to disk) rather than held in memory here.
 */
static void
RebuildDeleted(RollupMeter *meters, int nmeters, TriggerData *trig)
{
	Oid			argtypes[3] = {TEXTOID, TEXTOID, INT8OID};
	bool		derived = RollupHasDerivedData();

	if (SPI_register_trigger_data(trig) != SPI_OK_TD_REGISTER)
		elog(ERROR, "could not register the transition table of metering.events");
	/* deleted meters have no rollups, but their entitlements may have snapshots */
	if (derived)
	{
		int			ret = SPI_execute("SELECT metering._events_changed(f.meter_slug, array_agg(o.subject), array_agg(o.time)) "
									  "FROM old_events o JOIN metering.meters m ON m.event_type = o.type AND m.deleted_at IS NOT NULL "
									  "JOIN metering.features f ON f.meter_slug = m.slug GROUP BY f.meter_slug",
									  false, 0);

		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not update the snapshots of deleted meters: %s", SPI_result_code_string(ret));
	}

	for (int i = 0; i < nmeters; i++)
	{
		RollupMeter *m = &meters[i];
		Datum		args[3];
		Datum		rargs[6];
		char		rnulls[6];
		int			ret;

		args[0] = CStringGetTextDatum(m->slug);
		args[1] = CStringGetTextDatum(m->event_type);
		args[2] = Int64GetDatum(m->watermark);
		/* the entitlements' snapshots after the deleted events */
		ret = !derived ? SPI_OK_SELECT : SPI_execute_with_args("SELECT metering._events_changed($1, array_agg(o.subject), array_agg(o.time)) "
									"FROM old_events o WHERE o.type = $2 AND $3 IS NOT NULL",
									3, argtypes, args, NULL, false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not update the snapshots: %s", SPI_result_code_string(ret));
		ret = SPI_execute_with_args("DELETE FROM metering.meter_rollups r "
									"USING (SELECT DISTINCT o.subject, date_trunc('hour', o.time, 'UTC') AS bucket "
									"         FROM old_events o WHERE o.type = $2 AND o.seq <= $3) k "
									"WHERE r.meter = $1 AND r.subject = k.subject AND r.bucket = k.bucket",
									3, argtypes, args, NULL, false, 0);
		if (ret != SPI_OK_DELETE)
			elog(ERROR, "could not clear metering.meter_rollups: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
			continue;
		/*
		 * the events that remain in those hours, below the watermark: the
		 * time span bounds the scan (BRIN); the hours are a hashed semi-join
		 */
		RollupArgs(m, 0, m->watermark, rargs, rnulls);
		ret = SPI_execute_with_args(RollupSql(m->agg, RollupKeyed(),
											  "WITH k AS MATERIALIZED (SELECT DISTINCT o.subject, date_trunc('hour', o.time, 'UTC') AS bucket "
											  "  FROM old_events o WHERE o.type = $2 AND o.seq <= $6) ",
											  "e.seq <= $6 "
											  "AND e.time >= (SELECT min(bucket) FROM k) "
											  "AND e.time < (SELECT max(bucket) FROM k) + interval '1 hour' "
											  "AND (e.subject, date_trunc('hour', e.time, 'UTC')) IN (SELECT subject, bucket FROM k)"),
									6, add_argtypes, rargs, rnulls, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "could not rebuild metering.meter_rollups: %s", SPI_result_code_string(ret));
		/* ... and then the usage periods, from the rebuilt rollups */
		if (derived)
		{
			ret = SPI_execute_with_args("SELECT metering._usage_periods_rebuild($1, array_agg(o.subject), array_agg(o.time)) "
										"FROM old_events o WHERE o.type = $2 AND o.seq <= $3 HAVING count(*) > 0",
										3, argtypes, args, NULL, false, 0);
			if (ret != SPI_OK_SELECT)
				elog(ERROR, "could not rebuild the usage periods of meter \"%s\"", m->slug);
		}
	}
}

/* metering._events_deleted(): statement trigger for DELETE on events. */
PG_FUNCTION_INFO_V1(metering_events_deleted);
Datum
metering_events_deleted(PG_FUNCTION_ARGS)
{
	TriggerData *trig = (TriggerData *) fcinfo->context;
	RollupMeter *meters;
	int			nmeters;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_STATEMENT(trig->tg_event) ||
		!TRIGGER_FIRED_AFTER(trig->tg_event) || !TRIGGER_FIRED_BY_DELETE(trig->tg_event) ||
		trig->tg_oldtable == NULL)
		elog(ERROR, "metering._events_deleted must be an AFTER DELETE ... REFERENCING OLD TABLE AS old_events FOR EACH STATEMENT trigger");

	/*
	 * a shard of the distributed events: its node's meters are not the
	 * coordinator's (and no other table: no role may attach this function,
	 * 97_trigger_functions.sql)
	 */
	if (RelationGetRelid(trig->tg_relation) != MeteringRelid("events") &&
		RelationGetNamespace(trig->tg_relation) != get_namespace_oid("metering", false))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("trigger \"%s\" runs an internal function of metering on a table outside schema metering",
						trig->tg_trigger->tgname)));
	if (RelationGetRelid(trig->tg_relation) != MeteringRelid("events"))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("events cannot be deleted once distributed"),
				 errdetail("The rollups of deleted events are rebuilt on the coordinator only in this release."),
				 errhint("Record correcting events instead.")));
	SPI_connect();
	/* FOR UPDATE: deleters take turns, each rebuilding on the last one's rows */
	meters = RollupLoadMeters(NULL, &nmeters);
	if (nmeters > 0)
		RebuildDeleted(meters, nmeters, trig);
	SPI_finish();
	return PointerGetDatum(NULL);
}
