/*
 * entitlement_snapshot.c: snapshots of the engine's state, read and written.
 *
 * A snapshot is the engine's state after the cut at an instant X, written by
 * refresh_rollups().  It stays valid while nothing it was computed from
 * changes: triggers on grants, resets and entitlements delete the snapshots
 * a change reaches, refresh_rollups() and DELETE on events delete those that
 * late events reach, and a reader ignores any snapshot later than the
 * earliest event of the tail (an event not rolled up yet).
 */
#include "postgres.h"

#include "access/xact.h"

#include "common/hashfn.h"
#include "miscadmin.h"
#include "utils/fmgrprotos.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "calendar.h"
#include "entitlement.h"
#include "metering.h"
#include "refresh.h"

/* The latest snapshot at or before `limit`, into the current context. */
bool
EntLoadEntitlementSnapshot(Entitlement *ent, TimestampTz limit, EntSnapshot *snap)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {UUIDOID, TIMESTAMPTZOID, TEXTOID};
	Datum		args[3] = {UUIDPGetDatum(&ent->id), TimestampTzGetDatum(limit), ent->subject};
	bool		isnull;
	Datum	   *ids,
			   *bals;
	int			n1,
				n2;
	int			ret = SPI_execute_plan(MeteringPrepare(&plan,
											   "SELECT at, usage, grant_usage, overage, grant_ids, balances, inputs, hour_usage_before "
											   "FROM metering.entitlement_snapshots "
											   "WHERE entitlement_id = $1 AND subject = $3 AND at <= $2 ORDER BY at DESC LIMIT 1",
											   3, types),
									   args, NULL, true, 1);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the snapshots: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	snap->at = DatumGetTimestampTz(EntGetCol(0, 1, &isnull));
	snap->usage = DatumGetNumeric(EntCopyCol(0, 2, &isnull));
	snap->grant_usage = DatumGetNumeric(EntCopyCol(0, 3, &isnull));
	snap->overage = DatumGetNumeric(EntCopyCol(0, 4, &isnull));
	snap->inputs = DatumGetInt64(EntGetCol(0, 7, &isnull));
	{
		Datum		hb = EntCopyCol(0, 8, &isnull);

		snap->hour_before = isnull ? NULL : DatumGetNumeric(hb);
	}
	deconstruct_array(DatumGetArrayTypePCopy(EntGetCol(0, 5, &isnull)), UUIDOID, UUID_LEN, false,
					  TYPALIGN_CHAR, &ids, NULL, &n1);
	deconstruct_array(DatumGetArrayTypePCopy(EntGetCol(0, 6, &isnull)), NUMERICOID, -1, false,
					  TYPALIGN_INT, &bals, NULL, &n2);
	if (n1 != n2)
		return false;
	snap->n = n1;
	snap->ids = palloc(sizeof(pg_uuid_t) * Max(n1, 1));
	snap->balances = palloc(sizeof(Numeric) * Max(n1, 1));
	for (int i = 0; i < n1; i++)
	{
		snap->ids[i] = *DatumGetUUIDP(ids[i]);
		snap->balances[i] = DatumGetNumeric(bals[i]);
	}
	return true;
}

static void
AddBytes(StringInfo buf, const void *p, int n)
{
	appendBinaryStringInfo(buf, (const char *) p, n);
}

static void
AddNumeric(StringInfo buf, Numeric n)
{
	AddBytes(buf, VARDATA_ANY(n), VARSIZE_ANY_EXHDR(n));
	appendStringInfoChar(buf, '|');
}

/*
 * A fingerprint of everything the state after the cut at x depends on,
 * except usage: the period rules, the resets up to x and the grants that
 * started by x (with their end only if it is at or before x).  A reader
 * compares it with the snapshot's, so a snapshot that a concurrent grant,
 * void or reset should have removed (possible when that writer runs at
 * REPEATABLE READ and cannot see the new snapshot) is never used.  Grants
 * are summed, so their order does not matter.
 */
