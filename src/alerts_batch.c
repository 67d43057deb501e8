/*
 * alerts_batch.c: metering._alerts_for_events, the alerts of the events one
 * statement stored (35_alerts.sql says what it decides; this is how).
 *
 * It runs after every statement that stores events, so its cost is per
 * batch: two queries with plans made once (the live rules; the covered
 * entitlements of the batch's subjects), the events matched to those in
 * memory, and one statement that takes the turns of the reached ones.  The
 * lookup and the turns are planned to index lookups, so that a plan made
 * while a table was small stays one once it has grown
 * (MeteringPlanByIndexBegin).  On one node the events' trigger
 * (metering._events_alerts) reads the statement's transition table itself:
 * no rule live, it reads nothing; else it reads the subjects, then the events
 * again for those that a covered entitlement's subject stored, so that no
 * copy of the payloads is made.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/tuplestore.h"
#include "utils/timestamp.h"

#include "meter_value.h"
#include "metering.h"

/* A covered entitlement, with what its meter reads from an event. */
typedef struct Covered
{
	Datum		id;				/* uuid */
	text	   *subject;
	text	   *event_type;
	Jsonb	   *filters;		/* the feature's group filters, or NULL */
	MeterGroups *groups;		/* compiled group_by, when filtered */
	JsonPath   *path;			/* value_property, or NULL */
	bool		count;
} Covered;

/*
 * The covered entitlements' query, with its feature condition: one lookup
 * of each subject in the metered entitlements' hash index (OFFSET 0 keeps
 * the subquery a lookup per subject whatever the statistics said when the
 * plan was made: a read of every entitlement of a feature grows with the
 * customers, a batch's subjects do not).
 */
#define COVERED_SQL(condition) \
	"SELECT e.id, e.subject, m.event_type, f.meter_group_by_filters, m.group_by, " \
	"       m.aggregation = 'COUNT', m.value_property " \
	"FROM (SELECT DISTINCT u COLLATE \"C\" AS u FROM unnest($1::text[]) u) s " \
	"CROSS JOIN LATERAL (SELECT e.id, e.subject, e.feature_id FROM metering.entitlements e " \
	"                     WHERE e.subject = s.u AND e.deleted_at IS NULL AND e.type = 'metered' " condition \
	"                     OFFSET 0) e " \
	"JOIN metering.features f ON f.id = e.feature_id " \
	"JOIN metering.meters m ON m.slug = f.meter_slug"

/*
 * The same on a Citus coordinator whose entitlements are distributed: the
 * subjects' entitlements are read from their shards first (Citus joins no
 * shard with the coordinator's plain tables, nor plans a lateral lookup of
 * each), the rest is the coordinator's configuration.
 */
#define COVERED_DISTRIBUTED_SQL(condition) \
	"WITH e AS MATERIALIZED (SELECT e.id, e.subject, e.feature_id FROM metering.entitlements e " \
	"                         WHERE e.subject = ANY ($1) AND e.deleted_at IS NULL AND e.type = 'metered' " condition ") " \
	"SELECT e.id, e.subject, m.event_type, f.meter_group_by_filters, m.group_by, " \
	"       m.aggregation = 'COUNT', m.value_property " \
	"FROM e JOIN metering.features f ON f.id = e.feature_id " \
	"JOIN metering.meters m ON m.slug = f.meter_slug"

static SPIPlanPtr covered_all_plan,
			covered_plan,
			turns_plan,
			evaluate_plan;

/* Byte order of two texts: equality is the subjects' and types' equality. */
static int
TextCmp(text *a, text *b)
{
	int			la = VARSIZE_ANY_EXHDR(a),
				lb = VARSIZE_ANY_EXHDR(b);
	int			c = memcmp(VARDATA_ANY(a), VARDATA_ANY(b), Min(la, lb));

	return c != 0 ? c : (la > lb) - (la < lb);
}

