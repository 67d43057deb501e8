/*
 * ingest.c: CloudEvents 1.0 validation for metering.ingest and ingest_batch.
 *
 * Every event of a batch is validated before anything is stored, so one
 * malformed event rejects the whole batch; the error names the event's index
 * in the JSON array (from 0) and the offending attribute.  The rows go to
 * metering.events through SQL (see src/sql/12_ingest.sql), so triggers,
 * constraints and row security apply exactly as for a plain INSERT.
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "ingest.h"
#include "metering.h"
#include "timeparse.h"

/* how much of a bad value an error message quotes */
#define QUOTE_LIMIT 64

typedef struct EventContext
{
	int			index;			/* position in the batch, -1 for one event */
} EventContext;

static const char *
JsonbValueTypeName(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			return "null";
		case jbvString:
			return "a string";
		case jbvNumeric:
			return "a number";
		case jbvBool:
			return "a boolean";
		case jbvBinary:
			return JsonContainerIsArray(v->val.binary.data) ? "an array" : "an object";
		default:
			return "an unknown JSON value";
	}
}

static char *
EventPrefix(EventContext *ctx)
{
	if (ctx->index < 0)
		return pstrdup("event");
	return psprintf("event %d", ctx->index);
}

static char *
Quote(JsonbValue *v)
{
	int			len = v->val.string.len;

	if (len > QUOTE_LIMIT)
	{
		/* cut on a character boundary */
		int			cut = pg_mbcliplen(v->val.string.val, len, QUOTE_LIMIT);

		return psprintf("\"%.*s...\"", cut, v->val.string.val);
	}
	return psprintf("\"%.*s\"", len, v->val.string.val);
}

static bool
GetAttribute(JsonbContainer *obj, const char *name, JsonbValue *out)
{
	return getKeyJsonValueFromContainer(obj, name, strlen(name), out) != NULL;
}

#define EVENT_ID_MAX 512
#define EVENT_SOURCE_MAX 1024
#define EVENT_SUBJECT_MAX 512
#define EVENT_TYPE_MAX 512

/*
 * A required, non-empty string attribute of at most max bytes.  The limits
 * keep every key an event's attributes enter (the events' unique key, which
 * is (subject, source, id) once distributed, the rollups', the usage
 * periods') within what a btree entry may hold (2,704 bytes), so that no
 * event is refused by an index, or stops a refresh, after it was accepted.
 */
static text *
RequiredString(EventContext *ctx, JsonbContainer *obj, const char *name, int max)
{
	JsonbValue	v;

	if (!GetAttribute(obj, name, &v) || v.type == jbvNull)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s: \"%s\" is required", EventPrefix(ctx), name),
				 errhint("A CloudEvents 1.0 event has the string attributes specversion, id, source, type and subject.")));
	if (v.type != jbvString)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s: \"%s\" must be a string, not %s",
						EventPrefix(ctx), name, JsonbValueTypeName(&v))));
	if (v.val.string.len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s: \"%s\" must not be empty", EventPrefix(ctx), name)));
	if (v.val.string.len > max)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s: \"%s\" is longer than %d bytes (%d)", EventPrefix(ctx), name, max, v.val.string.len)));
	return cstring_to_text_with_len(v.val.string.val, v.val.string.len);
}

/*
 * Validates one event and fills the columns (id, source, subject, type,
 * time, data).  Absent or null time and data take their defaults.
 */
static void
ParseEvent(EventContext *ctx, JsonbValue *event, TimestampTz now,
		   Datum empty_data, Datum *values, bool *nulls)
{
	JsonbContainer *obj;
	JsonbValue	v;
	text	   *spec;

	if (event->type != jbvBinary || !JsonContainerIsObject(event->val.binary.data))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a JSON object, not %s",
						EventPrefix(ctx), JsonbValueTypeName(event))));
	obj = event->val.binary.data;

	spec = RequiredString(ctx, obj, "specversion", PG_INT32_MAX);
	if (VARSIZE_ANY_EXHDR(spec) != 3 || memcmp(VARDATA_ANY(spec), "1.0", 3) != 0)
	{
		GetAttribute(obj, "specversion", &v);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s: \"specversion\" must be \"1.0\", not %s",
						EventPrefix(ctx), Quote(&v))));
	}

	values[0] = PointerGetDatum(RequiredString(ctx, obj, "id", EVENT_ID_MAX));
	values[1] = PointerGetDatum(RequiredString(ctx, obj, "source", EVENT_SOURCE_MAX));
	values[2] = PointerGetDatum(RequiredString(ctx, obj, "subject", EVENT_SUBJECT_MAX));
	values[3] = PointerGetDatum(RequiredString(ctx, obj, "type", EVENT_TYPE_MAX));

	if (!GetAttribute(obj, "time", &v) || v.type == jbvNull)
		values[4] = TimestampTzGetDatum(now);
	else
	{
		TimestampTz t;

		if (v.type != jbvString)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s: \"time\" must be an RFC 3339 string, not %s",
							EventPrefix(ctx), JsonbValueTypeName(&v))));
		if (!ParseRfc3339(v.val.string.val, v.val.string.len, &t))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s: \"time\" is not an RFC 3339 date-time: %s",
							EventPrefix(ctx), Quote(&v)),
					 errhint("Write it as 2024-01-01T00:00:00Z or with an offset, 2024-01-01T01:00:00+01:00.")));
		values[4] = TimestampTzGetDatum(t);
	}

	if (!GetAttribute(obj, "data", &v) || v.type == jbvNull)
		values[5] = empty_data;
	else if (v.type == jbvBinary && JsonContainerIsObject(v.val.binary.data))
		values[5] = JsonbPGetDatum(JsonbValueToJsonb(&v));
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s: \"data\" must be a JSON object, not %s",
						EventPrefix(ctx), JsonbValueTypeName(&v))));

	memset(nulls, 0, sizeof(bool) * 6);
}

