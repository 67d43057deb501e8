/*
 * burndown.c: the grant burndown engine (see burndown.h).
 *
 * Rules, in the order they apply at a cut instant c:
 *   at a period boundary (automatic, or a manual reset) R:
 *     grants active before and at R keep rollover(balance, min, max);
 *     recurring grants due at R are refilled, grants that start at R hold
 *     their amount, grants that are not active hold 0;
 *     then, if overage is preserved, the old overage burns from those
 *     balances in burn order and the rest opens the new period, otherwise it
 *     is forgiven; usage counts from zero again;
 *   at any other cut:
 *     grants that end at c are forfeited, grants that start at c hold their
 *     amount, recurring grants due at c are refilled (set, not added), and
 *     the carried overage burns first;
 *   within a phase, usage burns through the active grants in burn order
 *   (priority, then expiry with never-expiring last, then creation, then
 *   id); a grant never goes below 0; the rest is overage.
 * We burn a preserved overage after the refills of a reset, where OpenMeter
 * burns it before them and lets a refill erase a debt that was paid.
 */
#include "postgres.h"

#include <math.h>

#include "miscadmin.h"

#include "fmgr.h"
#include "utils/fmgrprotos.h"
#include "utils/numeric.h"

#include "burndown.h"
#include "calendar.h"




Numeric
BdRollover(Numeric balance, Numeric min, Numeric max)
{
	Numeric		r = NumCmp(balance, min) > 0 ? balance : min;

	return NumCmp(r, max) < 0 ? r : max;
}

static int
CompareBurnOrder(const void *x, const void *y)
{
	const BdGrant *a = (const BdGrant *) x;
	const BdGrant *b = (const BdGrant *) y;

	if (a->priority != b->priority)
		return a->priority < b->priority ? -1 : 1;
	/* DT_NOEND sorts last by itself */
	if (a->expires_at != b->expires_at)
		return a->expires_at < b->expires_at ? -1 : 1;
	if (a->created_at != b->created_at)
		return a->created_at < b->created_at ? -1 : 1;
	return memcmp(a->id.data, b->id.data, UUID_LEN);
}

/* Whether t is one of g's recurrence instants. */
static bool
RecursAt(const BdGrant *g, TimestampTz t)
{
	if (!g->recurring)
		return false;
	return CalendarStep(g->recurrence_anchor, &g->recurrence,
						CalendarIndex(g->recurrence_anchor, &g->recurrence, t)) == t;
}

/* The next period boundary after the state's instant. */

static TimestampTz
NextBoundary(BdEngine *e)
{
	BdPlan	   *p = e->plan;
	TimestampTz next;

	if (!p->periods)
		return DT_NOEND;
	next = CalendarNextAfter(e->state.anchor, &p->period, e->state.at);

	if (e->state.next_reset < p->nresets && p->resets[e->state.next_reset].at <= next)
		next = p->resets[e->state.next_reset].at;
	return next;
}

TimestampTz
BdNextBoundary(BdEngine *e)
{
	return NextBoundary(e);
}

/*
 * Burns `amount` from the active grants in burn order; returns what could
 * not be burnt.  `burns`, when given, receives each grant's part.
 */
static Numeric
Burn(BdEngine *e, Numeric amount, TimestampTz at, Numeric *burns)
{
	for (int i = 0; i < e->ngrants && NumCmp(amount, e->zero) > 0; i++)
	{
		BdGrant    *g = &e->grants[i];
		Numeric		take;

		if (!BdActive(g, at) || NumCmp(g->balance, e->zero) <= 0)
			continue;
		take = NumCmp(g->balance, amount) < 0 ? g->balance : amount;
		g->balance = NumSub(g->balance, take);
		g->used = NumAdd(g->used, take);
		if (burns)
			burns[i] = take;
		amount = NumSub(amount, take);
	}
	return amount;
}

/* Burns the carried overage; the part paid counts as grant usage. */
static void
PayOverage(BdEngine *e, TimestampTz at, Numeric *burns)
{
	Numeric		left;

	if (NumCmp(e->state.overage, e->zero) <= 0)
		return;
	left = Burn(e, e->state.overage, at, burns);
	e->state.grant_usage = NumAdd(e->state.grant_usage, NumSub(e->state.overage, left));
	e->state.overage = left;
}