static int
CompareCovered(const void *x, const void *y)
{
	return TextCmp(((const Covered *) x)->subject, ((const Covered *) y)->subject);
}

/* What an event records for a covered entitlement, as the meter reads it. */
static Numeric
EventAmount(Covered *c, Jsonb *data, Numeric zero, Numeric one)
{
	if (c->filters != NULL && !MeterGroupsPass(c->groups, c->filters, data))
		return zero;
	if (c->count)
		return one;
	return c->path == NULL ? zero : MeterUsage(data, c->path);
}

/* the column of a relation's row type, by name */
static AttrNumber
ColumnOf(Relation rel, const char *name)
{
	int			col = SPI_fnumber(RelationGetDescr(rel), name);

	if (col <= 0)
		elog(ERROR, "metering.%s has no column \"%s\"", RelationGetRelationName(rel), name);
	return col;
}

/*
 * Whether a notification rule is live; if so *every tells whether one covers
 * every feature and *keys holds the keys of the features the others cover (a
 * text array; *keys_null when none).  Every statement that stores events
 * asks, rules or not: a scan of the few rows of the rules' table in the
 * statement's snapshot, without a query (a tenth of the cost of one).
 */
static bool
RulesLive(bool *every, Datum *keys, bool *keys_null)
{
	Relation	rel = table_open(MeteringRelid("notification_rules"), AccessShareLock);
	AttrNumber	key_col = ColumnOf(rel, "feature_key"),
				disabled_col = ColumnOf(rel, "disabled_at"),
				deleted_col = ColumnOf(rel, "deleted_at");
	TableScanDesc scan = table_beginscan(rel, GetActiveSnapshot(), 0, NULL);
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	ArrayBuildState *found = NULL;
	bool		live = false,
				isnull;

	*every = false;
	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		Datum		key;

		(void) slot_getattr(slot, disabled_col, &isnull);
		if (!isnull)
			continue;
		(void) slot_getattr(slot, deleted_col, &isnull);
		if (!isnull)
			continue;
		live = true;
		key = slot_getattr(slot, key_col, &isnull);
		if (isnull)
			*every = true;
		else
			found = accumArrayResult(found, key, false, TEXTOID, CurrentMemoryContext);
	}
	table_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	table_close(rel, NoLock);
	*keys_null = found == NULL;
	*keys = found == NULL ? (Datum) 0 : makeArrayResult(found, CurrentMemoryContext);
	return live;
}

/*
 * The covered entitlements of the subjects (all metered ones when a live
 * rule covers every feature, else those of the features with `keys`: an
 * entitlement's feature_key is its feature's, which never changes), sorted
 * by subject.
 */
static int
LoadCovered(ArrayType *subjects, bool every, Datum keys, bool keys_null, bool distributed, Covered **out)
{
	Oid			types[2] = {TEXTARRAYOID, TEXTARRAYOID};
	Datum		args[2] = {PointerGetDatum(subjects), keys};
	bool		isnull;
	Covered    *c;
	int			ret;

	/* (planned for each call: Citus plans its parameters' values) */
	if (distributed)
		ret = SPI_execute_with_args(every ? COVERED_DISTRIBUTED_SQL("")
									: COVERED_DISTRIBUTED_SQL("AND e.feature_key = ANY ($2)"),
									every ? 1 : 2, types, args, keys_null ? " n" : "  ", true, 0);
	else if (every)
		ret = MeteringExecuteByIndex(MeteringPrepareGeneric(&covered_all_plan, COVERED_SQL(""), 1, types), args, NULL, true, 0);
	else
		ret = MeteringExecuteByIndex(MeteringPrepareGeneric(&covered_plan, COVERED_SQL("AND e.feature_key = ANY ($2)"),
															2, types),
									 args, keys_null ? " n" : "  ", true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the covered entitlements: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return 0;

	c = palloc0(sizeof(Covered) * SPI_processed);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		Datum		x;

		c[i].id = SPI_getbinval(t, d, 1, &isnull);
		c[i].subject = DatumGetTextPP(SPI_getbinval(t, d, 2, &isnull));
		c[i].event_type = DatumGetTextPP(SPI_getbinval(t, d, 3, &isnull));
		x = SPI_getbinval(t, d, 5, &isnull);
		if (!isnull)
		{
			Jsonb	   *group_by = DatumGetJsonbP(x);

			/* (filters name groups, so a meter without groups has none) */
			x = SPI_getbinval(t, d, 4, &isnull);
			if (!isnull)
			{
				c[i].filters = DatumGetJsonbP(x);
				c[i].groups = MeterGroupsCompile(group_by, CurrentMemoryContext);
			}
		}
		c[i].count = DatumGetBool(SPI_getbinval(t, d, 6, &isnull));
		x = SPI_getbinval(t, d, 7, &isnull);
		c[i].path = isnull ? NULL : DatumGetJsonPathP(x);
	}
	qsort(c, SPI_processed, sizeof(Covered), CompareCovered);
	*out = c;
	return (int) SPI_processed;
}

