/*
 * burndown.h: the grant burndown engine.
 *
 * The engine knows nothing of tables: it is given an entitlement's period
 * rules, its grants and the usage of each phase, and moves a state through
 * time.  Time is cut into phases at every period boundary (automatic or a
 * manual reset), grant activation, expiry, void, delete and recurrence
 * instant; within a phase the set of active grants and their burn order do
 * not change, so a phase's usage can be burnt at once.
 */
#ifndef METERING_BURNDOWN_H
#define METERING_BURNDOWN_H

#include "datatype/timestamp.h"
#include "utils/memutils.h"
#include "utils/numeric.h"

#include "numeric_ops.h"
#include "utils/uuid.h"

typedef struct BdGrant
{
	pg_uuid_t	id;
	Numeric		amount;
	int			priority;
	TimestampTz effective_at;
	TimestampTz expires_at;		/* DT_NOEND when it never expires */
	TimestampTz end;			/* min(expires_at, voided_at, deleted_at) */
	bool		recurring;
	Interval	recurrence;
	TimestampTz recurrence_anchor;
	Numeric		min_rollover;
	Numeric		max_rollover;
	TimestampTz created_at;
	/* state */
	Numeric		balance;
	Numeric		used;			/* burnt in the current observation window */
} BdGrant;

typedef struct BdReset
{
	TimestampTz at;
	bool		retain_anchor;
	bool		preserve_overage;
} BdReset;

typedef struct BdPlan
{
	bool		periods;		/* false: one endless period (the aggregate) */
	TimestampTz measure_from;	/* the first period starts here */
	TimestampTz anchor;			/* the grid of automatic boundaries */
	Interval	period;
	bool		preserve_overage;	/* at automatic boundaries */
	BdReset    *resets;			/* manual resets, in time order */
	int			nresets;
} BdPlan;

/* Why a segment of the burndown history ended. */
#define BD_END_PRIORITY		0x01	/* the set of active grants changed */
#define BD_END_RECURRENCE	0x02
#define BD_END_RESET		0x04	/* a period boundary or manual reset */

typedef struct BdState
{
	TimestampTz at;				/* all cuts <= at are applied, usage < at counted */
	TimestampTz period_start;
	TimestampTz anchor;			/* the current grid (a reset may move it) */
	int			next_reset;		/* first manual reset after `at` */
	Numeric		usage;			/* usage in [period_start, at) */
	Numeric		grant_usage;	/* burnt from grants in the period */
	Numeric		overage;
} BdState;

/* What a cut did, for the history. */
typedef struct BdCut
{
	int			reasons;		/* BD_END_* */
	bool		reset;
	Numeric		overage_before;	/* carried into a reset */
	Numeric	   *balances_after_rollover;	/* per grant, before the overage burn */
	Numeric	   *reset_burns;	/* per grant, preserved overage burnt at a reset */
} BdCut;

typedef struct BdEngine
{
	BdPlan	   *plan;
	BdGrant    *grants;			/* in burn order */
	int			ngrants;
	BdState		state;
	bool		cut_applied;	/* the cut at state.at, if any, is done */
	Numeric		zero;
} BdEngine;

/* Sorts the grants into burn order and starts the engine at measure_from. */
extern void BdInit(BdEngine *e, BdPlan *plan, BdGrant *grants, int ngrants);

/* Restores a saved state (a snapshot) instead. */
extern void BdRestore(BdEngine *e, BdPlan *plan, BdGrant *grants, int ngrants,
					  TimestampTz at, Numeric usage, Numeric grant_usage,
					  Numeric overage);

/* The first period boundary (automatic or a reset) after the state's `at`. */
extern TimestampTz BdNextBoundary(BdEngine *e);

/* The first cut instant after the state's `at`, or DT_NOEND. */
extern TimestampTz BdNextCut(BdEngine *e);

/*
 * Whether t is a cut instant (the engine just before it would stop there);
 * leaves the grants in burn order and their `used` at zero.
 */
extern bool BdIsCut(BdPlan *plan, BdGrant *grants, int ngrants, TimestampTz t);

/* Whether grant g is active at t. */
static inline bool
BdActive(const BdGrant *g, TimestampTz t)
{
	return g->effective_at <= t && t < g->end;
}

/* Burns `usage`, the usage of the phase [state.at, to), and moves to `to`. */
extern void BdPhase(BdEngine *e, Numeric usage, TimestampTz to);

/*
 * Applies the cut at the state's instant, if it is one and was not applied
 * yet; `cut` (may be NULL) receives what happened.
 */
