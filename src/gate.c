/*
 * gate.c: the usage gate that reserve, commit_reservation and consume pass
 * (src/sql/34_holds.sql): the entitlement's row lock, its turn, the instant
 * a check reads the balance at, and the usage an event records.  Each rule
 * is here once; the SQL functions of the same names wrap them for the
 * plpgsql callers, and consume.c calls them directly.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "utils/jsonpath.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "entitlement.h"
#include "gate.h"
#include "meter_value.h"
#include "metering.h"

/* byte equality, as the columns' COLLATE "C" compares */
static bool
TextSame(text *a, text *b)
{
	return VARSIZE_ANY_EXHDR(a) == VARSIZE_ANY_EXHDR(b) &&
		memcmp(VARDATA_ANY(a), VARDATA_ANY(b), VARSIZE_ANY_EXHDR(a)) == 0;
}

/*
 * Locks the entitlement against the grant, void, reset and snapshot writers
 * (FOR NO KEY UPDATE), then checks at REPEATABLE READ that none of them
 * committed after the snapshot (40001).  False when it does not exist.
 * subject: the entitlement's, or 0 when not known (EntReadRow).  `row`,
 * when given, receives the row (in the caller's SPI upper context).
 */
bool
GateLock(Datum id, Datum subject, Datum *row)
{
	bool		isnull;

	if (!EntReadRow(id, subject, true))
		return false;
	subject = EntGetCol(0, 2, &isnull);
	if (row)
		*row = SPI_datumTransfer(EntGetCol(0, ENT_ROW_COL, &isnull), false, -1);
	/* once the lock is ours: whoever held it before us has committed */
	EntCheckUnchanged(id, SPI_datumTransfer(subject, false, -1));
	return true;
}

/*
 * Takes the entitlement's turn of this purpose (u: the usage gate; a: alert
 * evaluations): the update of its row of entitlement_turns, which waits for
 * the previous holder to end.  At REPEATABLE READ a snapshot taken before
 * that holder's commit fails here with 40001.  Returns the latest instant
 * the holders wrote at, this one's usage_time included: a check counts holds
 * and usage up to it, since a holder whose transaction began later than ours
 * wrote at its own now.
 */
TimestampTz
GateTakeTurn(Datum id, Datum subject, char purpose, TimestampTz usage_time)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {UUIDOID, TEXTOID, CHAROID, TIMESTAMPTZOID};
	Datum		args[4] = {id, subject, CharGetDatum(purpose), TimestampTzGetDatum(usage_time)};
	bool		isnull;
	int			ret = SPI_execute_plan(MeteringPrepare(&plan,
											   "INSERT INTO metering.entitlement_turns AS t (entitlement_id, subject, purpose, turns, usage_until) "
											   "VALUES ($1, $2, $3, 1, $4) ON CONFLICT ON CONSTRAINT entitlement_turns_pkey "
											   "DO UPDATE SET turns = t.turns + 1, usage_until = greatest(t.usage_until, excluded.usage_until) "
											   "RETURNING t.usage_until", 4, types),
									   args, NULL, false, 1);

	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "could not take the entitlement's turn: %s", SPI_result_code_string(ret));
	return DatumGetTimestampTz(EntGetCol(0, 1, &isnull));
}

/* t truncated to its UTC minute */
static TimestampTz
TruncMinute(TimestampTz t)
{
	TimestampTz r = t % USECS_PER_MINUTE;

	return t - (r < 0 ? r + USECS_PER_MINUTE : r);
}

/*
 * The instant a check reads the balance at: just after now, so that usage
 * stored at now counts, or just after the latest usage the holders stored
 * when that is later (an event's time may run ahead of metering.now()), but
 * within the current usage period.
 */
