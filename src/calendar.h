/*
 * calendar.h: UTC calendar arithmetic shared by usage periods, expirations,
 * recurrences and windows.
 *
 * Boundaries never chain: boundary n is computed from the anchor as
 * anchor + n * step, with the day clamped to the end of the month, so a
 * monthly anchor on Jan 31 gives Feb 29, Mar 31, Apr 30 and never drifts.
 */
#ifndef METERING_CALENDAR_H
#define METERING_CALENDAR_H

#include "datatype/timestamp.h"

/* anchor + n * step in UTC; an error (22008) when it leaves the timestamp range */
extern TimestampTz CalendarStep(TimestampTz anchor, const Interval *step, int64 n);

/* the largest n with CalendarStep(anchor, step, n) <= t (step must be positive) */
extern int64 CalendarIndex(TimestampTz anchor, const Interval *step, TimestampTz t);

/* the first boundary strictly after t */
extern TimestampTz CalendarNextAfter(TimestampTz anchor, const Interval *step, TimestampTz t);

/* no negative field, and at least `usecs` long */
extern bool IntervalIsAtLeast(const Interval *iv, int64 usecs);

/* t truncated to the minute (UTC minutes: offsets are whole minutes) */
extern TimestampTz TruncMinute(TimestampTz t);

/* t truncated to the UTC hour: the rollups' buckets */
extern TimestampTz TruncHour(TimestampTz t);

/*
 * The extension's instants are those of the years 1 to 9999 (UTC): the
 * clock, every argument time and every stored start.  Calendar steps from
 * there stay representable, so an answer is never an overflow.
 */
#define METERING_TIME_MIN	INT64CONST(-63082281600000000)	/* 0001-01-01 00:00:00+00 */
#define METERING_TIME_END	INT64CONST(252455616000000000)	/* 10000-01-01 00:00:00+00 */

/* Whether t is finite and within [METERING_TIME_MIN, METERING_TIME_END). */
extern bool MeteringTimeInRange(TimestampTz t);

#endif
