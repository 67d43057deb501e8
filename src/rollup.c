/*
 * rollup.c: hourly meter rollups, kept behind a watermark: the buffer
 * that builds and writes them, and the rebuild after DELETE on events.
 * The refresh that moves the watermark is in refresh.c.
 *
 * For every live meter, metering.meter_rollups holds one row per
 * (meter, subject, UTC hour, group values) with the partial aggregates every
 * aggregation but UNIQUE_COUNT can be finished from: event count, valued
 * count, sum, min, max, first and last instant, and the latest value.
 *
 * Ingestion does no rollup work.  Every event gets a sequence number (seq)
 * when it is stored, and a meter's rollups hold exactly its events with
 * seq <= the meter's watermark (metering.meter_rollup_state).  Readers add
 * the events above the watermark themselves, so an answer is exact whether
 * or not the rollups are current; refresh_rollups() only moves work from
 * query time to a maintenance call.
 *
 * DELETE on metering.events rebuilds the touched hours below the watermark
 * (a min, max or latest value cannot be subtracted).  The same accumulator
 * serves it and the refresh, so they cannot disagree.  Upserts go in key order.
 */
#include "postgres.h"

#include "commands/trigger.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "calendar.h"
#include "metering.h"
#include "refresh.h"
#include "rollup.h"

/* entries buffered before they are written out */
#define FLUSH_EVERY 65536

static SPIPlanPtr meters_plan = NULL;
static SPIPlanPtr upsert_plan = NULL;
static SPIPlanPtr upsert_plan_020 = NULL;	/* before ALTER EXTENSION ... UPDATE TO 0.3.0 */

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
 * Loads the live meters (or just one) in slug order with their watermarks,
 * locking the watermark rows FOR UPDATE: refreshes and the rebuilds of
 * DELETE take turns, meter by meter.  Must be called inside an SPI
 * connection.
 */
void
RollupLoadMeters(RollupBuffer *buf, const char *only_slug)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1];
	char		argnulls[1];
	SPIPlanPtr	plan = SavedPlan(&meters_plan,
								 "SELECT m.slug, m.event_type, m.aggregation::text, m.value_property, m.group_by, s.rolled_up_to "
								 "FROM metering.meters m JOIN metering.meter_rollup_state s ON s.meter = m.slug "
								 "WHERE m.deleted_at IS NULL AND ($1 IS NULL OR m.slug = $1) "
								 "ORDER BY m.slug COLLATE \"C\" FOR UPDATE OF s",
								 1, argtypes);
	MemoryContext old;
	int			ret;

	args[0] = only_slug ? CStringGetTextDatum(only_slug) : (Datum) 0;
	argnulls[0] = only_slug ? ' ' : 'n';
	ret = SPI_execute_plan(plan, args, argnulls, false, 0);
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
		m->watermark = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
	}
	MemoryContextSwitchTo(old);
	SPI_freetuptable(SPI_tuptable);
}

RollupBuffer *
RollupBufferCreate(void)
{
	RollupBuffer *buf = palloc0(sizeof(RollupBuffer));

	buf->cxt = AllocSetContextCreate(CurrentMemoryContext, "metering rollup",
									 ALLOCSET_DEFAULT_SIZES);
	buf->scratch = AllocSetContextCreate(CurrentMemoryContext, "metering rollup event",
										 ALLOCSET_SMALL_SIZES);
	return buf;
}

