/*
 * price.c: the price engine (see price.h).
 *
 * Rules (Stripe's semantics where Stripe and Lago agree):
 *   unit:       amount = quantity x unit_amount (a negative quantity, a
 *               refund, gives a negative amount).
 *   graduated:  tiers [{up_to, unit_amount, flat_amount}], up_to inclusive,
 *               strictly ascending and positive, the last one null (no end);
 *               tier i holds the quantity in (up_to[i-1], up_to[i]] (the
 *               first from 0); each tier prices the units that fall in it at
 *               its unit_amount and adds its flat_amount when any quantity
 *               falls in it.  Quantity <= 0 prices 0.
 *   volume:     the tier the whole quantity falls in (the first whose up_to
 *               is at least the quantity) prices every unit, plus its
 *               flat_amount once.  Quantity <= 0 prices 0.
 *   package:    max(0, quantity - free_units) rounded up to whole packages
 *               of package_size, each package_amount.
 *   percentage: one event's fee is rate x value + fixed_amount_per_event,
 *               raised to min_per_event and lowered to max_per_event when
 *               they are given (a negative value, a refund, is bounded the
 *               same way); the first free_events events of a period are free
 *               (counted by the caller, which knows the order of events).
 * Every amount is numeric, exact, never rounded here: rounding to the
 * currency's minor unit is done once per line, by the caller.  Arithmetic
 * overflow is numeric's own error (22003), never a wrap.
 */
#include "postgres.h"

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "price.h"

static const char *const model_names[] = {"unit", "graduated", "volume", "package", "percentage"};

int
PriceModelOf(const char *name)
{
	for (int i = 0; i < (int) lengthof(model_names); i++)
		if (strcmp(name, model_names[i]) == 0)
			return i;
	return -1;
}

const char *
PriceModelName(PriceModel model)
{
	return model_names[model];
}





Numeric
PriceZero(void)
{
	return int64_to_numeric(0);
}

static const char *
NumText(Numeric n)
{
	if (n == NULL)
		return "null";
	return DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(n)));
}

/* a finite, non-negative number from a tier field, else 22023 */
static Numeric
TierNumber(JsonbValue *v, int tier, const char *field, bool positive)
{
	Numeric		n;

	if (v->type != jbvNumeric)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price tiers[%d].%s must be a number", tier, field)));
	n = v->val.numeric;
	if (numeric_is_nan(n) || numeric_is_inf(n))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price tiers[%d].%s must be finite, got %s", tier, field, NumText(n))));
	if (NumCmp(n, PriceZero()) < 0 || (positive && NumCmp(n, PriceZero()) == 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price tiers[%d].%s must be %s, got %s", tier, field,
						positive ? "positive" : "at least 0", NumText(n))));
	return n;
}

int
PriceParseTiers(Jsonb *tiers, PriceTier **out)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			n;
	int			i = 0;
	PriceTier  *t;

	if (JB_ROOT_IS_SCALAR(tiers) || !JB_ROOT_IS_ARRAY(tiers))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price tiers must be a JSON array of tiers"),
				 errhint("[{\"up_to\": 1000, \"unit_amount\": 0}, {\"up_to\": null, \"unit_amount\": 0.001}]")));
	n = JB_ROOT_COUNT(tiers);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price tiers must hold at least one tier")));
	if (n > 1000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price tiers: at most 1000 tiers, got %d", n)));
	t = palloc0(sizeof(PriceTier) * n);

	it = JsonbIteratorInit(&tiers->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		JsonbIterator *oit;
		JsonbValue	k,
					val;
		JsonbIteratorToken otok;
		bool		has_up_to = false,
					has_unit = false,
					has_flat = false;

		if (tok != WJB_ELEM)
			continue;
		if (v.type != jbvBinary || !JsonContainerIsObject(v.val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("price tiers[%d] must be a JSON object with up_to, unit_amount and flat_amount", i)));
		t[i].unit_amount = PriceZero();
		t[i].flat_amount = PriceZero();
		oit = JsonbIteratorInit(v.val.binary.data);
		while ((otok = JsonbIteratorNext(&oit, &k, true)) != WJB_DONE)
		{
			char	   *key;

			if (otok != WJB_KEY)
				continue;
			key = pnstrdup(k.val.string.val, k.val.string.len);
			otok = JsonbIteratorNext(&oit, &val, true);
			Assert(otok == WJB_VALUE);
			if (strcmp(key, "up_to") == 0)
			{
				has_up_to = true;
				t[i].up_to = val.type == jbvNull ? NULL : TierNumber(&val, i, "up_to", true);
			}
			else if (strcmp(key, "unit_amount") == 0)
			{
				has_unit = true;
				t[i].unit_amount = TierNumber(&val, i, "unit_amount", false);
			}
			else if (strcmp(key, "flat_amount") == 0)
			{
				has_flat = true;
				t[i].flat_amount = TierNumber(&val, i, "flat_amount", false);
			}
			else
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("price tiers[%d]: unknown field \"%s\"", i, key),
						 errhint("A tier has up_to, unit_amount and flat_amount.")));
		}
		if (!has_up_to)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("price tiers[%d].up_to is required (null for the last tier)", i)));
		if (!has_unit && !has_flat)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("price tiers[%d] needs unit_amount or flat_amount", i)));
		if (i > 0 && t[i - 1].up_to == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("price tiers[%d].up_to is null, but only the last tier may have no end", i - 1)));
		if (i > 0 && t[i].up_to != NULL)
		{
			int			c = NumCmp(t[i].up_to, t[i - 1].up_to);

			if (c == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("price tiers[%d].up_to %s is a duplicate of tiers[%d].up_to", i, NumText(t[i].up_to), i - 1)));
			if (c < 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("price tiers are not sorted: tiers[%d].up_to %s is below tiers[%d].up_to %s",
								i, NumText(t[i].up_to), i - 1, NumText(t[i - 1].up_to))));
		}
		i++;
	}
	if (t[n - 1].up_to != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("price tiers[%d].up_to must be null: the last tier has no end, got %s", n - 1, NumText(t[n - 1].up_to))));
	*out = t;
	return n;
}

