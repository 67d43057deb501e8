/*
 * hashmap_rate.c: prices a point of usage with the HashMap rules
 * (metering.rate, metering.rate_explain, the aggregate metering.rated_total).
 *
 * Per group, starting from flat 0 and rate 1: matching flat mappings raise
 * flat to the largest cost, matching rate mappings multiply rate; among the
 * thresholds reached, the highest level applies (a field threshold before
 * pricing, a service threshold after); the group's price is
 * rate * flat * qty.  The point's price is the incoming price plus the
 * groups' prices.  Arithmetic is exact numeric, never rounded.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "hashmap.h"
#include "meter_value.h"
#include "metering.h"

/* What a group has gathered for one point. */
typedef struct HmGroupState
{
	bool		seen;			/* a rule of the group matched or was reached */
	Numeric		flat;
	Numeric		rate;
	Numeric		thr_level;		/* NULL: no threshold applies */
	Numeric		thr_cost;
	bool		thr_rate;
	int			thr_field;		/* -1: a service threshold, else the field's index */
} HmGroupState;

typedef struct Point
{
	HmCache    *cache;
	HmService  *svc;
	text	   *service_text;	/* the service, as given */
	const char *service;		/* the same as a C string, made for messages only */
	Numeric		qty;
	Jsonb	   *metadata;
	const char *tenant;			/* NULL: no tenant */
	TimestampTz at;
	HmGroupState *groups;
	bool	   *overridden;		/* per group, for one rule list */
	int			scratch_groups;	/* the size of groups and overridden */
	MemoryContext scratch_cxt;	/* where they live */
	Numeric		zero;
	Numeric		one;
	Numeric		minus_one;
} Point;

/* 0, 1 and -1, made once per backend */
static Numeric const_zero,
			const_one,
			const_minus_one;

static const char *
ServiceName(Point *p)
{
	if (p->service == NULL)
		p->service = text_to_cstring(p->service_text);
	return p->service;
}

static Numeric
Mul(Numeric a, Numeric b)
{
	return numeric_mul_opt_error(a, b, NULL);
}

static Numeric
Add(Numeric a, Numeric b)
{
	return numeric_add_opt_error(a, b, NULL);
}

static int
Cmp(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a), NumericGetDatum(b)));
}

static bool
Applies(const HmRule *r, TimestampTz at)
{
	return r->start <= at && at < r->end;
}

/* The range of `tenant`'s rules in a list: [*lo, *hi). */
static void
TenantRange(const HmRuleList *list, const char *tenant, int *lo, int *hi)
{
	int			a = list->nglobal,
				b = list->n;

	*lo = *hi = list->nglobal;
	if (tenant == NULL)
		return;
	while (a < b)
	{
		int			m = (a + b) / 2;

		if (strcmp(list->rules[m].tenant, tenant) < 0)
			a = m + 1;
		else
			b = m;
	}
	*lo = a;
	while (a < list->n && strcmp(list->rules[a].tenant, tenant) == 0)
		a++;
	*hi = a;
}

static HmGroupState *
GroupOf(Point *p, int g)
{
	HmGroupState *s = &p->groups[g];

	if (!s->seen)
	{
		s->seen = true;
		s->flat = p->zero;
		s->rate = p->one;
	}
	return s;
}

static void
ApplyMapping(Point *p, const HmRule *r)
{
	HmGroupState *s = GroupOf(p, r->group);

	if (r->rate)
		s->rate = s->rate == p->one ? r->cost : Mul(s->rate, r->cost);
	else if (Cmp(r->cost, s->flat) > 0)
		s->flat = r->cost;
}

/*
 * Mappings of one key: the tenant's rules that apply replace the global
 * rules of the same group; other global rules apply as they are.
 */
static void
ApplyMappings(Point *p, const HmRuleList *list)
{
	int			lo,
				hi;

	if (list->n == 0)
		return;
	TenantRange(list, p->tenant, &lo, &hi);
	for (int i = lo; i < hi; i++)
		if (Applies(&list->rules[i], p->at))
		{
			p->overridden[list->rules[i].group] = true;
			ApplyMapping(p, &list->rules[i]);
		}
	for (int i = 0; i < list->nglobal; i++)
		if (!p->overridden[list->rules[i].group] && Applies(&list->rules[i], p->at))
			ApplyMapping(p, &list->rules[i]);
	for (int i = lo; i < hi; i++)
		p->overridden[list->rules[i].group] = false;
}

