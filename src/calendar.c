/*
 * calendar.c: UTC calendar arithmetic, and time zone checks.
 *
 * Periods, expirations and recurrences add intervals to UTC wall-clock
 * time: months first (the day clamped to the month's end), then days, then
 * the time, exactly as PostgreSQL's timestamp + interval does, but never in
 * the session's time zone.  timestamptz values are UTC microseconds, so the
 * timestamp-without-time-zone arithmetic applied to them is UTC arithmetic.
 */
#include "postgres.h"

#include <math.h>

#include "common/int.h"
#include "fmgr.h"
#include "parser/scansup.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/fmgrprotos.h"
#include "utils/timestamp.h"

#include "calendar.h"

/* an average Gregorian month, for the first guess of CalendarIndex */
#define USECS_PER_AVG_MONTH ((int64) (30.436875 * USECS_PER_DAY))

static void
StepOverflow(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
			 errmsg("timestamp out of range")));
}

TimestampTz
CalendarStep(TimestampTz anchor, const Interval *step, int64 n)
{
	Interval	span;
	int64		months,
				days,
				time;

	if (pg_mul_s64_overflow((int64) step->month, n, &months) ||
		pg_mul_s64_overflow((int64) step->day, n, &days) ||
		pg_mul_s64_overflow(step->time, n, &time) ||
		months > PG_INT32_MAX || months < PG_INT32_MIN ||
		days > PG_INT32_MAX || days < PG_INT32_MIN)
		StepOverflow();
	span.month = (int32) months;
	span.day = (int32) days;
	span.time = time;
	return DatumGetTimestamp(DirectFunctionCall2(timestamp_pl_interval,
												 TimestampGetDatum(anchor),
												 IntervalPGetDatum(&span)));
}

int64
CalendarIndex(TimestampTz anchor, const Interval *step, TimestampTz t)
{
	double		approx = (double) step->month * USECS_PER_AVG_MONTH +
		(double) step->day * USECS_PER_DAY + (double) step->time;
	int64		n;

	if (approx <= 0 || step->month < 0 || step->day < 0 || step->time < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a calendar step must be positive and have no negative part, got %s",
						DatumGetCString(DirectFunctionCall1(interval_out, IntervalPGetDatum(step))))));
	if (TIMESTAMP_NOT_FINITE(t) || TIMESTAMP_NOT_FINITE(anchor))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	n = (int64) floor(((double) t - (double) anchor) / approx);
	/* months are 28 to 31 days long: a few steps put the guess right */
	while (CalendarStep(anchor, step, n) > t)
		n--;
	while (CalendarStep(anchor, step, n + 1) <= t)
		n++;
	return n;
}

TimestampTz
CalendarNextAfter(TimestampTz anchor, const Interval *step, TimestampTz t)
{
	return CalendarStep(anchor, step, CalendarIndex(anchor, step, t) + 1);
}

bool
IntervalIsAtLeast(const Interval *iv, int64 usecs)
{
	if (iv->month < 0 || iv->day < 0 || iv->time < 0)
		return false;
	/* the shortest a month can be is 28 days, a UTC day 24 hours */
	return (double) iv->month * 28 * USECS_PER_DAY + (double) iv->day * USECS_PER_DAY +
		(double) iv->time >= (double) usecs;
}

/* t rounded down to a multiple of `unit` microseconds (UTC: no offsets) */
static TimestampTz
TruncTo(TimestampTz t, int64 unit)
{
	TimestampTz r;

	if (TIMESTAMP_NOT_FINITE(t))
		return t;
	r = t - t % unit;
	if (t % unit < 0)
		r -= unit;
	return r;
}

TimestampTz
TruncMinute(TimestampTz t)
{
	return TruncTo(t, USECS_PER_MINUTE);
}

TimestampTz
TruncHour(TimestampTz t)
{
	return TruncTo(t, USECS_PER_HOUR);
}