void
BdInit(BdEngine *e, BdPlan *plan, BdGrant *grants, int ngrants)
{
	TimestampTz m = plan->measure_from;

	e->plan = plan;
	e->grants = grants;
	e->ngrants = ngrants;
	e->zero = int64_to_numeric(0);
	qsort(grants, ngrants, sizeof(BdGrant), CompareBurnOrder);

	e->state.at = m;
	e->state.period_start = m;
	e->state.anchor = plan->anchor;
	e->state.next_reset = 0;
	/* a manual reset at the very start only moves the grid */
	while (e->state.next_reset < plan->nresets && plan->resets[e->state.next_reset].at <= m)
	{
		if (!plan->resets[e->state.next_reset].retain_anchor)
			e->state.anchor = plan->resets[e->state.next_reset].at;
		e->state.next_reset++;
	}
	e->state.usage = e->zero;
	e->state.grant_usage = e->zero;
	e->state.overage = e->zero;
	/* the first period starts with every grant active then at its amount */
	for (int i = 0; i < ngrants; i++)
	{
		grants[i].balance = BdActive(&grants[i], m) ? grants[i].amount : e->zero;
		grants[i].used = e->zero;
	}
	e->cut_applied = true;
}

void
BdRestore(BdEngine *e, BdPlan *plan, BdGrant *grants, int ngrants,
		  TimestampTz at, Numeric usage, Numeric grant_usage, Numeric overage)
{
	BdPlan	   *p = plan;

	e->plan = plan;
	e->grants = grants;
	e->ngrants = ngrants;
	e->zero = int64_to_numeric(0);
	qsort(grants, ngrants, sizeof(BdGrant), CompareBurnOrder);

	/*
	 * The period containing `at`, computed rather than replayed: the grid in
	 * force is the anchor of the last reset that moved it, and the period
	 * starts at the later of the last reset and the grid's last boundary
	 * (never before measure_from).
	 */
	{
		TimestampTz start = p->measure_from;

		e->state.anchor = p->anchor;
		e->state.next_reset = 0;
		while (e->state.next_reset < p->nresets && p->resets[e->state.next_reset].at <= at)
		{
			BdReset    *r = &p->resets[e->state.next_reset];

			if (!r->retain_anchor)
				e->state.anchor = r->at;
			start = Max(start, r->at);
			e->state.next_reset++;
		}
		if (p->periods && at > start)
		{
			TimestampTz b = CalendarStep(e->state.anchor, &p->period,
										 CalendarIndex(e->state.anchor, &p->period, at));

			start = Max(start, b);
		}
		e->state.period_start = start;
	}
	e->state.at = at;
	e->state.usage = usage;
	e->state.grant_usage = grant_usage;
	e->state.overage = overage;
	for (int i = 0; i < ngrants; i++)
		grants[i].used = e->zero;
	/* a snapshot is the state after the cut at its instant */
	e->cut_applied = true;
}

static void
TooManyCuts(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
			 errmsg("the burndown would stop at more than %d instants", BD_MAX_CUTS),
			 errdetail("Every period boundary, grant change and recurrence between the start and the asked instant is one."),
			 errhint("Ask about an instant closer to the entitlement's usage, or use longer periods or recurrences.")));
}

static void
TooMuchWork(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
			 errmsg("the burndown would take more than " INT64_FORMAT " steps", BD_MAX_WORK),
			 errdetail("A step is one grant, or the overage and usage, at one instant the engine stops at; a number of more than %d bytes counts as one more step for each %d bytes.",
					   BD_NUMERIC_UNIT, BD_NUMERIC_UNIT),
			 errhint("Ask about an instant closer to the entitlement's usage, or use fewer grants, fewer distinct recurrences, longer periods or smaller numbers.")));
}

void
BdCheckRows(double rows, const char *what)
{
	if (rows > BD_MAX_ROWS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the %s would have more than %d rows", what, BD_MAX_ROWS),
				 errhint("Ask for a shorter range, or for longer windows.")));
}

