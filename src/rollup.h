/*
 * rollup.h: the statements that add events to the rollups (rollup.c), for
 * the refresh (refresh.c) and the rebuild after DELETE.
 */
#ifndef METERING_ROLLUP_H
#define METERING_ROLLUP_H

#include "executor/spi.h"

#include "meter_value.h"

typedef struct RollupMeter
{
	char	   *slug;
	char	   *event_type;
	MeterAggregation agg;
	Datum		value_property; /* jsonpath; (Datum) 0 for COUNT */
	Datum		group_by;		/* jsonb */
	int64		watermark;		/* rollups hold this meter's events with seq <= it */
} RollupMeter;

/*
 * The live meters (or just one) in slug order with their watermarks, locked
 * FOR UPDATE, allocated in the current context; *n is how many.
 */
extern RollupMeter *RollupLoadMeters(const char *only_slug, int *n);

/*
 * Adds the meter's events numbered above its watermark and up to `upto` to
 * its rollups; returns how many rollup rows it wrote.
 */
extern int64 RollupAdd(RollupMeter *m, int64 upto);

/* Whether the installed SQL keeps usage periods and snapshots (0.2.0 on). */
extern bool RollupHasDerivedData(void);

#endif
