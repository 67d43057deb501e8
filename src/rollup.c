/*
 * rollup.c: hourly meter rollups, kept by triggers on metering.events.
 *
 * For every live meter, metering.meter_rollups holds one row per
 * (meter, subject, UTC hour, group values) with the partial aggregates every
 * aggregation but UNIQUE_COUNT can be finished from: event count, valued
 * count, sum, min, max, first and last instant, and the latest value.  The
 * same code fills it from three sources, so they cannot disagree:
 *   - the rows of an INSERT on metering.events (statement trigger),
 *   - the events around the rows of a DELETE (buckets are rebuilt, since a
 *     min, max or latest value cannot be subtracted),
 *   - all stored events of a type, when a meter is defined (backfill).
 * Upserts go in key order, so concurrent ingests wait for each other instead
 * of deadlocking.
 *
 * Meters are read with the latest snapshot: together with the SHARE lock a
 * meter definition takes on metering.events, that makes sure every event is
 * counted by either the backfill or the trigger, whatever the isolation
 * level of the ingesting transaction.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "meter_value.h"

/* entries buffered before they are written out */
#define FLUSH_EVERY 65536

typedef struct RollupMeter
{
	char	   *slug;
	char	   *event_type;
	int			event_type_len;
	MeterAggregation agg;
	JsonPath   *value_path;		/* NULL for COUNT */
	MeterGroups *groups;
} RollupMeter;

typedef struct RollupEntry
{
	int			meter;			/* index into the meter array (slug order) */
	const char *subject;
	int			subject_len;
	TimestampTz bucket;
	const char *groups;
	TimestampTz time;
	bool		valued;
	Numeric		value;
} RollupEntry;

typedef struct RollupBuffer
{
	RollupMeter *meters;
	int			nmeters;
	RollupEntry *entries;
	int			nentries;
	int			capacity;
	MemoryContext cxt;			/* entries and their strings; reset by flush */
} RollupBuffer;

static SPIPlanPtr meters_plan = NULL;
static SPIPlanPtr upsert_plan = NULL;

static TimestampTz
HourOf(TimestampTz t)
{
	/* UTC hours: timestamps count microseconds from a midnight UTC */
	TimestampTz b = t - (t % USECS_PER_HOUR);

	if (t % USECS_PER_HOUR < 0)
		b -= USECS_PER_HOUR;
	return b;
}

static SPIPlanPtr
SavedPlan(SPIPlanPtr *plan, const char *sql, int nargs, Oid *argtypes)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(sql, nargs, argtypes);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	return *plan;
}

/*
 * Loads the live meters (or just one) in slug order, under the latest
 * snapshot.  Must be called inside an SPI connection.
 */
static void
LoadMeters(RollupBuffer *buf, const char *only_slug)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1];
	char		argnulls[1];
	SPIPlanPtr	plan = SavedPlan(&meters_plan,
								 "SELECT slug, event_type, aggregation::text, value_property, group_by "
								 "FROM metering.meters "
								 "WHERE deleted_at IS NULL AND ($1 IS NULL OR slug = $1) "
								 "ORDER BY slug COLLATE \"C\"",
								 1, argtypes);
	MemoryContext old;
	int			ret;

	args[0] = only_slug ? CStringGetTextDatum(only_slug) : (Datum) 0;
	argnulls[0] = only_slug ? ' ' : 'n';
	PushActiveSnapshot(GetLatestSnapshot());
	ret = SPI_execute_plan(plan, args, argnulls, true, 0);
	PopActiveSnapshot();
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read metering.meters: %s", SPI_result_code_string(ret));

	old = MemoryContextSwitchTo(buf->cxt->parent);
	buf->nmeters = (int) SPI_processed;
	buf->meters = palloc0(sizeof(RollupMeter) * Max(buf->nmeters, 1));
	for (int i = 0; i < buf->nmeters; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		RollupMeter *m = &buf->meters[i];
		bool		isnull;
		Datum		d;

		m->slug = SPI_getvalue(tup, desc, 1);
		m->event_type = SPI_getvalue(tup, desc, 2);
		m->event_type_len = strlen(m->event_type);
		m->agg = MeterAggregationFromName(SPI_getvalue(tup, desc, 3));
		d = SPI_getbinval(tup, desc, 4, &isnull);
		m->value_path = isnull ? NULL : DatumGetJsonPathPCopy(d);
		d = SPI_getbinval(tup, desc, 5, &isnull);
		m->groups = MeterGroupsCompile(DatumGetJsonbPCopy(d), CurrentMemoryContext);
	}
	MemoryContextSwitchTo(old);
	SPI_freetuptable(SPI_tuptable);
}

