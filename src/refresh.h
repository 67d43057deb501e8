/*
 * refresh.h: a refresh of the rollups, in steps (refresh.c).
 *
 * metering.refresh_rollups() runs every step in the caller's transaction;
 * the background worker (worker.c) runs each step in a transaction of its
 * own, so that a failing meter is retried next round while the others go
 * on, and no watermark stays locked longer than its own step.  Every step
 * runs inside an SPI connection.
 */
#ifndef METERING_REFRESH_H
#define METERING_REFRESH_H

#include "nodes/pg_list.h"

typedef struct MeteringRefreshCounts
{
	int64		events;			/* (meter, event) pairs rolled up */
	int64		rows;			/* rollup rows written */
	int64		snapshots;		/* entitlement snapshots written */
} MeteringRefreshCounts;

/* Waits for the writers of events numbered so far; returns that number. */
extern int64 MeteringRefreshBegin(void);

/* The live meters (or just one), in slug order, in the transaction's context. */
extern List *MeteringRefreshMeters(const char *only_slug);

/*
 * While true, a refresh drops the snapshots that late events reach but
 * queues the new snapshots of the events' entitlements instead of writing
 * them (the worker's rounds between two full ones: a reader adds the rollup
 * hours after an older snapshot instead).
 */
extern bool MeteringRefreshQueuesSnapshots;

/* Rolls up one meter's events up to `upto` and what depends on them. */
extern int64 MeteringRefreshMeter(const char *slug, int64 upto, MeteringRefreshCounts *counts);

/* Saves the snapshots of the entitlements queued (by grant, void, reset and the above). */
extern int64 MeteringRefreshQueue(void);

/* Analyzes the rollups when a refresh grew them by much. */
extern void MeteringRefreshAnalyze(int64 written);

extern void MeteringRefreshSummarize(int64 events);

#endif
