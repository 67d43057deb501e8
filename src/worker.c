/*
 * worker.c: the background refresh, when metering is in
 * shared_preload_libraries.
 *
 * A launcher (no database) looks at the databases every LAUNCHER_NAP and
 * starts one worker per database that accepts connections and is not a
 * template.  A worker without the extension in its database, or with
 * metering.refresh_interval 0 there, exits at once; the launcher tries that
 * database again after RETRY_AFTER.  A worker refreshes every interval, as
 * the extension's owner (row security hides nothing from it), and in
 * between, whenever the events not rolled up yet reach metering.refresh_tail
 * (every balance read walks them, whoever's they are) or one subject's reach
 * metering.refresh_subject_tail (its reads read them), it rolls them up and
 * queues the new snapshots for the next full round (a reader adds the few
 * rollup hours after an older snapshot meanwhile).  Each meter in
 * a transaction of its own (refresh.h): a failing meter is logged and
 * retried next round while the others go on, and no watermark stays locked
 * beyond its own step.  Each round is recorded in metering.refresh_rounds
 * (view metering.refresh_status).
 *
 * A worker connected to a database would make DROP DATABASE (and ALTER
 * DATABASE RENAME, CREATE DATABASE ... TEMPLATE) fail, so a utility hook
 * stops it first; the launcher starts it again later if the database is
 * still there.
 */
#include "postgres.h"

#include <limits.h>
#include <signal.h>

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "metering.h"
#include "refresh.h"

#define WORKER_TYPE "metering refresh"
#define LAUNCHER_NAP_MS 10000	/* how often the launcher looks at the databases */
#define RETRY_AFTER_MS 60000	/* before a database whose worker exited is tried again */
#define ROUNDS_KEPT 1000		/* rows of metering.refresh_rounds per database */
#define STEP_LOCK_TIMEOUT "10s"	/* a meter locked longer (a long DELETE) waits for the next round */

#define TAIL_POLL_MS 1000		/* how often a worker looks at the tail between rounds */
#define SUBJECT_SCAN_MAX 20000	/* events of the tail a look counts by subject, at most */

int			metering_refresh_interval = 60000;	/* ms; 0: no background refresh */
int			metering_refresh_tail = 10000;	/* events; 0: only every interval */
int			metering_refresh_subject_tail = 500;	/* one subject's events; 0: off */

static ProcessUtility_hook_type prev_utility_hook = NULL;

PGDLLEXPORT void metering_launcher_main(Datum arg);
PGDLLEXPORT void metering_worker_main(Datum arg);

/* ---- the launcher ---- */

typedef struct DbWorker
{
	Oid			dboid;			/* hash key */
	BackgroundWorkerHandle *handle;
	TimestampTz started;
	bool		seen;			/* still a database to serve */
} DbWorker;

static void
StartWorker(DbWorker *w)
{
	BackgroundWorker bgw;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "metering");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "metering_worker_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "metering refresh of database %u", w->dboid);
	snprintf(bgw.bgw_type, BGW_MAXLEN, WORKER_TYPE);
	bgw.bgw_main_arg = ObjectIdGetDatum(w->dboid);
	bgw.bgw_notify_pid = MyProcPid;
	w->started = GetCurrentTimestamp();
	if (!RegisterDynamicBackgroundWorker(&bgw, &w->handle))
	{
		w->handle = NULL;
		ereport(LOG,
				(errmsg("metering: no background worker slot for the refresh of database %u", w->dboid),
				 errhint("Raise max_worker_processes: the refresh needs one per database with the extension.")));
	}
}

static bool
WorkerRunning(DbWorker *w)
{
	pid_t		pid;

	return w->handle != NULL && GetBackgroundWorkerPid(w->handle, &pid) != BGWH_STOPPED;
}

/* Marks the databases that accept connections and are not templates. */
static void
ScanDatabases(HTAB *workers)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);
		DbWorker   *w;
		bool		found;

		if (!db->datallowconn || db->datistemplate)
			continue;
		w = hash_search(workers, &db->oid, HASH_ENTER, &found);
		if (!found)
		{
			w->handle = NULL;
			w->started = 0;
		}
		w->seen = true;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
}