static RollupBuffer *
RollupBufferCreate(void)
{
	RollupBuffer *buf = palloc0(sizeof(RollupBuffer));

	buf->cxt = AllocSetContextCreate(CurrentMemoryContext, "metering rollup",
									 ALLOCSET_DEFAULT_SIZES);
	return buf;
}

/* Adds one event for every meter of its type (or for meter `only` alone). */
static void
RollupAddEvent(RollupBuffer *buf, int only, text *subject, text *type,
			   TimestampTz time, Jsonb *data)
{
	const char *tp = VARDATA_ANY(type);
	int			tlen = VARSIZE_ANY_EXHDR(type);
	const char *subject_copy = NULL;

	for (int i = 0; i < buf->nmeters; i++)
	{
		RollupMeter *m = &buf->meters[i];
		RollupEntry *e;
		MemoryContext old;
		JsonbValue	v;

		if ((only >= 0 && i != only) || m->event_type_len != tlen ||
			memcmp(m->event_type, tp, tlen) != 0)
			continue;

		old = MemoryContextSwitchTo(buf->cxt);
		if (buf->nentries == buf->capacity)
		{
			buf->capacity = buf->capacity ? buf->capacity * 2 : 256;
			buf->entries = buf->entries
				? repalloc_huge(buf->entries, sizeof(RollupEntry) * buf->capacity)
				: palloc(sizeof(RollupEntry) * buf->capacity);
		}
		if (subject_copy == NULL)
			subject_copy = pnstrdup(VARDATA_ANY(subject), VARSIZE_ANY_EXHDR(subject));
		e = &buf->entries[buf->nentries++];
		e->meter = i;
		e->subject = subject_copy;
		e->subject_len = VARSIZE_ANY_EXHDR(subject);
		e->bucket = HourOf(time);
		e->time = time;
		e->groups = MeterGroupsText(m->groups, data);
		e->value = NULL;
		switch (m->agg)
		{
			case METER_COUNT:
				e->valued = true;
				break;
			case METER_UNIQUE_COUNT:
				e->valued = MeterPathValue(data, m->value_path, &v);
				break;
			default:
				e->valued = MeterPathValue(data, m->value_path, &v) &&
					(e->value = MeterValueNumber(&v)) != NULL;
				if (e->valued)
					e->value = DatumGetNumericCopy(NumericGetDatum(e->value));
				break;
		}
		MemoryContextSwitchTo(old);
	}
}

static int
CompareKeys(const RollupEntry *a, const RollupEntry *b)
{
	int			c;

	if (a->meter != b->meter)
		return a->meter < b->meter ? -1 : 1;
	c = memcmp(a->subject, b->subject, Min(a->subject_len, b->subject_len));
	if (c != 0)
		return c;
	if (a->subject_len != b->subject_len)
		return a->subject_len < b->subject_len ? -1 : 1;
	if (a->bucket != b->bucket)
		return a->bucket < b->bucket ? -1 : 1;
	return strcmp(a->groups, b->groups);
}

static int
CompareEntries(const void *x, const void *y)
{
	return CompareKeys((const RollupEntry *) x, (const RollupEntry *) y);
}

static int
NumericCompare(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a),
											 NumericGetDatum(b)));
}