/* A threshold reached by `value`: the highest level wins, the first among equals. */
static void
ReachThreshold(Point *p, const HmRule *r, int field)
{
	HmGroupState *s = GroupOf(p, r->group);

	if (!r->reachable)
		return;
	if (s->thr_level == NULL || Cmp(r->level, s->thr_level) > 0)
	{
		s->thr_level = r->level;
		s->thr_cost = r->cost;
		s->thr_rate = r->rate;
		s->thr_field = field;
	}
}

/* Whether a global threshold is replaced by one of the tenant's (same group and level). */
static bool
Replaced(Point *p, const HmRuleList *list, int lo, int hi, const HmRule *g)
{
	for (int i = lo; i < hi; i++)
	{
		const HmRule *t = &list->rules[i];

		if (t->group == g->group && Applies(t, p->at) && Cmp(t->level, g->level) == 0)
			return true;
	}
	return false;
}

/*
 * The thresholds of one parent that `value` reaches.  Each run of rules (the
 * tenant's, then the global ones) is sorted by level, highest first: per
 * group the first reached is that run's highest, and the rest of the group's
 * rules need no comparison.  A group still counts as reached by a lower
 * rule, as in the reference (it then prices, with flat 0, unless a mapping
 * matched).
 */
static void
ApplyThresholds(Point *p, const HmRuleList *list, Numeric value, int field)
{
	int			lo,
				hi;
	bool	   *done = p->overridden;	/* free between rule lists; reset below */

	TenantRange(list, p->tenant, &lo, &hi);
	/* the tenant's first: among equal levels the first reached wins */
	for (int i = lo; i < hi; i++)
	{
		const HmRule *r = &list->rules[i];

		if (!done[r->group] && Applies(r, p->at) && Cmp(value, r->level) >= 0)
		{
			ReachThreshold(p, r, field);
			done[r->group] = true;
		}
	}
	for (int i = lo; i < hi; i++)
		done[list->rules[i].group] = false;
	for (int i = 0; i < list->nglobal; i++)
	{
		const HmRule *r = &list->rules[i];

		if (!done[r->group] && Applies(r, p->at) && !Replaced(p, list, lo, hi, r) &&
			Cmp(value, r->level) >= 0)
		{
			ReachThreshold(p, r, field);
			done[r->group] = true;
		}
	}
	for (int i = 0; i < list->nglobal; i++)
		done[list->rules[i].group] = false;
}

/* Whether some threshold of the list applies to this point's tenant at its instant. */
static bool
AnyThreshold(Point *p, const HmRuleList *list)
{
	int			lo,
				hi;

	TenantRange(list, p->tenant, &lo, &hi);
	for (int i = 0; i < list->nglobal; i++)
		if (Applies(&list->rules[i], p->at))
			return true;
	for (int i = lo; i < hi; i++)
		if (Applies(&list->rules[i], p->at))
			return true;
	return false;
}

/* A metadata value as the text mappings compare: JSON spelling but for strings. */
static char *
ValueText(JsonbValue *v, int *len)
{
	char	   *s;

	switch (v->type)
	{
		case jbvString:
			*len = v->val.string.len;
			return v->val.string.val;
		case jbvNumeric:
			s = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
			break;
		case jbvBool:
			s = v->val.boolean ? "true" : "false";
			break;
		case jbvNull:
			s = "null";
			break;
		default:
			return NULL;		/* objects and arrays match nothing */
	}
	*len = strlen(s);
	return s;
}

/* The metadata value of a field with thresholds, as a number. */
static Numeric
ValueNumber(Point *p, HmField *f, JsonbValue *v)
{
	Numeric		n = JsonNumber(v);
	int			len = 0;
	char	   *text;

	if (n != NULL)
		return n;
	text = ValueText(v, &len);
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("rating service \"%s\": field \"%s\" has thresholds, and its value %s is not a number",
					ServiceName(p), f->name,
					text ? quote_literal_cstr(pnstrdup(text, pg_mbcliplen(text, len, 200))) : "(an object or array)")));
	return NULL;				/* not reached */
}

/*
 * Rates one point: fills p->groups.  False when the service has no rules
 * (the price is then the incoming one).
 */