TimestampTz
GateCheckInstant(Entitlement *ent, TimestampTz now, TimestampTz until, bool until_null)
{
	TimestampTz bound;

	if (ent->type != 'm' || TIMESTAMP_NOT_FINITE(now))
		return now;
	if (until_null || until <= now)
		return now + 1;
	if (TIMESTAMP_IS_NOEND(until))
	{
		bound = EntPeriodBound(ent, now, true);
		return TIMESTAMP_NOT_FINITE(bound) ? bound : bound - 1;
	}
	/*
	 * anchors and resets are whole UTC minutes: with a period of whole
	 * minutes no bound lies between two instants of one minute
	 */
	if (ent->plan.period.time % USECS_PER_MINUTE == 0 && TruncMinute(until + 1) == TruncMinute(now))
		return until + 1;
	bound = EntPeriodBound(ent, now, true);
	return TIMESTAMP_NOT_FINITE(bound) ? until + 1 : Min(until + 1, bound - 1);
}

/*
 * The usage an event records for an entitlement: checks that the event is
 * of the entitlement's subject and of its feature's meter (type and group
 * filters; 22023 otherwise, naming `what` the event is checked against),
 * and returns what the meter reads from it (MeterUsage).  NULL (isnull) for
 * a feature without a meter.
 */
Numeric
GateEventUsage(Datum feature, text *ent_subject, text *subject, text *type, Jsonb *data, const char *what,
			   bool *isnull)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {UUIDOID};
	Datum		args[1] = {feature};
	bool		n;
	int			ret;
	text	   *meter,
			   *event_type;
	char	   *feature_key;
	Datum		slug,
				path,
				filters;
	bool		no_filters;

	if (!TextSame(subject, ent_subject))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event subject \"%s\" is not the subject of the %s: \"%s\"",
						text_to_cstring(subject), what, text_to_cstring(ent_subject))));
	/* the feature and its meter: the configuration, which every node holds */
	ret = SPI_execute_plan(MeteringPrepare(&plan,
										   "SELECT f.key, m.slug, m.event_type, m.aggregation = 'COUNT', "
										   "       m.value_property, m.group_by, f.meter_group_by_filters "
										   "FROM metering.features f "
										   "LEFT JOIN metering.meters m ON m.slug = f.meter_slug WHERE f.id = $1",
										   1, types),
						   args, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the entitlement's meter: %s", SPI_result_code_string(ret));
	feature_key = TextDatumGetCString(EntGetCol(0, 1, &n));
	slug = EntCopyCol(0, 2, &n);
	*isnull = n;
	if (n)
		return NULL;
	meter = DatumGetTextPP(slug);
	event_type = DatumGetTextPP(EntCopyCol(0, 3, &n));
	if (!TextSame(type, event_type))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event type \"%s\" is not the type of the events of meter \"%s\" of feature \"%s\": \"%s\"",
						text_to_cstring(type), text_to_cstring(meter), feature_key, text_to_cstring(event_type))));
	filters = EntCopyCol(0, 7, &no_filters);
	if (!no_filters)
	{
		MeterGroups *groups = MeterGroupsCompile(DatumGetJsonbP(EntGetCol(0, 6, &n)), CurrentMemoryContext);

		if (!MeterGroupsPass(groups, DatumGetJsonbP(filters), data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("event data does not pass the group filters of feature \"%s\": %s", feature_key,
							JsonbToCString(NULL, &DatumGetJsonbP(filters)->root, VARSIZE(DatumGetJsonbP(filters))))));
	}
	if (DatumGetBool(EntGetCol(0, 4, &n)))
		return MeterUsage(data, NULL);
	path = EntCopyCol(0, 5, &n);
	return n ? int64_to_numeric(0) : MeterUsage(data, DatumGetJsonPathP(path));
}

