/*
 * timeparse.h: strict RFC 3339 timestamps, as CloudEvents and AWS send them.
 */
#ifndef METERING_TIMEPARSE_H
#define METERING_TIMEPARSE_H

#include "datatype/timestamp.h"

/*
 * Parses an RFC 3339 date-time ("2024-01-01T00:00:00Z",
 * "2024-01-01T00:00:00.5+02:00").  Returns false, without raising an error,
 * when the text is not one; the caller names the field in its own error.
 */
extern bool ParseRfc3339(const char *str, int len, TimestampTz *result);

#endif