static bool
RatePoint(Point *p)
{
	int			k = HmMapGet(&p->cache->service_names, VARDATA_ANY(p->service_text),
							 VARSIZE_ANY_EXHDR(p->service_text));
	HmService  *svc;

	if (k < 0)
		return false;
	svc = p->svc = &p->cache->services[k];
	/* the group arrays are reused from point to point (see InitPoint) */
	if (p->scratch_groups < p->cache->ngroups)
	{
		p->groups = MemoryContextAlloc(p->scratch_cxt, sizeof(HmGroupState) * p->cache->ngroups);
		p->overridden = MemoryContextAllocZero(p->scratch_cxt, sizeof(bool) * p->cache->ngroups);
		p->scratch_groups = p->cache->ngroups;
	}
	memset(p->groups, 0, sizeof(HmGroupState) * p->cache->ngroups);

	ApplyMappings(p, &svc->mappings);
	if (svc->thresholds.n > 0)
		ApplyThresholds(p, &svc->thresholds, p->qty, -1);
	if (svc->nfields > 0 && p->metadata != NULL && JB_ROOT_IS_OBJECT(p->metadata))
	{
		for (int i = 0; i < svc->nfields; i++)
		{
			HmField    *f = &svc->fields[i];
			JsonbValue	buf;
			JsonbValue *v = getKeyJsonValueFromContainer(&p->metadata->root, f->name, strlen(f->name), &buf);

			if (v == NULL)
				continue;		/* absent: skipped */
			if (f->values.count > 0)
			{
				int			len = 0;
				char	   *text = ValueText(v, &len);
				int			vk = text ? HmMapGet(&f->values, text, len) : -1;

				if (vk >= 0)
					ApplyMappings(p, &f->value_rules[vk]);
			}
			if (f->thresholds.n > 0 && AnyThreshold(p, &f->thresholds))
				ApplyThresholds(p, &f->thresholds, ValueNumber(p, f, v), i);
		}
	}
	return true;
}

/* A group's rate * flat, its field threshold applied. */
static Numeric
GroupRateFlat(Point *p, HmGroupState *s)
{
	Numeric		flat = s->flat;
	Numeric		rate = s->rate;

	if (s->thr_level != NULL && s->thr_field >= 0)
	{
		if (s->thr_rate)
			rate = Mul(rate, s->thr_cost);
		else
			flat = Add(flat, s->thr_cost);
	}
	if (flat == p->zero)
		return p->zero;
	return rate == p->one ? flat : Mul(rate, flat);
}

/* A group's price: field threshold, rate * flat * qty, service threshold. */
static Numeric
GroupPrice(Point *p, HmGroupState *s)
{
	Numeric		rf = GroupRateFlat(p, s);
	Numeric		price;

	/* (multiplying by 1 or 0 is common and costs an allocation) */
	price = rf == p->zero ? p->zero : Mul(rf, p->qty);
	if (s->thr_level != NULL && s->thr_field < 0)
	{
		if (s->thr_rate)
			price = Mul(price, s->thr_cost);
		else
			price = Add(price, s->thr_cost);
	}
	return price;
}

/*
 * Prepares a point.  `p` may be a Point kept from an earlier call of the
 * same query (its scratch arrays are reused); `cxt` is where they live.
 */
static void
InitPoint(Point *p, MemoryContext cxt, text *service, Numeric qty, Jsonb *metadata, text *tenant,
		  TimestampTz at)
{
	if (const_zero == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		const_zero = int64_to_numeric(0);
		const_one = int64_to_numeric(1);
		const_minus_one = int64_to_numeric(-1);
		MemoryContextSwitchTo(old);
	}
	if (p->scratch_cxt != cxt)
	{
		memset(p, 0, sizeof(Point));
		p->scratch_cxt = cxt;
	}
	p->cache = HmGetCache();
	p->svc = NULL;
	p->service_text = service;
	p->service = NULL;
	p->qty = qty;
	p->metadata = metadata;
	p->tenant = tenant ? text_to_cstring(tenant) : NULL;
	p->at = at;
	p->zero = const_zero;
	p->one = const_one;
	p->minus_one = const_minus_one;
	if (numeric_is_nan(qty) || numeric_is_inf(qty))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rating service \"%s\": qty must be a finite number", ServiceName(p))));
	if (TIMESTAMP_NOT_FINITE(at))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rating service \"%s\": the instant must be finite", ServiceName(p))));
}

/* The price of a point: `price` plus every matched group's price. */
static Numeric
PriceOf(Point *p, Numeric price)
{
	Numeric		sum_rf = p->zero;

	if (!RatePoint(p))
		return price;

	/*
	 * Groups without a service threshold add up rate * flat, multiplied by
	 * qty once: sum(rf) * qty = sum(rf * qty), exactly.
	 */
	for (int g = 0; g < p->cache->ngroups; g++)
	{
		HmGroupState *s = &p->groups[g];

		if (!s->seen)
			continue;
		if (s->thr_level != NULL && s->thr_field < 0)
			price = Add(price, GroupPrice(p, s));
		else
		{
			Numeric		rf = GroupRateFlat(p, s);

			if (rf != p->zero)
				sum_rf = sum_rf == p->zero ? rf : Add(sum_rf, rf);
		}
	}
	if (sum_rf != p->zero)
		price = Add(price, Mul(sum_rf, p->qty));
	return price;
}

