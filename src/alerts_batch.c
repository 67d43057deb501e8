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
 * (MeteringPlanByIndexBegin).
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
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

/* the covered entitlements' query, without its feature condition */
#define COVERED_SQL \
	"SELECT e.id, e.subject, m.event_type, f.meter_group_by_filters, m.group_by, " \
	"       m.aggregation = 'COUNT', m.value_property " \
	"FROM metering.entitlements e " \
	"JOIN metering.features f ON f.id = e.feature_id " \
	"JOIN metering.meters m ON m.slug = f.meter_slug " \
	"WHERE e.subject = ANY ($1) AND e.deleted_at IS NULL AND e.type = 'metered'"

static SPIPlanPtr rules_plan,
			covered_all_plan,
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

/*
 * The covered entitlements of the subjects (all metered ones when a live
 * rule covers every feature), sorted by subject; 0 when no rule is live.
 */
static int
LoadCovered(ArrayType *subjects, Covered **out)
{
	Oid			types[2] = {TEXTARRAYOID, UUIDARRAYOID};
	Datum		args[2];
	bool		every,
				isnull;
	Covered    *c;
	int			ret;

	ret = SPI_execute_plan(MeteringPrepareGeneric(&rules_plan,
								   "SELECT bool_or(r.feature_key IS NULL), array_agg(f.id) "
								   "FROM metering.notification_rules r "
								   "LEFT JOIN metering.features f ON f.key = r.feature_key "
								   "WHERE r.disabled_at IS NULL AND r.deleted_at IS NULL", 0, NULL),
						   NULL, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the notification rules: %s", SPI_result_code_string(ret));
	every = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (isnull)
		return 0;
	args[0] = PointerGetDatum(subjects);
	args[1] = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);

	/*
	 * By subject and, unless a rule covers every feature, by feature too
	 * (the live entitlements' index has both): only the covered rows are read.
	 */
	if (every)
		ret = MeteringExecuteByIndex(MeteringPrepareGeneric(&covered_all_plan, COVERED_SQL, 1, types), args, NULL, true, 0);
	else
		ret = MeteringExecuteByIndex(MeteringPrepareGeneric(&covered_plan, COVERED_SQL " AND e.feature_id = ANY ($2)",
															2, types),
									 args, NULL, true, 0);
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

/*
 * metering._alerts_for_events(subjects, types, times, datas): the stored
 * events as arrays, one element per event.
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
				ncovered,
				npairs = 0;
	Covered    *covered = NULL;
	Datum	   *pair_ids,
			   *pair_times,
			   *pair_amounts,
			   *pair_subjects;
	Numeric		zero = int64_to_numeric(0),
				one = int64_to_numeric(1);
	MemoryContext outer,
				scratch;
	Oid			turn_types[5] = {UUIDARRAYOID, TIMESTAMPTZARRAYOID, NUMERICARRAYOID, TIMESTAMPTZOID, TEXTARRAYOID};
	Datum		turn_args[5];
	Oid			eval_types[2] = {UUIDOID, TIMESTAMPTZOID};
	int			ret;

	deconstruct_array(subjects_a, TEXTOID, -1, false, TYPALIGN_INT, &subjects, &n1, &nevents);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(1), TEXTOID, -1, false, TYPALIGN_INT, &types, &n2, &k2);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(2), TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &times, &n3, &k3);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(3), JSONBOID, -1, false, TYPALIGN_INT, &datas, &n4, &k4);
	if (k2 != nevents || k3 != nevents || k4 != nevents)
		elog(ERROR, "_alerts_for_events: the arrays differ in length");

	SPI_connect();
	ncovered = LoadCovered(subjects_a, &covered);
	if (ncovered == 0)
	{
		SPI_finish();
		PG_RETURN_VOID();
	}

	/*
	 * each event's amount for each covered entitlement of its subject and
	 * type (what an amount takes to compute is freed event by event: a
	 * statement may store any number of events)
	 */
	outer = CurrentMemoryContext;
	scratch = AllocSetContextCreate(outer, "alerts of an event", ALLOCSET_SMALL_SIZES);
	pair_ids = palloc(sizeof(Datum) * nevents);
	pair_times = palloc(sizeof(Datum) * nevents);
	pair_amounts = palloc(sizeof(Datum) * nevents);
	pair_subjects = palloc(sizeof(Datum) * nevents);
	for (int i = 0; i < nevents; i++)
	{
		Covered		key;
		Covered    *hit;
		int			lo,
					hi;
		Jsonb	   *data;

		if (n1[i] || n2[i] || n3[i] || n4[i])
			continue;
		MemoryContextReset(scratch);
		MemoryContextSwitchTo(scratch);
		key.subject = DatumGetTextPP(subjects[i]);
		hit = bsearch(&key, covered, ncovered, sizeof(Covered), CompareCovered);
		MemoryContextSwitchTo(outer);
		if (hit == NULL)
			continue;
		/* the run of the subject's entitlements around the hit */
		lo = hi = hit - covered;
		while (lo > 0 && CompareCovered(&covered[lo - 1], &key) == 0)
			lo--;
		while (hi + 1 < ncovered && CompareCovered(&covered[hi + 1], &key) == 0)
			hi++;
		for (int j = lo; j <= hi; j++)
		{
			Numeric		amount;

			MemoryContextSwitchTo(scratch);
			if (TextCmp(covered[j].event_type, DatumGetTextPP(types[i])) != 0)
			{
				MemoryContextSwitchTo(outer);
				continue;
			}
			data = DatumGetJsonbP(datas[i]);
			amount = EventAmount(&covered[j], data, zero, one);
			MemoryContextSwitchTo(outer);
			if (amount != zero && amount != one)
				amount = DatumGetNumeric(datumCopy(NumericGetDatum(amount), false, -1));
			if (npairs % nevents == 0 && npairs > 0)
			{
				pair_ids = repalloc(pair_ids, sizeof(Datum) * (npairs + nevents));
				pair_times = repalloc(pair_times, sizeof(Datum) * (npairs + nevents));
				pair_amounts = repalloc(pair_amounts, sizeof(Datum) * (npairs + nevents));
				pair_subjects = repalloc(pair_subjects, sizeof(Datum) * (npairs + nevents));
			}
			pair_ids[npairs] = covered[j].id;
			pair_times[npairs] = times[i];
			pair_amounts[npairs] = NumericGetDatum(amount);
			pair_subjects[npairs] = PointerGetDatum(covered[j].subject);
			npairs++;
		}
	}
	if (npairs == 0)
	{
		SPI_finish();
		PG_RETURN_VOID();
	}

	/*
	 * The turns of the reached entitlements, in id order (no deadlock between
	 * two batches), taking the statement's usage from the headroom of those
	 * it fits in (the usage in the window read before the turn, taken only if
	 * that is still the window once the turn is ours); the others get no
	 * headroom and are evaluated in full.
	 */
	turn_args[0] = PointerGetDatum(construct_array(pair_ids, npairs, UUIDOID, 16, false, TYPALIGN_CHAR));
	turn_args[1] = PointerGetDatum(construct_array(pair_times, npairs, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL,
												   TYPALIGN_DOUBLE));
	turn_args[2] = PointerGetDatum(construct_array(pair_amounts, npairs, NUMERICOID, -1, false, TYPALIGN_INT));
	turn_args[3] = TimestampTzGetDatum(MeteringNow());
	turn_args[4] = PointerGetDatum(construct_array(pair_subjects, npairs, TEXTOID, -1, false, TYPALIGN_INT));
	ret = MeteringExecuteByIndex(MeteringPrepareGeneric(&turns_plan,
								 "INSERT INTO metering.entitlement_turns AS t "
								 "       (entitlement_id, subject, purpose, turns, usage_until, armed_from, armed_until, headroom) "
								 "SELECT u.id, u.subject, 'a', 1, max(u.time), w.armed_from, w.armed_until, "
								 "       CASE WHEN w.armed_from IS NOT NULL THEN coalesce(sum(u.amount) "
								 "            FILTER (WHERE u.time >= w.armed_from AND u.time < w.armed_until), 0) END "
								 "  FROM unnest($1, $2, $3, $5) AS u(id, time, amount, subject) "
								 "  LEFT JOIN metering.entitlement_turns w ON w.entitlement_id = u.id AND w.purpose = 'a' "
								 " GROUP BY u.id, u.subject, w.armed_from, w.armed_until ORDER BY u.id "
								 "ON CONFLICT ON CONSTRAINT entitlement_turns_pkey "
								 "DO UPDATE SET turns = t.turns + 1, usage_until = greatest(t.usage_until, excluded.usage_until), "
								 "  headroom = CASE WHEN t.armed_from = excluded.armed_from AND t.armed_until = excluded.armed_until "
								 "                      AND t.headroom > excluded.headroom "
								 "                      AND t.armed_from <= $4 AND $4 < t.armed_until "
								 "                      AND greatest(t.usage_until, excluded.usage_until) < t.armed_until "
								 "                 THEN t.headroom - excluded.headroom END "
								 "RETURNING t.entitlement_id, t.usage_until, t.headroom IS NULL",
								 5, turn_types),
						 turn_args, NULL, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "could not take the entitlements' turns: %s", SPI_result_code_string(ret));

	/* usage only grows: events cross thresholds, they never take one back */
	{
		SPITupleTable *turns = SPI_tuptable;
		uint64		nturns = SPI_processed;

		for (uint64 i = 0; i < nturns; i++)
		{
			bool		isnull;
			Datum		eval_args[2];

			if (!DatumGetBool(SPI_getbinval(turns->vals[i], turns->tupdesc, 3, &isnull)))
				continue;
			eval_args[0] = SPI_getbinval(turns->vals[i], turns->tupdesc, 1, &isnull);
			eval_args[1] = SPI_getbinval(turns->vals[i], turns->tupdesc, 2, &isnull);
			ret = SPI_execute_plan(MeteringPrepareGeneric(&evaluate_plan, "SELECT metering._evaluate_alerts($1, $2, false)",
										   2, eval_types),
								   eval_args, isnull ? " n" : "  ", false, 0);
			if (ret != SPI_OK_SELECT)
				elog(ERROR, "could not evaluate the alerts: %s", SPI_result_code_string(ret));
		}
	}
	SPI_finish();
	PG_RETURN_VOID();
}
