/*
 * refresh.c: the refresh of the rollups, in steps (refresh.h), and
 * refresh_rollups(), which runs them all.
 *
 * refresh_rollups() reads the sequence, then waits for every transaction
 * that holds a write lock on metering.events (those are the only ones that
 * can own a number at or below the one read) without blocking new writers,
 * as CREATE INDEX CONCURRENTLY does; after that, every event with a number at
 * or below it is committed or gone, and a new snapshot sees all of them.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_class.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

#include "metering.h"
#include "refresh.h"
#include "rollup.h"

bool		MeteringRefreshQueuesSnapshots = false;

/*
 * The last event number handed out.  A number at or below it can only be
 * held by a writer that still runs if every backend draws numbers one at a
 * time: a cached range would let a backend use numbers below it later.
 */
static int64
LastEventNumber(void)
{
	bool		isnull;
	int			ret = SPI_execute("SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END, q.seqcache "
								  "FROM metering.events_seq s, pg_catalog.pg_sequence q "
								  "WHERE q.seqrelid = 'metering.events_seq'::regclass",
								  true, 1);

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read metering.events_seq");
	if (DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull)) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("metering.events_seq must not cache numbers"),
				 errhint("ALTER SEQUENCE metering.events_seq CACHE 1;")));
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * The refresh's statements group a meter's new events by subject, hour and
 * group values (rollups) or period (usage periods): planned with the default
 * work_mem (4MB) they sort every event on disk, where a hash table of the
 * groups fits in memory.  A refresh is maintenance, so they get
 * maintenance_work_mem, until AtEOXact_GUC(true, the level returned).
 */
static int
MaintenanceWorkMem(void)
{
	int			level = NewGUCNestLevel();
	char		kb[32];

	snprintf(kb, sizeof(kb), "%d", Max(work_mem, maintenance_work_mem));
	(void) set_config_option("work_mem", kb, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	return level;
}

/*
 * A refresh, in steps (see refresh.h): the SQL function runs them all in
 * one transaction; the background worker commits after each, so that one
 * meter's failure or lock does not hold up the others.
 */
int64
MeteringRefreshBegin(void)
{
	Oid			events_oid;
	LOCKTAG		tag;
	int64		upto;
	int			ret;

	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("metering.refresh_rollups must run at READ COMMITTED"),
				 errdetail("It waits for concurrent writers and then needs a snapshot that sees their events."),
				 errhint("Call it in its own READ COMMITTED transaction.")));

	/* 1. the last number handed out */
	upto = LastEventNumber();

	/*
	 * 2. wait for every transaction that holds a write lock on the events: a
	 * number at or below `upto` can only belong to one of them (a writer
	 * takes its lock before it draws numbers), and new writers draw larger
	 * ones.  Our own transaction's locks do not count.
	 */
	events_oid = MeteringRelid("events");
	SET_LOCKTAG_RELATION(tag, MyDatabaseId, events_oid);
	WaitForLockers(tag, ShareLock, false);

	/* 3. a meter restored without its triggers has no watermark row yet: it gets one at 0 */
	ret = SPI_execute("INSERT INTO metering.meter_rollup_state (meter) "
					  "SELECT slug FROM metering.meters WHERE deleted_at IS NULL "
					  "ON CONFLICT (meter) DO NOTHING", false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not add missing watermarks: %s", SPI_result_code_string(ret));
	return upto;
}

List *
MeteringRefreshMeters(const char *only_slug)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {only_slug ? CStringGetTextDatum(only_slug) : (Datum) 0};
	char		nulls[1] = {only_slug ? ' ' : 'n'};
	List	   *slugs = NIL;
	int			ret;

	/*
	 * A Citus worker holds a copy of the meters, but the coordinator rolls up
	 * every shard's events (its watermarks follow its sequence): a worker's
	 * refresh, by call or in the background, has nothing to do.
	 */
	if (MeteringOnWorker())
		return NIL;
	ret = SPI_execute_with_args("SELECT slug FROM metering.meters WHERE deleted_at IS NULL "
								"AND ($1 IS NULL OR slug = $1) ORDER BY slug COLLATE \"C\"",
								1, argtypes, args, nulls, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read metering.meters: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);

		slugs = lappend(slugs, SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
		MemoryContextSwitchTo(old);
	}
	SPI_freetuptable(SPI_tuptable);
	return slugs;
}

