/*
 * burndown_agg.c: the aggregate metering.burndown(at, amount, grants
 * [, until]): usage rows, in time order, burnt through a set of grants given
 * as JSON; the result is each grant's balance and the overage.
 *
 * It is the engine of entitlements without usage periods: grants activate,
 * expire and recur, usage burns in burn order.  A row costs a comparison
 * with the next cut and an addition; integer amounts are added in int64
 * (checked for overflow), others as numeric, so the result is exact.
 */
#include "postgres.h"

#include "common/int.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "burndown.h"
#include "calendar.h"
#include "metering.h"
#include "timeparse.h"

typedef struct BurndownState
{
	BdPlan		plan;
	BdEngine	engine;
	BdGrant    *grants;
	int			ngrants;
	bool		started;
	TimestampTz until;			/* rows at or after it are ignored */
	TimestampTz last;			/* the latest row */
	TimestampTz next_cut;
	BdBudget	budget;			/* cuts and steps so far (BdCountCut) */
	BdArena		arena;			/* the engine's state and arithmetic */
	/* the usage of the current phase: an int64 part and a numeric part */
	int64		int_acc;
	Numeric		num_acc;		/* in the aggregate context, or NULL */
	MemoryContext cxt;
} BurndownState;

static void
BadGrants(const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("burndown grants: %s", what),
			 errhint("Pass a JSON array of objects with amount, effective_at and optionally id, priority, expires_at, recurrence, recurrence_anchor.")));
}

static JsonbValue *
Field(JsonbContainer *obj, const char *name, JsonbValue *buf)
{
	JsonbValue *v = getKeyJsonValueFromContainer(obj, name, strlen(name), buf);

	return v && v->type != jbvNull ? v : NULL;
}

static char *
FieldText(JsonbContainer *obj, const char *name, JsonbValue *buf)
{
	JsonbValue *v = Field(obj, name, buf);

	if (v == NULL)
		return NULL;
	if (v->type != jbvString)
		BadGrants(psprintf("\"%s\" must be a string", name));
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/* An RFC 3339 time (with an offset, so the answer never depends on the session). */
static TimestampTz
GrantTime(const char *s, int i, const char *name)
{
	TimestampTz t;

	if (!ParseRfc3339(s, strlen(s), &t))
		BadGrants(psprintf("grant %d: \"%s\" must be an RFC 3339 time such as 2024-01-01T00:00:00Z", i, name));
	return t;
}

/* A uuid in its canonical 8-4-4-4-12 spelling. */
static pg_uuid_t
GrantId(const char *s, int i)
{
	pg_uuid_t	id;

	if (!MeteringParseUuid(s, strlen(s), &id))
		BadGrants(psprintf("grant %d: \"id\" must be a uuid", i));
	return id;
}

/*
 * An interval; interval_in's own error (it holds no resources, so it can be
 * caught) becomes one that names the grant and the field.
 */
static Interval
GrantInterval(const char *s, int i)
{
	MemoryContext cxt = CurrentMemoryContext;
	Interval   *volatile iv = NULL;

	PG_TRY();
	{
		iv = DatumGetIntervalP(DirectFunctionCall3(interval_in, CStringGetDatum(s),
												   ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		iv = NULL;
	}
	PG_END_TRY();
	/* as the SQL side's interval '1000 years' (PostgreSQL counts a month as 30 days there) */
	if (iv == NULL || !IntervalIsAtLeast(iv, USECS_PER_HOUR) ||
		(double) iv->month * 30 * USECS_PER_DAY + (double) iv->day * USECS_PER_DAY + (double) iv->time >
		1000.0 * 360 * USECS_PER_DAY)
		BadGrants(psprintf("grant %d: \"recurrence\" must be an interval from an hour to 1000 years", i));
	return *iv;
}

/* Reads the grant set, in the aggregate context. */
static void
ParseGrants(BurndownState *st, Jsonb *grants)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			i = 0;

	if (!JB_ROOT_IS_ARRAY(grants) || JB_ROOT_IS_SCALAR(grants))
		BadGrants("must be a JSON array");
	st->ngrants = JB_ROOT_COUNT(grants);
	st->grants = palloc0(sizeof(BdGrant) * Max(st->ngrants, 1));
	it = JsonbIteratorInit(&grants->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		BdGrant    *g;
		JsonbContainer *obj;
		JsonbValue	buf;
		JsonbValue *f;
		char	   *s;

		if (tok != WJB_ELEM)
			continue;
		if (v.type != jbvBinary || !JsonContainerIsObject(v.val.binary.data))
			BadGrants(psprintf("grant %d is not an object", i));
		obj = v.val.binary.data;
		g = &st->grants[i];
		if ((s = FieldText(obj, "id", &buf)) != NULL)
			g->id = GrantId(s, i);
		else
		{
			/* no id: the grant's position, so that results can name it */
			memset(g->id.data, 0, UUID_LEN);
			for (int b = 0; b < 4; b++)
				g->id.data[UUID_LEN - 1 - b] = (uint8) ((i >> (8 * b)) & 0xFF);
		}
		f = Field(obj, "amount", &buf);
		if (f == NULL || f->type != jbvNumeric ||
			DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(f->val.numeric),
											  NumericGetDatum(int64_to_numeric(0)))) <= 0)
			BadGrants(psprintf("grant %d needs a positive \"amount\"", i));
		g->amount = DatumGetNumericCopy(NumericGetDatum(f->val.numeric));
		f = Field(obj, "priority", &buf);
		g->priority = 0;
		if (f != NULL)
		{
			bool		error = false;

			if (f->type == jbvNumeric)
				g->priority = numeric_int4_opt_error(f->val.numeric, &error);
			if (f->type != jbvNumeric || error || g->priority < 0 || g->priority > 255 ||
				DatumGetInt32(DirectFunctionCall1(numeric_scale, NumericGetDatum(f->val.numeric))) != 0)
				BadGrants(psprintf("grant %d: \"priority\" must be an integer from 0 to 255", i));
		}
		if ((s = FieldText(obj, "effective_at", &buf)) == NULL)
			BadGrants(psprintf("grant %d needs \"effective_at\"", i));
		g->effective_at = GrantTime(s, i, "effective_at");
		s = FieldText(obj, "expires_at", &buf);
		g->expires_at = s ? GrantTime(s, i, "expires_at") : DT_NOEND;
		g->end = g->expires_at;
		if ((s = FieldText(obj, "recurrence", &buf)) != NULL)
		{
			g->recurring = true;
			g->recurrence = GrantInterval(s, i);
			s = FieldText(obj, "recurrence_anchor", &buf);
			g->recurrence_anchor = s ? GrantTime(s, i, "recurrence_anchor") : g->effective_at;
		}
		else if (Field(obj, "recurrence_anchor", &buf) != NULL)
			BadGrants(psprintf("grant %d: \"recurrence_anchor\" needs a \"recurrence\"", i));
		g->min_rollover = g->max_rollover = int64_to_numeric(0);
		g->created_at = 0;
		for (int j = 0; j < i; j++)
			if (memcmp(st->grants[j].id.data, g->id.data, UUID_LEN) == 0)
				BadGrants(psprintf("grant %d has the id of grant %d (grants without an id are named by their position)", i, j));
		i++;
	}
}

