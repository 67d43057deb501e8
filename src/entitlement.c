/*
 * entitlement.c: entitlements over the event store: loading an entitlement
 * and its grants, the usage of each phase, snapshots, and the SQL functions
 * entitlement_value, grant_balances, burndown_history and balance_history.
 *
 * Usage is read three ways, in one pass:
 *   - hourly rollups of the feature's meter (events up to its watermark),
 *     used whole when no instant the engine stops at falls inside the span
 *     of a bucket's events (first_time < t <= last_time);
 *   - the events of the buckets that are split that way;
 *   - the events above the watermark (the tail, through the BRIN index).
 *
 * A snapshot is the engine's state after the cut at an instant X, written by
 * refresh_rollups().  It stays valid while nothing it was computed from
 * changes: triggers on grants, resets and entitlements delete the snapshots
 * a change reaches, refresh_rollups() and DELETE on events delete those that
 * late events reach, and a reader ignores any snapshot later than the
 * earliest event of the tail (an event not rolled up yet).
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/datetime.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "burndown.h"
#include "calendar.h"
#include "metering.h"
#include "meter_value.h"

typedef struct Entitlement
{
	pg_uuid_t	id;
	char		type;			/* 'm'etered, 'b'oolean, 's'tatic */
	Datum		subject;		/* text */
	Datum		config;			/* jsonb, or 0 */
	bool		soft_limit;
	TimestampTz created_at;
	TimestampTz deleted_at;		/* DT_NOEND when not deleted */
	BdPlan		plan;
	/* the feature's meter */
	bool		count;			/* COUNT, else SUM */
	Datum		event_type;		/* text */
	Datum		value_path;		/* jsonpath, or 0 for COUNT */
	Datum		group_by;		/* jsonb */
	Datum		filters;		/* jsonb, or 0 */
	Datum		meter;			/* text */
	int64		watermark;
	BdGrant    *grants;
	int			ngrants;
} Entitlement;

typedef struct UsagePoint
{
	TimestampTz time;
	Numeric		amount;
} UsagePoint;

typedef struct UsageList
{
	UsagePoint *points;
	int			n;
	int			cap;
} UsageList;

/* Receives the engine's progress; see Evaluate. */
typedef struct Observer Observer;
struct Observer
{
	/* after the phase up to `at` is burnt, before the cut at `at` */
	void		(*before_cut) (Observer *o, BdEngine *e, Numeric phase_usage);
	/* after the cut at `at` */
	void		(*after_cut) (Observer *o, BdEngine *e, BdCut *cut);
	/* copies what it holds of the engine's memory into the current context (BdArenaKeep) */
	void		(*keep) (Observer *o);
	/* the evaluation's budget (Evaluate counts into it) */
	BdBudget   *budget;
};

static bool
EntActive(Entitlement *ent, TimestampTz at)
{
	TimestampTz from = ent->type == 'm' ? ent->plan.measure_from : ent->created_at;

	return from <= at && at < ent->deleted_at;
}

/*
 * The instant argument `arg`, or metering.now() when NULL.  The engine's
 * calendar works in the years 1 to 9999 (as the clock does); outside them an
 * answer could only be an overflow.
 */
static TimestampTz
NowOr(FunctionCallInfo fcinfo, int arg, const char *name)
{
	TimestampTz t = PG_ARGISNULL(arg) ? MeteringNow() : PG_GETARG_TIMESTAMPTZ(arg);
	TimestampTz lo = (TimestampTz) (date2j(1, 1, 1) - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY;
	TimestampTz hi = (TimestampTz) (date2j(10000, 1, 1) - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY;

	if (TIMESTAMP_NOT_FINITE(t) || t < lo || t >= hi)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a finite time in the years 1 to 9999", name)));
	return t;
}

/* ---- loading ---- */

static SPIPlanPtr
Prepare(SPIPlanPtr *cache, const char *sql, int nargs, Oid *types)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(sql, nargs, types);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql, SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*cache = p;
	}
	return *cache;
}

