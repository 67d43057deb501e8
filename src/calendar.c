/*
 * calendar.c: time zone and calendar helpers shared by meters, periods and
 * reports.
 */
#include "postgres.h"

#include "fmgr.h"
#include "parser/scansup.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/datetime.h"

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