int64
MeteringRefreshMeter(const char *slug, int64 upto, MeteringRefreshCounts *counts)
{
	RollupMeter *m;
	Oid			argtypes[3] = {TEXTOID, INT8OID, INT8OID};
	Datum		args[3];
	bool		isnull;
	int64		added;
	int			nmeters;
	int			level;
	int			ret;

	/* its watermark, locked: refreshes and the rebuilds of DELETE take turns */
	m = RollupLoadMeters(slug, &nmeters);
	if (nmeters == 0)
		return 0;				/* deleted meanwhile */
	/* a TRUNCATE ... RESTART IDENTITY (or a setval) since the refresh began */
	if (LastEventNumber() < upto)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("metering.events_seq went backwards during the refresh"),
				 errhint("Run metering.refresh_rollups() again.")));
	if (m->watermark >= upto)
		return 0;
	/* how many events it adds (the rollups' statement returns the rows it wrote) */
	args[0] = CStringGetTextDatum(m->event_type);
	args[1] = Int64GetDatum(m->watermark);
	args[2] = Int64GetDatum(upto);
	ret = SPI_execute_with_args("SELECT count(*) FROM metering.events WHERE type = $1 AND seq > $2 AND seq <= $3",
								3, argtypes, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count the events of meter \"%s\"", m->slug);
	added = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	level = MaintenanceWorkMem();
	counts->rows += added > 0 ? RollupAdd(m, upto) : 0;
	args[0] = CStringGetTextDatum(m->slug);
	args[1] = Int64GetDatum(upto);
	ret = SPI_execute_with_args("UPDATE metering.meter_rollup_state SET rolled_up_to = $2, refreshed_at = metering.now() "
								"WHERE meter = $1",
								2, argtypes, args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not move the watermark of meter \"%s\"", m->slug);
	counts->events += added;
	if (RollupHasDerivedData())
	{
		Datum		hookargs[3] = {args[0], Int64GetDatum(m->watermark), Int64GetDatum(upto)};

		/* what depends on the meter's events: the usage periods ... */
		ret = SPI_execute_with_args("SELECT metering._usage_periods_add($1, $2, $3)",
									3, argtypes, hookargs, NULL, false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not add to the usage periods of meter \"%s\"", m->slug);
		/* ... and the entitlements' snapshots */
		ret = SPI_execute_with_args("SELECT metering._snapshot_meter($1, $2, $3)",
									3, argtypes, hookargs, NULL, false, 0);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "could not refresh the snapshots of meter \"%s\"", m->slug);
		counts->snapshots += DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	AtEOXact_GUC(true, level);
	return added;
}

int64
MeteringRefreshQueue(void)
{
	bool		isnull;
	int			ret;

	/*
	 * Entitlements whose snapshots a grant, void or reset removed get new
	 * ones (otherwise they would wait for their subject's next event).
	 */
	if (!RollupHasDerivedData())
		return 0;
	ret = SPI_execute("SELECT metering._snapshot_queue()", false, 0);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not save the queued snapshots: %s", SPI_result_code_string(ret));
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

void
MeteringRefreshAnalyze(int64 written)
{
	int			ret;

	/*
	 * A refresh that grew the rollups by much (the first one of a meter, or
	 * after a long pause) leaves the planner's statistics behind, and readers
	 * choose bad plans until autovacuum catches up: analyze at once.
	 */
	if (written <= 0)
		return;
	ret = SPI_execute("SELECT reltuples FROM pg_class WHERE oid = 'metering.meter_rollups'::regclass",
					  true, 1);
	if (ret == SPI_OK_SELECT && SPI_processed == 1)
	{
		bool		isnull;
		float4		reltuples = DatumGetFloat4(SPI_getbinval(SPI_tuptable->vals[0],
															 SPI_tuptable->tupdesc, 1, &isnull));

		if (reltuples < 0 || written > reltuples * 0.1 + 1000)
			SPI_execute("ANALYZE metering.meter_rollups", false, 0);
	}
}

/*
 * Summarizes the events' BRIN ranges filled since the last time: every read
 * of events by time (the end of the current hour, a split hour) scans all
 * ranges not summarized yet, and autovacuum's summarization (autosummarize)
 * falls behind under heavy ingest.  Skipped when the lock is taken (a
 * vacuum, which summarizes too, or another refresh): waiting would cancel a
 * running autovacuum.
 */
void
MeteringRefreshSummarize(int64 events)
{
	Oid			heap = MeteringRelid("events");
	Oid			index = MeteringRelid("events_seq_time_brin");

	HeapTuple	tup;
	bool		brin;

	if (events <= 0 || !OidIsValid(heap) || !OidIsValid(index))
		return;
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(index));
	if (!HeapTupleIsValid(tup))
		return;
	brin = ((Form_pg_class) GETSTRUCT(tup))->relam == BRIN_AM_OID;
	ReleaseSysCache(tup);
	if (!brin)
		return;
	if (!ConditionalLockRelationOid(heap, ShareUpdateExclusiveLock))
		return;
	(void) DirectFunctionCall1(brin_summarize_new_values, ObjectIdGetDatum(index));
}

/*
 * metering.refresh_rollups(meter text DEFAULT NULL): rolls up, for every live
 * meter (or one), the events stored since its watermark; returns how many
 * (meter, event) pairs it added.  All in the caller's transaction: each
 * meter's watermark is locked when its turn comes (in slug order, as
 * deleters lock them) and stays locked until the caller commits.
 */
PG_FUNCTION_INFO_V1(metering_refresh_rollups);
Datum
metering_refresh_rollups(PG_FUNCTION_ARGS)
{
	char	   *slug = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	MeteringRefreshCounts counts = {0, 0, 0};
	int64		upto;
	ListCell   *lc;
	List	   *slugs;

	SPI_connect();
	upto = MeteringRefreshBegin();
	slugs = MeteringRefreshMeters(slug);
	foreach(lc, slugs)
		MeteringRefreshMeter((const char *) lfirst(lc), upto, &counts);
	counts.snapshots += MeteringRefreshQueue();
	MeteringRefreshAnalyze(counts.rows);
	MeteringRefreshSummarize(counts.events);
	SPI_finish();
	PG_RETURN_INT64(counts.events);
}
