/*
 * consume.c: metering.consume(event, feature), a check and a record in one
 * call (src/sql/34_holds.sql).  In C because it is on every request's path:
 * the same steps as reserve, through the gate's rules (gate.c), without a
 * statement and a plpgsql frame for each.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "entitlement.h"
#include "gate.h"
#include "ingest.h"
#include "metering.h"
#include "numeric_ops.h"

/* whether (subject, source, id) is stored: a repeat of a stored event */
static bool
Stored(Datum *ev)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		args[3] = {ev[2], ev[1], ev[0]};
	int			ret = SPI_execute_plan(MeteringPrepare(&plan,
											   "SELECT 1 FROM metering.events x "
											   "WHERE x.subject = $1 AND x.source = $2 AND x.id = $3",
											   3, types),
									   args, NULL, true, 1);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not look for the event: %s", SPI_result_code_string(ret));
	return SPI_processed > 0;
}

/*
 * Stores the event, already parsed, as ingest does (metering._store_events,
 * whose rules these are too): a repeat of (source, id) is stored once, and
 * once distributed the coordinator evaluates the alerts of what it stored
 * (the events' trigger runs on the shards).  True when new.
 */
static bool
Store(Datum *ev)
{
	static SPIPlanPtr plan = NULL;
	static SPIPlanPtr alerts = NULL;
	Oid			types[6] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, JSONBOID};
	int			ret = SPI_execute_plan(MeteringPrepare(&plan,
											   "INSERT INTO metering.events (id, source, subject, type, time, data) "
											   "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
											   6, types),
									   ev, NULL, false, 0);
	bool		stored;

	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not store the event: %s", SPI_result_code_string(ret));
	stored = SPI_processed == 1;
	if (stored && OidIsValid(get_relname_relid("pg_dist_partition", PG_CATALOG_NAMESPACE)))
	{
		ret = SPI_execute_plan(MeteringPrepare(&alerts,
										  "SELECT metering._alerts_for_events(ARRAY[$1], ARRAY[$2], ARRAY[$3], ARRAY[$4]) "
										  "WHERE metering._distributed()",
										  4, (Oid[]) {TEXTOID, TEXTOID, TIMESTAMPTZOID, JSONBOID}),
							   (Datum[]) {ev[2], ev[3], ev[4], ev[5]}, NULL, false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not evaluate the alerts of the event: %s", SPI_result_code_string(ret));
	}
	return stored;
}

/*
 * metering.consume(event jsonb, feature text) RETURNS TABLE(granted,
 * stored, amount, available): granted (and stored) when the subject's
 * entitlement to the feature is active and is a soft limit or has
 * available >= the event's usage (boolean and static: access); denied
 * stores nothing; a repeat of a stored event is granted, not stored, and
 * consumes nothing again.
 */
PG_FUNCTION_INFO_V1(metering_consume);
Datum
metering_consume(PG_FUNCTION_ARGS)
{
	MemoryContext caller = CurrentMemoryContext;
	TimestampTz now = MeteringNow();
	TupleDesc	desc;
	Datum		values[4];
	bool		nulls[4] = {false, false, true, true};
	Datum		ev[6];			/* id, source, subject, type, time, data */
	Jsonb	   *event;
	pg_uuid_t	id;
	Entitlement ent;
	Datum		feature;
	EntValue	v = {0};
	Numeric		usage;
	bool		usage_null,
				active,
				ok;
	TimestampTz until,
				at;
	HeapTuple	tuple;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "consume must return a row");
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("consume: %s must not be NULL", PG_ARGISNULL(0) ? "event" : "feature")));
	event = PG_GETARG_JSONB_P(0);
	IngestParseOne(event, ev);
	values[0] = values[1] = BoolGetDatum(false);

	SPI_connect();
	if (!EntFind(DatumGetTextPP(ev[2]), PG_GETARG_TEXT_PP(1), now, &id, &feature))
		goto done;
	usage = GateEventUsage(feature, DatumGetTextPP(ev[2]), DatumGetTextPP(ev[2]), DatumGetTextPP(ev[3]),
						   DatumGetJsonbP(ev[5]), "entitlement", &usage_null);
	if (!GateLock(UUIDPGetDatum(&id), ev[2], NULL))
		elog(ERROR, "entitlement vanished");	/* (they are never deleted) */
	until = GateTakeTurn(UUIDPGetDatum(&id), ev[2], 'u', Max(DatumGetTimestampTz(ev[4]), now));

	/*
	 * The turn is ours: what follows reads with a snapshot taken now, which
	 * sees the previous holder's commit (at READ COMMITTED; at REPEATABLE
	 * READ the turn failed with 40001 if it could not).
	 */
	CommandCounterIncrement();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (!EntLoadEntitlement(&ent, &id, DatumGetTextPP(ev[2]), CurrentMemoryContext, true))
		elog(ERROR, "entitlement vanished");	/* (they are never deleted) */
	at = GateCheckInstant(&ent, now, until, false);
	active = EntActive(&ent, at);
	if (ent.type == 'm' && active)
		EntValueAt(&ent, at, now, &v);
	if (ent.deleted_at <= now)
		ok = false;
	else if (ent.type == 'm')
		ok = active && (ent.soft_limit || usage_null || NumCmp(v.available, usage) >= 0);
	else
		ok = active;

	if (!usage_null)
		nulls[2] = false;
	if (!ok)
	{
		/*
		 * a repeat consumes nothing again: granted (where granted, the store
		 * finds it a repeat); looked for with the snapshot of the turn, which
		 * sees the previous holder's event (and this statement's earlier ones)
		 */
		values[0] = BoolGetDatum(Stored(ev));
		if (ent.type == 'm' && active)
		{
			values[3] = NumericGetDatum(v.available);
			nulls[3] = false;
		}
	}
	else
	{
		bool		stored = Store(ev);

		values[0] = BoolGetDatum(true);
		values[1] = BoolGetDatum(stored);
		if (ent.type == 'm')
		{
			/* what is left once this usage burns (it burns the balance, then becomes overage) */
			Numeric		left = stored && !usage_null ? NumSub(v.balance, usage) : v.balance;

			if (NumCmp(left, int64_to_numeric(0)) < 0)
				left = int64_to_numeric(0);
			values[3] = NumericGetDatum(NumSub(left, v.reserved));
			nulls[3] = false;
		}
	}
	PopActiveSnapshot();
	MemoryContextSwitchTo(caller);
	if (!nulls[2])
		values[2] = datumCopy(NumericGetDatum(usage), false, -1);
	if (!nulls[3])
		values[3] = datumCopy(values[3], false, -1);
done:
	MemoryContextSwitchTo(caller);
	tuple = heap_form_tuple(BlessTupleDesc(desc), values, nulls);
	SPI_finish();
	PG_RETURN_DATUM(HeapTupleGetDatum(tuple));
}