static int64
SnapshotInputs(Entitlement *ent, TimestampTz x)
{
	StringInfoData buf;
	uint64		h;
	uint64		grants = 0;
	BdPlan	   *p = &ent->plan;

	initStringInfo(&buf);
	AddBytes(&buf, &p->measure_from, sizeof(TimestampTz));
	AddBytes(&buf, &p->anchor, sizeof(TimestampTz));
	AddBytes(&buf, &p->period.time, sizeof(int64));
	AddBytes(&buf, &p->period.day, sizeof(int32));
	AddBytes(&buf, &p->period.month, sizeof(int32));
	AddBytes(&buf, &p->preserve_overage, sizeof(bool));
	for (int i = 0; i < p->nresets && p->resets[i].at <= x; i++)
	{
		AddBytes(&buf, &p->resets[i].at, sizeof(TimestampTz));
		AddBytes(&buf, &p->resets[i].retain_anchor, sizeof(bool));
		AddBytes(&buf, &p->resets[i].preserve_overage, sizeof(bool));
	}
	h = hash_bytes_extended((const unsigned char *) buf.data, buf.len, 0);
	for (int i = 0; i < ent->ngrants; i++)
	{
		BdGrant    *g = &ent->grants[i];
		TimestampTz end = g->end <= x ? g->end : DT_NOEND;

		if (g->effective_at > x)
			continue;
		resetStringInfo(&buf);
		AddBytes(&buf, g->id.data, UUID_LEN);
		AddBytes(&buf, &g->priority, sizeof(int));
		AddBytes(&buf, &g->effective_at, sizeof(TimestampTz));
		AddBytes(&buf, &g->expires_at, sizeof(TimestampTz));
		AddBytes(&buf, &end, sizeof(TimestampTz));
		AddBytes(&buf, &g->recurring, sizeof(bool));
		if (g->recurring)
		{
			AddBytes(&buf, &g->recurrence.time, sizeof(int64));
			AddBytes(&buf, &g->recurrence.day, sizeof(int32));
			AddBytes(&buf, &g->recurrence.month, sizeof(int32));
			AddBytes(&buf, &g->recurrence_anchor, sizeof(TimestampTz));
		}
		AddBytes(&buf, &g->created_at, sizeof(TimestampTz));
		AddNumeric(&buf, g->amount);
		AddNumeric(&buf, g->min_rollover);
		AddNumeric(&buf, g->max_rollover);
		grants += hash_bytes_extended((const unsigned char *) buf.data, buf.len, 1);
	}
	pfree(buf.data);
	return (int64) (h ^ (grants * UINT64CONST(0x9E3779B97F4A7C15)));
}

static int
CompareSnapIds(const void *a, const void *b, void *arg)
{
	EntSnapshot *snap = (EntSnapshot *) arg;

	return memcmp(snap->ids[*(const int *) a].data, snap->ids[*(const int *) b].data, UUID_LEN);
}

/*
 * Starts the engine from the snapshot, if it was computed from the same
 * inputs and every grant active at its instant is in it.
 */
bool
EntStartFromSnapshot(BdEngine *e, Entitlement *ent, EntSnapshot *snap)
{
	int		   *order;

	if (snap->inputs != SnapshotInputs(ent, snap->at))
		return false;
	BdRestore(e, &ent->plan, ent->grants, ent->ngrants, snap->at, snap->usage,
			  snap->grant_usage, snap->overage);
	/* the snapshot's grants by id, found by bisection (there may be thousands) */
	order = palloc(sizeof(int) * Max(snap->n, 1));
	for (int j = 0; j < snap->n; j++)
		order[j] = j;
	qsort_arg(order, snap->n, sizeof(int), CompareSnapIds, snap);
	for (int i = 0; i < e->ngrants; i++)
	{
		BdGrant    *g = &e->grants[i];
		int			lo = 0,
					hi = snap->n;

		g->balance = e->zero;
		while (lo < hi)
		{
			int			mid = (lo + hi) / 2;
			int			c = memcmp(snap->ids[order[mid]].data, g->id.data, UUID_LEN);

			if (c == 0)
			{
				g->balance = snap->balances[order[mid]];
				break;
			}
			if (c < 0)
				lo = mid + 1;
			else
				hi = mid;
		}
		if (lo >= hi && BdActive(g, snap->at))
			return false;
	}
	pfree(order);
	return true;
}

/* ---- writing ---- */

/* how long before now the hourly snapshot is taken */
#define SNAPSHOT_LAG (10 * USECS_PER_MINUTE)

static bool SnapshotOneLocked(pg_uuid_t *id, text *subject, TimestampTz now);
static void QueueSnapshot(pg_uuid_t *id, text *subject);