/* Aggregates the buffered entries by key and upserts them, in key order. */
static void
RollupFlush(RollupBuffer *buf)
{
	static Oid	argtypes[13] = {
		TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID,
		INT8ARRAYOID, INT8ARRAYOID, NUMERICARRAYOID, NUMERICARRAYOID,
		NUMERICARRAYOID, TIMESTAMPTZARRAYOID, TIMESTAMPTZARRAYOID,
		TIMESTAMPTZARRAYOID, NUMERICARRAYOID
	};
	static const Oid elemtypes[13] = {
		TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID, INT8OID, INT8OID,
		NUMERICOID, NUMERICOID, NUMERICOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
		TIMESTAMPTZOID, NUMERICOID
	};
	SPIPlanPtr	plan;
	MemoryContext old;
	Datum	   *cols[13];
	bool	   *colnulls[13];
	Datum		args[13];
	int			nrows = 0;
	int			ret;

	if (buf->nentries == 0)
		return;
	plan = SavedPlan(&upsert_plan,
					 "INSERT INTO metering.meter_rollups AS r "
					 "(meter, subject, bucket, groups, events, valued, sum, min, max, "
					 " first_time, last_time, latest_time, latest_value) "
					 "SELECT u.meter, u.subject, u.bucket, u.groups::jsonb, u.events, u.valued, "
					 " u.sum, u.min, u.max, u.first_time, u.last_time, u.latest_time, u.latest_value "
					 "FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
					 " AS u(meter, subject, bucket, groups, events, valued, sum, min, max, "
					 "      first_time, last_time, latest_time, latest_value) "
					 "ON CONFLICT (meter, subject, bucket, groups) DO UPDATE SET "
					 " events = r.events + excluded.events, "
					 " valued = r.valued + excluded.valued, "
					 " sum = r.sum + excluded.sum, "
					 " min = least(r.min, excluded.min), "
					 " max = greatest(r.max, excluded.max), "
					 " first_time = least(r.first_time, excluded.first_time), "
					 " last_time = greatest(r.last_time, excluded.last_time), "
					 " latest_time = CASE WHEN r.latest_time IS NULL OR "
					 "   (excluded.latest_time, excluded.latest_value) > (r.latest_time, r.latest_value) "
					 "   THEN excluded.latest_time ELSE r.latest_time END, "
					 " latest_value = CASE WHEN r.latest_time IS NULL OR "
					 "   (excluded.latest_time, excluded.latest_value) > (r.latest_time, r.latest_value) "
					 "   THEN excluded.latest_value ELSE r.latest_value END",
					 13, argtypes);

	old = MemoryContextSwitchTo(buf->cxt);
	qsort(buf->entries, buf->nentries, sizeof(RollupEntry), CompareEntries);
	for (int c = 0; c < 13; c++)
	{
		cols[c] = palloc(sizeof(Datum) * buf->nentries);
		colnulls[c] = palloc0(sizeof(bool) * buf->nentries);
	}

	for (int i = 0; i < buf->nentries;)
	{
		RollupEntry *first = &buf->entries[i];
		RollupMeter *m = &buf->meters[first->meter];
		int64		events = 0,
					valued = 0;
		Numeric		sum = NULL,
					min = NULL,
					max = NULL,
					latest = NULL;
		TimestampTz first_time = first->time,
					last_time = first->time,
					latest_time = 0;
		int			r = nrows++;

		if (m->agg == METER_SUM || m->agg == METER_AVG)
			sum = int64_to_numeric(0);
		for (; i < buf->nentries && CompareKeys(first, &buf->entries[i]) == 0; i++)
		{
			RollupEntry *e = &buf->entries[i];

			events++;
			first_time = Min(first_time, e->time);
			last_time = Max(last_time, e->time);
			if (!e->valued)
				continue;
			valued++;
			if (e->value == NULL)
				continue;
			switch (m->agg)
			{
				case METER_SUM:
				case METER_AVG:
					sum = DatumGetNumeric(DirectFunctionCall2(numeric_add,
															  NumericGetDatum(sum),
															  NumericGetDatum(e->value)));
					break;
				case METER_MIN:
					if (min == NULL || NumericCompare(e->value, min) < 0)
						min = e->value;
					break;
				case METER_MAX:
					if (max == NULL || NumericCompare(e->value, max) > 0)
						max = e->value;
					break;
				case METER_LATEST:
					/* the last instant wins; a tie goes to the larger value */
					if (latest == NULL || e->time > latest_time ||
						(e->time == latest_time && NumericCompare(e->value, latest) > 0))
					{
						latest = e->value;
						latest_time = e->time;
					}
					break;
				default:
					break;
			}
		}
		cols[0][r] = CStringGetTextDatum(m->slug);
		cols[1][r] = PointerGetDatum(cstring_to_text_with_len(first->subject, first->subject_len));
		cols[2][r] = TimestampTzGetDatum(first->bucket);
		cols[3][r] = CStringGetTextDatum(first->groups);
		cols[4][r] = Int64GetDatum(events);
		cols[5][r] = Int64GetDatum(valued);
		cols[6][r] = NumericGetDatum(sum);
		colnulls[6][r] = sum == NULL;
		cols[7][r] = NumericGetDatum(min);
		colnulls[7][r] = min == NULL;
		cols[8][r] = NumericGetDatum(max);
		colnulls[8][r] = max == NULL;
		cols[9][r] = TimestampTzGetDatum(first_time);
		cols[10][r] = TimestampTzGetDatum(last_time);
		cols[11][r] = TimestampTzGetDatum(latest_time);
		colnulls[11][r] = latest == NULL;
		cols[12][r] = NumericGetDatum(latest);
		colnulls[12][r] = latest == NULL;
	}

	for (int c = 0; c < 13; c++)
	{
		int16		typlen;
		bool		typbyval;
		char		typalign;
		int			dims[1] = {nrows};
		int			lbs[1] = {1};

		get_typlenbyvalalign(elemtypes[c], &typlen, &typbyval, &typalign);
		args[c] = PointerGetDatum(construct_md_array(cols[c], colnulls[c], 1, dims, lbs,
													 elemtypes[c], typlen, typbyval, typalign));
	}
	MemoryContextSwitchTo(old);

	ret = SPI_execute_plan(plan, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not write metering.meter_rollups: %s", SPI_result_code_string(ret));

	MemoryContextReset(buf->cxt);
	buf->entries = NULL;
	buf->nentries = 0;
	buf->capacity = 0;
}

/* Attribute numbers of the event columns the rollups read. */
typedef struct EventColumns
{
	int			subject,
				type,
				time,
				data;
} EventColumns;

static EventColumns
FindEventColumns(TupleDesc desc)
{
	EventColumns c;

	c.subject = SPI_fnumber(desc, "subject");
	c.type = SPI_fnumber(desc, "type");
	c.time = SPI_fnumber(desc, "time");
	c.data = SPI_fnumber(desc, "data");
	if (c.subject <= 0 || c.type <= 0 || c.time <= 0 || c.data <= 0)
		elog(ERROR, "metering.events lacks one of subject, type, time, data");
	return c;
}

static void
AddTuple(RollupBuffer *buf, int only, TupleTableSlot *slot, EventColumns *c)
{
	bool		n1,
				n2,
				n3,
				n4;
	Datum		subject = slot_getattr(slot, c->subject, &n1);
	Datum		type = slot_getattr(slot, c->type, &n2);
	Datum		time = slot_getattr(slot, c->time, &n3);
	Datum		data = slot_getattr(slot, c->data, &n4);

	if (n1 || n2 || n3 || n4)
		return;					/* the table's NOT NULL constraints forbid it */
	RollupAddEvent(buf, only, DatumGetTextPP(subject), DatumGetTextPP(type),
				   DatumGetTimestampTz(time), DatumGetJsonbP(data));
}

/*
 * Feeds the events a query returns (subject, type, time, data) into the
 * buffer, under the latest snapshot, writing out every FLUSH_EVERY entries.
 */
static void
AddQueryEvents(RollupBuffer *buf, int only, const char *sql, int nargs,
			   Oid *argtypes, Datum *args)
{
	Portal		portal;

	PushActiveSnapshot(GetLatestSnapshot());
	portal = SPI_cursor_open_with_args(NULL, sql, nargs, argtypes, args, NULL, true, 0);
	for (;;)
	{
		SPI_cursor_fetch(portal, true, 10000);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			Datum		subject = SPI_getbinval(tup, desc, 1, &isnull);
			Datum		type = SPI_getbinval(tup, desc, 2, &isnull);
			Datum		time = SPI_getbinval(tup, desc, 3, &isnull);
			Datum		data = SPI_getbinval(tup, desc, 4, &isnull);

			RollupAddEvent(buf, only, DatumGetTextPP(subject), DatumGetTextPP(type),
						   DatumGetTimestampTz(time), DatumGetJsonbP(data));
		}
		SPI_freetuptable(SPI_tuptable);
		if (buf->nentries >= FLUSH_EVERY)
		{
			PopActiveSnapshot();
			RollupFlush(buf);
			PushActiveSnapshot(GetLatestSnapshot());
		}
	}
	SPI_cursor_close(portal);
	PopActiveSnapshot();
}