/* The longest an interval can be, in microseconds (a month is 31 days or less; days are 24 hours in UTC). */
static double
LongestLength(const Interval *iv)
{
	return (double) iv->month * 31 * USECS_PER_DAY + (double) iv->day * USECS_PER_DAY + (double) iv->time;
}

typedef struct GridCount
{
	int64		length;
	int64		phase;
	double		count;
} GridCount;

static int
CompareGrids(const void *x, const void *y)
{
	const GridCount *a = (const GridCount *) x;
	const GridCount *b = (const GridCount *) y;

	if (a->length != b->length)
		return a->length < b->length ? -1 : 1;
	if (a->phase != b->phase)
		return a->phase < b->phase ? -1 : 1;
	return (a->count < b->count) - (a->count > b->count);	/* largest first */
}

double
BdEstimateCuts(BdPlan *plan, BdGrant *grants, int ngrants, TimestampTz from, TimestampTz to)
{
	double		n = 0;
	double		most = 0;
	GridCount  *grids;
	int			ngrids = 0;

	/*
	 * Only what is sure to be separate instants: a grid of step s has at
	 * least floor(L / longest s) points in a span of length L.  The period
	 * boundaries are one grid; recurrences of the same fixed length (no
	 * months) on grids of distinct phases never meet, so they add up, and
	 * recurrences of other lengths may fall on the same instants (one cut).
	 * BdCountCut counts exactly.
	 */
	if (to <= from)
		return 0;
	if (plan->periods)
		n = floor(((double) to - (double) from) / LongestLength(&plan->period));
	grids = palloc(sizeof(GridCount) * Max(ngrants, 1));
	for (int i = 0; i < ngrants; i++)
	{
		BdGrant    *g = &grants[i];
		TimestampTz a = Max(from, g->effective_at);
		TimestampTz b = Min(to, g->end);
		double		c;

		if (!g->recurring || b <= a)
			continue;
		c = floor(((double) b - (double) a) / LongestLength(&g->recurrence));
		if (g->recurrence.month == 0)
		{
			int64		len = (int64) g->recurrence.day * USECS_PER_DAY + g->recurrence.time;

			grids[ngrids].length = len;
			grids[ngrids].phase = ((g->recurrence_anchor % len) + len) % len;
			grids[ngrids].count = c;
			ngrids++;
		}
		else
			most = Max(most, c);
	}
	qsort(grids, ngrids, sizeof(GridCount), CompareGrids);
	for (int i = 0; i < ngrids;)
	{
		int64		len = grids[i].length;
		double		sum = 0;

		while (i < ngrids && grids[i].length == len)
		{
			int64		phase = grids[i].phase;

			sum += grids[i].count;	/* the largest of this grid */
			while (i < ngrids && grids[i].length == len && grids[i].phase == phase)
				i++;
		}
		most = Max(most, sum);
	}
	pfree(grids);
	return Max(n, most);
}

/* The steps of one operation on a numeric of this size. */
static inline int64
NumericSteps(Numeric n)
{
	return (int64) (VARSIZE(n) / BD_NUMERIC_UNIT);
}

int64
BdStopCost(BdEngine *e)
{
	int64		state = 1 + NumericSteps(e->state.usage) + NumericSteps(e->state.grant_usage) +
		NumericSteps(e->state.overage);
	int64		cost = state * (e->ngrants + 1);

	/* the state's numbers meet every grant (the overage burns through them) */
	for (int i = 0; i < e->ngrants; i++)
		cost += NumericSteps(e->grants[i].balance) + NumericSteps(e->grants[i].used);
	return cost;
}

void
BdCheckCuts(BdEngine *e, TimestampTz to, BdBudget *b, int passes, double extra)
{
	double		n = BdEstimateCuts(e->plan, e->grants, e->ngrants, e->state.at, to);

	if (n + b->cuts > BD_MAX_CUTS)
		TooManyCuts();
	BdCheckWork(b, (n * passes + extra) * (double) BdStopCost(e));
}

void
BdCheckWork(BdBudget *b, double more)
{
	if (more + (double) b->work > (double) BD_MAX_WORK)
		TooMuchWork();
}

void
BdCountWork(BdBudget *b, int64 units)
{
	b->work += units;
	if (b->work > BD_MAX_WORK)
		TooMuchWork();
}