/* The (covered entitlement, event) pairs of a statement, as arrays. */
typedef struct Pairs
{
	Covered    *covered;
	int			ncovered;
	int			n;
	int			size;
	Datum	   *ids;
	Datum	   *times;
	Datum	   *amounts;
	Datum	   *subjects;
	Numeric		zero;
	Numeric		one;
	MemoryContext scratch;		/* what one event's amount takes to compute */
} Pairs;

static void
PairsInit(Pairs *p, Covered *covered, int ncovered, int size_hint)
{
	p->covered = covered;
	p->ncovered = ncovered;
	p->n = 0;
	p->size = Max(size_hint, 16);
	p->ids = palloc(sizeof(Datum) * p->size);
	p->times = palloc(sizeof(Datum) * p->size);
	p->amounts = palloc(sizeof(Datum) * p->size);
	p->subjects = palloc(sizeof(Datum) * p->size);
	p->zero = int64_to_numeric(0);
	p->one = int64_to_numeric(1);
	p->scratch = AllocSetContextCreate(CurrentMemoryContext, "alerts of an event", ALLOCSET_SMALL_SIZES);
}

/* the run of covered entitlements of the subject, as [*lo, *hi]; false when none */
static bool
FindSubject(Pairs *p, text *subject, int *lo, int *hi)
{
	Covered		key;
	Covered    *hit;

	key.subject = subject;
	hit = bsearch(&key, p->covered, p->ncovered, sizeof(Covered), CompareCovered);
	if (hit == NULL)
		return false;
	*lo = *hi = hit - p->covered;
	while (*lo > 0 && CompareCovered(&p->covered[*lo - 1], &key) == 0)
		(*lo)--;
	while (*hi + 1 < p->ncovered && CompareCovered(&p->covered[*hi + 1], &key) == 0)
		(*hi)++;
	return true;
}

/*
 * Adds the pairs of one event of a subject with covered entitlements
 * [lo, hi]: one for each of its type (the amount is computed in scratch
 * memory, reset event by event: a statement may store any number of events).
 */
static void
PairsAddEvent(Pairs *p, int lo, int hi, Datum type, Datum time, Datum data)
{
	MemoryContext outer = CurrentMemoryContext;

	MemoryContextReset(p->scratch);
	for (int j = lo; j <= hi; j++)
	{
		Covered    *c = &p->covered[j];
		Numeric		amount;

		MemoryContextSwitchTo(p->scratch);
		if (TextCmp(c->event_type, DatumGetTextPP(type)) != 0)
		{
			MemoryContextSwitchTo(outer);
			continue;
		}
		amount = EventAmount(c, DatumGetJsonbP(data), p->zero, p->one);
		MemoryContextSwitchTo(outer);
		if (amount != p->zero && amount != p->one)
			amount = DatumGetNumeric(datumCopy(NumericGetDatum(amount), false, -1));
		if (p->n == p->size)
		{
			p->size *= 2;
			p->ids = repalloc(p->ids, sizeof(Datum) * p->size);
			p->times = repalloc(p->times, sizeof(Datum) * p->size);
			p->amounts = repalloc(p->amounts, sizeof(Datum) * p->size);
			p->subjects = repalloc(p->subjects, sizeof(Datum) * p->size);
		}
		p->ids[p->n] = c->id;
		/* (by reference where float8 is: the row's memory goes with the next one) */
		p->times[p->n] = datumCopy(time, FLOAT8PASSBYVAL, sizeof(TimestampTz));
		p->amounts[p->n] = NumericGetDatum(amount);
		p->subjects[p->n] = PointerGetDatum(c->subject);
		p->n++;
	}
}

