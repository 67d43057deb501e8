/*
 * hashmap.h: the HashMap rating rules compiled into hash tables.
 *
 * The rule tables are read once per backend into the structures below and
 * kept until a rule table changes (any backend's change invalidates every
 * backend's copy, through relcache invalidation), so that pricing a point
 * costs a few hash probes and some numeric arithmetic, not a query.
 */
#ifndef METERING_HASHMAP_H
#define METERING_HASHMAP_H

#include "datatype/timestamp.h"
#include "utils/numeric.h"

/* One mapping or threshold. */
typedef struct HmRule
{
	TimestampTz start;			/* it applies on [start, end) */
	TimestampTz end;			/* min(end, deleted_at), DT_NOEND when neither */
	int			group;			/* index into HmCache.group_names; 0: the default group */
	const char *tenant;			/* NULL: every tenant */
	bool		rate;			/* map_type rate, else flat */
	Numeric		cost;
	Numeric		level;			/* thresholds only */
	bool		reachable;		/* thresholds: level > -1 (lower levels never apply) */
} HmRule;

/*
 * The rules of one key (a service's mappings, a field value's mappings, a
 * service's or a field's thresholds): the global ones first, then the
 * tenants' in tenant order, so that one tenant's are found by bisection;
 * thresholds by level, highest first, within each.
 */
typedef struct HmRuleList
{
	HmRule	   *rules;
	int			n;
	int			nglobal;
} HmRuleList;

/* A string -> index map with open addressing. */
typedef struct HmMap
{
	int			size;			/* a power of two, at least twice the count */
	int			count;
	int		   *slots;			/* index + 1; 0 is empty */
	const char **keys;			/* by index */
	int		   *lens;
} HmMap;

typedef struct HmField
{
	const char *name;
	HmMap		values;			/* metadata value text -> index into value_rules */
	HmRuleList *value_rules;
	HmRuleList	thresholds;
} HmField;

typedef struct HmService
{
	HmRuleList	mappings;
	HmRuleList	thresholds;
	HmField    *fields;			/* in name order */
	int			nfields;
} HmService;

typedef struct HmCache
{
	MemoryContext cxt;
	HmMap		service_names;	/* service name -> index into services */
	HmService  *services;
	const char **group_names;	/* [0] is NULL, the default group */
	int			ngroups;		/* including the default group */
	uint64		generation;		/* the invalidation count it was built at */
	bool		xact_only;		/* built under a transaction snapshot */
	uint32		lxid;			/* ... of this local transaction */
	bool		stmt_only;		/* built in parallel mode, under the statement's snapshot */
	TimestampTz stmt_start;		/* ... of this statement */
} HmCache;

extern int	HmMapGet(const HmMap *map, const char *key, int len);

/* The current rules (built or reused); valid until the next call. */
extern HmCache *HmGetCache(void);

#endif
