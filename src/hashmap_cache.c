/*
 * hashmap_cache.c: reads the HashMap rule tables into a per-backend cache
 * and keeps it honest.
 *
 * Every change to a rule table fires a statement trigger that queues a
 * relcache invalidation of that table; PostgreSQL delivers it to every
 * backend when the change commits (and to this backend at once), and our
 * callback counts it.  A cache is reused only while the count is the one it
 * was built at.  Three details make that airtight:
 *   - every call accepts pending invalidations itself (cheap when there are
 *     none), since a statement that finds its tables already locked, or a
 *     function looping over statements, would not;
 *   - at READ COMMITTED the rules are read under the latest snapshot, never
 *     the caller's (an open cursor's snapshot may be old: a cache built from
 *     it but stamped with the current count would stay stale);
 *   - a cache built under a REPEATABLE READ snapshot may miss changes that
 *     committed after the snapshot, so it serves only the transaction that
 *     built it; one built in parallel mode (no new snapshot may be taken
 *     there) serves only its statement.
 * The consequence at READ COMMITTED: a rule change that commits while a
 * long statement runs applies to the rows rated after it, as it would to the
 * next statement; REPEATABLE READ rates a whole transaction with one list.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/datum.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/guc.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "hashmap.h"
#include "metering.h"

static HmCache *cache = NULL;
static uint64 generation = 0;	/* invalidations seen */
static bool callback_registered = false;

/* The rule tables, as of the last load (no catalog access in the callback). */
#define NRULETABLES 5
static Oid	rule_tables[NRULETABLES];

/* An invalidation of one of the rule tables, or of everything. */
static void
InvalidateCallback(Datum arg, Oid relid)
{
	if (relid == InvalidOid)
	{
		generation++;
		return;
	}
	for (int i = 0; i < NRULETABLES; i++)
		if (rule_tables[i] == relid)
		{
			generation++;
			return;
		}
}

/* metering._hashmap_invalidate(): statement trigger on the rule tables. */
PG_FUNCTION_INFO_V1(metering_hashmap_invalidate);
Datum
metering_hashmap_invalidate(PG_FUNCTION_ARGS)
{
	TriggerData *trig = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "metering._hashmap_invalidate must be called as a trigger");
	CacheInvalidateRelcacheByRelid(RelationGetRelid(trig->tg_relation));
	return PointerGetDatum(NULL);
}

/* ---- the string map ---- */

static void
MapInit(HmMap *map, int capacity)
{
	int			size = 8;

	while (size < capacity * 2)
		size *= 2;
	map->size = size;
	map->count = 0;
	map->slots = palloc0(sizeof(int) * size);
	map->keys = palloc(sizeof(char *) * Max(capacity, 1));
	map->lens = palloc(sizeof(int) * Max(capacity, 1));
}

int
HmMapGet(const HmMap *map, const char *key, int len)
{
	uint32		h;
	int			i;

	if (map->count == 0)
		return -1;
	h = hash_bytes((const unsigned char *) key, len);
	for (i = h & (map->size - 1);; i = (i + 1) & (map->size - 1))
	{
		int			k = map->slots[i] - 1;

		if (k < 0)
			return -1;
		if (map->lens[k] == len && memcmp(map->keys[k], key, len) == 0)
			return k;
	}
}

/* Adds a key (not already there) as the next index; returns it. */
static int
MapAdd(HmMap *map, const char *key, int len)
{
	uint32		h = hash_bytes((const unsigned char *) key, len);
	int			i;

	for (i = h & (map->size - 1); map->slots[i] != 0; i = (i + 1) & (map->size - 1))
		;
	map->keys[map->count] = key;
	map->lens[map->count] = len;
	map->slots[i] = ++map->count;
	return map->count - 1;
}

/* ---- loading ---- */