/*
 * The turns of the reached entitlements, in id order (no deadlock between
 * two batches), taking the statement's usage from the headroom of those it
 * fits in (the usage in the window read before the turn, taken only if that
 * is still the window once the turn is ours); the others get no headroom and
 * are evaluated in full.
 */
static void
TakeTurns(Pairs *p, bool distributed)
{
	Oid			turn_types[5] = {UUIDARRAYOID, TIMESTAMPTZARRAYOID, NUMERICARRAYOID, TIMESTAMPTZOID, TEXTARRAYOID};
	Datum		turn_args[5];
	Oid			eval_types[3] = {UUIDOID, TIMESTAMPTZOID, TEXTOID};
	SPITupleTable *turns;
	uint64		nturns;
	int			ret;

	if (p->n == 0)
		return;
	turn_args[0] = PointerGetDatum(construct_array(p->ids, p->n, UUIDOID, 16, false, TYPALIGN_CHAR));
	turn_args[1] = PointerGetDatum(construct_array(p->times, p->n, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL,
												   TYPALIGN_DOUBLE));
	turn_args[2] = PointerGetDatum(construct_array(p->amounts, p->n, NUMERICOID, -1, false, TYPALIGN_INT));
	turn_args[3] = TimestampTzGetDatum(MeteringNow());
	turn_args[4] = PointerGetDatum(construct_array(p->subjects, p->n, TEXTOID, -1, false, TYPALIGN_INT));
	if (distributed)
	{
		/*
		 * Distributed entitlements: each reached one is evaluated in full,
		 * in id order, by the evaluation that takes its turn (Citus sends no
		 * statement of many subjects' turns with their headroom to their
		 * shards).
		 */
		ret = SPI_execute_with_args("SELECT metering._evaluate_alerts(u.id, u.subject, max(u.time), false) "
									"FROM unnest($1, $2, $5) AS u(id, time, subject) "
									"GROUP BY u.id, u.subject ORDER BY u.id",
									5, turn_types, turn_args, NULL, false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not evaluate the alerts: %s", SPI_result_code_string(ret));
		return;
	}
	ret = MeteringExecuteByIndex(MeteringPrepareGeneric(&turns_plan,
								 "INSERT INTO metering.entitlement_turns AS t "
								 "       (entitlement_id, subject, purpose, turns, usage_until, armed_from, armed_until, headroom) "
								 "SELECT u.id, u.subject, 'a', 1, max(u.time), w.armed_from, w.armed_until, "
								 "       CASE WHEN w.armed_from IS NOT NULL THEN coalesce(sum(u.amount) "
								 "            FILTER (WHERE u.time >= w.armed_from AND u.time < w.armed_until), 0) END "
								 "  FROM unnest($1, $2, $3, $5) AS u(id, time, amount, subject) "
								 "  LEFT JOIN metering.entitlement_turns w "
								 "         ON w.entitlement_id = u.id AND w.subject = u.subject AND w.purpose = 'a' "
								 " GROUP BY u.id, u.subject, w.armed_from, w.armed_until ORDER BY u.id "
								 "ON CONFLICT ON CONSTRAINT entitlement_turns_pkey "
								 "DO UPDATE SET turns = t.turns + 1, usage_until = greatest(t.usage_until, excluded.usage_until), "
								 "  headroom = CASE WHEN t.armed_from = excluded.armed_from AND t.armed_until = excluded.armed_until "
								 "                      AND t.headroom > excluded.headroom "
								 "                      AND t.armed_from <= $4 AND $4 < t.armed_until "
								 "                      AND greatest(t.usage_until, excluded.usage_until) < t.armed_until "
								 "                 THEN t.headroom - excluded.headroom END "
								 "RETURNING t.entitlement_id, t.usage_until, t.headroom IS NULL, t.subject",
								 5, turn_types),
						 turn_args, NULL, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "could not take the entitlements' turns: %s", SPI_result_code_string(ret));

	/* usage only grows: events cross thresholds, they never take one back */
	turns = SPI_tuptable;
	nturns = SPI_processed;
	for (uint64 i = 0; i < nturns; i++)
	{
		bool		isnull,
					no_until;
		Datum		eval_args[3];

		if (!DatumGetBool(SPI_getbinval(turns->vals[i], turns->tupdesc, 3, &isnull)))
			continue;
		eval_args[0] = SPI_getbinval(turns->vals[i], turns->tupdesc, 1, &isnull);
		eval_args[1] = SPI_getbinval(turns->vals[i], turns->tupdesc, 2, &no_until);
		eval_args[2] = SPI_getbinval(turns->vals[i], turns->tupdesc, 4, &isnull);
		ret = SPI_execute_plan(MeteringPrepareGeneric(&evaluate_plan, "SELECT metering._evaluate_alerts($1, $3, $2, false)",
													  3, eval_types),
							   eval_args, no_until ? " n " : "   ", false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not evaluate the alerts: %s", SPI_result_code_string(ret));
		/* (a statement may evaluate any number of entitlements) */
		SPI_freetuptable(SPI_tuptable);
	}
}

/*
 * metering._alerts_for_events(subjects, types, times, datas): the stored
 * events as arrays, one element per event (a Citus coordinator's writers
 * pass what they stored: the events' trigger runs on the shards there).
 */
PG_FUNCTION_INFO_V1(metering_alerts_for_events);
Datum
metering_alerts_for_events(PG_FUNCTION_ARGS)
{
	ArrayType  *subjects_a = PG_GETARG_ARRAYTYPE_P(0);
	Datum	   *subjects,
			   *types,
			   *times,
			   *datas;
	bool	   *n1,
			   *n2,
			   *n3,
			   *n4;
	int			nevents,
				k2,
				k3,
				k4,
				ncovered;
	Covered    *covered = NULL;
	Pairs		pairs;
	bool		every,
				keys_null,
				distributed;
	Datum		keys;

	deconstruct_array(subjects_a, TEXTOID, -1, false, TYPALIGN_INT, &subjects, &n1, &nevents);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(1), TEXTOID, -1, false, TYPALIGN_INT, &types, &n2, &k2);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(2), TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &times, &n3, &k3);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(3), JSONBOID, -1, false, TYPALIGN_INT, &datas, &n4, &k4);
	if (k2 != nevents || k3 != nevents || k4 != nevents)
		elog(ERROR, "_alerts_for_events: the arrays differ in length");

	SPI_connect();
	distributed = MeteringDistributedTable("entitlements");
	if (!RulesLive(&every, &keys, &keys_null) ||
		(ncovered = LoadCovered(subjects_a, every, keys, keys_null, distributed, &covered)) == 0)
	{
		SPI_finish();
		PG_RETURN_VOID();
	}
	PairsInit(&pairs, covered, ncovered, nevents);
	for (int i = 0; i < nevents; i++)
	{
		int			lo,
					hi;

		if (n1[i] || n2[i] || n3[i] || n4[i])
			continue;
		if (FindSubject(&pairs, DatumGetTextPP(subjects[i]), &lo, &hi))
			PairsAddEvent(&pairs, lo, hi, types[i], times[i], datas[i]);
	}
	TakeTurns(&pairs, distributed);
	SPI_finish();
	PG_RETURN_VOID();
}