void
BdCountStop(BdEngine *e, BdBudget *b)
{
	CHECK_FOR_INTERRUPTS();
	BdCountWork(b, BdStopCost(e));
}

void
BdCountCut(BdEngine *e, BdBudget *b)
{
	CHECK_FOR_INTERRUPTS();
	if (++b->cuts > BD_MAX_CUTS)
		TooManyCuts();
	BdCountWork(b, BdStopCost(e));
}

void
BdArenaInit(BdArena *a, MemoryContext parent)
{
	a->parent = parent;
	a->cxt = AllocSetContextCreate(parent, "metering burndown", ALLOCSET_DEFAULT_SIZES);
	a->limit = BD_ARENA_MIN;
}

static inline Numeric
CopyNumeric(Numeric n)
{
	return n ? DatumGetNumericCopy(NumericGetDatum(n)) : NULL;
}

void
BdArenaKeep(BdArena *a, BdEngine *e, void (*keep) (void *arg), void *arg)
{
	MemoryContext old = a->cxt;
	MemoryContext fresh;

	Assert(CurrentMemoryContext == old);
	if (MemoryContextMemAllocated(old, true) < a->limit)
		return;
	fresh = AllocSetContextCreate(a->parent, "metering burndown", ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(fresh);
	e->zero = CopyNumeric(e->zero);
	e->state.usage = CopyNumeric(e->state.usage);
	e->state.grant_usage = CopyNumeric(e->state.grant_usage);
	e->state.overage = CopyNumeric(e->state.overage);
	for (int i = 0; i < e->ngrants; i++)
	{
		e->grants[i].balance = CopyNumeric(e->grants[i].balance);
		e->grants[i].used = CopyNumeric(e->grants[i].used);
	}
	if (keep)
		keep(arg);
	a->cxt = fresh;
	MemoryContextDelete(old);
	/* amortized: copy again only when the garbage is a few times the state */
	a->limit = Max(BD_ARENA_MIN, 4 * MemoryContextMemAllocated(fresh, true));
}

TimestampTz
BdNextCut(BdEngine *e)
{
	TimestampTz at = e->state.at;
	TimestampTz next = NextBoundary(e);

	for (int i = 0; i < e->ngrants; i++)
	{
		BdGrant    *g = &e->grants[i];

		if (g->effective_at > at && g->effective_at < next && g->effective_at < g->end)
			next = g->effective_at;
		if (g->end > at && g->end < next && g->end > g->effective_at)
			next = g->end;
		if (g->recurring && g->end > at && g->effective_at < g->end)
		{
			TimestampTz r = CalendarNextAfter(g->recurrence_anchor, &g->recurrence,
											  Max(at, g->effective_at));

			if (r < g->end && r < next)
				next = r;
		}
	}
	return next;
}

bool
BdIsCut(BdPlan *plan, BdGrant *grants, int ngrants, TimestampTz t)
{
	BdEngine	probe;
	Numeric		zero = int64_to_numeric(0);

	if (t <= plan->measure_from)
		return false;
	BdRestore(&probe, plan, grants, ngrants, t - 1, zero, zero, zero);
	return BdNextCut(&probe) == t;
}

void
BdPhase(BdEngine *e, Numeric usage, TimestampTz to)
{
	TimestampTz from = e->state.at;

	if (NumCmp(usage, e->zero) > 0)
	{
		Numeric		left = Burn(e, usage, from, NULL);

		e->state.grant_usage = NumAdd(e->state.grant_usage, NumSub(usage, left));
		e->state.overage = NumAdd(e->state.overage, left);
	}
	else if (NumCmp(usage, e->zero) < 0)
	{
		/* a negative usage (a correction) pays back overage, never a grant */
		Numeric		back = NumSub(e->zero, usage);

		e->state.overage = NumCmp(back, e->state.overage) >= 0 ? e->zero
			: NumSub(e->state.overage, back);
	}
	e->state.usage = NumAdd(e->state.usage, usage);
	if (to != from)
		e->cut_applied = false;
	e->state.at = to;
}

/* Whether the state's instant is a period boundary not yet applied. */
static bool
AtBoundary(BdEngine *e, bool *manual)
{
	BdPlan	   *p = e->plan;
	TimestampTz at = e->state.at;

	*manual = e->state.next_reset < p->nresets && p->resets[e->state.next_reset].at == at;
	if (*manual)
		return true;
	if (!p->periods || at <= e->state.period_start)
		return false;
	/* the automatic boundary that follows the current period's start */
	return CalendarNextAfter(e->state.anchor, &p->period, e->state.period_start) == at;
}

void
BdApplyCut(BdEngine *e, BdCut *cut)
{
	BdPlan	   *p = e->plan;
	TimestampTz to = e->state.at;
	int			reasons = 0;
	bool		manual;

	if (cut)
	{
		memset(cut, 0, sizeof(BdCut));
		cut->overage_before = e->state.overage;
	}
	if (e->cut_applied)
		return;
	e->cut_applied = true;

	if (AtBoundary(e, &manual))
	{
		bool		preserve = manual ? p->resets[e->state.next_reset].preserve_overage
			: p->preserve_overage;
		Numeric    *burns = NULL;

		for (int i = 0; i < e->ngrants; i++)
		{
			BdGrant    *g = &e->grants[i];

			if (g->effective_at < to && to < g->end)
				g->balance = BdRollover(g->balance, g->min_rollover, g->max_rollover);
			else if (BdActive(g, to))
			{
				g->balance = g->amount;
				reasons |= BD_END_PRIORITY;
			}
			else
			{
				if (g->end == to)
					reasons |= BD_END_PRIORITY;
				g->balance = e->zero;
			}
			if (BdActive(g, to) && g->effective_at < to && RecursAt(g, to))
			{
				g->balance = g->amount;
				reasons |= BD_END_RECURRENCE;
			}
		}
		if (cut)
		{
			cut->reset = true;
			cut->balances_after_rollover = palloc(sizeof(Numeric) * Max(e->ngrants, 1));
			cut->reset_burns = palloc(sizeof(Numeric) * Max(e->ngrants, 1));
			for (int i = 0; i < e->ngrants; i++)
			{
				cut->balances_after_rollover[i] = e->grants[i].balance;
				cut->reset_burns[i] = e->zero;
			}
			burns = cut->reset_burns;
		}
		e->state.period_start = to;
		e->state.usage = e->zero;
		e->state.grant_usage = e->zero;
		if (preserve)
			PayOverage(e, to, burns);
		else
			e->state.overage = e->zero;
		if (manual)
		{
			if (!p->resets[e->state.next_reset].retain_anchor)
				e->state.anchor = to;
			e->state.next_reset++;
		}
		reasons |= BD_END_RESET;
	}
	else
	{
		for (int i = 0; i < e->ngrants; i++)
		{
			BdGrant    *g = &e->grants[i];

			if (g->end == to && g->effective_at < to)
			{
				g->balance = e->zero;
				reasons |= BD_END_PRIORITY;
			}
			else if (g->effective_at == to && to < g->end)
			{
				g->balance = g->amount;
				reasons |= BD_END_PRIORITY;
			}
			else if (BdActive(g, to) && RecursAt(g, to))
			{
				g->balance = g->amount;
				reasons |= BD_END_RECURRENCE;
			}
		}
		if (reasons != 0)
			PayOverage(e, to, NULL);
	}
	if (cut)
		cut->reasons = reasons;
}

void
BdAdvance(BdEngine *e, Numeric usage, TimestampTz to, BdCut *cut)
{
	BdPhase(e, usage, to);
	BdApplyCut(e, cut);
}

Numeric
BdBalance(BdEngine *e)
{
	Numeric		sum = e->zero;

	for (int i = 0; i < e->ngrants; i++)
		if (BdActive(&e->grants[i], e->state.at))
			sum = NumAdd(sum, e->grants[i].balance);
	return sum;
}

/* metering.rollover(balance, min_rollover, max_rollover) */
PG_FUNCTION_INFO_V1(metering_rollover);
Datum
metering_rollover(PG_FUNCTION_ARGS)
{
	PG_RETURN_NUMERIC(BdRollover(PG_GETARG_NUMERIC(0), PG_GETARG_NUMERIC(1), PG_GETARG_NUMERIC(2)));
}