typedef struct ParsedEvent
{
	int			ord;
	Datum		values[6];		/* id, source, subject, type, time, data */
} ParsedEvent;

static int
CompareText(Datum a, Datum b)
{
	text	   *ta = DatumGetTextPP(a);
	text	   *tb = DatumGetTextPP(b);
	int			la = VARSIZE_ANY_EXHDR(ta);
	int			lb = VARSIZE_ANY_EXHDR(tb);
	int			c = memcmp(VARDATA_ANY(ta), VARDATA_ANY(tb), Min(la, lb));

	return c != 0 ? c : (la > lb) - (la < lb);
}

/* (source, id) in byte order, then position: the order rows are inserted in */
static int
CompareParsed(const void *x, const void *y)
{
	const ParsedEvent *a = (const ParsedEvent *) x;
	const ParsedEvent *b = (const ParsedEvent *) y;
	int			c = CompareText(a->values[1], b->values[1]);

	if (c == 0)
		c = CompareText(a->values[0], b->values[0]);
	return c != 0 ? c : (a->ord > b->ord) - (a->ord < b->ord);
}

/*
 * One CloudEvents object: its columns (id, source, subject, type, time,
 * data), never NULL.  What _parse_events returns for it, for the callers in
 * C (metering.consume).
 */
void
IngestParseOne(Jsonb *event, Datum *values)
{
	EventContext ctx;
	JsonbValue	whole;
	bool		nulls[6];

	whole.type = jbvBinary;
	whole.val.binary.data = &event->root;
	whole.val.binary.len = VARSIZE(event) - VARHDRSZ;
	if (JB_ROOT_IS_SCALAR(event))
		JsonbExtractScalar(&event->root, &whole);
	ctx.index = -1;
	ParseEvent(&ctx, &whole, MeteringNow(), DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")), values, nulls);
}

/*
 * metering._parse_events(events jsonb, batch boolean): the validated rows
 * (ord, id, source, subject, type, time, data) of one event or of an array.
 * A batch comes back in (source, id) byte order, so that concurrent batches
 * meet their common keys in the same order and wait for each other rather
 * than deadlock; within one key, array order, so the first one wins.
 */
PG_FUNCTION_INFO_V1(metering_parse_events);
Datum
metering_parse_events(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Jsonb	   *events = PG_GETARG_JSONB_P(0);
	bool		batch = PG_GETARG_BOOL(1);
	TimestampTz now = MeteringNow();
	EventContext ctx;
	Datum		values[7];
	bool		nulls[7];
	Datum		empty_data = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));

	InitMaterializedSRF(fcinfo, 0);
	memset(nulls, 0, sizeof(nulls));

	if (!batch)
	{
		values[0] = Int32GetDatum(0);
		IngestParseOne(events, values + 1);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		PG_RETURN_NULL();
	}

	if (!JB_ROOT_IS_ARRAY(events) || JB_ROOT_IS_SCALAR(events))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("events must be a JSON array of CloudEvents objects")));
	{
		int			n = JB_ROOT_COUNT(events);
		ParsedEvent *rows = palloc_extended(sizeof(ParsedEvent) * Max(n, 1), MCXT_ALLOC_HUGE);
		JsonbIterator *it = JsonbIteratorInit(&events->root);
		JsonbValue	v;
		JsonbIteratorToken tok;

		ctx.index = 0;
		while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		{
			if (tok != WJB_ELEM)
				continue;
			rows[ctx.index].ord = ctx.index;
			ParseEvent(&ctx, &v, now, empty_data, rows[ctx.index].values, nulls + 1);
			ctx.index++;
		}
		qsort(rows, ctx.index, sizeof(ParsedEvent), CompareParsed);
		for (int i = 0; i < ctx.index; i++)
		{
			values[0] = Int32GetDatum(rows[i].ord);
			memcpy(values + 1, rows[i].values, sizeof(rows[i].values));
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	PG_RETURN_NULL();
}