static Datum
GetCol(int row, int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

static Datum
CopyCol(int row, int col, bool *isnull)
{
	Datum		d = GetCol(row, col, isnull);
	Form_pg_attribute att = TupleDescAttr(SPI_tuptable->tupdesc, col - 1);

	if (*isnull)
		return (Datum) 0;
	return datumCopy(d, att->attbyval, att->attlen);
}

/*
 * Loads an entitlement, its feature's meter, its resets and (with_grants)
 * its grants into the current memory context.  False when it does not
 * exist.  Must be called inside an SPI connection.
 */
static bool
LoadEntitlement(Entitlement *ent, pg_uuid_t *id, MemoryContext cxt, bool with_grants)
{
	static SPIPlanPtr ent_plan = NULL;
	static SPIPlanPtr reset_plan = NULL;
	static SPIPlanPtr grant_plan = NULL;
	Oid			types[1] = {UUIDOID};
	Datum		args[1] = {UUIDPGetDatum(id)};
	MemoryContext old;
	bool		isnull;
	int			ret;

	ret = SPI_execute_plan(Prepare(&ent_plan,
								   "SELECT e.type::text, e.subject, e.config, e.is_soft_limit, e.created_at, e.deleted_at, "
								   "       e.usage_period, e.usage_period_anchor, e.measure_usage_from, e.preserve_overage_at_reset, "
								   "       m.aggregation::text, m.event_type, m.value_property, m.group_by, "
								   "       f.meter_group_by_filters, m.slug, coalesce(s.rolled_up_to, 0) "
								   "FROM metering.entitlements e "
								   "JOIN metering.features f ON f.id = e.feature_id "
								   "LEFT JOIN metering.meters m ON m.slug = f.meter_slug "
								   "LEFT JOIN metering.meter_rollup_state s ON s.meter = m.slug "
								   "WHERE e.id = $1", 1, types),
						   args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the entitlement: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;

	old = MemoryContextSwitchTo(cxt);
	memset(ent, 0, sizeof(Entitlement));
	ent->id = *id;
	ent->type = TextDatumGetCString(GetCol(0, 1, &isnull))[0];
	ent->subject = CopyCol(0, 2, &isnull);
	ent->config = CopyCol(0, 3, &isnull);
	ent->soft_limit = DatumGetBool(GetCol(0, 4, &isnull));
	ent->created_at = DatumGetTimestampTz(GetCol(0, 5, &isnull));
	ent->deleted_at = DatumGetTimestampTz(GetCol(0, 6, &isnull));
	if (isnull)
		ent->deleted_at = DT_NOEND;
	if (ent->type == 'm')
	{
		ent->plan.periods = true;
		ent->plan.period = *DatumGetIntervalP(GetCol(0, 7, &isnull));
		ent->plan.anchor = DatumGetTimestampTz(GetCol(0, 8, &isnull));
		ent->plan.measure_from = DatumGetTimestampTz(GetCol(0, 9, &isnull));
		ent->plan.preserve_overage = DatumGetBool(GetCol(0, 10, &isnull));
		ent->count = strcmp(TextDatumGetCString(GetCol(0, 11, &isnull)), "COUNT") == 0;
		ent->event_type = CopyCol(0, 12, &isnull);
		ent->value_path = CopyCol(0, 13, &isnull);
		ent->group_by = CopyCol(0, 14, &isnull);
		ent->filters = CopyCol(0, 15, &isnull);
		ent->meter = CopyCol(0, 16, &isnull);
		ent->watermark = DatumGetInt64(GetCol(0, 17, &isnull));
	}
	MemoryContextSwitchTo(old);
	if (ent->type != 'm')
		return true;

	ret = SPI_execute_plan(Prepare(&reset_plan,
								   "SELECT effective_at, retain_anchor, preserve_overage FROM metering.resets "
								   "WHERE entitlement_id = $1 ORDER BY effective_at", 1, types),
						   args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the resets: %s", SPI_result_code_string(ret));
	old = MemoryContextSwitchTo(cxt);
	ent->plan.nresets = (int) SPI_processed;
	ent->plan.resets = palloc0(sizeof(BdReset) * Max(ent->plan.nresets, 1));
	for (int i = 0; i < ent->plan.nresets; i++)
	{
		ent->plan.resets[i].at = DatumGetTimestampTz(GetCol(i, 1, &isnull));
		ent->plan.resets[i].retain_anchor = DatumGetBool(GetCol(i, 2, &isnull));
		ent->plan.resets[i].preserve_overage = DatumGetBool(GetCol(i, 3, &isnull));
	}
	MemoryContextSwitchTo(old);
	if (!with_grants)
		return true;

	ret = SPI_execute_plan(Prepare(&grant_plan,
								   "SELECT id, amount, priority, effective_at, coalesce(expires_at, 'infinity'), "
								   "       least(coalesce(expires_at, 'infinity'), coalesce(voided_at, 'infinity'), "
								   "             coalesce(deleted_at, 'infinity')), "
								   "       recurrence, coalesce(recurrence_anchor, effective_at), "
								   "       min_rollover_amount, max_rollover_amount, created_at "
								   "FROM metering.grants WHERE entitlement_id = $1", 1, types),
						   args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the grants: %s", SPI_result_code_string(ret));
	old = MemoryContextSwitchTo(cxt);
	ent->ngrants = (int) SPI_processed;
	ent->grants = palloc0(sizeof(BdGrant) * Max(ent->ngrants, 1));
	for (int i = 0; i < ent->ngrants; i++)
	{
		BdGrant    *g = &ent->grants[i];
		Datum		rec;

		g->id = *DatumGetUUIDP(GetCol(i, 1, &isnull));
		g->amount = DatumGetNumeric(CopyCol(i, 2, &isnull));
		g->priority = DatumGetInt32(GetCol(i, 3, &isnull));
		g->effective_at = DatumGetTimestampTz(GetCol(i, 4, &isnull));
		g->expires_at = DatumGetTimestampTz(GetCol(i, 5, &isnull));
		g->end = DatumGetTimestampTz(GetCol(i, 6, &isnull));
		rec = GetCol(i, 7, &isnull);
		g->recurring = !isnull;
		if (g->recurring)
			g->recurrence = *DatumGetIntervalP(rec);
		g->recurrence_anchor = DatumGetTimestampTz(GetCol(i, 8, &isnull));
		g->min_rollover = DatumGetNumeric(CopyCol(i, 9, &isnull));
		g->max_rollover = DatumGetNumeric(CopyCol(i, 10, &isnull));
		g->created_at = DatumGetTimestampTz(GetCol(i, 11, &isnull));
	}
	MemoryContextSwitchTo(old);
	return true;
}

/* ---- usage ---- */

static void
AddPoint(UsageList *l, TimestampTz t, Numeric amount)
{
	if (l->n == l->cap)
	{
		l->cap = l->cap ? l->cap * 2 : 64;
		l->points = l->points ? repalloc_huge(l->points, sizeof(UsagePoint) * l->cap)
			: palloc(sizeof(UsagePoint) * l->cap);
	}
	l->points[l->n].time = t;
	l->points[l->n].amount = amount;
	l->n++;
}

static int
ComparePoints(const void *x, const void *y)
{
	TimestampTz a = ((const UsagePoint *) x)->time;
	TimestampTz b = ((const UsagePoint *) y)->time;

	return (a > b) - (a < b);
}

static int
CompareTimes(const void *x, const void *y)
{
	TimestampTz a = *(const TimestampTz *) x;
	TimestampTz b = *(const TimestampTz *) y;

	return (a > b) - (a < b);
}

/* Whether some instant of the sorted `stops` lies in (lo, hi]. */
static bool
StopInside(TimestampTz *stops, int n, TimestampTz lo, TimestampTz hi)
{
	int			a = 0,
				b = n;

	/* first index with stops[i] > lo */
	while (a < b)
	{
		int			m = (a + b) / 2;

		if (stops[m] > lo)
			b = m;
		else
			a = m + 1;
	}
	return a < n && stops[a] <= hi;
}

/*
 * SQL texts of the usage queries, for SUM or COUNT and with or without group
 * filters: $1 watermark, $2 event type, $3 subject, $4 from, $5 to,
 * $6 value path, $7 group_by, $8 filters, $9 meter, $10 hour buckets.
 */
static const char *
UsageSql(int which, bool count, bool filtered)
{
	/* negative values (corrections) are not usage: see ReadUsage */
	const char *value = count ? "1::numeric" : "greatest(metering._meter_number(e.data, $6), 0)";
	const char *filter = filtered ? "AND metering._meter_groups(e.data, $7) @> $8" : "";
	const char *rfilter = filtered ? "AND r.groups @> $8" : "";

	switch (which)
	{
		case 0:				/* events above the watermark */
			return psprintf("SELECT e.time, %s FROM metering.events e "
							"WHERE e.seq > $1 AND e.type = $2 AND e.subject = $3 AND e.time < $5 %s",
							value, filter);
		case 1:				/* rollup buckets */
			return psprintf("SELECT r.bucket, r.first_time, r.last_time, %s, r.min FROM metering.meter_rollups r "
							"WHERE r.meter = $9 AND r.subject = $3 AND r.bucket >= $4 AND r.bucket < $5 %s "
							"ORDER BY r.bucket",
							count ? "r.events::numeric" : "r.sum", rfilter);
		default:

			/*
			 * The events of split buckets, hour by hour: one small index scan
			 * each (OFFSET 0 keeps the planner from merging them into one scan
			 * of everything between the first and the last hour).
			 */
			return psprintf("SELECT x.time, x.v FROM unnest($10) h(hour), LATERAL ("
							"SELECT e.time, %s AS v FROM metering.events e "
							"WHERE e.seq <= $1 AND e.type = $2 AND e.subject = $3 "
							"AND e.time >= h.hour AND e.time < h.hour + interval '1 hour' "
							"AND e.time >= $4 AND e.time < $5 %s OFFSET 0) x",
							value, filter);
	}
}

static Portal
OpenUsage(Entitlement *ent, int which, TimestampTz from, TimestampTz to, ArrayType *buckets)
{
	static SPIPlanPtr plans[3][2][2];
	Oid			types[10] = {INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	JSONPATHOID, JSONBOID, JSONBOID, TEXTOID, TIMESTAMPTZARRAYOID};
	Datum		args[10];
	char		nulls[10];
	bool		filtered = ent->filters != (Datum) 0;
	SPIPlanPtr	plan = Prepare(&plans[which][ent->count][filtered],
							   UsageSql(which, ent->count, filtered), 10, types);

	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(ent->watermark);
	args[1] = ent->event_type;
	args[2] = ent->subject;
	args[3] = TimestampTzGetDatum(from);
	args[4] = TimestampTzGetDatum(to);
	args[5] = ent->value_path;
	nulls[5] = ent->value_path ? ' ' : 'n';
	args[6] = ent->group_by;
	args[7] = ent->filters;
	nulls[7] = filtered ? ' ' : 'n';
	args[8] = ent->meter;
	args[9] = buckets ? PointerGetDatum(buckets)
		: PointerGetDatum(construct_empty_array(TIMESTAMPTZOID));
	return SPI_cursor_open(NULL, plan, args, nulls, true);
}

/* Adds the rows (time, amount) of a usage cursor with from <= time < to. */
static void
ReadPoints(Portal portal, UsageList *l, TimestampTz from, TimestampTz to, TimestampTz *first)
{
	for (;;)
	{
		SPI_cursor_fetch(portal, true, 1000);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			bool		n1,
						n2;
			TimestampTz t = DatumGetTimestampTz(GetCol(i, 1, &n1));
			Datum		v = CopyCol(i, 2, &n2);

			if (first && t < *first)
				*first = t;
			if (n2 || t < from || t >= to)
				continue;
			AddPoint(l, t, DatumGetNumeric(v));
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
}

/*
 * The usage points of [from, to): whole rollup buckets where no stop falls
 * inside their events' span, the events of the others, and the tail.
 */
static void
ReadUsage(Entitlement *ent, TimestampTz from, TimestampTz to, TimestampTz *stops, int nstops,
		  UsageList *tail, UsageList *out)
{
	TimestampTz hour_from = from - (from % USECS_PER_HOUR + USECS_PER_HOUR) % USECS_PER_HOUR;
	Portal		portal = OpenUsage(ent, 1, hour_from, to, NULL);
	Datum	   *split = NULL;
	int			nsplit = 0;

	for (;;)
	{
		SPI_cursor_fetch(portal, true, 1000);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			bool		isnull;
			TimestampTz bucket = DatumGetTimestampTz(GetCol(i, 1, &isnull));
			TimestampTz first = DatumGetTimestampTz(GetCol(i, 2, &isnull));
			TimestampTz last = DatumGetTimestampTz(GetCol(i, 3, &isnull));
			bool		negative = false;
			Datum		amount;

			if (!ent->count)
			{
				Datum		min = GetCol(i, 5, &isnull);

				/* no minimum: no numeric value, or a rollup older than 0.2.0 */
				negative = isnull || BdCmp(DatumGetNumeric(min), int64_to_numeric(0)) < 0;
			}
			amount = CopyCol(i, 4, &isnull);
			if (last < from || first >= to || isnull)
				continue;

			/*
			 * A bucket is read event by event when an instant the engine stops
			 * at falls inside it, or when it holds a negative value: a
			 * correction is not usage (an entitlement counts only the
			 * positive values, so that the answer never depends on where
			 * negative and positive values happen to be netted).
			 */
			if (negative || first < from || StopInside(stops, nstops, first, last))
			{
				if (nsplit == 0 || DatumGetTimestampTz(split[nsplit - 1]) != bucket)
				{
					split = split ? repalloc(split, sizeof(Datum) * (nsplit + 1)) : palloc(sizeof(Datum));
					split[nsplit++] = TimestampTzGetDatum(bucket);
				}
				continue;
			}
			AddPoint(out, first, DatumGetNumeric(amount));
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);

	if (nsplit > 0)
	{
		ArrayType  *arr = construct_array(split, nsplit, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);

		ReadPoints(OpenUsage(ent, 2, Max(from, DatumGetTimestampTz(split[0])),
							 Min(to, DatumGetTimestampTz(split[nsplit - 1]) + USECS_PER_HOUR), arr),
				   out, from, to, NULL);
	}
	for (int i = 0; i < tail->n; i++)
		if (tail->points[i].time >= from && tail->points[i].time < to)
			AddPoint(out, tail->points[i].time, tail->points[i].amount);
	qsort(out->points, out->n, sizeof(UsagePoint), ComparePoints);
}

/* ---- snapshots ---- */

typedef struct EntSnapshot
{
	TimestampTz at;
	int64		inputs;			/* SnapshotInputs when it was written */
	Numeric		usage,
				grant_usage,
				overage;
	int			n;
	pg_uuid_t  *ids;
	Numeric    *balances;
} EntSnapshot;

/* The latest snapshot at or before `limit`, into the current context. */
static bool
LoadEntitlementSnapshot(Entitlement *ent, TimestampTz limit, EntSnapshot *snap)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {UUIDOID, TIMESTAMPTZOID};
	Datum		args[2] = {UUIDPGetDatum(&ent->id), TimestampTzGetDatum(limit)};
	bool		isnull;
	Datum	   *ids,
			   *bals;
	int			n1,
				n2;
	int			ret = SPI_execute_plan(Prepare(&plan,
											   "SELECT at, usage, grant_usage, overage, grant_ids, balances, inputs "
											   "FROM metering.entitlement_snapshots "
											   "WHERE entitlement_id = $1 AND at <= $2 ORDER BY at DESC LIMIT 1",
											   2, types),
									   args, NULL, true, 1);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the snapshots: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	snap->at = DatumGetTimestampTz(GetCol(0, 1, &isnull));
	snap->usage = DatumGetNumeric(CopyCol(0, 2, &isnull));
	snap->grant_usage = DatumGetNumeric(CopyCol(0, 3, &isnull));
	snap->overage = DatumGetNumeric(CopyCol(0, 4, &isnull));
	snap->inputs = DatumGetInt64(GetCol(0, 7, &isnull));
	deconstruct_array(DatumGetArrayTypePCopy(GetCol(0, 5, &isnull)), UUIDOID, UUID_LEN, false,
					  TYPALIGN_CHAR, &ids, NULL, &n1);
	deconstruct_array(DatumGetArrayTypePCopy(GetCol(0, 6, &isnull)), NUMERICOID, -1, false,
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
static bool
StartFromSnapshot(BdEngine *e, Entitlement *ent, EntSnapshot *snap)
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

/* ---- evaluation ---- */

static void
KeepObserver(void *arg)
{
	Observer   *o = (Observer *) arg;

	if (o && o->keep)
		o->keep(o);
}

/*
 * Runs the engine of a metered entitlement up to `to`, from the latest
 * usable snapshot at or before `start` (or from the beginning), stopping at
 * every cut and at the `obs` instants; `to` must not be before
 * measure_usage_from.  The observer sees every stop.
 *
 * The engine's state and arithmetic live in an arena (BdArena), so that the
 * memory does not grow with the cuts; the state it ends in is valid until
 * the caller's memory context goes.  The work is counted against the limits
 * of burndown.h (into the observer's budget), estimated first; the snapshot
 * writer, which bounds its own replay, is not held to a reader's budget.
 */
static void
Evaluate(Entitlement *ent, BdEngine *e, TimestampTz start, TimestampTz to,
		 TimestampTz *obs, int nobs, Observer *observer, bool writer)
{
	BdBudget	own = {0};
	BdBudget   *budget = observer ? observer->budget : &own;
	UsageList	tail = {0};
	UsageList	usage = {0};
	TimestampTz earliest_tail = DT_NOEND;
	EntSnapshot	snap;
	bool		from_snapshot = false;
	TimestampTz *stops;
	int			nstops = 0,
				cap;
	TimestampTz begin;
	int			next = 0;
	BdArena		arena;
	MemoryContext outer = CurrentMemoryContext;

	if (writer)
		budget->work = PG_INT64_MIN / 2;
	/* the tail: events not rolled up yet */
	ReadPoints(OpenUsage(ent, 0, ent->plan.measure_from, to, NULL), &tail,
			   ent->plan.measure_from, to, &earliest_tail);

	/* a snapshot no later than the earliest tail event (it may be late) */
	start = Min(start, Min(to, earliest_tail));
	if (start >= ent->plan.measure_from && LoadEntitlementSnapshot(ent, start, &snap))
		from_snapshot = StartFromSnapshot(e, ent, &snap);
	if (!from_snapshot)
		BdInit(e, &ent->plan, ent->grants, ent->ngrants);
	begin = e->state.at;

	/* where the engine stops: the cuts (a dry run), the observations, `to` */
	BdCheckCuts(e, to, budget, 2, nobs);
	cap = 64 + nobs;
	stops = palloc(sizeof(TimestampTz) * cap);
	BdArenaInit(&arena, outer);
	MemoryContextSwitchTo(arena.cxt);
	for (;;)
	{
		TimestampTz c = BdNextCut(e);

		if (c > to)
			break;
		BdCountCut(e, budget);
		BdAdvance(e, e->zero, c, NULL);
		if (nstops == cap)
		{
			cap *= 2;
			stops = repalloc_huge(stops, sizeof(TimestampTz) * cap);
		}
		stops[nstops++] = c;
		BdArenaKeep(&arena, e, NULL, NULL);
	}
	MemoryContextSwitchTo(outer);
	if (nstops + nobs + 1 > cap)
		stops = repalloc_huge(stops, sizeof(TimestampTz) * (nstops + nobs + 1));
	for (int i = 0; i < nobs; i++)
		if (obs[i] > begin && obs[i] <= to)
			stops[nstops++] = obs[i];
	if (to > begin)
		stops[nstops++] = to;
	qsort(stops, nstops, sizeof(TimestampTz), CompareTimes);
	{
		int			u = 0;

		for (int i = 0; i < nstops; i++)
			if (u == 0 || stops[u - 1] != stops[i])
				stops[u++] = stops[i];
		nstops = u;
	}
	/* the real run stops at each of them (the dry run's state is as cheap as the real one's start) */
	BdCheckWork(budget, (double) nstops * BdStopCost(e));

	/* the usage between the stops, then the real run */
	ReadUsage(ent, begin, to, stops, nstops, &tail, &usage);
	MemoryContextSwitchTo(arena.cxt);
	if (from_snapshot)
		StartFromSnapshot(e, ent, &snap);
	else
		BdInit(e, &ent->plan, ent->grants, ent->ngrants);
	if (observer && observer->after_cut)
		observer->after_cut(observer, e, NULL);
	for (int i = 0; i < nstops; i++)
	{
		Numeric		phase = e->zero;
		BdCut		cut;

		BdCountStop(e, budget);
		while (next < usage.n && usage.points[next].time < stops[i])
			phase = BdAdd(phase, usage.points[next++].amount);
		BdPhase(e, phase, stops[i]);
		if (observer && observer->before_cut)
			observer->before_cut(observer, e, phase);
		BdApplyCut(e, &cut);
		if (observer && observer->after_cut)
			observer->after_cut(observer, e, &cut);
		BdArenaKeep(&arena, e, KeepObserver, observer);
	}
	MemoryContextSwitchTo(outer);
}

/* ---- SQL functions ---- */

static bool
ParseUuid(text *t, pg_uuid_t *out)
{
	char	   *s = text_to_cstring(t);
	int			j = 0;

	for (int i = 0; s[i] && j < 32; i++)
	{
		char		c = s[i];
		int			v;

		if (c == '-' && (i == 8 || i == 13 || i == 18 || i == 23))
			continue;
		if (c >= '0' && c <= '9')
			v = c - '0';
		else if (c >= 'a' && c <= 'f')
			v = c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v = c - 'A' + 10;
		else
			return false;
		if (j % 2 == 0)
			out->data[j / 2] = v << 4;
		else
			out->data[j / 2] |= v;
		j++;
	}
	return j == 32 && strlen(s) == 36;
}

/*
 * The entitlement of (subject, feature) active at `at`; feature is a key or
 * an entitlement id.
 */
static bool
FindEntitlement(text *subject, text *feature, TimestampTz at, pg_uuid_t *out)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {TEXTOID, TEXTOID, UUIDOID, TIMESTAMPTZOID};
	pg_uuid_t	id;
	bool		is_id = ParseUuid(feature, &id);
	Datum		args[4] = {PointerGetDatum(subject), PointerGetDatum(feature),
	UUIDPGetDatum(&id), TimestampTzGetDatum(at)};
	char		nulls[4] = {' ', ' ', is_id ? ' ' : 'n', ' '};
	bool		isnull;
	int			ret = SPI_execute_plan(Prepare(&plan,
											   "SELECT id FROM metering.entitlements "
											   "WHERE subject = $1 AND (feature_key = $2 OR id = $3) "
											   "  AND CASE WHEN type = 'metered' THEN measure_usage_from ELSE created_at END <= $4 "
											   "  AND (deleted_at IS NULL OR $4 < deleted_at) "
											   "ORDER BY created_at DESC LIMIT 1", 4, types),
									   args, nulls, true, 1);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not look up the entitlement: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	*out = *DatumGetUUIDP(GetCol(0, 1, &isnull));
	return true;
}

/* the amounts of the entitlement's holds active at `at` */
static Numeric
Reserved(pg_uuid_t *id, TimestampTz at)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {UUIDOID, TIMESTAMPTZOID};
	Datum		args[2] = {UUIDPGetDatum(id), TimestampTzGetDatum(at)};
	bool		isnull;
	int			ret = SPI_execute_plan(Prepare(&plan,
											   "SELECT coalesce(sum(r.amount), 0) FROM metering.reservations r "
											   "WHERE r.entitlement_id = $1 AND r.expires_at > $2 AND r.created_at <= $2 "
											   "  AND (r.committed_at IS NULL OR r.committed_at > $2) "
											   "  AND (r.released_at IS NULL OR r.released_at > $2)", 2, types),
									   args, NULL, true, 1);

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the holds: %s", SPI_result_code_string(ret));
	return DatumGetNumeric(GetCol(0, 1, &isnull));
}

/*
 * metering.entitlement_value(subject, feature, at): has_access, balance,
 * usage, overage, total_available_grant_amount, start_of_period, config,
 * reserved (the holds active at `at`, src/sql/34_holds.sql) and available
 * (balance - reserved).
 */
PG_FUNCTION_INFO_V1(metering_entitlement_value);
Datum
metering_entitlement_value(PG_FUNCTION_ARGS)
{
	TimestampTz at = NowOr(fcinfo, 2, "at");
	TupleDesc	desc;
	Datum		values[9];
	bool		nulls[9];
	pg_uuid_t	id;
	Entitlement ent;
	MemoryContext caller = CurrentMemoryContext;
	HeapTuple	tuple;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "entitlement_value must return a row");
	memset(nulls, true, sizeof(nulls));
	values[0] = BoolGetDatum(false);
	nulls[0] = false;
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));

	SPI_connect();
	if (FindEntitlement(PG_GETARG_TEXT_PP(0), PG_GETARG_TEXT_PP(1), at, &id) &&
		LoadEntitlement(&ent, &id, CurrentMemoryContext, true) && EntActive(&ent, at))
	{
		values[0] = BoolGetDatum(true);
		if (ent.type == 's')
		{
			values[6] = ent.config;
			nulls[6] = false;
		}
		else if (ent.type == 'm')
		{
			BdEngine	e;
			Numeric		balance;

			Evaluate(&ent, &e, at, at, NULL, 0, NULL, false);
			balance = BdBalance(&e);
			values[0] = BoolGetDatum(ent.soft_limit || BdCmp(balance, e.zero) > 0);
			values[1] = NumericGetDatum(balance);
			values[2] = NumericGetDatum(e.state.usage);
			values[3] = NumericGetDatum(e.state.overage);
			values[4] = NumericGetDatum(BdAdd(e.state.grant_usage, balance));
			values[5] = TimestampTzGetDatum(e.state.period_start);
			values[7] = NumericGetDatum(Reserved(&id, at));
			values[8] = NumericGetDatum(BdSub(balance, DatumGetNumeric(values[7])));
			for (int i = 1; i <= 5; i++)
				nulls[i] = false;
			nulls[7] = nulls[8] = false;
		}
	}
	MemoryContextSwitchTo(caller);
	tuple = heap_form_tuple(BlessTupleDesc(desc), values, nulls);
	SPI_finish();
	PG_RETURN_DATUM(HeapTupleGetDatum(tuple));
}

static void
LoadMetered(Entitlement *ent, pg_uuid_t *id)
{
	if (!LoadEntitlement(ent, id, CurrentMemoryContext, true))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("entitlement %s does not exist",
						DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(id))))));
	if (ent->type != 'm')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("entitlement %s is not metered: it has no grants or balance",
						DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(id))))));
}