/*
 * DELETE: rebuilds every (meter, subject, hour) the deleted rows touched from
 * the events that remain.  The touched hours are found in SQL over the
 * transition table, so a large DELETE is deduplicated by the executor (which
 * can spill to disk) rather than held in memory here.
 */
static void
RebuildDeleted(RollupBuffer *buf, TriggerData *trig)
{
	Datum	   *slugs = palloc(sizeof(Datum) * buf->nmeters);
	Datum	   *types = palloc(sizeof(Datum) * buf->nmeters);
	Datum		args[2];
	Oid			argtypes[2] = {TEXTARRAYOID, TEXTARRAYOID};
	int			ret;

	for (int i = 0; i < buf->nmeters; i++)
	{
		slugs[i] = CStringGetTextDatum(buf->meters[i].slug);
		types[i] = CStringGetTextDatum(buf->meters[i].event_type);
	}
	args[0] = PointerGetDatum(construct_array(slugs, buf->nmeters, TEXTOID, -1, false, TYPALIGN_INT));
	args[1] = PointerGetDatum(construct_array(types, buf->nmeters, TEXTOID, -1, false, TYPALIGN_INT));

	if (SPI_register_trigger_data(trig) != SPI_OK_TD_REGISTER)
		elog(ERROR, "could not register the transition table of metering.events");
	ret = SPI_execute_with_args("DELETE FROM metering.meter_rollups r "
								"USING (SELECT DISTINCT m.slug, o.subject, date_trunc('hour', o.time, 'UTC') AS bucket "
								"         FROM old_events o JOIN unnest($1, $2) AS m(slug, type) ON m.type = o.type) k "
								"WHERE r.meter = k.slug AND r.subject = k.subject AND r.bucket = k.bucket",
								2, argtypes, args, NULL, false, 0);
	if (ret != SPI_OK_DELETE)
		elog(ERROR, "could not clear metering.meter_rollups: %s", SPI_result_code_string(ret));

	AddQueryEvents(buf, -1,
				   "SELECT e.subject, e.type, e.time, e.data "
				   "FROM (SELECT DISTINCT o.subject, o.type, date_trunc('hour', o.time, 'UTC') AS bucket "
				   "        FROM old_events o WHERE o.type = ANY ($2)) k "
				   "JOIN metering.events e ON e.subject = k.subject AND e.type = k.type "
				   " AND e.time >= k.bucket AND e.time < k.bucket + interval '1 hour'",
				   2, argtypes, args);
	RollupFlush(buf);
}

