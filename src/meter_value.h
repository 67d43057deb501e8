/*
 * meter_value.h: what a meter reads out of an event's data.
 *
 * A meter's value_property and group_by are JSONPath expressions; these
 * helpers evaluate them the same way wherever events are read (rollups,
 * raw scans in query_meter), so the two can never disagree.
 */
#ifndef METERING_METER_VALUE_H
#define METERING_METER_VALUE_H

#include "utils/jsonb.h"
#include "utils/jsonpath.h"
#include "utils/numeric.h"

typedef enum MeterAggregation
{
	METER_SUM,
	METER_COUNT,
	METER_AVG,
	METER_MIN,
	METER_MAX,
	METER_UNIQUE_COUNT,
	METER_LATEST
} MeterAggregation;

/* A meter's group_by, compiled: names in jsonb key order, paths parsed. */
typedef struct MeterGroups
{
	int			n;
	char	  **names;
	JsonPath  **paths;
} MeterGroups;

extern MeterAggregation MeterAggregationFromName(const char *name);

/*
 * The first item path selects in data (lax mode, errors suppressed).  False
 * when it selects nothing or JSON null: a missing value.
 */
extern bool MeterPathValue(Jsonb *data, JsonPath *path, JsonbValue *out);

/*
 * A JSON number, or a string holding a plain decimal number (optional sign,
 * digits, optional fraction, optional exponent of at most three digits, no
 * surrounding whitespace, at most 1000 characters); else NULL.  The one rule
 * of what a number is, for meters and rating alike.
 */
extern Numeric JsonNumber(JsonbValue *v);

/* JsonNumber, when also within a usage value's bounds (below); else NULL. */
extern Numeric MeterValueNumber(JsonbValue *v);

/* Text of a value: strings as they are, everything else in its JSON spelling. */
extern char *MeterValueText(JsonbValue *v);

/* Compiles a group_by object (name -> JSONPath text) in the given context. */
extern MeterGroups *MeterGroupsCompile(Jsonb *group_by, MemoryContext cxt);

/* {"name": "text value" | null, ...} for one event, as jsonb text. */
extern char *MeterGroupsText(MeterGroups *groups, Jsonb *data);

/* Whether the event's groups contain a feature's group filters. */
extern bool MeterGroupsPass(MeterGroups *groups, Jsonb *filters, Jsonb *data);

/*
 * The usage one event records for an entitlement: 1 for COUNT (path NULL),
 * else the value at path, 0 when it is missing, not a number or negative
 * (corrections are not usage).  The one rule, for the gate, the alerts and
 * (in SQL, greatest(_meter_number, 0)) the balance reads.
 */
extern Numeric MeterUsage(Jsonb *data, JsonPath *path);

#endif
