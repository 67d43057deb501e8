/*
 * metering.h: what the C files of the extension share.
 *
 * The engines meet only through the clock, the settings and the time
 * parsing declared here; everything else stays inside its own file.
 */
#ifndef METERING_H
#define METERING_H

#include "datatype/timestamp.h"

/* Settings (metering.c). */
extern int	metering_meter_usage_max_age;	/* seconds */
extern int	metering_batch_meter_usage_max_age; /* seconds */
extern bool metering_allow_backdated_rules;

/* The extension's present: metering.now when set, else the transaction start. */
extern TimestampTz MeteringNow(void);
extern TimestampTz MeteringTransactionClock(void);

/* A fresh time-ordered v7 uuid, monotonic within this backend (uuid.c). */
struct pg_uuid_t;
extern void MeteringUuidV7(struct pg_uuid_t *out);

/*
 * A uuid in exactly the canonical 8-4-4-4-12 hex spelling (either case);
 * false otherwise, so that callers raise errors naming their own field.
 */
extern bool MeteringParseUuid(const char *s, int len, struct pg_uuid_t *out);

/* The installed SQL's version (0.2.0 is 200), 0 when not installed. */
extern int	MeteringInstalledVersion(void);

/* The extension owner, or InvalidOid when the extension is not installed. */
extern Oid	MeteringExtensionOwner(void);

/* 0A000 on a Citus worker of a distributed install (inside SPI; see 80_distribute.sql) */
extern void MeteringRequireCoordinator(const char *what);
extern bool MeteringOnWorker(void);
extern bool MeteringDistributedTable(const char *relname);
extern bool MeteringCitusWorkerNode(void);
extern void MeteringRequireNotInShardQuery(const char *what);
extern bool MeteringSqlCurrent(void);
extern Oid	MeteringRelid(const char *relname);
extern void MeteringRequireSqlCurrent(const char *what);
extern void MeteringRequireConfig(const char *what);

/*
 * Between these, plans are made with index scans where an index serves
 * (no sequential or bitmap scans, the planner's default costs, no JIT): for
 * generic plans of hot queries that must stay index lookups as the tables
 * grow (metering.c).
 * End restores the settings; an error restores them too.
 */
extern int	MeteringPlanByIndexBegin(void);
extern void MeteringPlanByIndexEnd(int level);

/*
 * A kept plan of sql, prepared once into *cache (inside SPI): planned as
 * the plan cache chooses, or always generic.
 */
struct _SPI_plan;
extern struct _SPI_plan *MeteringPrepare(struct _SPI_plan **cache, const char *sql, int nargs, Oid *types);
extern struct _SPI_plan *MeteringPrepareGeneric(struct _SPI_plan **cache, const char *sql, int nargs, Oid *types);

/* SPI_execute_plan of such a plan, planned by index (above). */
extern int	MeteringExecuteByIndex(struct _SPI_plan *plan, Datum *args, const char *nulls, bool read_only,
								   long count);

/* Random bytes from the server's strong source; errors when it fails. */
extern void MeteringRandomBytes(void *buf, size_t len);

/*
 * At REPEATABLE READ and above: 40001 when the one-row, one-column query
 * answers differently under the latest snapshot than under the
 * transaction's (snapshot_guard.c).  "what" completes "a concurrent change
 * of ...".
 */
extern void MeteringErrorIfChangedSinceSnapshot(const char *sql, int nargs, Oid *types, Datum *args,
												const char *what);

/* The refresh_interval setting and, when preloaded, the background refresh (worker.c). */
extern void MeteringWorkerInit(void);

#endif