static Numeric
PhaseUsage(BurndownState *st)
{
	Numeric		u = int64_to_numeric(st->int_acc);

	if (st->num_acc)
		u = NumAdd(u, st->num_acc);
	return u;
}

static void
ResetPhase(BurndownState *st)
{
	st->int_acc = 0;
	if (st->num_acc)
		pfree(st->num_acc);
	st->num_acc = NULL;
}

/* Burns the collected usage up to `to` and applies the cut there. */
static void
CloseTo(BurndownState *st, TimestampTz to, bool cut)
{
	MemoryContext old = MemoryContextSwitchTo(st->arena.cxt);

	BdPhase(&st->engine, PhaseUsage(st), to);
	if (cut)
		BdApplyCut(&st->engine, NULL);
	ResetPhase(st);
	/* the phase's garbage goes; the state survives (memory does not grow with cuts) */
	BdArenaKeep(&st->arena, &st->engine, NULL, NULL);
	MemoryContextSwitchTo(old);
}

static void
Accumulate(BurndownState *st, Numeric amount)
{
	bool		error = false;
	int32		i;

	if (numeric_is_nan(amount) || numeric_is_inf(amount))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("burndown usage must be a finite number")));
	/*
	 * Integers in int32 range: add as int64.  A negative amount (a
	 * correction) is not usage, as for entitlements.
	 */
	if (DatumGetInt32(DirectFunctionCall1(numeric_scale, NumericGetDatum(amount))) == 0)
	{
		int64		sum;

		i = numeric_int4_opt_error(amount, &error);
		if (!error && i < 0)
			return;
		/* on overflow the accumulator stays as it was and the amount goes to num_acc */
		if (!error && !pg_add_s64_overflow(st->int_acc, (int64) i, &sum))
		{
			st->int_acc = sum;
			return;
		}
	}
	if (NumCmp(amount, st->engine.zero) < 0)
		return;
	{
		MemoryContext old = MemoryContextSwitchTo(st->cxt);
		Numeric		sum = st->num_acc ? NumAdd(st->num_acc, amount)
			: DatumGetNumericCopy(NumericGetDatum(amount));

		if (st->num_acc)
			pfree(st->num_acc);
		st->num_acc = sum;
		MemoryContextSwitchTo(old);
	}
}

