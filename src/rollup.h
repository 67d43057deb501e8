/*
 * rollup.h: the rollup buffer (rollup.c), for the refresh steps (refresh.c).
 *
 * Events go into a buffer of (meter, subject, hour, groups) entries, which
 * is written out in key order into metering.meter_rollups; a refresh and the
 * rebuild after DELETE use the same buffer, so they cannot disagree.
 */
#ifndef METERING_ROLLUP_H
#define METERING_ROLLUP_H

#include "executor/spi.h"
#include "utils/jsonpath.h"

#include "meter_value.h"

typedef struct RollupMeter
{
	char	   *slug;
	char	   *event_type;
	int			event_type_len;
	MeterAggregation agg;
	JsonPath   *value_path;		/* NULL for COUNT */
	MeterGroups *groups;
	int64		watermark;		/* rollups hold this meter's events with seq <= it */
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
	MemoryContext scratch;		/* one event's temporary work */
	int64		added;			/* entries added since the caller reset it */
	int64		written;		/* rollup rows upserted */
} RollupBuffer;

/* A buffer, in the current context. */
extern RollupBuffer *RollupBufferCreate(void);

/* The live meters (or just one) with their watermarks, locked FOR UPDATE. */
extern void RollupLoadMeters(RollupBuffer *buf, const char *only_slug);

/* Feeds the events of a query (subject, type, time, data) into the buffer. */
extern void RollupAddQueryEvents(RollupBuffer *buf, int only, const char *sql, int nargs,
								 Oid *argtypes, Datum *args);

/* Writes the buffered entries out and empties the buffer. */
extern void RollupFlush(RollupBuffer *buf);

/* Whether the installed SQL keeps usage periods and snapshots (0.2.0 on). */
extern bool RollupHasDerivedData(void);

#endif
