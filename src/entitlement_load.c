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
 * Loads an entitlement, its feature's meter, its resets and (with_grants)
 * its grants into the current memory context.  False when it does not
 * exist.  Must be called inside an SPI connection.
 */
bool
EntLoadEntitlement(Entitlement *ent, pg_uuid_t *id, MemoryContext cxt, bool with_grants)
{
	static SPIPlanPtr ent_plan = NULL;
	static SPIPlanPtr reset_plan = NULL;
	static SPIPlanPtr grant_plan = NULL;
	Oid			types[1] = {UUIDOID};
	Datum		args[1] = {UUIDPGetDatum(id)};
	MemoryContext old;
	bool		isnull;
	int			ret;

	ret = SPI_execute_plan(MeteringPrepare(&ent_plan,
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
		ent->plan.periods = true;
		ent->plan.period = *DatumGetIntervalP(EntGetCol(0, 7, &isnull));
		ent->plan.anchor = DatumGetTimestampTz(EntGetCol(0, 8, &isnull));
		ent->plan.measure_from = DatumGetTimestampTz(EntGetCol(0, 9, &isnull));
		ent->plan.preserve_overage = DatumGetBool(EntGetCol(0, 10, &isnull));
		ent->count = strcmp(TextDatumGetCString(EntGetCol(0, 11, &isnull)), "COUNT") == 0;
		ent->event_type = EntCopyCol(0, 12, &isnull);
		ent->value_path = EntCopyCol(0, 13, &isnull);
		ent->group_by = EntCopyCol(0, 14, &isnull);
		ent->filters = EntCopyCol(0, 15, &isnull);
		ent->meter = EntCopyCol(0, 16, &isnull);
		ent->watermark = DatumGetInt64(EntGetCol(0, 17, &isnull));
	}
	MemoryContextSwitchTo(old);
	if (ent->type != 'm')
		return true;

	ret = SPI_execute_plan(MeteringPrepare(&reset_plan,
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
		ent->plan.resets[i].at = DatumGetTimestampTz(EntGetCol(i, 1, &isnull));
		ent->plan.resets[i].retain_anchor = DatumGetBool(EntGetCol(i, 2, &isnull));
		ent->plan.resets[i].preserve_overage = DatumGetBool(EntGetCol(i, 3, &isnull));
	}
	MemoryContextSwitchTo(old);
	if (!with_grants)
		return true;

	ret = SPI_execute_plan(MeteringPrepare(&grant_plan,
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