/* metering.grant_balances(entitlement, at): the grants active at `at`. */
PG_FUNCTION_INFO_V1(metering_grant_balances);
Datum
metering_grant_balances(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	pg_uuid_t  *id;
	TimestampTz at = NowOr(fcinfo, 1, "at");
	Entitlement ent;
	BdEngine	e;

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		return (Datum) 0;		/* no entitlement: no grants */
	id = PG_GETARG_UUID_P(0);
	SPI_connect();
	LoadMetered(&ent, id);
	if (EntActive(&ent, at))
	{
		Evaluate(&ent, &e, at, at, NULL, 0, NULL, false);
		for (int i = 0; i < e.ngrants; i++)
		{
			Datum		values[2];
			bool		nulls[2] = {false, false};

			if (!BdActive(&e.grants[i], at))
				continue;
			values[0] = UUIDPGetDatum(&e.grants[i].id);
			values[1] = NumericGetDatum(e.grants[i].balance);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	SPI_finish();
	PG_RETURN_NULL();
}

/* {"grant id": number, ...} of the grants active at `at`, or of all when `all` */
static Datum
GrantsJson(BdEngine *e, Numeric *per_grant, bool all)
{
	StringInfoData buf;
	bool		first = true;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (int i = 0; i < e->ngrants; i++)
	{
		Numeric		v = per_grant ? per_grant[i] : e->grants[i].balance;

		if (!all && !BdActive(&e->grants[i], e->state.at))
			continue;
		if (per_grant && BdCmp(v, e->zero) == 0)
			continue;
		appendStringInfo(&buf, "%s\"%s\": %s", first ? "" : ", ",
						 DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&e->grants[i].id))),
						 DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v))));
		first = false;
	}
	appendStringInfoChar(&buf, '}');
	return DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
}

