/*
 * gate.h: the usage gate of reserve, commit_reservation and consume
 * (gate.c), for consume.c.  Each must be called inside an SPI connection.
 */
#ifndef METERING_GATE_H
#define METERING_GATE_H

#include "utils/jsonb.h"

#include "entitlement.h"

extern bool GateLock(Datum id, Datum subject, Datum *row);
extern TimestampTz GateTakeTurn(Datum id, Datum subject, char purpose, TimestampTz usage_time);
extern TimestampTz GateCheckInstant(Entitlement *ent, TimestampTz now, TimestampTz until, bool until_null);
extern Numeric GateEventUsage(Datum feature, text *ent_subject, text *subject, text *type, Jsonb *data,
							  const char *what, bool *isnull);

#endif