/* a ceiling of a / b for b > 0, exact */
static Numeric
CeilDiv(Numeric a, Numeric b)
{
	Numeric		q = DatumGetNumeric(DirectFunctionCall2(numeric_div_trunc, NumericGetDatum(a), NumericGetDatum(b)));

	if (NumCmp(NumSub(a, NumMul(q, b)), PriceZero()) > 0)
		q = NumAdd(q, int64_to_numeric(1));
	return q;
}

static void
TierDetail(StringInfo d, Numeric from, const PriceTier *t, Numeric units, Numeric amount, Numeric flat)
{
	appendStringInfo(d, "{\"from\": %s, \"up_to\": %s, \"units\": %s, \"unit_amount\": %s, \"flat_amount\": %s, \"amount\": %s}",
					 NumText(from), NumText(t->up_to), NumText(units), NumText(t->unit_amount),
					 NumText(flat), NumText(amount));
}

Numeric
PriceAmount(const Price *p, Numeric q, StringInfo d)
{
	Numeric		zero = PriceZero();
	Numeric		total = zero;

	switch (p->model)
	{
		case PRICE_UNIT:
			total = NumMul(q, p->unit_amount);
			appendStringInfo(d, "{\"units\": %s, \"unit_amount\": %s, \"amount\": %s}",
							 NumText(q), NumText(p->unit_amount), NumText(total));
			break;

		case PRICE_GRADUATED:
			{
				Numeric		from = zero;

				appendStringInfoString(d, "{\"tiers\": [");
				for (int i = 0; i < p->ntiers; i++)
				{
					const PriceTier *t = &p->tiers[i];
					Numeric		units = zero;
					Numeric		flat = zero;
					Numeric		amount;

					if (NumCmp(q, from) > 0)
					{
						units = (t->up_to == NULL || NumCmp(q, t->up_to) < 0) ? q : t->up_to;
						units = NumSub(units, from);
						flat = t->flat_amount;
					}
					amount = NumAdd(NumMul(units, t->unit_amount), flat);
					total = NumAdd(total, amount);
					if (i > 0)
						appendStringInfoString(d, ", ");
					TierDetail(d, from, t, units, amount, flat);
					if (t->up_to != NULL)
						from = t->up_to;
				}
				appendStringInfo(d, "], \"amount\": %s}", NumText(total));
				break;
			}

		case PRICE_VOLUME:
			{
				Numeric		from = zero;
				int			i;

				if (NumCmp(q, zero) <= 0)
				{
					appendStringInfo(d, "{\"tier\": null, \"units\": %s, \"amount\": 0}", NumText(q));
					break;
				}
				for (i = 0; i < p->ntiers - 1; i++)
				{
					if (NumCmp(q, p->tiers[i].up_to) <= 0)
						break;
					from = p->tiers[i].up_to;
				}
				total = NumAdd(NumMul(q, p->tiers[i].unit_amount), p->tiers[i].flat_amount);
				appendStringInfo(d, "{\"tier\": %d, \"from\": %s, \"up_to\": %s, \"units\": %s, \"unit_amount\": %s, \"flat_amount\": %s, \"amount\": %s}",
								 i + 1, NumText(from), NumText(p->tiers[i].up_to), NumText(q),
								 NumText(p->tiers[i].unit_amount), NumText(p->tiers[i].flat_amount), NumText(total));
				break;
			}

		case PRICE_PACKAGE:
			{
				Numeric		billable = NumSub(q, p->free_units);
				Numeric		packages;

				if (NumCmp(billable, zero) < 0)
					billable = zero;
				packages = CeilDiv(billable, p->package_size);
				total = NumMul(packages, p->package_amount);
				appendStringInfo(d, "{\"units\": %s, \"free_units\": %s, \"billable_units\": %s, \"package_size\": %s, \"packages\": %s, \"package_amount\": %s, \"amount\": %s}",
								 NumText(q), NumText(p->free_units), NumText(billable), NumText(p->package_size),
								 NumText(packages), NumText(p->package_amount), NumText(total));
				break;
			}

		case PRICE_PERCENTAGE:
			{
				Numeric		fee = PriceEventFee(p->rate, p->fixed_amount_per_event, p->min_per_event,
												p->max_per_event, q);

				total = fee;
				appendStringInfo(d, "{\"events\": 1, \"value\": %s, \"rate\": %s, \"fixed_amount_per_event\": %s, \"min_per_event\": %s, \"max_per_event\": %s, \"fees\": %s, \"amount\": %s}",
								 NumText(q), NumText(p->rate), NumText(p->fixed_amount_per_event),
								 NumText(p->min_per_event), NumText(p->max_per_event), NumText(fee), NumText(fee));
				break;
			}
	}
	return total;
}

Numeric
PriceEventFee(Numeric rate, Numeric fixed, Numeric min, Numeric max, Numeric value)
{
	Numeric		fee = NumMul(rate, value);

	if (fixed != NULL)
		fee = NumAdd(fee, fixed);
	if (min != NULL && NumCmp(fee, min) < 0)
		fee = min;
	if (max != NULL && NumCmp(fee, max) > 0)
		fee = max;
	return fee;
}
