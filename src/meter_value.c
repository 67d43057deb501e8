/*
 * meter_value.c: reading a meter's value and groups out of event data.
 */
#include "postgres.h"

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/json.h"
#include "utils/jsonpath.h"
#include "utils/memutils.h"

#include "meter_value.h"

/* a numeric string longer than this is not a usage value but an attack */
#define MAX_NUMBER_STRING 1000

MeterAggregation
MeterAggregationFromName(const char *name)
{
	static const char *const names[] = {
		"SUM", "COUNT", "AVG", "MIN", "MAX", "UNIQUE_COUNT", "LATEST"
	};

	for (int i = 0; i < (int) lengthof(names); i++)
		if (strcmp(name, names[i]) == 0)
			return (MeterAggregation) i;
	elog(ERROR, "unknown meter aggregation \"%s\"", name);
	return METER_SUM;			/* keep the compiler quiet */
}

/*
 * The common path $.a.b (lax, keys only) over objects, read directly: what
 * jsonb_path_query_first answers for it, without its executor (a balance
 * read passes every event of the subject not rolled up yet through here).
 * False when the path or the data is of another shape; the caller then asks
 * the executor.
 */
static bool
KeyChainValue(Jsonb *data, JsonPath *path, JsonbValue *out, bool *found)
{
	JsonPathItem item,
				next;
	JsonbContainer *container = &data->root;

	if ((path->header & JSONPATH_LAX) == 0 || !JB_ROOT_IS_OBJECT(data))
		return false;
	jspInit(&item, path);
	if (item.type != jpiRoot || !jspGetNext(&item, &next))
		return false;
	/* every step a key: a path of another shape goes to the executor whole */
	for (JsonPathItem probe = next;;)
	{
		JsonPathItem after;

		if (probe.type != jpiKey)
			return false;
		if (!jspGetNext(&probe, &after))
			break;
		probe = after;
	}
	for (;;)
	{
		int32		len;
		char	   *key = jspGetString(&next, &len);
		JsonbValue *v = getKeyJsonValueFromContainer(container, key, len, out);
		JsonPathItem after;
		bool		last = !jspGetNext(&next, &after);

		if (v == NULL)
		{
			*found = false;		/* lax: a missing key selects nothing */
			return true;
		}
		if (v->type == jbvBinary)
		{
			/* an array is unwrapped in lax mode, a container is returned whole: the executor's */
			if (last || !JsonContainerIsObject(v->val.binary.data))
				return false;
			container = v->val.binary.data;
			next = after;
			continue;
		}
		if (!last)
		{
			*found = false;		/* lax: a key of a scalar selects nothing */
			return true;
		}
		*found = v->type != jbvNull;
		return true;
	}
}

bool
MeterPathValue(Jsonb *data, JsonPath *path, JsonbValue *out)
{
	LOCAL_FCINFO(fcinfo, 4);
	Datum		result;
	Jsonb	   *found;
	static Jsonb *empty_vars = NULL;

	bool		direct;

	if (KeyChainValue(data, path, out, &direct))
		return direct;
	if (empty_vars == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		empty_vars = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
		MemoryContextSwitchTo(old);
	}

	/* jsonb_path_query_first(data, path, '{}', silent => true) */
	InitFunctionCallInfoData(*fcinfo, NULL, 4, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = PointerGetDatum(data);
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = PointerGetDatum(path);
	fcinfo->args[1].isnull = false;
	fcinfo->args[2].value = PointerGetDatum(empty_vars);
	fcinfo->args[2].isnull = false;
	fcinfo->args[3].value = BoolGetDatum(true);
	fcinfo->args[3].isnull = false;
	result = jsonb_path_query_first(fcinfo);
	if (fcinfo->isnull)
		return false;
	found = DatumGetJsonbP(result);
	if (JB_ROOT_IS_SCALAR(found))
	{
		if (!JsonbExtractScalar(&found->root, out))
			return false;
		return out->type != jbvNull;
	}
	out->type = jbvBinary;
	out->val.binary.data = &found->root;
	out->val.binary.len = VARSIZE(found) - VARHDRSZ;
	return true;
}

/*
 * A plain decimal: optional sign, digits with an optional fraction, an
 * optional exponent of at most three digits, no whitespace.  Checked before
 * numeric_in so that a malformed string is a rejected value, never an error
 * (numeric_in takes any such string of at most 1000 characters).
 */
static bool
IsPlainNumber(const char *s, int len)
{
	int			i = 0;
	int			digits = 0;

	if (len == 0 || len > MAX_NUMBER_STRING)
		return false;
	if (s[i] == '+' || s[i] == '-')
		i++;
	while (i < len && isdigit((unsigned char) s[i]))
		i++, digits++;
	if (i < len && s[i] == '.')
	{
		i++;
		while (i < len && isdigit((unsigned char) s[i]))
			i++, digits++;
	}
	if (digits == 0)
		return false;
	if (i < len && (s[i] == 'e' || s[i] == 'E'))
	{
		int			edigits = 0;

		i++;
		if (i < len && (s[i] == '+' || s[i] == '-'))
			i++;
		while (i < len && isdigit((unsigned char) s[i]))
			i++, edigits++;
		if (edigits == 0 || edigits > 3)
			return false;
	}
	return i == len;
}

/*
 * Usage values are below 10^100 in magnitude with at most 100 decimals:
 * sums of any number of them stay far inside numeric's range, so neither a
 * rollup nor a query can ever overflow because of one event.
 */
static bool
WithinBounds(Numeric n)
{
	static Numeric limit = NULL;

	if (limit == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		limit = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum("1e100"),
													ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
		MemoryContextSwitchTo(old);
	}
	if (DatumGetInt32(DirectFunctionCall1(numeric_scale, NumericGetDatum(n))) > 100)
		return false;
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp,
											 DirectFunctionCall1(numeric_abs, NumericGetDatum(n)),
											 NumericGetDatum(limit))) < 0;
}

