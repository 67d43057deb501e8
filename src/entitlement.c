/*
 * entitlement.c: the SQL functions over entitlements: entitlement_value,
 * grant_balances, burndown_history, balance_history, _period_start and
 * _unchanged_since_snapshot.  What they share is in entitlement.h.
 */
#include "postgres.h"

#include <math.h>

#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/timestamp.h"

#include "calendar.h"
#include "entitlement.h"
#include "metering.h"

bool
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

	if (!MeteringTimeInRange(t))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a finite time in the years 1 to 9999", name)));
	return t;
}

/*
 * The entitlement of (subject, feature) active at `at`; feature is a key or
 * an entitlement id.  feature_id, when given, receives its feature's id (in
 * the SPI upper context).
 */
bool
EntFind(text *subject, text *feature, TimestampTz at, pg_uuid_t *out, Datum *feature_id)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {TEXTOID, TEXTOID, UUIDOID, TIMESTAMPTZOID};
	pg_uuid_t	id;
	bool		is_id = MeteringParseUuid(VARDATA_ANY(feature), VARSIZE_ANY_EXHDR(feature), &id);
	Datum		args[4] = {PointerGetDatum(subject), PointerGetDatum(feature),
	UUIDPGetDatum(&id), TimestampTzGetDatum(at)};
	char		nulls[4] = {' ', ' ', is_id ? ' ' : 'n', ' '};
	bool		isnull;
	int			ret;

	MeteringRequireNotInShardQuery("entitlement_value");
	ret = SPI_execute_plan(MeteringPrepare(&plan,
											   "SELECT id, feature_id FROM metering.entitlements "
											   "WHERE subject = $1 AND (feature_key = $2 OR id = $3) "
											   "  AND CASE WHEN type = 'metered' THEN measure_usage_from ELSE created_at END <= $4 "
											   "  AND (deleted_at IS NULL OR $4 < deleted_at) "
											   "ORDER BY created_at DESC LIMIT 1", 4, types),
									   args, nulls, true, 1);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not look up the entitlement: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		/* a Citus worker holds no entitlements: refuse rather than answer "none" */
		MeteringRequireCoordinator("entitlement_value");
		return false;
	}
	*out = *DatumGetUUIDP(EntGetCol(0, 1, &isnull));
	if (feature_id)
		*feature_id = SPI_datumTransfer(EntGetCol(0, 2, &isnull), false, 16);
	return true;
}

/*
 * The amounts of the entitlement's holds made by `at` that are still open
 * after `since` (by reservations_entitlement_end; since = at: the holds
 * active at `at`).  The end is written without COALESCE, which row security
 * counts as leaky: the condition stays the index's for every role.
 */
static Numeric
Reserved(Entitlement *ent, TimestampTz at, TimestampTz since)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {UUIDOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TEXTOID};
	Datum		args[4] = {UUIDPGetDatum(&ent->id), TimestampTzGetDatum(at), TimestampTzGetDatum(since), ent->subject};
	bool		isnull;
	/* (planned once: planned for each instant, it cost more than it reads) */
	int			ret = MeteringExecuteByIndex(MeteringPrepareGeneric(&plan,
																	"SELECT coalesce(sum(r.amount), 0) FROM metering.reservations r "
																	"WHERE r.entitlement_id = $1 AND r.subject = $4 AND r.created_at <= $2 "
																	"  AND least(r.expires_at, CASE WHEN r.committed_at IS NOT NULL THEN r.committed_at "
																	"                              WHEN r.released_at IS NOT NULL THEN r.released_at "
																	"                              ELSE 'infinity' END) > $3",
																	4, types),
											 args, NULL, true, 1);

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the holds: %s", SPI_result_code_string(ret));
	return DatumGetNumeric(EntGetCol(0, 1, &isnull));
}

/*
 * What entitlement_value answers for a metered entitlement active at `at`,
 * counting the holds made by `at` and still open after `since` (see
 * Reserved).
 */
void
EntValueAt(Entitlement *ent, TimestampTz at, TimestampTz since, EntValue *v)
{
	BdEngine	e;

	EntEvaluate(ent, &e, at, at, NULL, 0, NULL, false);
	v->balance = BdBalance(&e);
	v->has_access = ent->soft_limit || NumCmp(v->balance, e.zero) > 0;
	v->usage = e.state.usage;
	v->overage = e.state.overage;
	v->total = NumAdd(e.state.grant_usage, v->balance);
	v->period_start = e.state.period_start;
	v->reserved = Reserved(ent, at, since);
	v->available = NumSub(v->balance, v->reserved);
}

