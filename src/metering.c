/*
 * metering.c: module initialisation, settings and the clock.
 *
 * metering.now() is the only clock of the extension: every rule that speaks
 * of "now" reads it, so tests, replays and backfills can pin the present by
 * setting metering.now.  Because moving the clock changes what the rules
 * accept, only a superuser (or a role granted SET on it) may set it.
 * Unpinned, it is the start of the transaction (on Citus, of the
 * distributed transaction: clock.c).
 */
#include "postgres.h"

#include <limits.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/parallel.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/indexing.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "pgtime.h"
#include "utils/datetime.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "calendar.h"
#include "metering.h"

PG_MODULE_MAGIC;

int			metering_meter_usage_max_age = 6 * 3600;
int			metering_batch_meter_usage_max_age = 24 * 3600;
bool		metering_allow_backdated_rules = false;

static char *metering_now_string = NULL;
static bool metering_now_is_set = false;
static TimestampTz metering_now_value = 0;

void		_PG_init(void);

/*
 * Parses a metering.now value without raising an error (a GUC check hook
 * must not throw).  Only a concrete date and time in years 1 to 9999 is a
 * clock; "infinity", "epoch" and the like are refused.
 */
static bool
ParseClockValue(const char *str, TimestampTz *result)
{
	char		workbuf[MAXDATELEN + MAXDATEFIELDS];
	char	   *field[MAXDATEFIELDS];
	int			ftype[MAXDATEFIELDS];
	int			nf;
	int			dtype;
	int			tz;
	struct pg_tm tt;
	fsec_t		fsec;

	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = false;

	if (strlen(str) >= MAXDATELEN)
		return false;
	if (ParseDateTime(str, workbuf, sizeof(workbuf), field, ftype,
					  MAXDATEFIELDS, &nf) != 0)
		return false;

	/*
	 * While a parallel worker restores its leader's settings there is no
	 * session time zone and no table of zone abbreviations yet, and
	 * DecodeDateTime would crash looking either up: accept only the
	 * canonical spelling (numbers and a numeric offset), which is what the
	 * leader's value always is (see check_metering_now).
	 */
	if (InitializingParallelWorker || session_timezone == NULL)
	{
		bool		has_offset = false;

		for (int i = 0; i < nf; i++)
		{
			if (ftype[i] == DTK_TZ)
				has_offset = true;
			else if (ftype[i] != DTK_DATE && ftype[i] != DTK_TIME)
				return false;
		}
		if (!has_offset)
			return false;
	}

	/*
	 * DecodeDateTime raises an error for an unknown zone name.  It holds no
	 * resources, so the error can be caught and turned into a refusal.
	 */
	PG_TRY();
	{
		ok = DecodeDateTime(field, ftype, nf, &dtype, &tt, &fsec, &tz) == 0 &&
			dtype == DTK_DATE &&
			tm2timestamp(&tt, fsec, &tz, result) == 0 &&
			IS_VALID_TIMESTAMP(*result) &&
			/* years 1 to 9999 in UTC (the canonical spelling has no BC) */
			MeteringTimeInRange(*result);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/*
 * Whether the installed SQL is 0.3.0's or later (the library is updated
 * before ALTER EXTENSION metering UPDATE runs, and must keep ingesting and
 * rolling up until then): told by a table 0.3.0 made, a cheap cached lookup
 * where reading the extension's version would be a catalog scan.
 */
bool
MeteringSqlCurrent(void)
{
	return OidIsValid(MeteringRelid("reservations"));
}

/* The oid of a relation of schema metering (cached lookups); InvalidOid when there is none. */
Oid
MeteringRelid(const char *relname)
{
	Oid			nsp = get_namespace_oid("metering", true);

	return OidIsValid(nsp) ? get_relname_relid(relname, nsp) : InvalidOid;
}

/* What reads entitlements as 0.3.0 keeps them: 55000 before the update. */
void
MeteringRequireSqlCurrent(const char *what)
{
	if (!MeteringSqlCurrent())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("%s needs the SQL of metering 0.3.0, and this database has an older one", what),
				 errhint("Run ALTER EXTENSION metering UPDATE in this database.")));
}

/*
 * Whether there is a distributed install to ask about: Citus's catalog, and
 * the SQL of 0.3.0 or later, which has the helpers (the library is updated
 * before ALTER EXTENSION metering UPDATE runs).  Without them, a single node.
 */
static bool
MayBeDistributed(void)
{
	return OidIsValid(get_relname_relid("pg_dist_partition", PG_CATALOG_NAMESPACE)) && MeteringSqlCurrent();
}

