/*
 * visible_subjects.c: metering._visible_subjects_once(role), the row-security
 * rule of distributed tables (80_distribute.sql).
 *
 * On one node the policies call metering._visible_subjects() in an
 * uncorrelated subquery, evaluated once per statement.  Citus refuses
 * subqueries in the policies of distributed and reference tables, so there
 * the policy calls this function, which a shard's scan evaluates per row:
 * it answers from the last call of the same query (same transaction,
 * statement start and snapshot, role name and calling user: an answer about
 * a role is only reused for the user it was computed for, since
 * _visible_subjects() refuses to answer some users about others) and asks
 * _visible_subjects() otherwise.  The snapshot's contents are in the key
 * so that each query of a function or DO block sees the access rights as
 * they are when it starts, as the subquery of one node's policy does: a
 * transaction that commits between two snapshots was running at the first
 * (it is in its xip, or at or past its xmax) and is not at the second, and
 * a change by the same transaction moves the command id.  (The snapshot's
 * completion counter cannot serve: a copy, which every active snapshot is,
 * has it 0.)
 * That query reads the reference tables subject_access and subjects, which
 * Citus would refuse inside a shard's task as a nested distributed query;
 * it is allowed here, for this query only: a reference table has a copy on
 * every node and is read in place, in the same transaction.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define NESTED_GUC "citus.allow_nested_distributed_execution"

static LocalTransactionId cached_lxid = InvalidLocalTransactionId;
static TimestampTz cached_stmt = 0;
static NameData cached_role;
static Oid	cached_user = InvalidOid;
static SnapshotData cached_snap;	/* the fields compared, and copies of */
static TransactionId *cached_xip = NULL;	/* its xip and subxip, in */
static TransactionId *cached_subxip = NULL;	/* TopMemoryContext */
static ArrayType *cached_value = NULL;	/* in TopMemoryContext; NULL: all subjects */

/* whether snap is the snapshot the cached answer was computed under */
static bool
SameSnapshot(Snapshot snap)
{
	return snap->xmin == cached_snap.xmin && snap->xmax == cached_snap.xmax &&
		snap->curcid == cached_snap.curcid && snap->xcnt == cached_snap.xcnt &&
		snap->subxcnt == cached_snap.subxcnt && snap->suboverflowed == cached_snap.suboverflowed &&
		snap->takenDuringRecovery == cached_snap.takenDuringRecovery &&
		(snap->xcnt == 0 || memcmp(snap->xip, cached_xip, sizeof(TransactionId) * snap->xcnt) == 0) &&
		(snap->subxcnt == 0 || memcmp(snap->subxip, cached_subxip, sizeof(TransactionId) * snap->subxcnt) == 0);
}

static void
KeepSnapshot(Snapshot snap)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	if (cached_xip)
		pfree(cached_xip);
	if (cached_subxip)
		pfree(cached_subxip);
	cached_xip = palloc(sizeof(TransactionId) * Max(snap->xcnt, 1));
	cached_subxip = palloc(sizeof(TransactionId) * Max(snap->subxcnt, 1));
	if (snap->xcnt > 0)
		memcpy(cached_xip, snap->xip, sizeof(TransactionId) * snap->xcnt);
	if (snap->subxcnt > 0)
		memcpy(cached_subxip, snap->subxip, sizeof(TransactionId) * snap->subxcnt);
	MemoryContextSwitchTo(old);
	cached_snap.xmin = snap->xmin;
	cached_snap.xmax = snap->xmax;
	cached_snap.curcid = snap->curcid;
	cached_snap.xcnt = snap->xcnt;
	cached_snap.subxcnt = snap->subxcnt;
	cached_snap.suboverflowed = snap->suboverflowed;
	cached_snap.takenDuringRecovery = snap->takenDuringRecovery;
}

PG_FUNCTION_INFO_V1(metering_visible_subjects_once);
Datum
metering_visible_subjects_once(PG_FUNCTION_ARGS)
{
	Name		who = PG_GETARG_NAME(0);
	Oid			types[1] = {NAMEOID};
	Datum		args[1] = {NameGetDatum(who)};
	bool		isnull;
	int			guc_level;
	int			ret;
	Datum		d;

	Snapshot	snap = ActiveSnapshotSet() ? GetActiveSnapshot() : NULL;

	if (snap != NULL &&
		cached_lxid == MyProc->lxid && cached_stmt == GetCurrentStatementStartTimestamp() &&
		cached_user == GetUserId() && strcmp(NameStr(cached_role), NameStr(*who)) == 0 &&
		SameSnapshot(snap))
	{
		if (cached_value == NULL)
			PG_RETURN_NULL();
		PG_RETURN_ARRAYTYPE_P(DatumGetArrayTypePCopy(PointerGetDatum(cached_value)));
	}

	SPI_connect();
	guc_level = NewGUCNestLevel();
	if (GetConfigOption(NESTED_GUC, true, false) != NULL)
		(void) set_config_option(NESTED_GUC, "on", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	ret = SPI_execute_with_args("SELECT metering._visible_subjects($1)", 1, types, args, NULL, true, 1);
	AtEOXact_GUC(true, guc_level);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the visible subjects: %s", SPI_result_code_string(ret));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

	if (cached_value != NULL)
		pfree(cached_value);
	cached_value = NULL;
	cached_lxid = InvalidLocalTransactionId;
	if (!isnull)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		cached_value = DatumGetArrayTypePCopy(d);
		MemoryContextSwitchTo(old);
	}
	/* (no snapshot to tell this query from the next: ask every time) */
	if (snap != NULL)
	{
		KeepSnapshot(snap);
		cached_lxid = MyProc->lxid;
		cached_stmt = GetCurrentStatementStartTimestamp();
		cached_user = GetUserId();
		namestrcpy(&cached_role, NameStr(*who));
	}
	SPI_finish();

	if (cached_value == NULL)
		PG_RETURN_NULL();
	PG_RETURN_ARRAYTYPE_P(DatumGetArrayTypePCopy(PointerGetDatum(cached_value)));
}