/* metering._events_rollup(): statement trigger for INSERT and DELETE on events. */
PG_FUNCTION_INFO_V1(metering_events_rollup);
Datum
metering_events_rollup(PG_FUNCTION_ARGS)
{
	TriggerData *trig = (TriggerData *) fcinfo->context;
	RollupBuffer *buf;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_STATEMENT(trig->tg_event) ||
		!TRIGGER_FIRED_AFTER(trig->tg_event))
		elog(ERROR, "metering._events_rollup must be an AFTER ... FOR EACH STATEMENT trigger");

	SPI_connect();
	buf = RollupBufferCreate();
	LoadMeters(buf, NULL);
	if (buf->nmeters > 0)
	{
		TupleDesc	desc = RelationGetDescr(trig->tg_relation);

		if (TRIGGER_FIRED_BY_INSERT(trig->tg_event) && trig->tg_newtable)
		{
			TupleTableSlot *slot = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
			EventColumns c = FindEventColumns(desc);

			tuplestore_rescan(trig->tg_newtable);
			while (tuplestore_gettupleslot(trig->tg_newtable, true, false, slot))
			{
				AddTuple(buf, -1, slot, &c);
				/* a bulk load (COPY, INSERT ... SELECT) is rolled up in slices */
				if (buf->nentries >= FLUSH_EVERY)
					RollupFlush(buf);
			}
			ExecDropSingleTupleTableSlot(slot);
			RollupFlush(buf);
		}
		else if (TRIGGER_FIRED_BY_DELETE(trig->tg_event) && trig->tg_oldtable)
			RebuildDeleted(buf, trig);
	}
	SPI_finish();
	return PointerGetDatum(NULL);
}

/*
 * metering._rollup_backfill(meter text): rolls up every stored event of a
 * newly defined meter's type.
 */
PG_FUNCTION_INFO_V1(metering_rollup_backfill);
Datum
metering_rollup_backfill(PG_FUNCTION_ARGS)
{
	char	   *slug = text_to_cstring(PG_GETARG_TEXT_PP(0));
	RollupBuffer *buf;
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1];

	SPI_connect();
	buf = RollupBufferCreate();
	LoadMeters(buf, slug);
	if (buf->nmeters == 1)
	{
		args[0] = CStringGetTextDatum(buf->meters[0].event_type);
		AddQueryEvents(buf, 0,
					   "SELECT subject, type, time, data FROM metering.events WHERE type = $1",
					   1, argtypes, args);
		RollupFlush(buf);
	}
	SPI_finish();
	PG_RETURN_VOID();
}