/*
 * Asks an SQL helper of 80_distribute.sql or 81_config_copies.sql whether
 * this node may run what: on a single node there is nothing to ask (and no
 * query to pay).
 */
static void
AskNode(const char *query, const char *what)
{
	Oid			types[1] = {TEXTOID};
	Datum		args[1];
	int			ret;

	if (!MayBeDistributed())
		return;
	args[0] = CStringGetTextDatum(what);
	ret = SPI_execute_with_args(query, 1, types, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not check the node: %s", SPI_result_code_string(ret));
}

/* What reads the coordinator's own configuration: 0A000 on a worker. */
void
MeteringRequireCoordinator(const char *what)
{
	AskNode("SELECT metering._require_coordinator($1)", what);
}

/*
 * What reads a subject's entitlement rows, called in a query that Citus sent
 * to a worker's shard (not by a trigger of its rows, which may read the
 * co-located shards): 0A000, since Citus refuses a query of other shards
 * there.  A cheap test on the coordinator and on a single node.
 */
void
MeteringRequireNotInShardQuery(const char *what)
{
	if (MeteringCitusWorkerNode() && DatumGetInt32(pg_trigger_depth(NULL)) == 0)
		MeteringRequireCoordinator(what);
}

/*
 * Whether this session runs on a Citus worker of a distributed install
 * (metering._on_worker()); false on a single node, unasked.
 */
bool
MeteringOnWorker(void)
{
	bool		isnull;
	int			ret;

	if (!MayBeDistributed())
		return false;
	ret = SPI_execute("SELECT metering._on_worker()", true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not check the node: %s", SPI_result_code_string(ret));
	return DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Whether the table of schema metering is a distributed table of Citus
 * (metering.distribute()); false on a single node, unasked.
 */
bool
MeteringDistributedTable(const char *relname)
{
	Oid			types[1] = {OIDOID};
	Datum		args[1];
	bool		isnull;
	int			ret;

	if (!MayBeDistributed())
		return false;
	args[0] = ObjectIdGetDatum(MeteringRelid(relname));
	ret = SPI_execute_with_args("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)",
								1, types, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not check the table: %s", SPI_result_code_string(ret));
	return DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/* What reads configuration that every node holds: 55000 where a worker's copy is not whole. */
void
MeteringRequireConfig(const char *what)
{
	AskNode("SELECT metering._require_config($1)", what);
}

/*
 * Index-only planning: the hot queries whose good plan is an index lookup
 * whatever the tables hold are planned once (generic plans), and a plan
 * made while a table was small must not stay a scan of all of it once it
 * has grown.  With these scans off (and the costs at the planner's
 * defaults) an index is taken where one serves (the scans still are where
 * none does), and JIT stays off: disable_cost would otherwise push the
 * plans' cost past jit_above_cost.  For statements whose every plausible
 * index serves them: a generic plan cannot weigh how selective a bound
 * such as "seq above the watermark" is.  (The window also covers the
 * execution, so SQL nested in it is planned the same way.)
 */
static const char *const pinned[][2] = {
	{"enable_seqscan", "off"}, {"enable_bitmapscan", "off"}, {"jit", "off"},
	{"plan_cache_mode", "force_generic_plan"},
	{"enable_indexscan", "on"}, {"enable_indexonlyscan", "on"},
	{"enable_nestloop", "on"}, {"enable_hashjoin", "on"}, {"enable_mergejoin", "on"},
	{"enable_hashagg", "on"}, {"enable_sort", "on"}, {"enable_memoize", "on"},
	{"seq_page_cost", "1"}, {"random_page_cost", "4"}, {"cpu_tuple_cost", "0.01"},
	{"cpu_index_tuple_cost", "0.005"}, {"cpu_operator_cost", "0.0025"},
};

int
MeteringPlanByIndexBegin(void)
{
	int			level = NewGUCNestLevel();

	/*
	 * The plans are the extension's, kept for every later caller of the
	 * backend: a caller's own settings must neither plan them again each
	 * call nor shape them (the planner's defaults).  Only what differs is
	 * set: this window is on the hot paths, and most sessions keep most
	 * defaults.
	 */
	for (size_t i = 0; i < lengthof(pinned); i++)
	{
		const char *current = GetConfigOption(pinned[i][0], false, false);

		if (current == NULL || strcmp(current, pinned[i][1]) != 0)
			(void) set_config_option(pinned[i][0], pinned[i][1], PGC_USERSET, PGC_S_SESSION,
									 GUC_ACTION_SAVE, true, 0, false);
	}
	return level;
}

void
MeteringPlanByIndexEnd(int level)
{
	AtEOXact_GUC(true, level);
}

static SPIPlanPtr
KeptPlan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types, int options)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	p = SPI_prepare_cursor(sql, nargs, types, options);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql, SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*cache = p;
	}
	return *cache;
}

SPIPlanPtr
MeteringPrepare(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types)
{
	return KeptPlan(cache, sql, nargs, types, 0);
}

SPIPlanPtr
MeteringPrepareGeneric(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types)
{
	return KeptPlan(cache, sql, nargs, types, CURSOR_OPT_GENERIC_PLAN);
}

int
MeteringExecuteByIndex(SPIPlanPtr plan, Datum *args, const char *nulls, bool read_only, long count)
{
	int			level = MeteringPlanByIndexBegin();
	int			ret = SPI_execute_plan(plan, args, nulls, read_only, count);

	MeteringPlanByIndexEnd(level);
	return ret;
}

/*
 * The version of the installed SQL, as major * 10000 + minor * 100 + patch
 * (0 when the extension is not installed): the library is installed before
 * ALTER EXTENSION metering UPDATE runs, and works with older SQL until then.
 */
int
MeteringInstalledVersion(void)
{
	Oid			extoid = get_extension_oid("metering", true);
	int			version = 0;
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;

	if (!OidIsValid(extoid))
		return 0;
	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, Anum_pg_extension_extversion, RelationGetDescr(rel), &isnull);
		int			major = 0,
					minor = 0,
					patch = 0;

		if (!isnull && sscanf(TextDatumGetCString(d), "%d.%d.%d", &major, &minor, &patch) >= 2)
			version = major * 10000 + minor * 100 + patch;
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return version;
}

Oid
MeteringExtensionOwner(void)
{
	Oid			extoid = get_extension_oid("metering", true);
	Oid			owner = InvalidOid;
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;

	if (!OidIsValid(extoid))
		return InvalidOid;
	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return owner;
}

/*
 * Validates a metering.now value.  Who may set it is PostgreSQL's business:
 * the setting is PGC_SUSET, so only superusers and roles granted SET ON
 * PARAMETER metering.now may set it.  A value set before the library was
 * loaded (a placeholder) is checked against the role that set it, not
 * against the role the library happens to be loaded by (inside an
 * owner-run function that would be the owner).
 */
static bool
check_metering_now(char **newval, void **extra, GucSource source)
{
	TimestampTz value;
	TimestampTz *stored;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (!ParseClockValue(*newval, &value))
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errmsg("invalid value for metering.now: \"%s\"", *newval);
		GUC_check_errdetail("metering.now takes a timestamp with time zone, such as 2024-01-01 00:00:00+00.");
		return false;
	}
	/*
	 * Keep the value in one canonical spelling, UTC with a numeric offset, so
	 * that reading it back never depends on the session's time zone or zone
	 * abbreviations: a parallel worker parses its leader's value before those
	 * settings are restored.
	 */
	{
		struct pg_tm tm;
		fsec_t		fsec;
		char		buf[MAXDATELEN + 1];
		char	   *canonical;

		if (timestamp2tm(value, NULL, &tm, &fsec, NULL, NULL) != 0)
			return false;
		tm.tm_isdst = 0;		/* print the +00 */
		EncodeDateTime(&tm, fsec, true, 0, NULL, USE_ISO_DATES, buf);
		if (strcmp(buf, *newval) != 0)
		{
			canonical = strdup(buf);
			if (canonical == NULL)
				return false;
			free(*newval);
			*newval = canonical;
		}
	}
	stored = (TimestampTz *) malloc(sizeof(TimestampTz));
	if (stored == NULL)
		return false;
	*stored = value;
	*extra = stored;
	return true;
}

