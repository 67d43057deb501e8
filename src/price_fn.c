/*
 * price_fn.c: the SQL surface of the price engine: a row of metering.prices
 * read into a Price (and checked: 22023 naming the field), the amount of a
 * quantity under it, the fee of one event.  No SQL runs here.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "metering.h"

#include "price.h"

/* the model parameters, and which models take them */
#define M_UNIT	(1 << PRICE_UNIT)
#define M_GRAD	(1 << PRICE_GRADUATED)
#define M_VOL	(1 << PRICE_VOLUME)
#define M_PACK	(1 << PRICE_PACKAGE)
#define M_PCT	(1 << PRICE_PERCENTAGE)

typedef struct PriceParam
{
	const char *name;
	int			takes;			/* models that take it */
	int			needs;			/* models that need it */
} PriceParam;

static const PriceParam params[] = {
	{"unit_amount", M_UNIT, M_UNIT},
	{"tiers", M_GRAD | M_VOL, M_GRAD | M_VOL},
	{"package_size", M_PACK, M_PACK},
	{"package_amount", M_PACK, M_PACK},
	{"free_units", M_PACK, 0},
	{"rate", M_PCT, M_PCT},
	{"fixed_amount_per_event", M_PCT, 0},
	{"free_events", M_PCT, 0},
	{"min_per_event", M_PCT, 0},
	{"max_per_event", M_PCT, 0},
};

/* a numeric column: NULL, or finite and at least 0 (positive: above 0) */
static Numeric
NumberField(HeapTupleHeader row, const char *field, bool positive)
{
	bool		isnull;
	Datum		d = GetAttributeByName(row, field, &isnull);
	Numeric		n;
	int			c;

	if (isnull)
		return NULL;
	n = DatumGetNumeric(d);
	if (numeric_is_nan(n) || numeric_is_inf(n))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price %s must be a finite number, got %s", field,
						DatumGetCString(DirectFunctionCall1(numeric_out, d)))));
	c = NumCmp(n, PriceZero());
	if (c < 0 || (positive && c == 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price %s must be %s, got %s", field, positive ? "positive" : "at least 0",
						DatumGetCString(DirectFunctionCall1(numeric_out, d)))));
	return n;
}

/* Reads and checks a row of metering.prices. */
static void
PriceLoad(HeapTupleHeader row, Price *p)
{
	bool		isnull;
	Datum		d;
	char	   *model;
	int			m;

	memset(p, 0, sizeof(Price));
	d = GetAttributeByName(row, "model", &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price model is required"),
				 errhint("One of unit, graduated, volume, package, percentage.")));
	model = TextDatumGetCString(d);
	m = PriceModelOf(model);
	if (m < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price model must be unit, graduated, volume, package or percentage, got \"%s\"", model)));
	p->model = (PriceModel) m;

	for (int i = 0; i < (int) lengthof(params); i++)
	{
		bool		given;

		(void) GetAttributeByName(row, params[i].name, &isnull);
		given = !isnull;
		if (given && !(params[i].takes & (1 << m)))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("price %s is not a parameter of model %s", params[i].name, model),
					 errhint("Leave it NULL.")));
		if (!given && (params[i].needs & (1 << m)))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("price %s is required for model %s", params[i].name, model)));
	}

	p->unit_amount = NumberField(row, "unit_amount", false);
	p->package_size = NumberField(row, "package_size", true);
	p->package_amount = NumberField(row, "package_amount", false);
	p->free_units = NumberField(row, "free_units", false);
	p->rate = NumberField(row, "rate", false);
	p->fixed_amount_per_event = NumberField(row, "fixed_amount_per_event", false);
	p->min_per_event = NumberField(row, "min_per_event", false);
	p->max_per_event = NumberField(row, "max_per_event", false);
	(void) NumberField(row, "minimum_amount", false);
	if (p->free_units == NULL)
		p->free_units = PriceZero();
	if (p->fixed_amount_per_event == NULL)
		p->fixed_amount_per_event = PriceZero();
	if (p->min_per_event != NULL && p->max_per_event != NULL &&
		NumCmp(p->min_per_event, p->max_per_event) > 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price min_per_event (%s) must not be above max_per_event (%s)",
						DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(p->min_per_event))),
						DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(p->max_per_event))))));
	d = GetAttributeByName(row, "free_events", &isnull);
	p->free_events = isnull ? 0 : DatumGetInt64(d);
	if (p->free_events < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price free_events must be at least 0, got " INT64_FORMAT, p->free_events)));
	d = GetAttributeByName(row, "tiers", &isnull);
	if (!isnull)
		p->ntiers = PriceParseTiers(DatumGetJsonbP(d), &p->tiers);
}

/* metering._price_check(metering.prices): 22023 when the price is not sound */
PG_FUNCTION_INFO_V1(metering_price_check);
Datum
metering_price_check(PG_FUNCTION_ARGS)
{
	Price		p;

	PriceLoad(PG_GETARG_HEAPTUPLEHEADER(0), &p);
	PG_RETURN_VOID();
}

/* metering._price_amount(metering.prices, quantity) -> (amount, details) */
PG_FUNCTION_INFO_V1(metering_price_amount);
Datum
metering_price_amount(PG_FUNCTION_ARGS)
{
	Price		p;
	TupleDesc	tupdesc;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	StringInfoData details;
	Numeric		amount;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	PriceLoad(PG_GETARG_HEAPTUPLEHEADER(0), &p);
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price quantity must not be NULL")));
	{
		Numeric		q = PG_GETARG_NUMERIC(1);

		if (numeric_is_nan(q) || numeric_is_inf(q))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("price quantity must be a finite number, got %s",
							DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(q))))));
		initStringInfo(&details);
		amount = PriceAmount(&p, q, &details);
	}
	values[0] = NumericGetDatum(amount);
	values[1] = DirectFunctionCall1(jsonb_in, CStringGetDatum(details.data));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* metering._price_fee(rate, fixed, min, max, value): one event's fee */
PG_FUNCTION_INFO_V1(metering_price_fee);
Datum
metering_price_fee(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(4))
		PG_RETURN_NULL();
	PG_RETURN_NUMERIC(PriceEventFee(PG_GETARG_NUMERIC(0),
									PG_ARGISNULL(1) ? NULL : PG_GETARG_NUMERIC(1),
									PG_ARGISNULL(2) ? NULL : PG_GETARG_NUMERIC(2),
									PG_ARGISNULL(3) ? NULL : PG_GETARG_NUMERIC(3),
									PG_GETARG_NUMERIC(4)));
}

/*
 * metering._prices_unchanged_since_snapshot(meter): the REPEATABLE READ half
 * of "one price per key at any instant".  Writers of one meter's prices take
 * turns on an advisory lock; at REPEATABLE READ the second may not see what
 * the first committed, so it compares the meter's prices under both
 * snapshots and fails as a concurrent update does (40001).
 */
PG_FUNCTION_INFO_V1(metering_prices_unchanged_since_snapshot);
Datum
metering_prices_unchanged_since_snapshot(PG_FUNCTION_ARGS)
{
	static const char *sql =
	"SELECT coalesce(string_agg(concat_ws('/', id, start, coalesce(\"end\"::text, '-'), "
	"                                     coalesce(deleted_at::text, '-')), ',' ORDER BY id), '') "
	"FROM metering.prices WHERE meter_slug = $1";
	Oid			types[1] = {TEXTOID};
	Datum		args[1] = {PG_GETARG_DATUM(0)};

	MeteringErrorIfChangedSinceSnapshot(sql, 1, types, args, "the meter's prices");
	PG_RETURN_BOOL(true);
}