/* The burndown history: segments between the cuts that change the burn. */
typedef struct HistoryObserver
{
	Observer	base;
	ReturnSetInfo *rsinfo;
	TimestampTz from;
	bool		open;			/* a segment is being collected */
	TimestampTz seg_start;
	Numeric		balance_at_start;
	Numeric		overage_at_start;
	Datum		balances_at_start;
	Numeric		usage;
	Numeric    *used_at_start;	/* of ngrants */
	int			ngrants;
	int64		rows;
} HistoryObserver;

/* The steps of one GrantsJson */
static void
CountJson(HistoryObserver *h, BdEngine *e)
{
	BdCountWork(h->base.budget, (int64) (e->ngrants + 1) * BD_ROW_GRANT_WORK);
}

static void
OpenSegment(HistoryObserver *h, BdEngine *e)
{
	CountJson(h, e);
	h->open = true;
	h->seg_start = e->state.at;
	h->balance_at_start = BdBalance(e);
	h->overage_at_start = e->state.overage;
	h->balances_at_start = GrantsJson(e, NULL, false);
	h->usage = e->zero;
	h->used_at_start = palloc(sizeof(Numeric) * Max(e->ngrants, 1));
	h->ngrants = e->ngrants;
	for (int i = 0; i < e->ngrants; i++)
		h->used_at_start[i] = e->grants[i].used;
}

