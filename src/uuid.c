/*
 * uuid.c: time-ordered identifiers (RFC 9562 version 7).
 *
 * 48 bits of Unix milliseconds, then a 12-bit counter that keeps ids made in
 * the same millisecond by this backend in creation order, then 62 random
 * bits that keep backends apart.  Burn order breaks ties on the id, so ids
 * must never go backwards within a backend, even if the system clock does.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "metering.h"

#define UNIX_EPOCH_OFFSET_MS \
	((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000)

static int64 last_ms = 0;
static uint32 last_counter = 0;

void
MeteringRandomBytes(void *buf, size_t len)
{
	if (!pg_strong_random(buf, len))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random bytes")));
}

void
MeteringUuidV7(pg_uuid_t *out)
{
	int64		ms = GetCurrentTimestamp() / 1000 + UNIX_EPOCH_OFFSET_MS;
	uint8		rnd[10];

	MeteringRandomBytes(rnd, sizeof(rnd));
	if (ms > last_ms)
	{
		last_ms = ms;
		/* start low in the counter space so a burst has room to count up */
		last_counter = ((uint32) rnd[8] << 8 | rnd[9]) & 0x1FF;
	}
	else if (++last_counter > 0xFFF)
	{
		/* counter exhausted: borrow the next millisecond */
		last_ms++;
		last_counter = 0;
	}

	out->data[0] = (uint8) (last_ms >> 40);
	out->data[1] = (uint8) (last_ms >> 32);
	out->data[2] = (uint8) (last_ms >> 24);
	out->data[3] = (uint8) (last_ms >> 16);
	out->data[4] = (uint8) (last_ms >> 8);
	out->data[5] = (uint8) last_ms;
	out->data[6] = 0x70 | (uint8) ((last_counter >> 8) & 0x0F);
	out->data[7] = (uint8) last_counter;
	out->data[8] = 0x80 | (rnd[0] & 0x3F);
	memcpy(&out->data[9], &rnd[1], 7);
}

bool
MeteringParseUuid(const char *s, int len, pg_uuid_t *out)
{
	int			k = 0;

	if (len != 36)
		return false;
	for (int i = 0; i < len; i++)
	{
		char		c = s[i];
		int			v;

		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (c != '-')
				return false;
			continue;
		}
		if (c >= '0' && c <= '9')
			v = c - '0';
		else if (c >= 'a' && c <= 'f')
			v = c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v = c - 'A' + 10;
		else
			return false;
		if (k % 2 == 0)
			out->data[k / 2] = v << 4;
		else
			out->data[k / 2] |= v;
		k++;
	}
	return true;
}

/* metering.uuid_v7(): a new time-ordered uuid. */
PG_FUNCTION_INFO_V1(metering_uuid_v7);
Datum
metering_uuid_v7(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *result = (pg_uuid_t *) palloc(sizeof(pg_uuid_t));

	MeteringUuidV7(result);
	PG_RETURN_UUID_P(result);
}

/* metering.uuid_v7_time(id): the instant a v7 uuid was made, to the millisecond. */
PG_FUNCTION_INFO_V1(metering_uuid_v7_time);
Datum
metering_uuid_v7_time(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *id = PG_GETARG_UUID_P(0);
	int64		ms = 0;

	if ((id->data[6] >> 4) != 7)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("uuid is not a version 7 uuid")));
	for (int i = 0; i < 6; i++)
		ms = (ms << 8) | id->data[i];
	PG_RETURN_TIMESTAMPTZ((ms - UNIX_EPOCH_OFFSET_MS) * 1000);
}