extern void BdApplyCut(BdEngine *e, BdCut *cut);

/* BdPhase, then BdApplyCut */
extern void BdAdvance(BdEngine *e, Numeric usage, TimestampTz to, BdCut *cut);

/* Sum of the balances of the grants active at the state's instant. */
extern Numeric BdBalance(BdEngine *e);

/* rollover(balance, min, max) = min(max, max(balance, min)) */
extern Numeric BdRollover(Numeric balance, Numeric min, Numeric max);

/*
 * Bounded work.  Every evaluation a reader can start counts its work against
 * limits, with a cheap lower-bound estimate up front (a hopeless call fails
 * at once) and a hard count as it runs (nothing runs long); all are errors
 * 54000.  The limits were measured on a 2-core machine so that the slowest
 * accepted call takes about 2 seconds.
 */
/* instants the engine stops at (README: "more than 1,000,000 instants") */
#define BD_MAX_CUTS 1000000
/* steps: one grant (or the state) at one stop, 30-60 ns each (measured): 50M is at most ~2 s */
#define BD_MAX_WORK INT64CONST(50000000)
/* the snapshot writer (refresh_rollups, not for readers) may replay 10x more, so that readers can start from its snapshots */
#define BD_MAX_WRITER_WORK (10 * BD_MAX_WORK)
/* a numeric this many bytes long costs one more step (measured: a 64 KB overage costs ~130 us a cut) */
#define BD_NUMERIC_UNIT 64
/* rows of burndown_history (segments) and balance_history (windows): a reply, not a dump */
#define BD_MAX_ROWS 100000
/* steps one grant costs in a history row (its JSON, built and parsed) */
#define BD_ROW_GRANT_WORK 10

typedef struct BdBudget
{
	int64		cuts;			/* instants stopped at (BdCountCut) */
	int64		work;			/* steps */
} BdBudget;

/* The steps one stop costs now: every grant and the state, weighted by numeric size. */
extern int64 BdStopCost(BdEngine *e);

/*
 * Counts one more instant the engine stops at, and its steps, checking for
 * interrupts: an evaluation that would stop at more than BD_MAX_CUTS
 * instants (an hourly period asked about a century away) or take more than
 * BD_MAX_WORK steps (many grants, huge numbers) is an error, not a runaway.
 */
extern void BdCountCut(BdEngine *e, BdBudget *b);

/* Counts a stop that is not a new instant (an observation, a second pass). */
extern void BdCountStop(BdEngine *e, BdBudget *b);

/* Counts `units` more steps. */
extern void BdCountWork(BdBudget *b, int64 units);

/* Errors at once when `more` steps would exceed BD_MAX_WORK. */
extern void BdCheckWork(BdBudget *b, double more);

/*
 * A lower bound of the cuts in (from, to]: the period boundaries, or the
 * recurrences of the grants (those of equal length on distinct grids add up).
 */
extern double BdEstimateCuts(BdPlan *plan, BdGrant *grants, int ngrants,
							 TimestampTz from, TimestampTz to);

/*
 * Errors at once when the cuts up to `to`, each stopped at `passes` times,
 * plus `extra` stops, would clearly exceed BD_MAX_CUTS or BD_MAX_WORK.
 */
extern void BdCheckCuts(BdEngine *e, TimestampTz to, BdBudget *b, int passes, double extra);

/* Errors when a history would return more than BD_MAX_ROWS rows. */
extern void BdCheckRows(double rows, const char *what);

/*
 * The engine's memory: its state and all its arithmetic live in a context
 * that is replaced by a fresh one holding only the surviving state (grant
 * balances and used, the state's usage, grant usage and overage) once it
 * has grown past a few times that, so that a long evaluation's memory does
 * not grow with its cuts x grants.
 */
typedef struct BdArena
{
	MemoryContext parent;
	MemoryContext cxt;
	Size		limit;
} BdArena;

#define BD_ARENA_MIN (1024 * 1024)

/* Creates the arena's context under `parent` (it is not made current). */
extern void BdArenaInit(BdArena *a, MemoryContext parent);

/*
 * Call with the arena's context current, between stops: when the context is
 * over its limit, the engine's state (and whatever `keep` copies into the
 * current context) is copied into a fresh context, which becomes current
 * and the arena's, and the old one is deleted.
 */
extern void BdArenaKeep(BdArena *a, BdEngine *e, void (*keep) (void *arg), void *arg);


#endif