static char *
TextCol(int row, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

static bool
Equal(const char *a, const char *b)
{
	return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/*
 * The rules of one table, ordered so that each key's list is contiguous
 * with its global rules first: service, field (NULL first), value, tenant.
 * $1: 'm' for mappings, 't' for thresholds.
 */
static const char *RulesSql =
"WITH g AS (SELECT id, row_number() OVER (ORDER BY id) AS gi FROM metering.hashmap_groups), "
"r AS ( "
"  SELECT m.service_id, m.field_id, m.group_id, m.value, NULL::numeric AS level, m.cost, m.map_type, m.tenant_id, "
"         m.start, least(m.\"end\", m.deleted_at) AS stop "
"    FROM metering.hashmap_mappings m WHERE $1 = 'm' "
"  UNION ALL "
"  SELECT t.service_id, t.field_id, t.group_id, NULL, t.level, t.cost, t.map_type, t.tenant_id, "
"         t.start, least(t.\"end\", t.deleted_at) "
"    FROM metering.hashmap_thresholds t WHERE $1 = 't') "
"SELECT coalesce(s.name, fs.name) AS service, f.name AS field, r.value, coalesce(g.gi, 0)::int4, "
"       r.level, r.cost, r.map_type = 'rate', r.tenant_id, r.start, r.stop "
"  FROM r LEFT JOIN g ON g.id = r.group_id "
"  LEFT JOIN metering.hashmap_services s ON s.id = r.service_id "
"  LEFT JOIN metering.hashmap_fields f ON f.id = r.field_id "
"  LEFT JOIN metering.hashmap_services fs ON fs.id = f.service_id "
" WHERE r.stop IS NULL OR r.stop > r.start "
" ORDER BY coalesce(s.name, fs.name) COLLATE \"C\", f.name COLLATE \"C\" NULLS FIRST, "
"          r.value COLLATE \"C\" NULLS FIRST, r.tenant_id COLLATE \"C\" NULLS FIRST, r.level DESC, "
"          coalesce(g.gi, 0), r.start";

static HmService *
ServiceFor(HmCache *c, const char *name, int *nservices, int cap)
{
	int			k = HmMapGet(&c->service_names, name, strlen(name));

	if (k < 0)
	{
		/* the count came from the same snapshot; guard it all the same */
		if (c->service_names.count >= cap)
			elog(ERROR, "hashmap rules changed while they were read");
		k = MapAdd(&c->service_names, name, strlen(name));
		memset(&c->services[k], 0, sizeof(HmService));
		*nservices = k + 1;
	}
	return &c->services[k];
}

static HmField *
FieldFor(HmService *svc, const char *name)
{
	/* rows come in field name order: the field is the last one or a new one */
	if (svc->nfields > 0 && strcmp(svc->fields[svc->nfields - 1].name, name) == 0)
		return &svc->fields[svc->nfields - 1];
	svc->fields = svc->nfields == 0 ? palloc(sizeof(HmField) * 4)
		: (svc->nfields % 4 == 0 ? repalloc(svc->fields, sizeof(HmField) * (svc->nfields + 4)) : svc->fields);
	memset(&svc->fields[svc->nfields], 0, sizeof(HmField));
	svc->fields[svc->nfields].name = name;
	return &svc->fields[svc->nfields++];
}

/* Appends a rule to a list; rows come global first, then by tenant. */
static void
ListAdd(HmRuleList *list, HmRule *rule)
{
	if (list->n == 0)
		list->rules = palloc(sizeof(HmRule) * 4);
	else if ((list->n & (list->n - 1)) == 0 && list->n >= 4)
		list->rules = repalloc(list->rules, sizeof(HmRule) * list->n * 2);
	list->rules[list->n++] = *rule;
	if (rule->tenant == NULL)
		list->nglobal = list->n;
}

static void
LoadRules(HmCache *c, char which, int *nservices, int cap)
{
	Oid			types[1] = {CHAROID};
	Datum		args[1] = {CharGetDatum(which)};
	int			ret = SPI_execute_with_args(RulesSql, 1, types, args, NULL, true, 0);
	HmField    *field = NULL;
	const char *last_value = NULL;
	HmRuleList *value_list = NULL;

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the hashmap rules: %s", SPI_result_code_string(ret));
	/* SPI returns in its own context, which SPI_finish frees: keep to ours */
	MemoryContextSwitchTo(c->cxt);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *service = TextCol(i, 1);
		char	   *fname = TextCol(i, 2);
		char	   *value = TextCol(i, 3);
		HmService  *svc;
		HmRule		rule;
		bool		isnull;
		Datum		d;

		if (service == NULL || (which == 'm' && fname != NULL && value == NULL))
			continue;
		svc = ServiceFor(c, service, nservices, cap);
		rule.group = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
		d = SPI_getbinval(tup, desc, 5, &isnull);
		rule.level = isnull ? NULL : DatumGetNumericCopy(d);
		rule.reachable = rule.level != NULL &&
			DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(rule.level),
											  NumericGetDatum(int64_to_numeric(-1)))) > 0;
		rule.cost = DatumGetNumericCopy(SPI_getbinval(tup, desc, 6, &isnull));
		rule.rate = DatumGetBool(SPI_getbinval(tup, desc, 7, &isnull));
		rule.tenant = TextCol(i, 8);
		rule.start = DatumGetTimestampTz(SPI_getbinval(tup, desc, 9, &isnull));
		d = SPI_getbinval(tup, desc, 10, &isnull);
		rule.end = isnull ? DT_NOEND : DatumGetTimestampTz(d);

		if (fname == NULL)
		{
			ListAdd(which == 'm' ? &svc->mappings : &svc->thresholds, &rule);
			continue;
		}
		if (field == NULL || field != &svc->fields[svc->nfields - 1] || strcmp(field->name, fname) != 0)
		{
			field = FieldFor(svc, fname);
			last_value = NULL;
		}
		if (which == 't')
		{
			ListAdd(&field->thresholds, &rule);
			continue;
		}
		if (last_value == NULL || !Equal(last_value, value))
		{
			int			k = field->values.size == 0 ? -1 : HmMapGet(&field->values, value, strlen(value));

			if (k < 0)
			{
				/* grow: rebuild the map with twice the room */
				if (field->values.size == 0 || field->values.count * 2 >= field->values.size)
				{
					HmMap		old = field->values;
					int			n = old.size == 0 ? 0 : old.count;

					MapInit(&field->values, Max(8, n * 2));
					for (int j = 0; j < n; j++)
						MapAdd(&field->values, old.keys[j], old.lens[j]);
					field->value_rules = n == 0 ? palloc0(sizeof(HmRuleList) * Max(8, n * 2))
						: repalloc(field->value_rules, sizeof(HmRuleList) * Max(8, n * 2));
					for (int j = n; j < Max(8, n * 2); j++)
						memset(&field->value_rules[j], 0, sizeof(HmRuleList));
				}
				k = MapAdd(&field->values, value, strlen(value));
			}
			value_list = &field->value_rules[k];
			last_value = value;
		}
		ListAdd(value_list, &rule);
	}
	SPI_freetuptable(SPI_tuptable);
}

