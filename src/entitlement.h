/*
 * entitlement.h: what the entitlement files share.
 *
 * A metered entitlement is answered in steps, one file each: loading it, its
 * resets and grants (entitlement_load.c); reading its usage from rollups and
 * events (entitlement_usage.c); starting from, and writing, snapshots of the
 * engine's state (entitlement_snapshot.c); running the burndown engine over
 * the usage (entitlement_eval.c).  entitlement.c holds the SQL functions
 * that answer with them.
 */
#ifndef METERING_ENTITLEMENT_H
#define METERING_ENTITLEMENT_H

#include "executor/spi.h"
#include "utils/array.h"
#include "utils/uuid.h"

#include "burndown.h"

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

/* Receives the engine's progress; see EntEvaluate. */
typedef struct Observer Observer;
struct Observer
{
	/* after the phase up to `at` is burnt, before the cut at `at` */
	void		(*before_cut) (Observer *o, BdEngine *e, Numeric phase_usage);
	/* after the cut at `at` */
	void		(*after_cut) (Observer *o, BdEngine *e, BdCut *cut);
	/* copies what it holds of the engine's memory into the current context (BdArenaKeep) */
	void		(*keep) (Observer *o);
	/* the evaluation's budget (EntEvaluate counts into it) */
	BdBudget   *budget;
};

typedef struct EntSnapshot
{
	TimestampTz at;
	int64		inputs;			/* SnapshotInputs when it was written */
	Numeric		hour_before;	/* usage of at's hour before at, or NULL */
	Numeric		usage,
				grant_usage,
				overage;
	int			n;
	pg_uuid_t  *ids;
	Numeric    *balances;
} EntSnapshot;

/* entitlement_load.c: SPI helpers (columns from 1; plans are kept with MeteringPrepare) */
extern Datum EntGetCol(int row, int col, bool *isnull);
extern Datum EntCopyCol(int row, int col, bool *isnull);
extern bool EntReadRow(Datum id, Datum subject, bool lock);
#define ENT_ROW_COL 12			/* EntReadRow's column of the whole row */
extern bool EntLoadEntitlement(Entitlement *ent, pg_uuid_t *id, text *subject, MemoryContext cxt, bool with_grants);

/* entitlement_usage.c: which is 0 (events above the watermark), 1 (rollups), 2 (split buckets) */
extern Portal EntOpenUsage(Entitlement *ent, int which, TimestampTz from, TimestampTz to, ArrayType *buckets);
extern void EntReadPoints(Portal portal, UsageList *l, TimestampTz from, TimestampTz to, TimestampTz *first);
extern void EntReadUsage(Entitlement *ent, TimestampTz from, Numeric from_hour_before, TimestampTz to,
						 TimestampTz *stops, int nstops, UsageList *tail, UsageList *out);
extern Numeric EntHourUsageBefore(Entitlement *ent, TimestampTz at);

/* entitlement_snapshot.c: reading a snapshot */
extern bool EntLoadEntitlementSnapshot(Entitlement *ent, TimestampTz limit, EntSnapshot *snap);
extern bool EntStartFromSnapshot(BdEngine *e, Entitlement *ent, EntSnapshot *snap);

/* entitlement.c: what the SQL functions answer, for the C callers (the usage gate) */
typedef struct EntValue
{
	bool		has_access;
	Numeric		balance,
				usage,
				overage,
				total,			/* total_available_grant_amount */
				reserved,
				available;
	TimestampTz period_start;
} EntValue;

extern bool EntFind(text *subject, text *feature, TimestampTz at, pg_uuid_t *out, Datum *feature_id);
extern bool EntActive(Entitlement *ent, TimestampTz at);
extern void EntValueAt(Entitlement *ent, TimestampTz at, TimestampTz since, EntValue *v);
extern TimestampTz EntPeriodBound(Entitlement *ent, TimestampTz at, bool upper);
extern void EntCheckUnchanged(Datum id, Datum subject);
/* 02000-class P0002: the entitlement `id` (uuid) does not exist */
extern void EntErrorNoSuch(Datum id) pg_attribute_noreturn();

/* entitlement_eval.c */
extern void EntEvaluate(Entitlement *ent, BdEngine *e, TimestampTz start, TimestampTz to,
						TimestampTz *obs, int nobs, Observer *observer, bool writer);

#endif