Numeric
JsonNumber(JsonbValue *v)
{
	Numeric		n = NULL;

	if (v->type == jbvNumeric)
		n = v->val.numeric;
	else if (v->type == jbvString && IsPlainNumber(v->val.string.val, v->val.string.len))
	{
		char	   *s = pnstrdup(v->val.string.val, v->val.string.len);

		n = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(s),
												ObjectIdGetDatum(InvalidOid),
												Int32GetDatum(-1)));
	}
	return n;
}

Numeric
MeterValueNumber(JsonbValue *v)
{
	Numeric		n = JsonNumber(v);

	return n != NULL && WithinBounds(n) ? n : NULL;
}

char *
MeterValueText(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvString:
			return pnstrdup(v->val.string.val, v->val.string.len);
		case jbvNumeric:
			return DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
		case jbvBool:
			return pstrdup(v->val.boolean ? "true" : "false");
		case jbvNull:
			return pstrdup("null");
		case jbvBinary:
			return JsonbToCString(NULL, v->val.binary.data, v->val.binary.len);
		default:
			elog(ERROR, "unexpected jsonb value type %d", (int) v->type);
	}
	return NULL;
}

MeterGroups *
MeterGroupsCompile(Jsonb *group_by, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	MeterGroups *g = palloc0(sizeof(MeterGroups));
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			cap;

	if (!JB_ROOT_IS_OBJECT(group_by))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("group_by must be a JSON object of name to JSONPath")));
	cap = JB_ROOT_COUNT(group_by);
	g->names = palloc0(sizeof(char *) * Max(cap, 1));
	g->paths = palloc0(sizeof(JsonPath *) * Max(cap, 1));
	it = JsonbIteratorInit(&group_by->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
			g->names[g->n] = pnstrdup(v.val.string.val, v.val.string.len);
		else if (tok == WJB_VALUE)
		{
			char	   *path;

			if (v.type != jbvString)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("group_by \"%s\" must be a JSONPath string", g->names[g->n])));
			path = pnstrdup(v.val.string.val, v.val.string.len);
			g->paths[g->n] = DatumGetJsonPathP(DirectFunctionCall1(jsonpath_in, CStringGetDatum(path)));
			g->n++;
		}
	}
	MemoryContextSwitchTo(old);
	return g;
}

char *
MeterGroupsText(MeterGroups *groups, Jsonb *data)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (int i = 0; i < groups->n; i++)
	{
		JsonbValue	v;

		if (i > 0)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, groups->names[i]);
		appendStringInfoString(&buf, ": ");
		if (MeterPathValue(data, groups->paths[i], &v))
			escape_json(&buf, MeterValueText(&v));
		else
			appendStringInfoString(&buf, "null");
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

bool
MeterGroupsPass(MeterGroups *groups, Jsonb *filters, Jsonb *data)
{
	Datum		values = DirectFunctionCall1(jsonb_in, CStringGetDatum(MeterGroupsText(groups, data)));

	return DatumGetBool(DirectFunctionCall2(jsonb_contains, values, PointerGetDatum(filters)));
}