static void
EmitSegment(HistoryObserver *h, TimestampTz end, Numeric balance_at_start, Numeric overage_at_start,
			Datum balances_at_start, Numeric usage, Numeric overage, Datum usages, int reasons)
{
	Datum		values[9];
	bool		nulls[9];
	Datum		terms[3];
	int			nterms = 0;

	BdCheckRows(++h->rows, "burndown history");
	memset(nulls, 0, sizeof(nulls));
	if (reasons & BD_END_PRIORITY)
		terms[nterms++] = CStringGetTextDatum("priority_change");
	if (reasons & BD_END_RECURRENCE)
		terms[nterms++] = CStringGetTextDatum("recurrence");
	if (reasons & BD_END_RESET)
		terms[nterms++] = CStringGetTextDatum("usage_reset");
	values[0] = TimestampTzGetDatum(h->seg_start);
	values[1] = TimestampTzGetDatum(end);
	values[2] = NumericGetDatum(balance_at_start);
	values[3] = NumericGetDatum(overage_at_start);
	values[4] = NumericGetDatum(usage);
	values[5] = NumericGetDatum(overage);
	values[6] = balances_at_start;
	values[7] = usages;
	values[8] = PointerGetDatum(construct_array(terms, nterms, TEXTOID, -1, false, TYPALIGN_INT));
	tuplestore_putvalues(h->rsinfo->setResult, h->rsinfo->setDesc, values, nulls);
}

