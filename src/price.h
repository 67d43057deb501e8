/*
 * price.h: the price engine.
 *
 * The engine knows nothing of tables: it is given one price (its model and
 * the model's parameters, already checked by PriceCheck) and a quantity for
 * a billing period, or the value of one event, and answers an exact amount
 * and the detail of how it was reached (per tier, per package, per event).
 * The loader that reads a row of metering.prices into a Price, and the SQL
 * surface, are in price_fn.c.
 */
#ifndef METERING_PRICE_H
#define METERING_PRICE_H

#include "lib/stringinfo.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "numeric_ops.h"

typedef enum PriceModel
{
	PRICE_UNIT,
	PRICE_GRADUATED,
	PRICE_VOLUME,
	PRICE_PACKAGE,
	PRICE_PERCENTAGE
} PriceModel;

typedef struct PriceTier
{
	Numeric		up_to;			/* inclusive; NULL: no end (last tier only) */
	Numeric		unit_amount;	/* 0 when not given */
	Numeric		flat_amount;	/* 0 when not given */
} PriceTier;

typedef struct Price
{
	PriceModel	model;
	Numeric		unit_amount;	/* unit */
	PriceTier  *tiers;			/* graduated, volume */
	int			ntiers;
	Numeric		package_size;	/* package */
	Numeric		package_amount;
	Numeric		free_units;		/* package; 0 when not given */
	Numeric		rate;			/* percentage: a fraction of the value */
	Numeric		fixed_amount_per_event; /* 0 when not given */
	Numeric		min_per_event;	/* NULL: no bound */
	Numeric		max_per_event;	/* NULL: no bound */
	int64		free_events;	/* 0 when not given */
} Price;

/* The model of a name, or -1. */
extern int	PriceModelOf(const char *name);
extern const char *PriceModelName(PriceModel model);

/*
 * Parses and checks a tiers array (22023 naming the tier and the field);
 * returns the number of tiers and sets *tiers.
 */
extern int	PriceParseTiers(Jsonb *tiers, PriceTier **out);

/*
 * The amount of a period's quantity under a unit, graduated, volume or
 * package price; appends the details (one JSON object) to `details`.
 */
extern Numeric PriceAmount(const Price *p, Numeric quantity, StringInfo details);

/* The fee of one event of a percentage price (free events aside). */
extern Numeric PriceEventFee(Numeric rate, Numeric fixed, Numeric min, Numeric max, Numeric value);

/* 0 as a numeric (the arithmetic: numeric_ops.h) */
extern Numeric PriceZero(void);

#endif