/*
 * metering._events_alerts(): the events' AFTER INSERT statement trigger,
 * with the statement's rows as new_events.  Any other table does nothing: a
 * shard of the distributed events (80_distribute.sql), whose node's rules
 * and entitlements are not the coordinator's (its writers evaluate
 * instead), or a table of a role that would hand us rows of its choosing
 * (no role may attach the extension's trigger functions: 97_trigger_functions.sql).
 */
PG_FUNCTION_INFO_V1(metering_events_alerts);
Datum
metering_events_alerts(PG_FUNCTION_ARGS)
{
	TriggerData *trig = (TriggerData *) fcinfo->context;
	Tuplestorestate *rows;
	TupleDesc	desc;
	TupleTableSlot *slot;
	AttrNumber	subject_col,
				type_col,
				time_col,
				data_col;
	ArrayBuildState *subjects = NULL;
	Covered    *covered = NULL;
	Pairs		pairs;
	bool		every,
				keys_null,
				isnull;
	Datum		keys;
	int			ncovered;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BY_INSERT(trig->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trig->tg_event) || trig->tg_newtable == NULL)
		elog(ERROR, "_events_alerts: not called as the events' statement trigger with a new table");
	if (RelationGetRelid(trig->tg_relation) != MeteringRelid("events"))
		return PointerGetDatum(NULL);
	rows = trig->tg_newtable;
	if (tuplestore_tuple_count(rows) == 0)
		return PointerGetDatum(NULL);

	/*
	 * The rules and the covered entitlements as they are now, as a statement
	 * run from here sees them (at READ COMMITTED, what was committed since
	 * the triggering statement began, and what that statement wrote)
	 */
	SPI_connect();
	CommandCounterIncrement();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (!RulesLive(&every, &keys, &keys_null))
	{
		PopActiveSnapshot();
		SPI_finish();
		return PointerGetDatum(NULL);
	}
	desc = RelationGetDescr(trig->tg_relation);
	subject_col = ColumnOf(trig->tg_relation, "subject");
	type_col = ColumnOf(trig->tg_relation, "type");
	time_col = ColumnOf(trig->tg_relation, "time");
	data_col = ColumnOf(trig->tg_relation, "data");
	slot = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);

	/* our own read pointer: other triggers read the same rows */
	tuplestore_select_read_pointer(rows, tuplestore_alloc_read_pointer(rows, EXEC_FLAG_REWIND));
	tuplestore_rescan(rows);
	while (tuplestore_gettupleslot(rows, true, false, slot))
		subjects = accumArrayResult(subjects, slot_getattr(slot, subject_col, &isnull), false, TEXTOID,
									CurrentMemoryContext);
	ncovered = LoadCovered(DatumGetArrayTypeP(makeArrayResult(subjects, CurrentMemoryContext)),
						   every, keys, keys_null, false, &covered);
	PopActiveSnapshot();
	if (ncovered > 0)
	{
		PairsInit(&pairs, covered, ncovered, 0);
		tuplestore_rescan(rows);
		while (tuplestore_gettupleslot(rows, true, false, slot))
		{
			int			lo,
						hi;

			if (FindSubject(&pairs, DatumGetTextPP(slot_getattr(slot, subject_col, &isnull)), &lo, &hi))
				PairsAddEvent(&pairs, lo, hi, slot_getattr(slot, type_col, &isnull),
							  slot_getattr(slot, time_col, &isnull), slot_getattr(slot, data_col, &isnull));
		}
		TakeTurns(&pairs, false);
	}
	ExecDropSingleTupleTableSlot(slot);
	tuplestore_select_read_pointer(rows, 0);
	SPI_finish();
	return PointerGetDatum(NULL);
}