/* 22004 when one of the first n arguments of the SQL wrapper `name` is NULL */
static void
RequireArgs(FunctionCallInfo fcinfo, int n, const char *name)
{
	for (int i = 0; i < n; i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s: argument %d must not be NULL", name, i + 1)));
}

/* a column (id, subject, feature_id) of an entitlements row passed to a SQL wrapper */
static Datum
RowColumn(HeapTupleHeader row, const char *name)
{
	bool		isnull;
	Datum		d = GetAttributeByName(row, name, &isnull);

	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the entitlement must not be NULL")));
	return d;
}

/*
 * metering._lock_entitlement(entitlement uuid, subject text): GateLock (a
 * NULL subject: not known); the row, or NULL when none
 */
PG_FUNCTION_INFO_V1(metering_lock_entitlement);
Datum
metering_lock_entitlement(PG_FUNCTION_ARGS)
{
	Datum		row;
	bool		found;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	SPI_connect();
	/* (the SQL of 0.2.0, which the library serves until the update, gives no subject) */
	found = GateLock(PG_GETARG_DATUM(0), PG_NARGS() < 2 || PG_ARGISNULL(1) ? (Datum) 0 : PG_GETARG_DATUM(1), &row);
	SPI_finish();
	if (!found)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(row);
}

/* metering._take_turn(entitlement uuid, purpose "char", usage_time timestamptz) */
PG_FUNCTION_INFO_V1(metering_take_turn);
Datum
metering_take_turn(PG_FUNCTION_ARGS)
{
	TimestampTz until;

	RequireArgs(fcinfo, 4, "_take_turn");
	SPI_connect();
	until = GateTakeTurn(PG_GETARG_DATUM(0), PG_GETARG_DATUM(1), PG_GETARG_CHAR(2), PG_GETARG_TIMESTAMPTZ(3));
	SPI_finish();
	PG_RETURN_TIMESTAMPTZ(until);
}

/* metering._check_instant(e entitlements, now timestamptz, usage_until timestamptz) */
PG_FUNCTION_INFO_V1(metering_check_instant);
Datum
metering_check_instant(PG_FUNCTION_ARGS)
{
	Datum		id;
	Entitlement ent;
	TimestampTz at;

	RequireArgs(fcinfo, 2, "_check_instant");
	id = RowColumn(PG_GETARG_HEAPTUPLEHEADER(0), "id");
	SPI_connect();
	if (!EntLoadEntitlement(&ent, DatumGetUUIDP(id), DatumGetTextPP(RowColumn(PG_GETARG_HEAPTUPLEHEADER(0), "subject")),
							CurrentMemoryContext, false))
		EntErrorNoSuch(id);
	at = GateCheckInstant(&ent, PG_GETARG_TIMESTAMPTZ(1), PG_ARGISNULL(2) ? 0 : PG_GETARG_TIMESTAMPTZ(2),
						  PG_ARGISNULL(2));
	SPI_finish();
	PG_RETURN_TIMESTAMPTZ(at);
}

/* metering._event_usage(e entitlements, subject text, type text, data jsonb, what text) */
PG_FUNCTION_INFO_V1(metering_event_usage);
Datum
metering_event_usage(PG_FUNCTION_ARGS)
{
	MemoryContext caller = CurrentMemoryContext;
	Numeric		usage;
	bool		isnull;
	HeapTupleHeader e;

	RequireArgs(fcinfo, 5, "_event_usage");
	e = PG_GETARG_HEAPTUPLEHEADER(0);
	SPI_connect();
	usage = GateEventUsage(RowColumn(e, "feature_id"), DatumGetTextPP(RowColumn(e, "subject")), PG_GETARG_TEXT_PP(1), PG_GETARG_TEXT_PP(2), PG_GETARG_JSONB_P(3),
						   text_to_cstring(PG_GETARG_TEXT_PP(4)), &isnull);
	if (!isnull)
	{
		MemoryContext old = MemoryContextSwitchTo(caller);

		usage = DatumGetNumeric(datumCopy(NumericGetDatum(usage), false, -1));
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	if (isnull)
		PG_RETURN_NULL();
	PG_RETURN_NUMERIC(usage);
}

/* metering._find_entitlement(subject text, feature text, at timestamptz): EntFind */
PG_FUNCTION_INFO_V1(metering_find_entitlement);
Datum
metering_find_entitlement(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *id = palloc(sizeof(pg_uuid_t));
	bool		found;

	SPI_connect();
	found = EntFind(PG_GETARG_TEXT_PP(0), PG_GETARG_TEXT_PP(1), PG_GETARG_TIMESTAMPTZ(2), id, NULL);
	SPI_finish();
	if (!found)
		PG_RETURN_NULL();
	PG_RETURN_UUID_P(id);
}