static void
assign_metering_now(const char *newval, void *extra)
{
	if (extra != NULL)
	{
		metering_now_is_set = true;
		metering_now_value = *(TimestampTz *) extra;
	}
	else
		metering_now_is_set = false;
}

TimestampTz
MeteringNow(void)
{
	if (metering_now_is_set)
		return metering_now_value;
	return MeteringTransactionClock();
}

void
_PG_init(void)
{
	DefineCustomStringVariable("metering.now",
							   "Pins the present of the metering extension (metering.now()).",
							   "Empty means the start of the current transaction (with Citus, of the distributed transaction). Only superusers and roles granted SET on it may set it.",
							   &metering_now_string,
							   "",
							   PGC_SUSET,
							   GUC_NOT_IN_SAMPLE,
							   check_metering_now,
							   assign_metering_now,
							   NULL);

	DefineCustomIntVariable("metering.meter_usage_max_age",
							"How far in the past a MeterUsage timestamp may be.",
							"AWS accepts six hours; the window is a setting because AWS has changed it before.",
							&metering_meter_usage_max_age,
							6 * 3600, 0, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("metering.batch_meter_usage_max_age",
							"How far in the past a BatchMeterUsage timestamp may be.",
							"AWS accepts 24 hours; the window is a setting because AWS has changed it before.",
							&metering_batch_meter_usage_max_age,
							24 * 3600, 0, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("metering.allow_backdated_rules",
							 "Lets rating rules start or end in the past.",
							 "Off by default: a rule that starts in the past re-prices usage already rated (CloudKitty's force), and a row with an earlier created_at is a restore. Only superusers and roles granted SET on it may set it.",
							 &metering_allow_backdated_rules,
							 false,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	MeteringWorkerInit();

	MarkGUCPrefixReserved("metering");
}

/* metering.now(): the extension's present. */
PG_FUNCTION_INFO_V1(metering_now);
Datum
metering_now(PG_FUNCTION_ARGS)
{
	PG_RETURN_TIMESTAMPTZ(MeteringNow());
}

/* metering._usage_max_age(batch): the MeterUsage or BatchMeterUsage window. */
PG_FUNCTION_INFO_V1(metering_max_age);
Datum
metering_max_age(PG_FUNCTION_ARGS)
{
	bool		batch = PG_GETARG_BOOL(0);
	int			secs = batch ? metering_batch_meter_usage_max_age : metering_meter_usage_max_age;
	Interval   *result = (Interval *) palloc0(sizeof(Interval));

	result->time = (int64) secs * USECS_PER_SEC;
	PG_RETURN_INTERVAL_P(result);
}

/*
 * metering._made_by_us(xmin) of the SQL of 0.2.0 (the library is updated
 * before ALTER EXTENSION UPDATE): whether a row with this xmin was written
 * by the current transaction, subtransactions included.
 */
PG_FUNCTION_INFO_V1(metering_made_by_us);
Datum
metering_made_by_us(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(TransactionIdIsCurrentTransactionId(DatumGetTransactionId(PG_GETARG_DATUM(0))));
}

/*
 * The entitlements this transaction created, noted by their insert trigger
 * (metering._note_created) for the grants' rule that only an entitlement
 * made in the same transaction takes grants before its current period.  A
 * row's xmin would say so on one node, but Citus reads no system column of
 * a distributed table; the shard's backend that inserts an entitlement is
 * the one its later rows in the transaction go through (Citus keeps a
 * modified placement's connection), so a note in backend memory reaches
 * them.  Kept in the transaction's memory, and forgotten with it.
 */
static HTAB *created = NULL;
static LocalTransactionId created_lxid = InvalidLocalTransactionId;

/* the transaction's memory goes: so does the table */
static void
ForgetCreated(void *arg)
{
	created = NULL;
}

PG_FUNCTION_INFO_V1(metering_note_created);
Datum
metering_note_created(PG_FUNCTION_ARGS)
{
	bool		found;

	if (created == NULL || created_lxid != MyProc->lxid)
	{
		HASHCTL		ctl = {0};
		MemoryContextCallback *forget = MemoryContextAllocZero(TopTransactionContext,
															   sizeof(MemoryContextCallback));

		ctl.keysize = sizeof(pg_uuid_t);
		ctl.entrysize = sizeof(pg_uuid_t);
		ctl.hcxt = TopTransactionContext;
		created = hash_create("metering created entitlements", 64, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		created_lxid = MyProc->lxid;
		forget->func = ForgetCreated;
		MemoryContextRegisterResetCallback(TopTransactionContext, forget);
	}
	hash_search(created, PG_GETARG_UUID_P(0), HASH_ENTER, &found);
	PG_RETURN_VOID();
}

/* metering._created_here(entitlement): whether this transaction created it */
PG_FUNCTION_INFO_V1(metering_created_here);
Datum
metering_created_here(PG_FUNCTION_ARGS)
{
	bool		found = false;

	if (created != NULL && created_lxid == MyProc->lxid)
		hash_search(created, PG_GETARG_UUID_P(0), HASH_FIND, &found);
	PG_RETURN_BOOL(found);
}

/*
 * metering._outer_role(): the role the session acts as (SET ROLE, or the
 * login role), which a SECURITY DEFINER function cannot learn from
 * current_user.
 */
PG_FUNCTION_INFO_V1(metering_outer_role);
Datum
metering_outer_role(PG_FUNCTION_ARGS)
{
	PG_RETURN_OID(GetOuterUserId());
}