static Datum
UsedSince(HistoryObserver *h, BdEngine *e)
{
	Numeric    *d = palloc(sizeof(Numeric) * Max(e->ngrants, 1));

	CountJson(h, e);
	for (int i = 0; i < e->ngrants; i++)
		d[i] = BdSub(e->grants[i].used, h->used_at_start[i]);
	return GrantsJson(e, d, true);
}

static void
HistoryBeforeCut(Observer *o, BdEngine *e, Numeric phase_usage)
{
	HistoryObserver *h = (HistoryObserver *) o;

	if (h->open)
		h->usage = BdAdd(h->usage, phase_usage);
}

static void
HistoryAfterCut(Observer *o, BdEngine *e, BdCut *cut)
{
	HistoryObserver *h = (HistoryObserver *) o;

	if (e->state.at < h->from)
		return;
	if (!h->open)
	{
		OpenSegment(h, e);
		return;
	}
	if (cut == NULL || cut->reasons == 0)
		return;
	/* the segment that ends here, with the overage before the cut */
	EmitSegment(h, e->state.at, h->balance_at_start, h->overage_at_start, h->balances_at_start,
				h->usage, cut->overage_before, UsedSince(h, e), cut->reasons);
	if (cut->reset)
	{
		/* the zero-length rollover segment [R, R]: the preserved overage burns */
		Numeric		after = e->zero;
		for (int i = 0; i < e->ngrants; i++)
			if (BdActive(&e->grants[i], e->state.at))
				after = BdAdd(after, cut->balances_after_rollover[i]);
		{
			BdGrant    *saved = palloc(sizeof(BdGrant) * Max(e->ngrants, 1));
			Datum		balances;

			/* the balances after rollover, as the segment's opening */
			CountJson(h, e);
			CountJson(h, e);
			memcpy(saved, e->grants, sizeof(BdGrant) * e->ngrants);
			for (int i = 0; i < e->ngrants; i++)
				e->grants[i].balance = cut->balances_after_rollover[i];
			balances = GrantsJson(e, NULL, false);
			memcpy(e->grants, saved, sizeof(BdGrant) * e->ngrants);
			h->seg_start = e->state.at;
			EmitSegment(h, e->state.at, after, cut->overage_before, balances, e->zero,
						e->state.overage, GrantsJson(e, cut->reset_burns, true), 0);
		}
	}
	OpenSegment(h, e);
}

/* What a segment being collected holds of the engine's memory */
static void
HistoryKeep(Observer *o)
{
	HistoryObserver *h = (HistoryObserver *) o;
	Numeric    *used;

	if (!h->open)
		return;
	h->balance_at_start = DatumGetNumericCopy(NumericGetDatum(h->balance_at_start));
	h->overage_at_start = DatumGetNumericCopy(NumericGetDatum(h->overage_at_start));
	h->usage = DatumGetNumericCopy(NumericGetDatum(h->usage));
	h->balances_at_start = datumCopy(h->balances_at_start, false, -1);
	used = palloc(sizeof(Numeric) * Max(h->ngrants, 1));
	for (int i = 0; i < h->ngrants; i++)
		used[i] = DatumGetNumericCopy(NumericGetDatum(h->used_at_start[i]));
	h->used_at_start = used;
}

static void
CheckRange(Entitlement *ent, TimestampTz *from, TimestampTz *to)
{
	if (TIMESTAMP_NOT_FINITE(*from) || TIMESTAMP_NOT_FINITE(*to))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("from_time and to_time must be finite times")));
	if (*from < ent->plan.measure_from)
		*from = ent->plan.measure_from;
	if (*to > ent->deleted_at)
		*to = ent->deleted_at;
}

/* metering.burndown_history(entitlement, from_time, to_time) */
PG_FUNCTION_INFO_V1(metering_burndown_history);
Datum
metering_burndown_history(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	pg_uuid_t  *id;
	Entitlement ent;
	BdEngine	e;
	HistoryObserver h;
	BdBudget	budget = {0};
	TimestampTz from,
				to;

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		return (Datum) 0;
	id = PG_GETARG_UUID_P(0);
	SPI_connect();
	LoadMetered(&ent, id);
	from = PG_ARGISNULL(1) ? ent.plan.measure_from : PG_GETARG_TIMESTAMPTZ(1);
	to = NowOr(fcinfo, 2, "to_time");
	CheckRange(&ent, &from, &to);
	if (from > to)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("from_time is after to_time")));
	/* a segment at least per cut in (from, to], each with its grants' JSON */
	{
		double		rows = BdEstimateCuts(&ent.plan, ent.grants, ent.ngrants, from, to);
		BdBudget	b = {0};

		BdCheckRows(rows, "burndown history");
		BdCheckWork(&b, rows * 2 * (ent.ngrants + 1) * BD_ROW_GRANT_WORK);
	}
	memset(&h, 0, sizeof(h));
	h.base.before_cut = HistoryBeforeCut;
	h.base.after_cut = HistoryAfterCut;
	h.base.keep = HistoryKeep;
	h.base.budget = &budget;
	h.rsinfo = rsinfo;
	h.from = from;
	Evaluate(&ent, &e, from, to, &from, 1, &h.base, false);
	if (h.open && to > h.seg_start)
		EmitSegment(&h, to, h.balance_at_start, h.overage_at_start, h.balances_at_start,
					h.usage, e.state.overage, UsedSince(&h, &e), 0);
	SPI_finish();
	PG_RETURN_NULL();
}

/* Window starts of a MINUTE/HOUR/DAY grid in a time zone, clipped to [from, to). */
static TimestampTz *
Windows(text *unit, text *zone, TimestampTz from, TimestampTz to, int *n)
{
	TimestampTz *w;
	int			cap = 64;
	int64		count = 0;
	TimestampTz t;
	char	   *u = text_to_cstring(unit);
	int64		step;

	/* past the grid point of t, but not past the next one (days are 23 to 25 hours) */
	if (strcmp(u, "hour") == 0)
		step = 90 * USECS_PER_MINUTE;
	else if (strcmp(u, "day") == 0)
		step = 36 * USECS_PER_HOUR;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("window_size must be HOUR or DAY, not \"%s\"", u)));
	/* at least one window per 90 minutes or 25 hours */
	BdCheckRows(floor(((double) to - (double) from) / (strcmp(u, "hour") == 0 ? 90 * USECS_PER_MINUTE : 25 * USECS_PER_HOUR)),
				"balance history");
	w = palloc(sizeof(TimestampTz) * cap);
	*n = 0;
	t = from;
	while (t < to)
	{
		TimestampTz base,
					next;

		CHECK_FOR_INTERRUPTS();
		BdCheckRows(++count, "balance history");
		if (*n == cap)
		{
			cap *= 2;
			w = repalloc_huge(w, sizeof(TimestampTz) * cap);
		}
		w[(*n)++] = t;
		/* the next grid point after t; the first window may start off the grid */
		base = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_trunc_zone, PointerGetDatum(unit),
													   TimestampTzGetDatum(t), PointerGetDatum(zone)));
		next = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_trunc_zone, PointerGetDatum(unit),
													   TimestampTzGetDatum(base + step), PointerGetDatum(zone)));
		if (next <= t)
			elog(ERROR, "the %s grid of time zone %s does not advance at %s", u, text_to_cstring(zone),
				 timestamptz_to_str(t));
		t = next;
	}
	return w;
}

