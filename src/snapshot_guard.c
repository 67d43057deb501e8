/*
 * snapshot_guard.c: the REPEATABLE READ check that writers of one parent
 * row share.
 *
 * Writers that must see each other's rows (grants of one entitlement, rules
 * of one service) take turns on a lock of the parent row.  At READ
 * COMMITTED each statement then sees whatever the previous holder
 * committed.  At REPEATABLE READ it does not: the previous holder only
 * locked the parent, so PostgreSQL raises no serialization failure, and its
 * rows stay invisible to our snapshot.  The guard reads a fingerprint of the
 * rows both under the transaction's snapshot and under the latest one, and
 * fails as a concurrent update fails (40001) when they differ.
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "utils/snapmgr.h"

#include "metering.h"

static char *
Fingerprint(const char *sql, int nargs, Oid *types, Datum *args)
{
	int			ret = SPI_execute_with_args(sql, nargs, types, args, NULL, true, 1);

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read the rows to compare: %s", SPI_result_code_string(ret));
	return SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
}

void
MeteringErrorIfChangedSinceSnapshot(const char *sql, int nargs, Oid *types, Datum *args,
									const char *what)
{
	char	   *seen;
	char	   *now;

	if (!IsolationUsesXactSnapshot())
		return;
	SPI_connect();
	seen = Fingerprint(sql, nargs, types, args);
	PushActiveSnapshot(GetLatestSnapshot());
	now = Fingerprint(sql, nargs, types, args);
	PopActiveSnapshot();
	if ((seen == NULL) != (now == NULL) || (seen && strcmp(seen, now) != 0))
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to a concurrent change of %s", what),
				 errhint("Run the transaction again.")));
	SPI_finish();
}