Numeric
MeterUsage(Jsonb *data, JsonPath *path)
{
	JsonbValue	v;
	Numeric		n;

	if (path == NULL)
		return int64_to_numeric(1);
	/* negative values (corrections) are not usage */
	if (!MeterPathValue(data, path, &v) || (n = MeterValueNumber(&v)) == NULL ||
		DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(n),
										  NumericGetDatum(int64_to_numeric(0)))) < 0)
		return int64_to_numeric(0);
	return n;
}

/* metering._meter_number(data, path): the meter value of one event, or NULL. */
PG_FUNCTION_INFO_V1(metering_meter_number);
Datum
metering_meter_number(PG_FUNCTION_ARGS)
{
	JsonbValue	v;
	Numeric		n;

	if (!MeterPathValue(PG_GETARG_JSONB_P(0), PG_GETARG_JSONPATH_P(1), &v))
		PG_RETURN_NULL();
	n = MeterValueNumber(&v);
	if (n == NULL)
		PG_RETURN_NULL();
	PG_RETURN_NUMERIC(n);
}

/* metering._meter_text(data, path): the value as UNIQUE_COUNT compares it. */
PG_FUNCTION_INFO_V1(metering_meter_text);
Datum
metering_meter_text(PG_FUNCTION_ARGS)
{
	JsonbValue	v;

	if (!MeterPathValue(PG_GETARG_JSONB_P(0), PG_GETARG_JSONPATH_P(1), &v))
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(MeterValueText(&v)));
}

/*
 * metering._meter_groups(data, group_by): the event's group values.  The
 * compiled group_by is kept in fn_extra, since a query passes the same one
 * for every row.
 */
typedef struct GroupsCache
{
	Jsonb	   *key;
	MeterGroups *groups;
} GroupsCache;

PG_FUNCTION_INFO_V1(metering_meter_groups);
Datum
metering_meter_groups(PG_FUNCTION_ARGS)
{
	Jsonb	   *data = PG_GETARG_JSONB_P(0);
	Jsonb	   *group_by = PG_GETARG_JSONB_P(1);
	GroupsCache *cache = (GroupsCache *) fcinfo->flinfo->fn_extra;
	char	   *text;

	if (cache == NULL || VARSIZE(cache->key) != VARSIZE(group_by) ||
		memcmp(cache->key, group_by, VARSIZE(group_by)) != 0)
	{
		MemoryContext cxt = fcinfo->flinfo->fn_mcxt;

		if (cache == NULL)
			cache = MemoryContextAllocZero(cxt, sizeof(GroupsCache));
		cache->groups = MeterGroupsCompile(group_by, cxt);
		cache->key = MemoryContextAlloc(cxt, VARSIZE(group_by));
		memcpy(cache->key, group_by, VARSIZE(group_by));
		fcinfo->flinfo->fn_extra = cache;
	}
	text = MeterGroupsText(cache->groups, data);
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(text)));
}

/*
 * metering._meter_path_problem(path): why a JSONPath cannot serve a meter,
 * or NULL.  Silent evaluation suppresses most JSONPath errors, but not an
 * unknown $variable (meters pass no variables) nor the time-zone casts of
 * .datetime() comparisons, whose result would also depend on the session;
 * both are refused when the meter is defined, so that no event can ever
 * fail to ingest because of a meter.  The scan skips string literals.
 */
PG_FUNCTION_INFO_V1(metering_meter_path_problem);
Datum
metering_meter_path_problem(PG_FUNCTION_ARGS)
{
	char	   *s = DatumGetCString(DirectFunctionCall1(jsonpath_out, PG_GETARG_DATUM(0)));
	bool		in_string = false;

	for (char *p = s; *p; p++)
	{
		if (in_string)
		{
			if (*p == '\\' && p[1] != '\0')
				p++;
			else if (*p == '"')
				in_string = false;
			continue;
		}
		if (*p == '$' && p[1] == '"')
			PG_RETURN_TEXT_P(cstring_to_text("it uses a variable, and meters pass none"));
		if (*p == '"')
			in_string = true;
		else if (strncmp(p, ".datetime(", 10) == 0)
			PG_RETURN_TEXT_P(cstring_to_text("datetime() results depend on the session time zone"));
	}
	PG_RETURN_NULL();
}
