/*
 * entitlement_load.c: reading an entitlement, its feature's meter, its
 * resets and its grants; with the SPI helpers the entitlement files share.
 */
#include "postgres.h"

#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/timestamp.h"

#include "entitlement.h"
#include "metering.h"

Datum
EntGetCol(int row, int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

Datum
EntCopyCol(int row, int col, bool *isnull)
{
	Datum		d = EntGetCol(row, col, isnull);
	Form_pg_attribute att = TupleDescAttr(SPI_tuptable->tupdesc, col - 1);

	if (*isnull)
		return (Datum) 0;
	return datumCopy(d, att->attbyval, att->attlen);
}

/*
 * The row of entitlement `id` in SPI_tuptable (false when none): by its id
 * and subject when the subject is known (NULL: not), which a distributed
 * install routes to the subject's shard; by the id alone a Citus
 * coordinator asks every shard.  lock: FOR NO KEY UPDATE.  Columns: the
 * entitlements' first columns, then e.* as a row (column ENT_ROW_COL).
 */
#define ENT_ROW_SQL(condition) \
	"SELECT e.type::text, e.subject, e.config, e.is_soft_limit, e.created_at, " \
	"       e.deleted_at, e.usage_period, e.usage_period_anchor, e.measure_usage_from, " \
	"       e.preserve_overage_at_reset, e.feature_id, e " \
	"FROM metering.entitlements e WHERE e.id = $1 " condition

bool
EntReadRow(Datum id, Datum subject, bool lock)
{
	static SPIPlanPtr plans[2][2];
	static const char *const sql[2][2] = {
		{ENT_ROW_SQL(""), ENT_ROW_SQL("FOR NO KEY UPDATE")},
		{ENT_ROW_SQL("AND e.subject = $2"), ENT_ROW_SQL("AND e.subject = $2 FOR NO KEY UPDATE")}
	};
	Oid			types[2] = {UUIDOID, TEXTOID};
	Datum		args[2] = {id, subject};
	bool		by_subject = subject != (Datum) 0;
	int			ret;

	ret = SPI_execute_plan(MeteringPrepare(&plans[by_subject][lock], sql[by_subject][lock], by_subject ? 2 : 1, types),
						   args, NULL, !lock, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the entitlement: %s", SPI_result_code_string(ret));
	return SPI_processed > 0;
}

#define RESET_SQL(condition) \
	"SELECT effective_at, retain_anchor, preserve_overage FROM metering.resets " \
	"WHERE entitlement_id = $1 " condition " ORDER BY effective_at"
#define GRANT_SQL(condition) \
	"SELECT id, amount, priority, effective_at, coalesce(expires_at, 'infinity'), " \
	"       least(coalesce(expires_at, 'infinity'), coalesce(voided_at, 'infinity'), " \
	"             coalesce(deleted_at, 'infinity')), " \
	"       recurrence, coalesce(recurrence_anchor, effective_at), " \
	"       min_rollover_amount, max_rollover_amount, created_at " \
	"FROM metering.grants WHERE entitlement_id = $1 " condition

/*
 * Loads an entitlement (of `subject`, or NULL when not known: see
 * EntReadRow), its feature's meter, its resets and (with_grants) its grants
 * into the current memory context.  False when it does not exist.  Must be
 * called inside an SPI connection.
 */
bool
EntLoadEntitlement(Entitlement *ent, pg_uuid_t *id, text *subject, MemoryContext cxt, bool with_grants)
{
	static SPIPlanPtr meter_plan = NULL;
	static SPIPlanPtr reset_plans[2];
	static SPIPlanPtr grant_plans[2];
	static const char *const reset_sql[2] = {RESET_SQL(""), RESET_SQL("AND subject = $2")};
	static const char *const grant_sql[2] = {GRANT_SQL(""), GRANT_SQL("AND subject = $2")};
	Oid			types[2] = {UUIDOID, TEXTOID};
	/* (the tables of 0.2.0, which the library serves until the update, have no subject column) */
	int			by_subject = MeteringSqlCurrent() ? 1 : 0;
	Datum		args[2];
	Datum		feature;
	MemoryContext old;
	bool		isnull;
	int			ret;

	if (!EntReadRow(UUIDPGetDatum(id), PointerGetDatum(subject), false))
		return false;

	old = MemoryContextSwitchTo(cxt);
	memset(ent, 0, sizeof(Entitlement));
	ent->id = *id;
	ent->type = TextDatumGetCString(EntGetCol(0, 1, &isnull))[0];
	ent->subject = EntCopyCol(0, 2, &isnull);
	ent->config = EntCopyCol(0, 3, &isnull);
	ent->soft_limit = DatumGetBool(EntGetCol(0, 4, &isnull));
	ent->created_at = DatumGetTimestampTz(EntGetCol(0, 5, &isnull));
	ent->deleted_at = DatumGetTimestampTz(EntGetCol(0, 6, &isnull));
	if (isnull)
		ent->deleted_at = DT_NOEND;
	if (ent->type == 'm')
	{
		Datum		period = EntGetCol(0, 7, &isnull);
		bool		no_anchor,
					no_start;

		ent->plan.periods = true;
		ent->plan.anchor = DatumGetTimestampTz(EntGetCol(0, 8, &no_anchor));
		ent->plan.measure_from = DatumGetTimestampTz(EntGetCol(0, 9, &no_start));
		/* (the insert trigger fills them: a row without them was never checked) */
		if (isnull || no_anchor || no_start)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("metered entitlement %s has no usage period, anchor or measure_usage_from",
							DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(id))))));
		ent->plan.period = *DatumGetIntervalP(period);
		ent->plan.preserve_overage = DatumGetBool(EntGetCol(0, 10, &isnull));
	}
	feature = EntCopyCol(0, 11, &isnull);
	MemoryContextSwitchTo(old);
	if (ent->type != 'm')
		return true;

	/* the feature's meter: the configuration, which every node holds */
	args[0] = feature;
	ret = SPI_execute_plan(MeteringPrepare(&meter_plan,
								   "SELECT m.aggregation::text, m.event_type, m.value_property, m.group_by, "
								   "       f.meter_group_by_filters, m.slug, coalesce(s.rolled_up_to, 0) "
								   "FROM metering.features f "
								   "LEFT JOIN metering.meters m ON m.slug = f.meter_slug "
								   "LEFT JOIN metering.meter_rollup_state s ON s.meter = m.slug "
								   "WHERE f.id = $1", 1, types),
						   args, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the entitlement's meter: %s", SPI_result_code_string(ret));
	old = MemoryContextSwitchTo(cxt);
	ent->count = strcmp(TextDatumGetCString(EntGetCol(0, 1, &isnull)), "COUNT") == 0;
	ent->event_type = EntCopyCol(0, 2, &isnull);
	ent->value_path = EntCopyCol(0, 3, &isnull);
	ent->group_by = EntCopyCol(0, 4, &isnull);
	ent->filters = EntCopyCol(0, 5, &isnull);
	ent->meter = EntCopyCol(0, 6, &isnull);
	ent->watermark = DatumGetInt64(EntGetCol(0, 7, &isnull));
	MemoryContextSwitchTo(old);

	/* the entitlement's own rows, by its subject (the shard they are on) */
	args[0] = UUIDPGetDatum(id);
	args[1] = ent->subject;

	ret = SPI_execute_plan(MeteringPrepare(&reset_plans[by_subject], reset_sql[by_subject], 1 + by_subject, types),
						   args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the resets: %s", SPI_result_code_string(ret));
	old = MemoryContextSwitchTo(cxt);
	ent->plan.nresets = (int) SPI_processed;
	ent->plan.resets = palloc0(sizeof(BdReset) * Max(ent->plan.nresets, 1));
	for (int i = 0; i < ent->plan.nresets; i++)
	{
		ent->plan.resets[i].at = DatumGetTimestampTz(EntGetCol(i, 1, &isnull));
		ent->plan.resets[i].retain_anchor = DatumGetBool(EntGetCol(i, 2, &isnull));
		ent->plan.resets[i].preserve_overage = DatumGetBool(EntGetCol(i, 3, &isnull));
	}
	MemoryContextSwitchTo(old);
	if (!with_grants)
		return true;

	ret = SPI_execute_plan(MeteringPrepare(&grant_plans[by_subject], grant_sql[by_subject], 1 + by_subject, types),
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

		g->id = *DatumGetUUIDP(EntGetCol(i, 1, &isnull));
		g->amount = DatumGetNumeric(EntCopyCol(i, 2, &isnull));
		g->priority = DatumGetInt32(EntGetCol(i, 3, &isnull));
		g->effective_at = DatumGetTimestampTz(EntGetCol(i, 4, &isnull));
		g->expires_at = DatumGetTimestampTz(EntGetCol(i, 5, &isnull));
		g->end = DatumGetTimestampTz(EntGetCol(i, 6, &isnull));
		rec = EntGetCol(i, 7, &isnull);
		g->recurring = !isnull;
		if (g->recurring)
			g->recurrence = *DatumGetIntervalP(rec);
		g->recurrence_anchor = DatumGetTimestampTz(EntGetCol(i, 8, &isnull));
		g->min_rollover = DatumGetNumeric(EntCopyCol(i, 9, &isnull));
		g->max_rollover = DatumGetNumeric(EntCopyCol(i, 10, &isnull));
		g->created_at = DatumGetTimestampTz(EntGetCol(i, 11, &isnull));
	}
	MemoryContextSwitchTo(old);
	return true;
}