/* metering._burndown_trans(state, at, amount, grants [, until]) */
PG_FUNCTION_INFO_V1(metering_burndown_trans);
Datum
metering_burndown_trans(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	BurndownState *st;
	TimestampTz at;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "metering._burndown_trans called in a non-aggregate context");
	st = PG_ARGISNULL(0) ? NULL : (BurndownState *) PG_GETARG_POINTER(0);
	if (st == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		if (PG_ARGISNULL(3))
			BadGrants("must not be NULL");
		st = palloc0(sizeof(BurndownState));
		st->cxt = aggcxt;
		ParseGrants(st, PG_GETARG_JSONB_P_COPY(3));
		st->until = (PG_NARGS() > 4 && !PG_ARGISNULL(4)) ? PG_GETARG_TIMESTAMPTZ(4) : DT_NOEND;
		MemoryContextSwitchTo(old);
	}
	if (PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_POINTER(st);
	at = PG_GETARG_TIMESTAMPTZ(1);
	if (at >= st->until)
		PG_RETURN_POINTER(st);

	if (!st->started)
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);
		TimestampTz start = at;

		for (int i = 0; i < st->ngrants; i++)
			start = Min(start, st->grants[i].effective_at);
		st->plan.periods = false;
		st->plan.measure_from = start;
		st->plan.anchor = start;
		BdInit(&st->engine, &st->plan, st->grants, st->ngrants);
		BdArenaInit(&st->arena, aggcxt);
		st->next_cut = BdNextCut(&st->engine);
		st->started = true;
		st->last = at;
		MemoryContextSwitchTo(old);
	}
	if (at < st->last)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("burndown usage must come in time order"),
				 errhint("Give it rows in time order: FROM (SELECT ... ORDER BY time) s, or metering.burndown(time, amount, grants ORDER BY time).")));
	st->last = at;
	for (bool checked = false; st->next_cut <= at;)
	{
		BdCountCut(&st->engine, &st->budget);
		CloseTo(st, st->next_cut, true);
		st->next_cut = BdNextCut(&st->engine);
		/* more than one cut before this row: refuse a hopeless gap at once */
		if (st->next_cut <= at && !checked)
		{
			BdCheckCuts(&st->engine, at, &st->budget, 1, 0);
			checked = true;
		}
	}
	Accumulate(st, PG_GETARG_NUMERIC(2));
	PG_RETURN_POINTER(st);
}

/* metering._burndown_final(state): {"balances": {...}, "overage": n, "usage": n} */
PG_FUNCTION_INFO_V1(metering_burndown_final);
Datum
metering_burndown_final(PG_FUNCTION_ARGS)
{
	BurndownState *st = PG_ARGISNULL(0) ? NULL : (BurndownState *) PG_GETARG_POINTER(0);
	StringInfoData buf;
	BdEngine	e;
	BdGrant    *grants;
	BdBudget	budget;
	BdArena		arena;
	MemoryContext caller = CurrentMemoryContext;
	Datum		result;

	if (st == NULL || !st->started)
		PG_RETURN_NULL();
	/* work on a copy: the final function must not change the state */
	e = st->engine;
	grants = palloc(sizeof(BdGrant) * Max(st->ngrants, 1));
	memcpy(grants, st->grants, sizeof(BdGrant) * st->ngrants);
	e.grants = grants;
	budget = st->budget;
	BdArenaInit(&arena, caller);
	MemoryContextSwitchTo(arena.cxt);
	if (st->until == DT_NOEND)
		BdPhase(&e, PhaseUsage(st), Max(e.state.at, st->last));
	else
	{
		/* every row is before both the next cut and `until` */
		BdPhase(&e, PhaseUsage(st), Min(st->until, st->next_cut));
		BdApplyCut(&e, NULL);
		BdCheckCuts(&e, st->until, &budget, 1, 0);
		for (;;)
		{
			TimestampTz c = BdNextCut(&e);

			if (c > st->until)
				break;
			BdCountCut(&e, &budget);
			BdPhase(&e, e.zero, c);
			BdApplyCut(&e, NULL);
			BdArenaKeep(&arena, &e, NULL, NULL);
		}
		if (e.state.at < st->until)
			BdPhase(&e, e.zero, st->until);
	}

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"balances\": {");
	for (int i = 0; i < e.ngrants; i++)
		appendStringInfo(&buf, "%s\"%s\": %s", i ? ", " : "",
						 DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&grants[i].id))),
						 DatumGetCString(DirectFunctionCall1(numeric_out,
															 NumericGetDatum(BdActive(&grants[i], e.state.at)
																			 ? grants[i].balance : e.zero))));
	appendStringInfo(&buf, "}, \"overage\": %s, \"usage\": %s}",
					 DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(e.state.overage))),
					 DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(e.state.usage))));
	MemoryContextSwitchTo(caller);
	result = DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
	MemoryContextDelete(arena.cxt);
	PG_RETURN_DATUM(result);
}