void
metering_launcher_main(Datum arg)
{
	HASHCTL		ctl;
	HTAB	   *workers;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	/* no database: pg_database is a shared catalog */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(DbWorker);
	workers = hash_create("metering refresh workers", 16, &ctl, HASH_ELEM | HASH_BLOBS);

	for (;;)
	{
		HASH_SEQ_STATUS seq;
		DbWorker   *w;
		TimestampTz now;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		hash_seq_init(&seq, workers);
		while ((w = hash_seq_search(&seq)) != NULL)
			w->seen = false;
		ScanDatabases(workers);
		now = GetCurrentTimestamp();
		hash_seq_init(&seq, workers);
		while ((w = hash_seq_search(&seq)) != NULL)
		{
			if (!w->seen)
			{
				/* a database dropped: its worker, if any, has gone with it */
				hash_search(workers, &w->dboid, HASH_REMOVE, NULL);
				continue;
			}
			if (!WorkerRunning(w) &&
				(w->started == 0 || TimestampDifferenceExceeds(w->started, now, RETRY_AFTER_MS)))
				StartWorker(w);
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 LAUNCHER_NAP_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* ---- a database's worker ---- */

/*
 * A setting of this database: its own (ALTER DATABASE ... SET, read anew
 * every time, since a connection applies it only when it starts), else the
 * server's.
 */
static int
DatabaseSetting(const char *name, int server_value, int flags)
{
	Oid			types[2] = {OIDOID, TEXTOID};
	Datum		args[2] = {ObjectIdGetDatum(MyDatabaseId), CStringGetTextDatum(name)};
	int			value = server_value;
	int			ret = SPI_execute_with_args("SELECT substr(c, length($2) + 2) "
											"FROM pg_catalog.pg_db_role_setting s, unnest(s.setconfig) c "
											"WHERE s.setdatabase = $1 AND s.setrole = 0 "
											"AND starts_with(c, $2 || '=')",
											2, types, args, NULL, true, 1);

	if (ret == SPI_OK_SELECT && SPI_processed == 1)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		if (v == NULL || !parse_int(v, &value, flags, NULL) || value < 0)
			value = server_value;
	}
	return value;
}

/*
 * The tail every balance read walks: how many events the live meter
 * furthest behind (but those skipped) has not rolled up, by their numbers
 * (0 without live meters), and, when that is below `cap` (else a round is
 * due anyway) but at least `subject_cap` (else no subject can have that
 * many), the most of its newest SUBJECT_SCAN_MAX events that one subject
 * has: a read passes everyone's entries but reads its own subject's
 * events, about twenty-four times the cost of passing one.
 */
typedef struct Tail
{
	int64		events;
	int64		one_subject;
} Tail;

static Tail
TailLength(List *skip, int64 cap, int64 subject_cap)
{
	Tail		t = {0, 0};
	bool		isnull;
	Oid			types[1] = {TEXTARRAYOID};
	Datum	   *slugs = palloc(sizeof(Datum) * Max(list_length(skip), 1));
	Datum		args[1];
	int64		low;
	int			i = 0;
	ListCell   *lc;
	int			ret;

	foreach(lc, skip)
		slugs[i++] = CStringGetTextDatum((const char *) lfirst(lc));
	args[0] = PointerGetDatum(construct_array(slugs, i, TEXTOID, -1, false, TYPALIGN_INT));
	/* (the events are not read where there is no live meter: a Citus worker's) */
	ret = SPI_execute_with_args("SELECT w.low, (SELECT max(seq) FROM metering.events) - w.low "
								"FROM (SELECT min(s.rolled_up_to) AS low FROM metering.meter_rollup_state s "
								"      JOIN metering.meters m ON m.slug = s.meter "
								"      WHERE m.deleted_at IS NULL AND m.slug <> ALL ($1)) w "
								"WHERE w.low IS NOT NULL", 1, types, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		return t;
	low = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	t.events = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	if (isnull)
		t.events = 0;
	if (t.events >= cap || subject_cap <= 0 || t.events < subject_cap)
		return t;

	/* (at most the newest SUBJECT_SCAN_MAX: a lower bound, never a false alarm) */
	types[0] = INT8OID;
	args[0] = Int64GetDatum(low);
	ret = SPI_execute_with_args("SELECT max(n) FROM (SELECT count(*) AS n FROM "
								"  (SELECT subject FROM metering.events WHERE seq > $1 "
								"    ORDER BY seq DESC LIMIT " CppAsString2(SUBJECT_SCAN_MAX) ") e "
								"  GROUP BY subject) x",
								1, types, args, NULL, true, 1);
	if (ret == SPI_OK_SELECT && SPI_processed == 1)
	{
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			t.one_subject = DatumGetInt64(d);
	}
	return t;
}

typedef struct Round
{
	TimestampTz started;
	int			meters;
	int			failed;
	MeteringRefreshCounts counts;
	char	   *last_error;		/* in TopMemoryContext, or NULL */
} Round;

/*
 * Runs one step in a transaction of its own, as the owner; a failure is
 * logged and counted, and the round goes on.
 */
typedef void (*Step) (Round *r, void *arg);

static bool
RunStep(Round *r, Oid owner, const char *what, Step step, void *arg, bool lock_timeout)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, what);
	PG_TRY();
	{
		Oid			saved_user;
		int			saved_sec;

		if (lock_timeout)
			(void) set_config_option("lock_timeout", STEP_LOCK_TIMEOUT, PGC_SUSET, PGC_S_SESSION,
									 GUC_ACTION_LOCAL, true, 0, false);
		GetUserIdAndSecContext(&saved_user, &saved_sec);
		SetUserIdAndSecContext(owner, saved_sec | SECURITY_LOCAL_USERID_CHANGE);
		SPI_connect();
		step(r, arg);
		SPI_finish();
		SetUserIdAndSecContext(saved_user, saved_sec);
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ereport(LOG,
				(errmsg("metering: %s failed: %s", what, edata->message),
				 errdetail("It is tried again next round; the rest of the round goes on.")));
		if (r->last_error)
			pfree(r->last_error);
		r->last_error = MemoryContextStrdup(TopMemoryContext, psprintf("%s: %s", what, edata->message));
		FreeErrorData(edata);
		r->failed++;
		ok = false;
	}
	PG_END_TRY();
	/* (a commit leaves us in TopMemoryContext) */
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return ok;
}

static int64 round_upto;
static List *round_meters;

static void
StepBegin(Round *r, void *arg)
{
	List	   *slugs;
	ListCell   *lc;

	round_upto = MeteringRefreshBegin();
	slugs = MeteringRefreshMeters(NULL);
	/* kept across the round's transactions */
	round_meters = NIL;
	foreach(lc, slugs)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		round_meters = lappend(round_meters, pstrdup((const char *) lfirst(lc)));
		MemoryContextSwitchTo(old);
	}
}