/* Writes the snapshot of one entitlement at its last cut; true when it did. */
static bool
SnapshotOne(pg_uuid_t *id, text *subject)
{
	static SPIPlanPtr lock_plan = NULL;
	Oid			types[2] = {UUIDOID, TEXTOID};
	Datum		args[2] = {UUIDPGetDatum(id), PointerGetDatum(subject)};
	TimestampTz now = MeteringNow();
	bool		written;
	int			ret;

	/*
	 * Grant, void and reset writers of this entitlement wait for us; if one
	 * is at work, skip it rather than wait (its change drops the snapshots it
	 * reaches and queues the entitlement for the next refresh anyway).
	 */
	ret = SPI_execute_plan(MeteringPrepare(&lock_plan,
								   "SELECT 1 FROM metering.entitlements WHERE id = $1 AND subject = $2 FOR SHARE SKIP LOCKED",
								   2, types), args, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not lock the entitlement: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		QueueSnapshot(id, subject);
		return false;
	}

	/*
	 * The reads below are read-only SPI calls, which use the active snapshot:
	 * take a new one, so that they see what committed while we waited for the
	 * lock and the snapshots this refresh just dropped.  (refresh_rollups runs
	 * at READ COMMITTED only.)
	 */
	CommandCounterIncrement();
	PushActiveSnapshot(GetTransactionSnapshot());
	written = SnapshotOneLocked(id, subject, now);
	PopActiveSnapshot();
	return written;
}

