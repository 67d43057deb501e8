/*
 * clock.c: the present of a transaction that spans Citus nodes.
 *
 * On one node metering.now() is the start of the transaction.  Once the
 * tables are spread over Citus workers, one transaction runs on several
 * nodes, each with its own transaction start, and what a trigger stamps on
 * each copy of a reference table (a subject's deleted_at) would differ from
 * node to node.  Citus gives every distributed transaction an identifier
 * with a timestamp, assigned on the node where it began and sent to each
 * worker with its BEGIN.  In a database with the citus extension that
 * timestamp is the clock: every node of one transaction reads the same
 * present.  The node that begins a transaction assigns it at its first
 * reading of the clock, so that the value never changes within the
 * transaction (a later distributed statement would otherwise assign one).
 *
 * Any role may set a transaction's identifier itself (Citus's
 * assign_distributed_transaction_id is PUBLIC, and it runs it on the
 * workers as the user), so an identifier is not trusted blindly: on the
 * coordinator only one that Citus assigned there is the clock (one set by
 * hand there is refused, whoever the user: inside an owner-run function
 * the current user is the owner; a superuser sets metering.now instead);
 * on a worker, one dated after the worker's own transaction start, beyond
 * a minute of clock skew, is not the coordinator's and the node keeps its
 * own start.  A role that connects to a worker directly can still date its
 * own transaction there in the past (README, Security).
 *
 * Citus's functions are found in its library, which is loaded only where
 * it is preloaded; a database without Citus pays one test per backend.
 */
#include "postgres.h"

#include "access/parallel.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/proc.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#include "metering.h"

/*
 * Citus's DistributedTransactionId (distributed/transaction_identifier.h,
 * the same from Citus 7 to 13).
 */
typedef struct CitusTransactionId
{
	int			initiator_node;
	bool		originator;
	uint64		number;
	TimestampTz timestamp;
} CitusTransactionId;

typedef bool (*CitusLoadedFn) (void);
typedef void (*CitusEnsureIdFn) (void);
typedef CitusTransactionId *(*CitusCurrentIdFn) (void);
typedef int32 (*CitusGroupIdFn) (void);
typedef bool (*CitusTableFn) (Oid relid);

#define COORDINATOR_GROUP 0
#define MAX_SKEW_USECS (60 * USECS_PER_SEC)

static int	citus_preloaded = -1;	/* unknown yet */
static CitusLoadedFn citus_loaded;
static CitusEnsureIdFn citus_ensure_id;
static CitusCurrentIdFn citus_current_id;
static CitusGroupIdFn citus_group_id;
static CitusTableFn citus_table;

static LocalTransactionId clock_lxid = InvalidLocalTransactionId;
static TimestampTz clock_value;

/* Whether citus is among the preloaded libraries (then it is loaded). */
static bool
CitusPreloaded(void)
{
	const char *libs;
	char	   *copy;
	List	   *names = NIL;
	ListCell   *lc;

	if (citus_preloaded >= 0)
		return citus_preloaded == 1;
	citus_preloaded = 0;
	libs = GetConfigOption("shared_preload_libraries", true, false);
	if (libs == NULL)
		return false;
	copy = pstrdup(libs);
	if (SplitDirectoriesString(copy, ',', &names))
	{
		foreach(lc, names)
		{
			const char *name = (const char *) lfirst(lc);
			const char *base = strrchr(name, '/');

			base = base ? base + 1 : name;
			if (strcmp(base, "citus") == 0 || strcmp(base, "citus.so") == 0)
				citus_preloaded = 1;
		}
	}
	if (citus_preloaded == 1)
	{
		citus_loaded = (CitusLoadedFn) load_external_function("citus", "CitusHasBeenLoaded", false, NULL);
		citus_ensure_id = (CitusEnsureIdFn) load_external_function("citus", "EnsureDistributedTransactionId", false, NULL);
		citus_current_id = (CitusCurrentIdFn) load_external_function("citus", "GetCurrentDistributedTransactionId", false, NULL);
		citus_group_id = (CitusGroupIdFn) load_external_function("citus", "GetLocalGroupId", false, NULL);
		citus_table = (CitusTableFn) load_external_function("citus", "IsCitusTable", false, NULL);
		if (citus_loaded == NULL || citus_ensure_id == NULL || citus_current_id == NULL ||
			citus_group_id == NULL || citus_table == NULL)
			citus_preloaded = 0;
	}
	return citus_preloaded == 1;
}

/* Whether this node is a Citus worker (of a database with the citus extension). */
bool
MeteringCitusWorkerNode(void)
{
	return CitusPreloaded() && IsTransactionState() && citus_loaded() && citus_group_id() != COORDINATOR_GROUP;
}

/*
 * The present of the current transaction when the setting metering.now
 * does not pin it: the start of the transaction, or in a database with
 * Citus the timestamp of its distributed transaction.
 */
TimestampTz
MeteringTransactionClock(void)
{
	TimestampTz start = GetCurrentTransactionStartTimestamp();
	CitusTransactionId *id;

	if (!CitusPreloaded() || !IsTransactionState())
		return start;
	if (MyProc->lxid == clock_lxid)
		return clock_value;
	if (!citus_loaded())
		return start;			/* this database has no citus extension */
	id = citus_current_id();
	/*
	 * Only where the extension's tables are distributed (Citus's metadata
	 * cache answers).  Not in parallel mode: the parallel workers, which
	 * read the leader's identifier, may have read none already.  Not in a
	 * read-only statement outside a transaction block: it writes nothing
	 * on which the nodes must agree, and an identifier costs each worker it
	 * reads from a BEGIN and a COMMIT more (a read-only transaction block
	 * may get one from Citus later, whose instant its parts on the workers
	 * would read: it starts one at once, as a writing one does).
	 */
	if (id->number == 0 && !IsInParallelMode() && (!XactReadOnly || IsTransactionBlock()) &&
		citus_table(MeteringRelid("events")))
	{
		citus_ensure_id();
		id = citus_current_id();
	}
	clock_value = start;
	if (id->number != 0 && id->originator)
		clock_value = id->timestamp;
	else if (id->number != 0 && citus_group_id() == COORDINATOR_GROUP)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("metering.now(): this transaction's distributed transaction identifier was not assigned on this node"),
				 errdetail("On the coordinator the clock is the identifier Citus assigns there; one set with assign_distributed_transaction_id() would move it."),
				 errhint("To move the clock, a superuser sets metering.now. Citus itself sends the coordinator such an identifier when citus.enable_local_execution is off: leave it on.")));
	else if (id->number != 0 && id->timestamp <= start + MAX_SKEW_USECS)
		clock_value = id->timestamp;
	clock_lxid = MyProc->lxid;
	return clock_value;
}
