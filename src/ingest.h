/*
 * ingest.h: CloudEvents validation (ingest.c), for the C callers that store
 * one event themselves.
 */
#ifndef METERING_INGEST_H
#define METERING_INGEST_H

#include "utils/jsonb.h"

/* validates one event; values[6]: id, source, subject, type, time, data */
extern void IngestParseOne(Jsonb *event, Datum *values);

#endif