/*
 * Adds one event for every meter of its type (or for meter `only` alone).
 * JSONPath evaluation leaves garbage behind, so it runs in a scratch context
 * reset after every event; only the results are kept.
 */
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
		char	   *groups;
		bool		valued;
		Numeric		value = NULL;

		if ((only >= 0 && i != only) || m->event_type_len != tlen ||
			memcmp(m->event_type, tp, tlen) != 0)
			continue;

		old = MemoryContextSwitchTo(buf->scratch);
		groups = MeterGroupsText(m->groups, data);
		switch (m->agg)
		{
			case METER_COUNT:
				valued = true;
				break;
			case METER_UNIQUE_COUNT:
				valued = MeterPathValue(data, m->value_path, &v);
				break;
			default:
				valued = MeterPathValue(data, m->value_path, &v) &&
					(value = MeterValueNumber(&v)) != NULL;
				break;
		}

		MemoryContextSwitchTo(buf->cxt);
		if (buf->nentries == buf->capacity)
		{
			buf->capacity = buf->capacity ? buf->capacity * 2 : 1024;
			buf->entries = buf->entries
				? repalloc_huge(buf->entries, sizeof(RollupEntry) * buf->capacity)
				: palloc(sizeof(RollupEntry) * buf->capacity);
		}
		if (subject_copy == NULL)
			subject_copy = pnstrdup(VARDATA_ANY(subject), VARSIZE_ANY_EXHDR(subject));
		e = &buf->entries[buf->nentries++];
		buf->added++;
		e->meter = i;
		e->subject = subject_copy;
		e->subject_len = VARSIZE_ANY_EXHDR(subject);
		e->bucket = TruncHour(time);
		e->time = time;
		e->groups = pstrdup(groups);
		e->valued = valued;
		e->value = value ? DatumGetNumericCopy(NumericGetDatum(value)) : NULL;
		MemoryContextSwitchTo(old);
		MemoryContextReset(buf->scratch);
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
void
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
	bool		keyed;
	SPIPlanPtr *slot;

	if (buf->nentries == 0)
		return;
	/*
	 * 0.3.0 keys the rollups by a hash of their groups (a group value may be
	 * longer than a btree entry holds); until ALTER EXTENSION ... UPDATE has
	 * run, the library writes 0.2.0's table, keyed by the groups themselves.
	 */
	keyed = MeteringInstalledVersion() >= 300;
	slot = keyed ? &upsert_plan : &upsert_plan_020;
	plan = SavedPlan(slot, *slot ? NULL :
					 psprintf("INSERT INTO metering.meter_rollups AS r "
					 "(meter, subject, bucket, groups, events, valued, sum, min, max, "
					 " first_time, last_time, latest_time, latest_value%s) "
					 "SELECT u.meter, u.subject, u.bucket, u.groups::jsonb, u.events, u.valued, "
					 " u.sum, u.min, u.max, u.first_time, u.last_time, u.latest_time, u.latest_value%s "
					 "FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
					 " AS u(meter, subject, bucket, groups, events, valued, sum, min, max, "
					 "      first_time, last_time, latest_time, latest_value) "
					 "ON CONFLICT (meter, subject, bucket, %s) DO UPDATE SET "
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
					 keyed ? ", groups_key" : "",
					 keyed ? ", pg_catalog.sha256(pg_catalog.textsend(u.groups::jsonb::text))" : "",
					 keyed ? "groups_key" : "groups"),
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
					/* entitlements read a bucket with a negative value event by event */
					if (m->agg == METER_SUM && (min == NULL || NumericCompare(e->value, min) < 0))
						min = e->value;
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
	buf->written += nrows;

	MemoryContextReset(buf->cxt);
	buf->entries = NULL;
	buf->nentries = 0;
	buf->capacity = 0;
}

/*
 * Feeds the events a query returns (subject, type, time, data) into the
 * buffer, under the latest snapshot, writing out every FLUSH_EVERY entries.
 */