static TimestampTz
AtOrNow(FunctionCallInfo fcinfo, int arg)
{
	return (PG_NARGS() > arg && !PG_ARGISNULL(arg)) ? PG_GETARG_TIMESTAMPTZ(arg) : MeteringNow();
}

/*
 * metering.rate(service, qty, metadata, tenant, at, price): NULL when service
 * or qty is NULL.
 */
PG_FUNCTION_INFO_V1(metering_rate);
Datum
metering_rate(PG_FUNCTION_ARGS)
{
	Point		p = {0};
	Numeric		price;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	price = PG_ARGISNULL(5) ? int64_to_numeric(0) : PG_GETARG_NUMERIC(5);
	InitPoint(&p, CurrentMemoryContext, PG_GETARG_TEXT_PP(0), PG_GETARG_NUMERIC(1), PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2),
			  PG_ARGISNULL(3) ? NULL : PG_GETARG_TEXT_PP(3), AtOrNow(fcinfo, 4));
	if (numeric_is_nan(price) || numeric_is_inf(price))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rating service \"%s\": the incoming price must be a finite number", ServiceName(&p))));
	PG_RETURN_NUMERIC(PriceOf(&p, price));
}

/*
 * metering._rated_total_trans(state, service, qty, metadata, tenant [, at]):
 * the running sum of the points' prices; points without a service or a
 * quantity add nothing.
 */
PG_FUNCTION_INFO_V1(metering_rated_total_trans);
Datum
metering_rated_total_trans(PG_FUNCTION_ARGS)
{
	Point	   *p;
	Numeric		price;

	if (PG_ARGISNULL(1) || PG_ARGISNULL(2))
	{
		if (PG_ARGISNULL(0))
			PG_RETURN_NULL();
		PG_RETURN_DATUM(PG_GETARG_DATUM(0));
	}
	/* one Point for the whole query, its scratch arrays reused row to row */
	if (fcinfo->flinfo->fn_extra == NULL)
		fcinfo->flinfo->fn_extra = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(Point));
	p = (Point *) fcinfo->flinfo->fn_extra;
	InitPoint(p, fcinfo->flinfo->fn_mcxt, PG_GETARG_TEXT_PP(1), PG_GETARG_NUMERIC(2), PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3),
			  PG_ARGISNULL(4) ? NULL : PG_GETARG_TEXT_PP(4), AtOrNow(fcinfo, 5));
	price = PriceOf(p, PG_ARGISNULL(0) ? const_zero : PG_GETARG_NUMERIC(0));
	PG_RETURN_NUMERIC(price);
}

/*
 * metering.rate_explain(service, qty, metadata, tenant, at): one row per
 * group that something matched, default group first.
 */
PG_FUNCTION_INFO_V1(metering_rate_explain);
Datum
metering_rate_explain(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Point		p = {0};

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	InitPoint(&p, CurrentMemoryContext, PG_GETARG_TEXT_PP(0), PG_GETARG_NUMERIC(1), PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2),
			  PG_ARGISNULL(3) ? NULL : PG_GETARG_TEXT_PP(3), AtOrNow(fcinfo, 4));
	if (!RatePoint(&p))
		PG_RETURN_NULL();
	for (int g = 0; g < p.cache->ngroups; g++)
	{
		HmGroupState *s = &p.groups[g];
		Datum		values[8];
		bool		nulls[8] = {false};

		if (!s->seen)
			continue;
		values[0] = p.cache->group_names[g] ? CStringGetTextDatum(p.cache->group_names[g]) : (Datum) 0;
		nulls[0] = p.cache->group_names[g] == NULL;
		values[1] = NumericGetDatum(s->flat);
		values[2] = NumericGetDatum(s->rate);
		values[3] = s->thr_level ? NumericGetDatum(s->thr_level) : (Datum) 0;
		nulls[3] = s->thr_level == NULL;
		values[4] = NumericGetDatum(GroupPrice(&p, s));
		values[5] = s->thr_level ? NumericGetDatum(s->thr_cost) : (Datum) 0;
		nulls[5] = s->thr_level == NULL;
		values[6] = s->thr_level ? CStringGetTextDatum(s->thr_rate ? "rate" : "flat") : (Datum) 0;
		nulls[6] = s->thr_level == NULL;
		if (s->thr_level == NULL)
		{
			values[7] = (Datum) 0;
			nulls[7] = true;
		}
		else if (s->thr_field < 0)
			values[7] = CStringGetTextDatum("service");
		else
			values[7] = CStringGetTextDatum(psprintf("field %s", p.svc->fields[s->thr_field].name));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
