/*
 * numeric_ops.h: exact arithmetic on numeric values, shared by the engines
 * (burndown, prices): the server's numeric functions, called directly.  They
 * raise 22003 beyond what numeric holds; nothing here rounds or wraps.
 */
#ifndef METERING_NUMERIC_OPS_H
#define METERING_NUMERIC_OPS_H

#include "fmgr.h"
#include "utils/fmgrprotos.h"
#include "utils/numeric.h"

static inline Numeric
NumAdd(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_add, NumericGetDatum(a), NumericGetDatum(b)));
}

static inline Numeric
NumSub(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_sub, NumericGetDatum(a), NumericGetDatum(b)));
}

static inline Numeric
NumMul(Numeric a, Numeric b)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_mul, NumericGetDatum(a), NumericGetDatum(b)));
}

static inline int
NumCmp(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a), NumericGetDatum(b)));
}

#endif
