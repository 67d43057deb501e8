/*
 * entitlement_eval.c: running the burndown engine of a metered entitlement
 * over its usage, from a snapshot or from the beginning.
 */
#include "postgres.h"

#include "entitlement.h"

static int
CompareTimes(const void *x, const void *y)
{
	TimestampTz a = *(const TimestampTz *) x;
	TimestampTz b = *(const TimestampTz *) y;

	return (a > b) - (a < b);
}

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
void
EntEvaluate(Entitlement *ent, BdEngine *e, TimestampTz start, TimestampTz to,
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
	EntReadPoints(EntOpenUsage(ent, 0, ent->plan.measure_from, to, NULL), &tail,
			   ent->plan.measure_from, to, &earliest_tail);

	/* a snapshot no later than the earliest tail event (it may be late) */
	start = Min(start, Min(to, earliest_tail));
	if (start >= ent->plan.measure_from && EntLoadEntitlementSnapshot(ent, start, &snap))
		from_snapshot = EntStartFromSnapshot(e, ent, &snap);
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
	EntReadUsage(ent, begin, from_snapshot ? snap.hour_before : NULL, to, stops, nstops, &tail, &usage);
	MemoryContextSwitchTo(arena.cxt);
	if (from_snapshot)
		EntStartFromSnapshot(e, ent, &snap);
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
			phase = NumAdd(phase, usage.points[next++].amount);
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