/*
 * The row of entitlement_value for the entitlement `id` (found: it was
 * found) at `at`, with the holds still open after `since`; in an SPI
 * connection, which it ends.
 */
static Datum
ValueRow(FunctionCallInfo fcinfo, MemoryContext caller, bool found, pg_uuid_t *id, text *subject, TimestampTz at,
		 TimestampTz since)
{
	TupleDesc	desc;
	Datum		values[9];
	bool		nulls[9];
	Entitlement ent;
	HeapTuple	tuple;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "entitlement_value must return a row");
	MeteringRequireSqlCurrent("entitlement_value");
	memset(nulls, true, sizeof(nulls));
	values[0] = BoolGetDatum(false);
	nulls[0] = false;
	if (found && EntLoadEntitlement(&ent, id, subject, CurrentMemoryContext, true) && EntActive(&ent, at))
	{
		values[0] = BoolGetDatum(true);
		if (ent.type == 's')
		{
			values[6] = ent.config;
			nulls[6] = false;
		}
		else if (ent.type == 'm')
		{
			EntValue	v;

			EntValueAt(&ent, at, since, &v);
			values[0] = BoolGetDatum(v.has_access);
			values[1] = NumericGetDatum(v.balance);
			values[2] = NumericGetDatum(v.usage);
			values[3] = NumericGetDatum(v.overage);
			values[4] = NumericGetDatum(v.total);
			values[5] = TimestampTzGetDatum(v.period_start);
			values[7] = NumericGetDatum(v.reserved);
			values[8] = NumericGetDatum(v.available);
			for (int i = 1; i <= 5; i++)
				nulls[i] = false;
			nulls[7] = nulls[8] = false;
		}
	}
	MemoryContextSwitchTo(caller);
	tuple = heap_form_tuple(BlessTupleDesc(desc), values, nulls);
	SPI_finish();
	return HeapTupleGetDatum(tuple);
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
	MemoryContext caller = CurrentMemoryContext;
	pg_uuid_t	id;
	bool		found;

	SPI_connect();
	found = !PG_ARGISNULL(0) && !PG_ARGISNULL(1) && EntFind(PG_GETARG_TEXT_PP(0), PG_GETARG_TEXT_PP(1), at, &id, NULL);
	PG_RETURN_DATUM(ValueRow(fcinfo, caller, found, &id, found ? PG_GETARG_TEXT_PP(0) : NULL, at, at));
}

/*
 * metering._gate_value(entitlement, subject, at, since): entitlement_value's row for
 * the usage gate (src/sql/34_holds.sql), which reads at its check instant
 * and counts every hold still open after its now: a hold made now counts
 * even when the check reads ahead of its expiry (usage dated ahead).
 */
PG_FUNCTION_INFO_V1(metering_gate_value);
Datum
metering_gate_value(PG_FUNCTION_ARGS)
{
	MemoryContext caller = CurrentMemoryContext;
	TimestampTz at,
				since;

	/* (a declaration of another version would be read wrong) */
	if (PG_NARGS() != 4)
		elog(ERROR, "_gate_value takes an entitlement, its subject and two instants");
	at = NowOr(fcinfo, 2, "at");
	since = NowOr(fcinfo, 3, "since");
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("_gate_value: entitlement and subject must not be NULL")));
	SPI_connect();
	PG_RETURN_DATUM(ValueRow(fcinfo, caller, true, PG_GETARG_UUID_P(0), PG_GETARG_TEXT_PP(1), at, Min(at, since)));
}

void
EntErrorNoSuch(Datum id)
{
	ereport(ERROR,
			(errcode(ERRCODE_NO_DATA_FOUND),
			 errmsg("entitlement %s does not exist", DatumGetCString(DirectFunctionCall1(uuid_out, id)))));
}

static void
LoadMetered(Entitlement *ent, pg_uuid_t *id)
{
	MeteringRequireSqlCurrent("an entitlement's balances and histories");
	MeteringRequireNotInShardQuery("an entitlement's balances and histories");
	if (!EntLoadEntitlement(ent, id, NULL, CurrentMemoryContext, true))
	{
		MeteringRequireCoordinator("an entitlement's balances and histories");
		EntErrorNoSuch(UUIDPGetDatum(id));
	}
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
		EntEvaluate(&ent, &e, at, at, NULL, 0, NULL, false);
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
		if (per_grant && NumCmp(v, e->zero) == 0)
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
		d[i] = NumSub(e->grants[i].used, h->used_at_start[i]);
	return GrantsJson(e, d, true);
}