static bool
SnapshotOneLocked(pg_uuid_t *id, text *subject, TimestampTz now)
{
	static SPIPlanPtr insert_plan = NULL;
	Entitlement ent;
	BdEngine	e;
	EntSnapshot snap;
	bool		from_snapshot = false;
	TimestampTz x,
				aligned,
				cut = DT_NOEND;
	BdBudget	budget = {0};
	BdArena		arena;
	MemoryContext outer = CurrentMemoryContext;
	bool		written;
	int			ret;

	if (!EntLoadEntitlement(&ent, id, subject, CurrentMemoryContext, true) || ent.type != 'm' ||
		now < ent.plan.measure_from || now >= ent.deleted_at)
		return false;

	/* the last cut at or before now */
	if (EntLoadEntitlementSnapshot(&ent, now, &snap))
		from_snapshot = EntStartFromSnapshot(&e, &ent, &snap);
	if (!from_snapshot)
		BdInit(&e, &ent.plan, ent.grants, ent.ngrants);
	x = e.state.at;
	BdArenaInit(&arena, outer);
	MemoryContextSwitchTo(arena.cxt);
	for (;;)
	{
		TimestampTz c = BdNextCut(&e);

		if (c > now)
			break;
		/* too long a history to replay: no snapshot (queries say why) */
		CHECK_FOR_INTERRUPTS();
		budget.work += BdStopCost(&e);
		if (++budget.cuts > BD_MAX_CUTS || budget.work > BD_MAX_WRITER_WORK)
		{
			MemoryContextSwitchTo(outer);
			return false;
		}
		BdAdvance(&e, e.zero, c, NULL);
		BdArenaKeep(&arena, &e, NULL, NULL);
		x = c;
	}
	MemoryContextSwitchTo(outer);

	/*
	 * Past the last cut, the state at the last whole hour a while ago: a
	 * reader that starts there reads whole rollup buckets, where one that
	 * starts at a cut inside an hour reads that hour's events, of every
	 * subject (the events have no per-subject index).  Within a phase usage
	 * burns the same in two parts as in one, so any instant can be a
	 * snapshot's.  The lag keeps events still on their way from dropping it
	 * at once.
	 */
	aligned = TruncHour(now - SNAPSHOT_LAG);
	if (aligned > x)
	{
		cut = x;
		x = aligned;
	}
	/*
	 * (The state at the start is where the engine begins anyway; it is kept
	 * only when the start falls inside an hour, for that hour's usage.)
	 */
	if ((x == e.plan->measure_from && TruncHour(x) == x) || (from_snapshot && x <= snap.at))
		return false;

	/* the writer: bounded by the loop above, not by a reader's budget */
	EntEvaluate(&ent, &e, x, x, NULL, 0, NULL, true);
	{
		Oid			itypes[10] = {UUIDOID, TIMESTAMPTZOID, NUMERICOID, NUMERICOID, NUMERICOID,
		UUIDARRAYOID, NUMERICARRAYOID, INT8OID, NUMERICOID, TEXTOID};
		Datum		iargs[10];
		char		inulls[10] = "         ";
		Numeric		hour_before = EntHourUsageBefore(&ent, x);
		Datum	   *ids = palloc(sizeof(Datum) * Max(e.ngrants, 1));
		Datum	   *bals = palloc(sizeof(Datum) * Max(e.ngrants, 1));
		int			n = 0;

		for (int i = 0; i < e.ngrants; i++)
			if (BdActive(&e.grants[i], x))
			{
				ids[n] = UUIDPGetDatum(&e.grants[i].id);
				bals[n] = NumericGetDatum(e.grants[i].balance);
				n++;
			}
		iargs[0] = UUIDPGetDatum(id);
		iargs[1] = TimestampTzGetDatum(x);
		iargs[2] = NumericGetDatum(e.state.usage);
		iargs[3] = NumericGetDatum(e.state.grant_usage);
		iargs[4] = NumericGetDatum(e.state.overage);
		iargs[5] = PointerGetDatum(construct_array(ids, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
		iargs[6] = PointerGetDatum(construct_array(bals, n, NUMERICOID, -1, false, TYPALIGN_INT));
		iargs[7] = Int64GetDatum(SnapshotInputs(&ent, x));
		iargs[8] = hour_before ? NumericGetDatum(hour_before) : (Datum) 0;
		inulls[8] = hour_before ? ' ' : 'n';
		iargs[9] = ent.subject;
		ret = SPI_execute_plan(MeteringPrepare(&insert_plan,
									   "INSERT INTO metering.entitlement_snapshots AS s "
									   "(entitlement_id, at, usage, grant_usage, overage, grant_ids, balances, inputs, hour_usage_before, subject) "
									   "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
									   "ON CONFLICT ON CONSTRAINT entitlement_snapshots_pkey DO UPDATE SET usage = EXCLUDED.usage, "
									   "grant_usage = EXCLUDED.grant_usage, overage = EXCLUDED.overage, "
									   "grant_ids = EXCLUDED.grant_ids, balances = EXCLUDED.balances, "
									   "inputs = EXCLUDED.inputs, created_at = EXCLUDED.created_at, "
									   "hour_usage_before = EXCLUDED.hour_usage_before "
									   "WHERE (s.usage, s.grant_usage, s.overage, s.grant_ids, s.balances, s.inputs, s.hour_usage_before) "
									   "IS DISTINCT FROM (EXCLUDED.usage, EXCLUDED.grant_usage, EXCLUDED.overage, "
									   "EXCLUDED.grant_ids, EXCLUDED.balances, EXCLUDED.inputs, EXCLUDED.hour_usage_before)",
									   10, itypes), iargs, inulls, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "could not write the snapshot: %s", SPI_result_code_string(ret));
		written = SPI_processed > 0;
	}

	/*
	 * An hourly snapshot replaces the hourly ones since the last cut (and the
	 * one it started from, when no cut came since), so that they do not pile
	 * up; the snapshots at cuts stay, for the histories.
	 */
	if (cut != DT_NOEND)
	{
		static SPIPlanPtr prune_plan = NULL;
		Oid			ptypes[4] = {UUIDOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TEXTOID};
		bool		started_hourly = from_snapshot && cut == snap.at &&
			!BdIsCut(&ent.plan, ent.grants, ent.ngrants, cut);
		Datum		pargs[4] = {UUIDPGetDatum(id), TimestampTzGetDatum(started_hourly ? cut - 1 : cut),
		TimestampTzGetDatum(x), ent.subject};

		ret = SPI_execute_plan(MeteringPrepare(&prune_plan,
										  "DELETE FROM metering.entitlement_snapshots "
										  "WHERE entitlement_id = $1 AND subject = $4 AND at > $2 AND at < $3",
										  4, ptypes), pargs, NULL, false, 0);
		if (ret != SPI_OK_DELETE)
			elog(ERROR, "could not prune the snapshots: %s", SPI_result_code_string(ret));
	}
	return written;
}

/* Puts an entitlement in the snapshot queue (inside the caller's SPI connection). */
static void
QueueSnapshot(pg_uuid_t *id, text *subject)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {UUIDOID, TEXTOID};
	Datum		args[2] = {UUIDPGetDatum(id), PointerGetDatum(subject)};
	int			ret = SPI_execute_plan(MeteringPrepare(&plan,
												  "INSERT INTO metering.entitlement_snapshot_queue (entitlement_id, subject) "
												  "VALUES ($1, $2) ON CONFLICT DO NOTHING", 2, types),
									   args, NULL, false, 0);

	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not queue the entitlement: %s", SPI_result_code_string(ret));
}

/* Writes the snapshots of the entitlements in SPI_tuptable (ids in column 1, subjects in 2). */
static int64
SnapshotFound(void)
{
	int			n = (int) SPI_processed;
	pg_uuid_t  *ids = palloc(sizeof(pg_uuid_t) * Max(n, 1));
	text	  **subjects = palloc(sizeof(text *) * Max(n, 1));
	MemoryContext per_entitlement;
	MemoryContext old;
	volatile int64 written = 0;

	for (int i = 0; i < n; i++)
	{
		bool		isnull;

		ids[i] = *DatumGetUUIDP(EntGetCol(i, 1, &isnull));
		subjects[i] = DatumGetTextPCopy(EntGetCol(i, 2, &isnull));
	}
	SPI_freetuptable(SPI_tuptable);

	per_entitlement = AllocSetContextCreate(CurrentMemoryContext, "metering snapshot",
											ALLOCSET_DEFAULT_SIZES);
	for (int i = 0; i < n; i++)
	{
		MemoryContext caller = CurrentMemoryContext;
		ResourceOwner owner = CurrentResourceOwner;

		/*
		 * Each in a subtransaction: an entitlement whose snapshot cannot be
		 * written (whatever the reason) is logged and queued for the next
		 * refresh, and the others, and the rollups of the same refresh, go
		 * on.  A connection of its own, so that its query results go with it.
		 */
		BeginInternalSubTransaction(NULL);
		old = MemoryContextSwitchTo(per_entitlement);
		PG_TRY();
		{
			SPI_connect();
			if (SnapshotOne(&ids[i], subjects[i]))
				written++;
			SPI_finish();
			ReleaseCurrentSubTransaction();
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(caller);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(caller);
			CurrentResourceOwner = owner;
			ereport(WARNING,
					(errmsg("could not write the snapshot of entitlement %s: %s",
							DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&ids[i]))),
							edata->message),
					 errdetail("The next refresh tries again; answers do not depend on snapshots.")));
			FreeErrorData(edata);
			QueueSnapshot(&ids[i], subjects[i]);
		}
		PG_END_TRY();
		MemoryContextSwitchTo(caller);
		CurrentResourceOwner = owner;
		(void) old;
		MemoryContextReset(per_entitlement);
	}
	MemoryContextDelete(per_entitlement);
	return written;
}