void
RollupAddQueryEvents(RollupBuffer *buf, int only, const char *sql, int nargs,
					 Oid *argtypes, Datum *args)
{
	Portal		portal;
	MemoryContext batch = AllocSetContextCreate(CurrentMemoryContext, "metering rollup batch",
												ALLOCSET_DEFAULT_SIZES);
	MemoryContext old;

	PushActiveSnapshot(GetLatestSnapshot());
	portal = SPI_cursor_open_with_args(NULL, sql, nargs, argtypes, args, NULL, true, 0);
	for (;;)
	{
		SPI_cursor_fetch(portal, true, 10000);
		if (SPI_processed == 0)
			break;
		/* detoasted payloads live only as long as their batch */
		old = MemoryContextSwitchTo(batch);
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
		MemoryContextSwitchTo(old);
		MemoryContextReset(batch);
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
	MemoryContextDelete(batch);
}

/*
 * Whether the installed SQL keeps what depends on the events (entitlement
 * snapshots and usage periods, 0.2.0 and later): the library is upgraded
 * before ALTER EXTENSION metering UPDATE runs, and must keep working with
 * the SQL of 0.1.0 until then.
 */
bool
RollupHasDerivedData(void)
{
	return MeteringInstalledVersion() >= 200;
}

/*
 * DELETE: rebuilds, for every meter, the touched hours below its watermark
 * from the events that remain there.  The hours are found in SQL over the
 * transition table, so a large DELETE is deduplicated by the executor (which
 * can spill to disk) rather than held in memory here.
 */
static void
RebuildDeleted(RollupBuffer *buf, TriggerData *trig)
{
	Oid			argtypes[3] = {TEXTOID, TEXTOID, INT8OID};
	bool		derived = RollupHasDerivedData();

	if (SPI_register_trigger_data(trig) != SPI_OK_TD_REGISTER)
		elog(ERROR, "could not register the transition table of metering.events");
	/* deleted meters have no rollups, but their entitlements may have snapshots */
	if (derived)
	{
		int			ret = SPI_execute("SELECT metering._events_changed(f.meter_slug, array_agg(o.subject), array_agg(o.time)) "
									  "FROM old_events o JOIN metering.meters m ON m.event_type = o.type AND m.deleted_at IS NOT NULL "
									  "JOIN metering.features f ON f.meter_slug = m.slug GROUP BY f.meter_slug",
									  false, 0);

		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not update the snapshots of deleted meters: %s", SPI_result_code_string(ret));
	}

	for (int i = 0; i < buf->nmeters; i++)
	{
		RollupMeter *m = &buf->meters[i];
		Datum		args[3];
		int			ret;

		args[0] = CStringGetTextDatum(m->slug);
		args[1] = CStringGetTextDatum(m->event_type);
		args[2] = Int64GetDatum(m->watermark);
		/* the entitlements' snapshots after the deleted events */
		ret = !derived ? SPI_OK_SELECT : SPI_execute_with_args("SELECT metering._events_changed($1, array_agg(o.subject), array_agg(o.time)) "
									"FROM old_events o WHERE o.type = $2 AND $3 IS NOT NULL",
									3, argtypes, args, NULL, false, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not update the snapshots: %s", SPI_result_code_string(ret));
		ret = SPI_execute_with_args("DELETE FROM metering.meter_rollups r "
									"USING (SELECT DISTINCT o.subject, date_trunc('hour', o.time, 'UTC') AS bucket "
									"         FROM old_events o WHERE o.type = $2 AND o.seq <= $3) k "
									"WHERE r.meter = $1 AND r.subject = k.subject AND r.bucket = k.bucket",
									3, argtypes, args, NULL, false, 0);
		if (ret != SPI_OK_DELETE)
			elog(ERROR, "could not clear metering.meter_rollups: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
			continue;
		/* the time span bounds the scan (BRIN); the hours are a hashed semi-join */
		RollupAddQueryEvents(buf, i,
					   "WITH k AS MATERIALIZED (SELECT DISTINCT o.subject, date_trunc('hour', o.time, 'UTC') AS bucket "
					   "                          FROM old_events o WHERE o.type = $2 AND o.seq <= $3) "
					   "SELECT e.subject, e.type, e.time, e.data FROM metering.events e "
					   "WHERE e.type = $2 AND e.seq <= $3 "
					   "  AND e.time >= (SELECT min(bucket) FROM k) "
					   "  AND e.time < (SELECT max(bucket) FROM k) + interval '1 hour' "
					   "  AND (e.subject, date_trunc('hour', e.time, 'UTC')) IN (SELECT subject, bucket FROM k)",
					   3, argtypes, args);
		RollupFlush(buf);
		/* ... and then the usage periods, from the rebuilt rollups */
		if (derived)
		{
			ret = SPI_execute_with_args("SELECT metering._usage_periods_rebuild($1, array_agg(o.subject), array_agg(o.time)) "
										"FROM old_events o WHERE o.type = $2 AND o.seq <= $3 HAVING count(*) > 0",
										3, argtypes, args, NULL, false, 0);
			if (ret != SPI_OK_SELECT)
				elog(ERROR, "could not rebuild the usage periods of meter \"%s\"", m->slug);
		}
	}
}

/* metering._events_deleted(): statement trigger for DELETE on events. */
PG_FUNCTION_INFO_V1(metering_events_deleted);
Datum
metering_events_deleted(PG_FUNCTION_ARGS)
{
	TriggerData *trig = (TriggerData *) fcinfo->context;
	RollupBuffer *buf;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_STATEMENT(trig->tg_event) ||
		!TRIGGER_FIRED_AFTER(trig->tg_event) || !TRIGGER_FIRED_BY_DELETE(trig->tg_event) ||
		trig->tg_oldtable == NULL)
		elog(ERROR, "metering._events_deleted must be an AFTER DELETE ... REFERENCING OLD TABLE AS old_events FOR EACH STATEMENT trigger");

	/* a shard of the distributed events: its node's meters are not the coordinator's */
	if (strcmp(RelationGetRelationName(trig->tg_relation), "events") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("events cannot be deleted once distributed"),
				 errdetail("The rollups of deleted events are rebuilt on the coordinator only in this release."),
				 errhint("Record correcting events instead.")));
	SPI_connect();
	buf = RollupBufferCreate();
	/* FOR UPDATE: deleters take turns, each rebuilding on the last one's rows */
	RollupLoadMeters(buf, NULL);
	if (buf->nmeters > 0)
		RebuildDeleted(buf, trig);
	SPI_finish();
	return PointerGetDatum(NULL);
}
