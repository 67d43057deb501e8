/*
 * timeparse.c: strict RFC 3339 date-times.
 *
 * timestamptz_in accepts far more than RFC 3339 ("yesterday", dates without
 * an offset read in the session's time zone, ...), and an event's instant
 * must not depend on the session that ingested it, so events and AWS
 * records are parsed here instead.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "timeparse.h"

static bool
Digits(const char *s, int n, int *out)
{
	int			v = 0;

	for (int i = 0; i < n; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (s[i] - '0');
	}
	*out = v;
	return true;
}

bool
ParseRfc3339(const char *s, int len, TimestampTz *result)
{
	struct pg_tm tm;
	fsec_t		fsec = 0;
	int			tz = 0;
	int			pos;
	Timestamp	ts;

	memset(&tm, 0, sizeof(tm));
	/* "YYYY-MM-DDTHH:MM:SS" is 19 characters, the offset at least one more */
	if (len < 20)
		return false;
	if (!Digits(s, 4, &tm.tm_year) || s[4] != '-' ||
		!Digits(s + 5, 2, &tm.tm_mon) || s[7] != '-' ||
		!Digits(s + 8, 2, &tm.tm_mday) ||
		(s[10] != 'T' && s[10] != 't' && s[10] != ' ') ||
		!Digits(s + 11, 2, &tm.tm_hour) || s[13] != ':' ||
		!Digits(s + 14, 2, &tm.tm_min) || s[16] != ':' ||
		!Digits(s + 17, 2, &tm.tm_sec))
		return false;
	if (tm.tm_year < 1 || tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 ||
		tm.tm_mday > day_tab[isleap(tm.tm_year)][tm.tm_mon - 1] ||
		tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 60)
		return false;
	pos = 19;
	if (s[pos] == '.')
	{
		int			ndigits = 0;
		int64		frac = 0;

		pos++;
		while (pos < len && s[pos] >= '0' && s[pos] <= '9')
		{
			/* keep seven digits: six for microseconds, one to round on */
			if (ndigits < 7)
				frac = frac * 10 + (s[pos] - '0');
			ndigits++;
			pos++;
		}
		if (ndigits == 0)
			return false;
		for (int i = ndigits; i < 7; i++)
			frac *= 10;
		fsec = (fsec_t) ((frac + 5) / 10);
	}
	if (pos >= len)
		return false;
	if ((s[pos] == 'Z' || s[pos] == 'z') && pos + 1 == len)
		tz = 0;
	else if ((s[pos] == '+' || s[pos] == '-') && pos + 6 == len)
	{
		int			oh,
					om;

		if (!Digits(s + pos + 1, 2, &oh) || s[pos + 3] != ':' ||
			!Digits(s + pos + 4, 2, &om) || oh > 23 || om > 59)
			return false;
		/* PostgreSQL counts offsets west of Greenwich as positive */
		tz = (oh * SECS_PER_HOUR + om * SECS_PER_MINUTE) * (s[pos] == '+' ? -1 : 1);
	}
	else
		return false;
	/* a leap second is the first instant of the next minute */
	if (tm2timestamp(&tm, fsec, &tz, &ts) != 0 || !IS_VALID_TIMESTAMP(ts))
		return false;
	*result = ts;
	return true;
}

/* metering._rfc3339(text): the instant, or NULL when the text is not RFC 3339. */
PG_FUNCTION_INFO_V1(metering_rfc3339);
Datum
metering_rfc3339(PG_FUNCTION_ARGS)
{
	text	   *s = PG_GETARG_TEXT_PP(0);
	TimestampTz t;

	if (!ParseRfc3339(VARDATA_ANY(s), VARSIZE_ANY_EXHDR(s), &t))
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(t);
}