/*
 * metering._snapshot_meter(meter, from_seq, to_seq): after a refresh rolled
 * up a meter's events (from_seq, to_seq], drops the snapshots those events
 * reach and writes new ones for their subjects' entitlements (or queues
 * them: MeteringRefreshQueuesSnapshots).
 */
PG_FUNCTION_INFO_V1(metering_snapshot_meter);
Datum
metering_snapshot_meter(PG_FUNCTION_ARGS)
{
	Oid			types[3] = {TEXTOID, INT8OID, INT8OID};
	Datum		args[3] = {PG_GETARG_DATUM(0), PG_GETARG_DATUM(1), PG_GETARG_DATUM(2)};
	int64		written;
	int			ret;

	SPI_connect();
	/* the subjects of the new events, and their earliest instant */
	ret = SPI_execute_with_args("SELECT array_agg(subject), array_agg(since) FROM ("
								"  SELECT e.subject, min(e.time) AS since FROM metering.events e "
								"  JOIN metering.meters m ON m.slug = $1 AND e.type = m.event_type "
								"  WHERE e.seq > $2 AND e.seq <= $3 "
								"    AND EXISTS (SELECT 1 FROM metering.features f JOIN metering.entitlements n "
								"                ON n.feature_id = f.id WHERE f.meter_slug = $1) "
								"  GROUP BY e.subject) t",
								3, types, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the new events of the meter: %s", SPI_result_code_string(ret));
	{
		bool		null1,
					null2;
		Datum		subjects = EntCopyCol(0, 1, &null1);
		Datum		since = EntCopyCol(0, 2, &null2);
		Oid			ftypes[3] = {TEXTOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID};
		Datum		fargs[3] = {args[0], subjects, since};

		if (null1 || null2)
		{
			SPI_finish();
			PG_RETURN_INT64(0);
		}
		/* late ones reach snapshots after them */
		ret = SPI_execute_with_args("SELECT metering._events_changed($1, $2, $3)",
									3, ftypes, fargs, NULL, false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not drop snapshots: %s", SPI_result_code_string(ret));
		/* (before the update to 0.3.0 the snapshots' columns are 0.2.0's: none is written) */
		if (!MeteringSqlCurrent())
		{
			SPI_finish();
			PG_RETURN_INT64(0);
		}
		/* their new snapshots, or (MeteringRefreshQueuesSnapshots) their turn for them */
		ret = SPI_execute_with_args(psprintf("%s SELECT n.id, n.subject FROM metering.entitlements n "
											 "JOIN metering.features f ON f.id = n.feature_id AND f.meter_slug = $1 "
											 "WHERE n.type = 'metered' AND n.deleted_at IS NULL AND n.subject = ANY ($2) "
											 "  AND $3 IS NOT NULL ORDER BY n.id %s",
											 MeteringRefreshQueuesSnapshots ? "INSERT INTO metering.entitlement_snapshot_queue" : "",
											 MeteringRefreshQueuesSnapshots ? "ON CONFLICT DO NOTHING" : ""),
									3, ftypes, fargs, NULL, false, 0);
		if (ret != (MeteringRefreshQueuesSnapshots ? SPI_OK_INSERT : SPI_OK_SELECT))
			elog(ERROR, "could not find the entitlements of the meter: %s", SPI_result_code_string(ret));
		if (MeteringRefreshQueuesSnapshots)
		{
			SPI_finish();
			PG_RETURN_INT64(0);
		}
	}
	written = SnapshotFound();
	SPI_finish();
	PG_RETURN_INT64(written);
}

/*
 * Refreshes and event deletions of the features' meters wait for a writer of
 * snapshots in its own transaction, and it for them: they drop the snapshots
 * their events reach, and must see its snapshots to do so.  (A refresh's own
 * snapshots are written under the meter's lock already.)
 */
static void
LockFeatureMeters(void)
{
	int			ret = SPI_execute("SELECT 1 FROM metering.meter_rollup_state s "
								  "WHERE s.meter IN (SELECT f.meter_slug FROM metering.features f) "
								  "ORDER BY s.meter FOR SHARE", false, 0);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not lock the meters: %s", SPI_result_code_string(ret));
	CommandCounterIncrement();
}

/*
 * metering._snapshot_queue(): saves the snapshots of the queued entitlements
 * (see _forget_snapshots) and empties the queue; returns how many it saved.
 */
PG_FUNCTION_INFO_V1(metering_snapshot_queue);
Datum
metering_snapshot_queue(PG_FUNCTION_ARGS)
{
	int64		written;
	int			ret;

	/* (before the update to 0.3.0 the snapshots' columns are 0.2.0's: the update's first refresh saves them) */
	if (!MeteringSqlCurrent())
		PG_RETURN_INT64(0);

	SPI_connect();
	/* (the background refresh saves them in a transaction of their own) */
	LockFeatureMeters();
	ret = SPI_execute("DELETE FROM metering.entitlement_snapshot_queue RETURNING entitlement_id, subject", false, 0);
	if (ret != SPI_OK_DELETE_RETURNING)
		elog(ERROR, "could not read the snapshot queue: %s", SPI_result_code_string(ret));
	written = SnapshotFound();
	SPI_finish();
	PG_RETURN_INT64(written);
}

/*
 * metering.refresh_snapshots(entitlement): writes the snapshot at the last
 * cut before now of one live metered entitlement, or of all of them (after a
 * restore, which does not dump snapshots); returns how many it wrote.
 */
PG_FUNCTION_INFO_V1(metering_refresh_snapshots);
Datum
metering_refresh_snapshots(PG_FUNCTION_ARGS)
{
	Oid			types[1] = {UUIDOID};
	Datum		args[1] = {PG_ARGISNULL(0) ? (Datum) 0 : PG_GETARG_DATUM(0)};
	char		nulls[1] = {PG_ARGISNULL(0) ? 'n' : ' '};
	int64		written;
	int			ret;

	/* (before the update to 0.3.0 the snapshots' columns are 0.2.0's: the update's first refresh saves them) */
	if (!MeteringSqlCurrent())
		PG_RETURN_INT64(0);

	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("metering.refresh_snapshots must run at READ COMMITTED"),
				 errhint("Call it in its own READ COMMITTED transaction.")));
	SPI_connect();
	LockFeatureMeters();
	ret = SPI_execute_with_args("SELECT n.id, n.subject FROM metering.entitlements n "
								"WHERE n.type = 'metered' AND n.deleted_at IS NULL "
								"  AND ($1 IS NULL OR n.id = $1) ORDER BY n.id",
								1, types, args, nulls, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not find the entitlements: %s", SPI_result_code_string(ret));
	written = SnapshotFound();
	SPI_finish();
	PG_RETURN_INT64(written);
}