typedef struct WindowObserver
{
	Observer	base;
	TimestampTz *starts;
	int			n;
	Numeric    *usage;			/* per window */
	Numeric    *balance;		/* at each start */
	Numeric    *overage;		/* at each start, and at `to` */
	int			cur;			/* the window the engine is in, -1 before */
	TimestampTz to;
	MemoryContext cxt;			/* of the arrays: the finished windows' numbers */
} WindowObserver;

/* The current window's usage is the only number it holds of the engine's memory */
static void
WindowKeep(Observer *o)
{
	WindowObserver *w = (WindowObserver *) o;

	if (w->cur >= 0)
		w->usage[w->cur] = DatumGetNumericCopy(NumericGetDatum(w->usage[w->cur]));
}

static void
WindowBeforeCut(Observer *o, BdEngine *e, Numeric phase_usage)
{
	WindowObserver *w = (WindowObserver *) o;

	if (w->cur >= 0)
		w->usage[w->cur] = BdAdd(w->usage[w->cur], phase_usage);
}

static void
WindowAfterCut(Observer *o, BdEngine *e, BdCut *cut)
{
	WindowObserver *w = (WindowObserver *) o;
	TimestampTz at = e->state.at;

	if (w->cur + 1 < w->n && w->starts[w->cur + 1] == at)
	{
		Numeric		balance = BdBalance(e);
		MemoryContext old = MemoryContextSwitchTo(w->cxt);

		if (w->cur >= 0)
			w->usage[w->cur] = DatumGetNumericCopy(NumericGetDatum(w->usage[w->cur]));
		w->cur++;
		w->balance[w->cur] = DatumGetNumericCopy(NumericGetDatum(balance));
		w->overage[w->cur] = DatumGetNumericCopy(NumericGetDatum(e->state.overage));
		MemoryContextSwitchTo(old);
	}
	if (at == w->to)
	{
		MemoryContext old = MemoryContextSwitchTo(w->cxt);

		w->overage[w->n] = DatumGetNumericCopy(NumericGetDatum(e->state.overage));
		MemoryContextSwitchTo(old);
	}
}

/* metering.balance_history(entitlement, from_time, to_time, window_size, window_time_zone) */
PG_FUNCTION_INFO_V1(metering_balance_history);
Datum
metering_balance_history(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	pg_uuid_t  *id;
	Entitlement ent;
	BdEngine	e;
	WindowObserver w;
	BdBudget	budget = {0};
	TimestampTz from,
				to;
	text	   *unit;
	text	   *zone;

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		return (Datum) 0;
	if (PG_ARGISNULL(3) || PG_ARGISNULL(4))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("window_size and window_time_zone are required")));
	id = PG_GETARG_UUID_P(0);
	unit = PG_GETARG_TEXT_PP(3);
	zone = PG_GETARG_TEXT_PP(4);
	SPI_connect();
	LoadMetered(&ent, id);
	from = PG_ARGISNULL(1) ? ent.plan.measure_from : PG_GETARG_TIMESTAMPTZ(1);
	to = NowOr(fcinfo, 2, "to_time");
	CheckRange(&ent, &from, &to);
	if (from > to)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("from_time is after to_time")));
	memset(&w, 0, sizeof(w));
	w.base.before_cut = WindowBeforeCut;
	w.base.after_cut = WindowAfterCut;
	w.base.keep = WindowKeep;
	w.base.budget = &budget;
	w.cxt = CurrentMemoryContext;
	w.starts = Windows(unit, zone, from, to, &w.n);
	w.usage = palloc(sizeof(Numeric) * (w.n + 1));
	w.balance = palloc(sizeof(Numeric) * (w.n + 1));
	w.overage = palloc(sizeof(Numeric) * (w.n + 1));
	for (int i = 0; i <= w.n; i++)
		w.usage[i] = w.balance[i] = w.overage[i] = int64_to_numeric(0);
	w.cur = -1;
	w.to = to;
	Evaluate(&ent, &e, from, to, w.starts, w.n, &w.base, false);
	/* the engine started exactly at the first window when that is its start */
	for (int i = 0; i < w.n; i++)
	{
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};

		values[0] = TimestampTzGetDatum(w.starts[i]);
		values[1] = TimestampTzGetDatum(i + 1 < w.n ? w.starts[i + 1] : to);
		values[2] = NumericGetDatum(w.usage[i]);
		values[3] = NumericGetDatum(w.balance[i]);
		values[4] = NumericGetDatum(w.overage[i + 1]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
	PG_RETURN_NULL();
}

/*
 * metering._period_start(entitlement, at): the start of the usage period
 * containing `at` (resets included), for the triggers' rules.
 */
PG_FUNCTION_INFO_V1(metering_period_start);
Datum
metering_period_start(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *id = PG_GETARG_UUID_P(0);
	TimestampTz at = PG_GETARG_TIMESTAMPTZ(1);
	Entitlement ent;
	BdEngine	e;
	TimestampTz result;

	SPI_connect();
	/* the periods depend on the resets only */
	if (!LoadEntitlement(&ent, id, CurrentMemoryContext, false) || ent.type != 'm')
	{
		SPI_finish();
		PG_RETURN_NULL();
	}
	BdRestore(&e, &ent.plan, ent.grants, ent.ngrants, Max(at, ent.plan.measure_from), int64_to_numeric(0),
			  int64_to_numeric(0), int64_to_numeric(0));
	result = PG_GETARG_BOOL(2) ? BdNextBoundary(&e) : e.state.period_start;
	SPI_finish();
	PG_RETURN_TIMESTAMPTZ(result);
}

static bool SnapshotOneLocked(pg_uuid_t *id, TimestampTz now);