static void
StepMeter(Round *r, void *arg)
{
	int64		before = r->counts.events;

	MeteringRefreshMeter((const char *) arg, round_upto, &r->counts);
	MeteringRefreshAnalyze(r->counts.rows);
	MeteringRefreshSummarize(r->counts.events - before);
}

static void
StepQueue(Round *r, void *arg)
{
	r->counts.snapshots += MeteringRefreshQueue();
}

static void
StepRecord(Round *r, void *arg)
{
	Oid			types[7] = {TIMESTAMPTZOID, INT4OID, INT4OID, INT8OID, INT8OID, TEXTOID, INT4OID};
	Datum		args[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', r->last_error ? ' ' : 'n', ' '};
	int			ret;

	args[0] = TimestampTzGetDatum(r->started);
	args[1] = Int32GetDatum(r->meters);
	args[2] = Int32GetDatum(r->failed);
	args[3] = Int64GetDatum(r->counts.events);
	args[4] = Int64GetDatum(r->counts.snapshots);
	args[5] = r->last_error ? CStringGetTextDatum(r->last_error) : (Datum) 0;
	args[6] = Int32GetDatum(ROUNDS_KEPT);
	ret = SPI_execute_with_args("WITH r AS (INSERT INTO metering.refresh_rounds "
								"(started_at, ended_at, meters, failed, events, snapshots, last_error) "
								"VALUES ($1, clock_timestamp(), $2, $3, $4, $5, $6) RETURNING 1) "
								"DELETE FROM metering.refresh_rounds WHERE started_at < "
								"(SELECT started_at FROM metering.refresh_rounds ORDER BY started_at DESC "
								" OFFSET $7 - 1 LIMIT 1)",
								7, types, args, nulls, false, 0);
	if (ret != SPI_OK_DELETE)
		elog(ERROR, "could not record the round: %s", SPI_result_code_string(ret));
}

/*
 * The meters whose step failed in the last round (in TopMemoryContext): a
 * round started by the tail leaves them to the next full round, which tries
 * them again (a watermark another session holds would otherwise make the
 * tail look long, and start a round every second).
 */
static List *failed_meters = NIL;

static bool
FailedLastRound(const char *slug)
{
	ListCell   *lc;

	foreach(lc, failed_meters)
		if (strcmp((const char *) lfirst(lc), slug) == 0)
			return true;
	return false;
}

/* A round: every meter (but the failed ones, between full rounds), then (full) the queued snapshots. */
static void
RunRound(Oid owner, bool full)
{
	Round		r;
	ListCell   *lc;
	List	   *failed = NIL;
	MemoryContext old;

	memset(&r, 0, sizeof(r));
	r.started = GetCurrentTimestamp();
	round_meters = NIL;
	if (RunStep(&r, owner, "metering refresh: begin", StepBegin, NULL, false))
	{
		/* (RunStep catches what a step raises: the flag is always put back) */
		MeteringRefreshQueuesSnapshots = !full;
		foreach(lc, round_meters)
		{
			char	   *slug = (char *) lfirst(lc);
			bool		skip = !full && FailedLastRound(slug);

			CHECK_FOR_INTERRUPTS();
			if (!skip)
				r.meters++;
			if (skip || !RunStep(&r, owner, psprintf("metering refresh of meter \"%s\"", slug), StepMeter, slug, true))
			{
				old = MemoryContextSwitchTo(TopMemoryContext);
				failed = lappend(failed, pstrdup(slug));
				MemoryContextSwitchTo(old);
			}
		}
		MeteringRefreshQueuesSnapshots = false;
		if (full)
			RunStep(&r, owner, "metering refresh: queued snapshots", StepQueue, NULL, true);
	}
	RunStep(&r, owner, "metering refresh: record the round", StepRecord, NULL, false);
	list_free_deep(failed_meters);
	failed_meters = failed;
	list_free_deep(round_meters);
	round_meters = NIL;
	if (r.last_error)
		pfree(r.last_error);
}

/*
 * The extension's owner, this database's interval and tail setting, and
 * (when tail is on) whether the tail is due for a round; false: nothing to
 * do here.
 */
static bool
LookAround(Oid *owner, int *interval, int *tail, bool *tail_due)
{
	bool		present;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	/* before 0.3.0 there is no table to record rounds in */
	present = MeteringSqlCurrent();
	*tail_due = false;
	if (present)
	{
		int			subject_tail;

		*owner = MeteringExtensionOwner();
		SPI_connect();
		*interval = DatabaseSetting("metering.refresh_interval", metering_refresh_interval, GUC_UNIT_MS);
		*tail = DatabaseSetting("metering.refresh_tail", metering_refresh_tail, 0);
		subject_tail = DatabaseSetting("metering.refresh_subject_tail", metering_refresh_subject_tail, 0);
		if (*interval > 0 && *tail > 0)
		{
			Tail		t = TailLength(failed_meters, *tail, subject_tail);

			*tail_due = t.events >= *tail || (subject_tail > 0 && t.one_subject >= subject_tail);
		}
		SPI_finish();
	}
	PopActiveSnapshot();
	CommitTransactionCommand();
	return present && *interval > 0;
}

void
metering_worker_main(Datum arg)
{
	Oid			dboid = DatumGetObjectId(arg);
	Oid			owner;
	int			interval;
	int			tail;
	bool		tail_due;
	TimestampTz last_full = 0;
	MemoryContext round_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pgstat_report_appname(WORKER_TYPE);

	/*
	 * The steps run as the extension's owner with this session's settings,
	 * which include the database's (ALTER DATABASE ... SET search_path): the
	 * names in their statements must be pg_catalog's, as in the SQL
	 * functions that pin their search_path, not a schema's early in it.
	 */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	/* what a round allocates outside its transactions, freed after it */
	round_cxt = AllocSetContextCreate(TopMemoryContext, "metering refresh round", ALLOCSET_DEFAULT_SIZES);

	while (LookAround(&owner, &interval, &tail, &tail_due))
	{
		TimestampTz now = GetCurrentTimestamp();
		long		wait;

		MemoryContextSwitchTo(round_cxt);
		if (last_full == 0 || TimestampDifferenceExceeds(last_full, now, interval))
		{
			RunRound(owner, true);
			/* (the interval is a rest between full rounds, however long they take) */
			last_full = GetCurrentTimestamp();
		}
		else if (tail_due)
			RunRound(owner, false);
		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(round_cxt);
		wait = interval - TimestampDifferenceMilliseconds(last_full, GetCurrentTimestamp());
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(Min(wait, tail > 0 ? TAIL_POLL_MS : interval), 1), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
	}
	proc_exit(0);
}

/* ---- out of the way of DROP DATABASE ---- */

/* Stops this server's refresh workers connected to a database. */
static void
StopWorkersOf(Oid dboid)
{
	int			n;
	bool		any = false;

	if (!OidIsValid(dboid) || !pg_database_ownercheck(dboid, GetUserId()))
		return;
	n = pgstat_fetch_stat_numbackends();
	for (int i = 1; i <= n; i++)
	{
		LocalPgBackendStatus *local = pgstat_fetch_stat_local_beentry(i);
		PgBackendStatus *be = local ? &local->backendStatus : NULL;
		const char *type;

		if (be == NULL || be->st_databaseid != dboid || be->st_backendType != B_BG_WORKER)
			continue;
		type = GetBackgroundWorkerTypeByPid(be->st_procpid);
		if (type != NULL && strcmp(type, WORKER_TYPE) == 0)
		{
			kill(be->st_procpid, SIGTERM);
			any = true;
		}
	}
	pgstat_clear_snapshot();
	/* the command waits a few seconds for other sessions to leave */
	if (any)
		ereport(DEBUG1, (errmsg("metering: stopped the refresh of database %u", dboid)));
}

static void
MeteringUtility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				ProcessUtilityContext context, ParamListInfo params,
				QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;

	if (IsA(stmt, DropdbStmt))
		StopWorkersOf(get_database_oid(((DropdbStmt *) stmt)->dbname, true));
	else if (IsA(stmt, RenameStmt) && ((RenameStmt *) stmt)->renameType == OBJECT_DATABASE)
		StopWorkersOf(get_database_oid(((RenameStmt *) stmt)->subname, true));
	else if (IsA(stmt, CreatedbStmt))
	{
		ListCell   *lc;

		foreach(lc, ((CreatedbStmt *) stmt)->options)
		{
			DefElem    *opt = (DefElem *) lfirst(lc);

			if (strcmp(opt->defname, "template") == 0 && opt->arg != NULL)
				StopWorkersOf(get_database_oid(defGetString(opt), true));
		}
	}
	if (prev_utility_hook)
		prev_utility_hook(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

/* ---- set-up (from _PG_init) ---- */

void
MeteringWorkerInit(void)
{
	BackgroundWorker bgw;

	DefineCustomIntVariable("metering.refresh_interval",
							"How often the background worker refreshes the rollups, usage periods and snapshots.",
							"0 turns the background refresh off. Per database with ALTER DATABASE ... SET. Needs metering in shared_preload_libraries.",
							&metering_refresh_interval,
							60000, 0, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("metering.refresh_tail",
							"How many events not rolled up yet make the background worker roll them up before the interval is over.",
							"Every balance read walks them. 0: only every interval. Per database with ALTER DATABASE ... SET.",
							&metering_refresh_tail,
							10000, 0, INT_MAX,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("metering.refresh_subject_tail",
							"How many of one subject's events not rolled up yet make the background worker roll them up before the interval is over.",
							"Every balance read of the subject reads them. 0: only the whole tail counts. Needs metering.refresh_tail above 0. Per database with ALTER DATABASE ... SET.",
							&metering_refresh_subject_tail,
							500, 0, INT_MAX,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);
	if (!process_shared_preload_libraries_in_progress)
		return;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = 10;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "metering");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "metering_launcher_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "metering refresh launcher");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "metering launcher");
	RegisterBackgroundWorker(&bgw);

	prev_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = MeteringUtility;
}