static HmCache *
Load(void)
{
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "metering hashmap rules",
											  ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	HmCache    *c = palloc0(sizeof(HmCache));
	int			ret;
	int			cap;
	int			nservices = 0;
	bool		fresh = !IsolationUsesXactSnapshot() && !IsInParallelMode();
	int			guc_level;

	c->cxt = cxt;
	{
		static const char *const names[NRULETABLES] = {"hashmap_services", "hashmap_fields", "hashmap_groups",
		"hashmap_mappings", "hashmap_thresholds"};
		Oid			schema = get_namespace_oid("metering", false);

		for (int i = 0; i < NRULETABLES; i++)
			rule_tables[i] = get_relname_relid(names[i], schema);
	}
	/*
	 * One snapshot for every query below (read_only SPI uses the active one):
	 * the latest at READ COMMITTED, the transaction's otherwise.  Operators
	 * and functions resolve in pg_catalog whatever the caller's search_path.
	 */
	if (fresh)
		PushActiveSnapshot(GetLatestSnapshot());
	guc_level = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	PG_TRY();
	{
		SPI_connect();
		/* a Citus worker holds a copy of the rules (81_config_copies.sql) */
		MeteringRequireConfig("rating");
		/* groups, numbered as RulesSql numbers them */
		ret = SPI_execute("SELECT name FROM metering.hashmap_groups ORDER BY id", true, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not read the hashmap groups: %s", SPI_result_code_string(ret));
		MemoryContextSwitchTo(cxt);
		c->ngroups = (int) SPI_processed + 1;
		c->group_names = palloc0(sizeof(char *) * c->ngroups);
		for (int i = 1; i < c->ngroups; i++)
			c->group_names[i] = TextCol(i - 1, 1);
		SPI_freetuptable(SPI_tuptable);

		ret = SPI_execute("SELECT (SELECT count(DISTINCT name) FROM metering.hashmap_services)", true, 1);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not count the hashmap services: %s", SPI_result_code_string(ret));
		{
			bool		isnull;

			cap = (int) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		}
		SPI_freetuptable(SPI_tuptable);
		MemoryContextSwitchTo(cxt);
		MapInit(&c->service_names, Max(cap, 1));
		c->services = palloc0(sizeof(HmService) * Max(cap, 1));

		/* SPI's own context holds the rows; the cache copies what it keeps */
		MemoryContextSwitchTo(cxt);
		LoadRules(c, 'm', &nservices, cap);
		MemoryContextSwitchTo(cxt);
		LoadRules(c, 't', &nservices, cap);
		SPI_finish();
	}
	PG_CATCH();
	{
		/* the aborting (sub)transaction pops the snapshot and the GUC */
		MemoryContextSwitchTo(old);
		MemoryContextDelete(cxt);
		PG_RE_THROW();
	}
	PG_END_TRY();
	AtEOXact_GUC(true, guc_level);
	if (fresh)
		PopActiveSnapshot();
	MemoryContextSwitchTo(old);
	return c;
}

HmCache *
HmGetCache(void)
{
	uint64		start;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(InvalidateCallback, (Datum) 0);
		callback_registered = true;
	}
	AcceptInvalidationMessages();
	if (cache != NULL && cache->generation == generation &&
		(!cache->xact_only || cache->lxid == MyProc->lxid) &&
		(!cache->stmt_only || (cache->lxid == MyProc->lxid &&
							   cache->stmt_start == GetCurrentStatementStartTimestamp())))
		return cache;

	start = generation;
	if (cache != NULL)
	{
		MemoryContextDelete(cache->cxt);
		cache = NULL;
	}
	cache = Load();
	/* an invalidation that arrived while loading makes the next call rebuild */
	cache->generation = start;
	cache->xact_only = IsolationUsesXactSnapshot();
	cache->stmt_only = IsInParallelMode();
	cache->stmt_start = GetCurrentStatementStartTimestamp();
	cache->lxid = MyProc->lxid;
	return cache;
}