/* Writes the snapshot of one entitlement at its last cut; true when it did. */
static bool
SnapshotOne(pg_uuid_t *id)
{
	static SPIPlanPtr lock_plan = NULL;
	Oid			types[1] = {UUIDOID};
	Datum		args[1] = {UUIDPGetDatum(id)};
	TimestampTz now = MeteringNow();
	bool		written;
	int			ret;

	/*
	 * Grant, void and reset writers of this entitlement wait for us; if one
	 * is at work, skip it rather than wait (its change drops the snapshots it
	 * reaches and queues the entitlement for the next refresh anyway).
	 */
	ret = SPI_execute_plan(Prepare(&lock_plan,
								   "SELECT 1 FROM metering.entitlements WHERE id = $1 FOR SHARE SKIP LOCKED",
								   1, types), args, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not lock the entitlement: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		static SPIPlanPtr queue_plan = NULL;

		ret = SPI_execute_plan(Prepare(&queue_plan,
									   "INSERT INTO metering.entitlement_snapshot_queue "
									   "SELECT $1 WHERE EXISTS (SELECT 1 FROM metering.entitlements WHERE id = $1) "
									   "ON CONFLICT DO NOTHING", 1, types), args, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "could not queue the entitlement: %s", SPI_result_code_string(ret));
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
	written = SnapshotOneLocked(id, now);
	PopActiveSnapshot();
	return written;
}

static bool
SnapshotOneLocked(pg_uuid_t *id, TimestampTz now)
{
	static SPIPlanPtr insert_plan = NULL;
	Entitlement ent;
	BdEngine	e;
	EntSnapshot snap;
	bool		from_snapshot = false;
	TimestampTz x;
	BdBudget	budget = {0};
	BdArena		arena;
	MemoryContext outer = CurrentMemoryContext;
	int			ret;

	if (!LoadEntitlement(&ent, id, CurrentMemoryContext, true) || ent.type != 'm' ||
		now < ent.plan.measure_from || now >= ent.deleted_at)
		return false;

	/* the last cut at or before now */
	if (LoadEntitlementSnapshot(&ent, now, &snap))
		from_snapshot = StartFromSnapshot(&e, &ent, &snap);
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
	if (x == e.plan->measure_from || (from_snapshot && x <= snap.at))
		return false;

	/* the writer: bounded by the loop above, not by a reader's budget */
	Evaluate(&ent, &e, x, x, NULL, 0, NULL, true);
	{
		Oid			itypes[8] = {UUIDOID, TIMESTAMPTZOID, NUMERICOID, NUMERICOID, NUMERICOID,
		UUIDARRAYOID, NUMERICARRAYOID, INT8OID};
		Datum		iargs[8];
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
		ret = SPI_execute_plan(Prepare(&insert_plan,
									   "INSERT INTO metering.entitlement_snapshots AS s "
									   "(entitlement_id, at, usage, grant_usage, overage, grant_ids, balances, inputs) "
									   "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
									   "ON CONFLICT (entitlement_id, at) DO UPDATE SET usage = EXCLUDED.usage, "
									   "grant_usage = EXCLUDED.grant_usage, overage = EXCLUDED.overage, "
									   "grant_ids = EXCLUDED.grant_ids, balances = EXCLUDED.balances, "
									   "inputs = EXCLUDED.inputs, created_at = EXCLUDED.created_at "
									   "WHERE (s.usage, s.grant_usage, s.overage, s.grant_ids, s.balances, s.inputs) "
									   "IS DISTINCT FROM (EXCLUDED.usage, EXCLUDED.grant_usage, EXCLUDED.overage, "
									   "EXCLUDED.grant_ids, EXCLUDED.balances, EXCLUDED.inputs)",
									   8, itypes), iargs, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "could not write the snapshot: %s", SPI_result_code_string(ret));
	}
	return SPI_processed > 0;
}

/* Writes the snapshots of the entitlements in SPI_tuptable (ids in column 1). */
static int64
SnapshotFound(void)
{
	int			n = (int) SPI_processed;
	pg_uuid_t  *ids = palloc(sizeof(pg_uuid_t) * Max(n, 1));
	MemoryContext per_entitlement;
	MemoryContext old;
	int64		written = 0;

	for (int i = 0; i < n; i++)
	{
		bool		isnull;

		ids[i] = *DatumGetUUIDP(GetCol(i, 1, &isnull));
	}
	SPI_freetuptable(SPI_tuptable);

	per_entitlement = AllocSetContextCreate(CurrentMemoryContext, "metering snapshot",
											ALLOCSET_DEFAULT_SIZES);
	for (int i = 0; i < n; i++)
	{
		/* a connection of its own, so that its query results go with it */
		old = MemoryContextSwitchTo(per_entitlement);
		SPI_connect();
		if (SnapshotOne(&ids[i]))
			written++;
		SPI_finish();
		MemoryContextSwitchTo(old);
		MemoryContextReset(per_entitlement);
	}
	MemoryContextDelete(per_entitlement);
	return written;
}

/*
 * metering._snapshot_meter(meter, from_seq, to_seq): after a refresh rolled
 * up a meter's events (from_seq, to_seq], drops the snapshots those events
 * reach and writes new ones for their subjects' entitlements.
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
		Datum		subjects = CopyCol(0, 1, &null1);
		Datum		since = CopyCol(0, 2, &null2);
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
		ret = SPI_execute_with_args("SELECT n.id FROM metering.entitlements n "
									"JOIN metering.features f ON f.id = n.feature_id AND f.meter_slug = $1 "
									"WHERE n.type = 'metered' AND n.deleted_at IS NULL AND n.subject = ANY ($2) "
									"  AND $3 IS NOT NULL ORDER BY n.id",
									3, ftypes, fargs, NULL, false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not find the entitlements of the meter: %s", SPI_result_code_string(ret));
	}
	written = SnapshotFound();
	SPI_finish();
	PG_RETURN_INT64(written);
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

	SPI_connect();
	ret = SPI_execute("DELETE FROM metering.entitlement_snapshot_queue RETURNING entitlement_id", false, 0);
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

	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("metering.refresh_snapshots must run at READ COMMITTED"),
				 errhint("Call it in its own READ COMMITTED transaction.")));
	SPI_connect();

	/*
	 * Refreshes and event deletions of the features' meters wait for us, and
	 * we for them: they drop the snapshots their events reach, and must see
	 * ours to do so.
	 */
	ret = SPI_execute("SELECT 1 FROM metering.meter_rollup_state s "
					  "WHERE s.meter IN (SELECT f.meter_slug FROM metering.features f) "
					  "ORDER BY s.meter FOR SHARE", false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not lock the meters: %s", SPI_result_code_string(ret));
	CommandCounterIncrement();
	ret = SPI_execute_with_args("SELECT n.id FROM metering.entitlements n "
								"WHERE n.type = 'metered' AND n.deleted_at IS NULL "
								"  AND ($1 IS NULL OR n.id = $1) ORDER BY n.id",
								1, types, args, nulls, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not find the entitlements: %s", SPI_result_code_string(ret));
	written = SnapshotFound();
	SPI_finish();
	PG_RETURN_INT64(written);
}

/*
 * metering._unchanged_since_snapshot(entitlement): the rules of grants and
 * resets (no retroactive grant, resets in order) are checked against what
 * the transaction sees.  At READ COMMITTED each statement sees the latest
 * commits, and the entitlement's row lock makes writers take turns.  At
 * REPEATABLE READ a writer that committed after our snapshot is invisible
 * to us even once we hold the lock (it only locked the row, it did not
 * update it), so compare what the snapshot sees with what is committed now,
 * and fail the way PostgreSQL fails a concurrent update (40001).
 */
PG_FUNCTION_INFO_V1(metering_unchanged_since_snapshot);
Datum
metering_unchanged_since_snapshot(PG_FUNCTION_ARGS)
{
	static const char *sql =
	"SELECT coalesce((SELECT string_agg(g.id::text || '/' || coalesce(g.voided_at::text, '') || '/' "
	"                                   || coalesce(g.deleted_at::text, ''), ',' ORDER BY g.id) "
	"                   FROM metering.grants g WHERE g.entitlement_id = $1), '') || '|' || "
	"       (SELECT coalesce(string_agg(r.effective_at::text, ',' ORDER BY r.effective_at), '') "
	"          FROM metering.resets r WHERE r.entitlement_id = $1)";
	Oid			types[1] = {UUIDOID};
	Datum		args[1] = {PG_GETARG_DATUM(0)};

	MeteringErrorIfChangedSinceSnapshot(sql, 1, types, args, "the entitlement's grants or resets");
	PG_RETURN_BOOL(true);
}