static void
HistoryBeforeCut(Observer *o, BdEngine *e, Numeric phase_usage)
{
	HistoryObserver *h = (HistoryObserver *) o;

	if (h->open)
		h->usage = NumAdd(h->usage, phase_usage);
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
				after = NumAdd(after, cut->balances_after_rollover[i]);
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
	EntEvaluate(&ent, &e, from, to, &from, 1, &h.base, false);
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
		w->usage[w->cur] = NumAdd(w->usage[w->cur], phase_usage);
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
	EntEvaluate(&ent, &e, from, to, w.starts, w.n, &w.base, false);
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
 * metering._period_bound(entitlement, subject, at, upper): the start (or end) of the usage period
 * containing `at` (resets included), for the triggers' rules.
 */
/* The start (or with upper, the exclusive end) of the metered entitlement's period containing `at`. */
TimestampTz
EntPeriodBound(Entitlement *ent, TimestampTz at, bool upper)
{
	BdEngine	e;

	/* (the periods depend on the plan only: the grants stay untouched for a later evaluation) */
	BdRestore(&e, &ent->plan, NULL, 0, Max(at, ent->plan.measure_from), int64_to_numeric(0),
			  int64_to_numeric(0), int64_to_numeric(0));
	return upper ? BdNextBoundary(&e) : e.state.period_start;
}

PG_FUNCTION_INFO_V1(metering_period_start);
Datum
metering_period_start(PG_FUNCTION_ARGS)
{
	/* (the SQL of 0.2.0, which the library serves until the update, gives no subject) */
	int			old = PG_NARGS() == 3 ? 1 : 0;
	pg_uuid_t  *id = PG_GETARG_UUID_P(0);
	TimestampTz at = PG_GETARG_TIMESTAMPTZ(2 - old);
	bool		upper = PG_GETARG_BOOL(3 - old);
	Entitlement ent;
	TimestampTz result;

	SPI_connect();
	/* the periods depend on the resets only */
	if (!EntLoadEntitlement(&ent, id, old ? NULL : PG_GETARG_TEXT_PP(1), CurrentMemoryContext, false) || ent.type != 'm')
	{
		SPI_finish();
		PG_RETURN_NULL();
	}
	result = EntPeriodBound(&ent, at, upper);
	SPI_finish();
	PG_RETURN_TIMESTAMPTZ(result);
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
void
EntCheckUnchanged(Datum id, Datum subject)
{
#define CHANGES_SQL(grant_condition, reset_condition) \
	"SELECT coalesce((SELECT string_agg(g.id::text || '/' || coalesce(g.voided_at::text, '') || '/' " \
	"                                   || coalesce(g.deleted_at::text, ''), ',' ORDER BY g.id) " \
	"                   FROM metering.grants g WHERE g.entitlement_id = $1 " grant_condition "), '') || '|' || " \
	"       (SELECT coalesce(string_agg(r.effective_at::text, ',' ORDER BY r.effective_at), '') " \
	"          FROM metering.resets r WHERE r.entitlement_id = $1 " reset_condition ")"
	/* (the tables of 0.2.0, which the library serves until the update, have no subject column) */
	static const char *const sql[2] = {CHANGES_SQL("", ""), CHANGES_SQL("AND g.subject = $2", "AND r.subject = $2")};
	bool		by_subject = MeteringSqlCurrent();
	Oid			types[2] = {UUIDOID, TEXTOID};
	Datum		args[2] = {id, subject};

	MeteringErrorIfChangedSinceSnapshot(sql[by_subject], by_subject ? 2 : 1, types, args,
										"the entitlement's grants or resets");
}

PG_FUNCTION_INFO_V1(metering_unchanged_since_snapshot);
Datum
metering_unchanged_since_snapshot(PG_FUNCTION_ARGS)
{
	Datum		subject;

	/* (the SQL of 0.2.0, which the library serves until the update, gives no subject) */
	if (PG_NARGS() == 2)
		subject = PG_GETARG_DATUM(1);
	else
	{
		bool		isnull;

		SPI_connect();
		if (!EntReadRow(PG_GETARG_DATUM(0), (Datum) 0, false))
		{
			SPI_finish();
			PG_RETURN_BOOL(true);
		}
		subject = SPI_datumTransfer(EntGetCol(0, 2, &isnull), false, -1);
		SPI_finish();
	}
	EntCheckUnchanged(PG_GETARG_DATUM(0), subject);
	PG_RETURN_BOOL(true);
}