/* metering.calendar_step(anchor, step, n): anchor + n * step, in UTC, never chained. */
PG_FUNCTION_INFO_V1(metering_calendar_step);
Datum
metering_calendar_step(PG_FUNCTION_ARGS)
{
	PG_RETURN_TIMESTAMPTZ(CalendarStep(PG_GETARG_TIMESTAMPTZ(0), PG_GETARG_INTERVAL_P(1),
									   PG_GETARG_INT64(2)));
}

/* metering._calendar_index(anchor, step, t): the largest n with anchor + n * step <= t. */
PG_FUNCTION_INFO_V1(metering_calendar_index);
Datum
metering_calendar_index(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(CalendarIndex(PG_GETARG_TIMESTAMPTZ(0), PG_GETARG_INTERVAL_P(1),
								  PG_GETARG_TIMESTAMPTZ(2)));
}

bool
MeteringTimeInRange(TimestampTz t)
{
	return !TIMESTAMP_NOT_FINITE(t) && t >= METERING_TIME_MIN && t < METERING_TIME_END;
}

/* metering._time_in_range(t): MeteringTimeInRange, for the SQL side. */
PG_FUNCTION_INFO_V1(metering_time_in_range);
Datum
metering_time_in_range(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(MeteringTimeInRange(PG_GETARG_TIMESTAMPTZ(0)));
}

/*
 * metering._minute(t, what): t truncated to the UTC minute; `what` names the
 * field in the error for an infinite t (no period, grant or reset starts at
 * infinity).
 */
PG_FUNCTION_INFO_V1(metering_minute);
Datum
metering_minute(PG_FUNCTION_ARGS)
{
	TimestampTz t = PG_GETARG_TIMESTAMPTZ(0);

	/* years 1 to 9999, like metering.now: calendar steps from there stay in range */
	if (!MeteringTimeInRange(t))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a finite time in the years 1 to 9999", text_to_cstring(PG_GETARG_TEXT_PP(1)))));
	PG_RETURN_TIMESTAMPTZ(TruncMinute(t));
}

/* metering._interval_at_least(iv, min): no negative field and at least min long. */
PG_FUNCTION_INFO_V1(metering_interval_at_least);
Datum
metering_interval_at_least(PG_FUNCTION_ARGS)
{
	Interval   *iv = PG_GETARG_INTERVAL_P(0);
	Interval   *min = PG_GETARG_INTERVAL_P(1);

	if (min->month != 0 || min->day != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the minimum must be a time without days or months, got %s",
						DatumGetCString(DirectFunctionCall1(interval_out, IntervalPGetDatum(min))))));
	PG_RETURN_BOOL(IntervalIsAtLeast(iv, min->time));
}

/*
 * metering._valid_time_zone(name): whether date_trunc and AT TIME ZONE accept
 * the name, tested the way they resolve it (abbreviation first, then the
 * zone database), without raising an error.
 */
PG_FUNCTION_INFO_V1(metering_valid_time_zone);
Datum
metering_valid_time_zone(PG_FUNCTION_ARGS)
{
	text	   *zone = PG_GETARG_TEXT_PP(0);
	char		tzname[TZ_STRLEN_MAX + 1];
	char	   *lowzone;
	int			type,
				val;
	pg_tz	   *tzp;

	if (VARSIZE_ANY_EXHDR(zone) == 0 || VARSIZE_ANY_EXHDR(zone) > TZ_STRLEN_MAX)
		PG_RETURN_BOOL(false);
	text_to_cstring_buffer(zone, tzname, sizeof(tzname));
	lowzone = downcase_truncate_identifier(tzname, strlen(tzname), false);
	type = DecodeTimezoneAbbrev(0, lowzone, &val, &tzp);
	if (type == TZ || type == DTZ || type == DYNTZ)
		PG_RETURN_BOOL(true);
	PG_RETURN_BOOL(pg_tzset(tzname) != NULL);
}
