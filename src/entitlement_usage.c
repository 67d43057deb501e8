/*
 * entitlement_usage.c: the usage of an entitlement's phases.
 *
 * Usage is read three ways, in one pass:
 *   - hourly rollups of the feature's meter (events up to its watermark),
 *     used whole when no instant the engine stops at falls inside the span
 *     of a bucket's events (first_time < t <= last_time);
 *   - the events of the buckets that are split that way;
 *   - the events above the watermark (the tail, through the btree on
 *     (seq, subject), which checks the subject in its entries).
 */
#include "postgres.h"

#include "utils/timestamp.h"

#include "calendar.h"
#include "entitlement.h"
#include "metering.h"
#include "numeric_ops.h"

static void
AddPoint(UsageList *l, TimestampTz t, Numeric amount)
{
	if (l->n == l->cap)
	{
		l->cap = l->cap ? l->cap * 2 : 64;
		l->points = l->points ? repalloc_huge(l->points, sizeof(UsagePoint) * l->cap)
			: palloc(sizeof(UsagePoint) * l->cap);
	}
	l->points[l->n].time = t;
	l->points[l->n].amount = amount;
	l->n++;
}

static int
ComparePoints(const void *x, const void *y)
{
	TimestampTz a = ((const UsagePoint *) x)->time;
	TimestampTz b = ((const UsagePoint *) y)->time;

	return (a > b) - (a < b);
}

/*
 * How many instants of the sorted `stops` lie in (lo, hi] (0, 1 or 2 for
 * more); *one receives the first.
 */
static int
StopsInside(TimestampTz *stops, int n, TimestampTz lo, TimestampTz hi, TimestampTz *one)
{
	int			a = 0,
				b = n;

	/* first index with stops[i] > lo */
	while (a < b)
	{
		int			m = (a + b) / 2;

		if (stops[m] > lo)
			b = m;
		else
			a = m + 1;
	}
	if (a == n || stops[a] > hi)
		return 0;
	*one = stops[a];
	return a + 1 < n && stops[a + 1] <= hi ? 2 : 1;
}

/*
 * SQL texts of the usage queries, for SUM or COUNT and with or without group
 * filters: $1 watermark, $2 event type, $3 subject, $4 from, $5 to,
 * $6 value path, $7 group_by, $8 filters, $9 meter, $10 hour buckets.
 */
static const char *
UsageSql(int which, bool count, bool filtered)
{
	/* negative values (corrections) are not usage: see EntReadUsage */
	const char *value = count ? "1::numeric" : "greatest(metering._meter_number(e.data, $6), 0)";
	const char *filter = filtered ? "AND metering._meter_groups(e.data, $7) @> $8" : "";
	const char *rfilter = filtered ? "AND r.groups @> $8" : "";

	switch (which)
	{
		case 0:				/* events above the watermark */
			return psprintf("SELECT e.time, %s FROM metering.events e "
							"WHERE e.seq > $1 AND e.type = $2 AND e.subject = $3 AND e.time < $5 %s",
							value, filter);
		case 1:				/* rollup buckets */
			return psprintf("SELECT r.bucket, r.first_time, r.last_time, %s, r.min FROM metering.meter_rollups r "
							"WHERE r.meter = $9 AND r.subject = $3 AND r.bucket >= $4 AND r.bucket < $5 %s "
							"ORDER BY r.bucket",
							count ? "r.events::numeric" : "r.sum", rfilter);
		default:

			/*
			 * The events of split buckets, hour by hour: one small index scan
			 * each (OFFSET 0 keeps the planner from merging them into one scan
			 * of everything between the first and the last hour).
			 */
			return psprintf("SELECT x.time, x.v FROM unnest($10) h(hour), LATERAL ("
							"SELECT e.time, %s AS v FROM metering.events e "
							"WHERE e.seq <= $1 AND e.type = $2 AND e.subject = $3 "
							"AND e.time >= h.hour AND e.time < h.hour + interval '1 hour' "
							"AND e.time >= $4 AND e.time < $5 %s OFFSET 0) x",
							value, filter);
	}
}

Portal
EntOpenUsage(Entitlement *ent, int which, TimestampTz from, TimestampTz to, ArrayType *buckets)
{
	static SPIPlanPtr plans[3][2][2];
	Oid			types[10] = {INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	JSONPATHOID, JSONBOID, JSONBOID, TEXTOID, TIMESTAMPTZARRAYOID};
	Datum		args[10];
	char		nulls[10];
	bool		filtered = ent->filters != (Datum) 0;
	SPIPlanPtr	plan = MeteringPrepare(&plans[which][ent->count][filtered],
							   UsageSql(which, ent->count, filtered), 10, types);

	memset(nulls, ' ', sizeof(nulls));
	args[0] = Int64GetDatum(ent->watermark);
	args[1] = ent->event_type;
	args[2] = ent->subject;
	args[3] = TimestampTzGetDatum(from);
	args[4] = TimestampTzGetDatum(to);
	args[5] = ent->value_path;
	nulls[5] = ent->value_path ? ' ' : 'n';
	args[6] = ent->group_by;
	args[7] = ent->filters;
	nulls[7] = filtered ? ' ' : 'n';
	args[8] = ent->meter;
	args[9] = buckets ? PointerGetDatum(buckets)
		: PointerGetDatum(construct_empty_array(TIMESTAMPTZOID));
	/*
	 * (planned for each call, to the watermark: a generic plan cannot tell a
	 * short tail from a third of the table, and would take an index that
	 * leads with the subject, reading its whole history)
	 */
	return SPI_cursor_open(NULL, plan, args, nulls, true);
}

/* Adds the rows (time, amount) of a usage cursor with from <= time < to. */
void
EntReadPoints(Portal portal, UsageList *l, TimestampTz from, TimestampTz to, TimestampTz *first)
{
	for (;;)
	{
		SPI_cursor_fetch(portal, true, 1000);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			bool		n1,
						n2;
			TimestampTz t = DatumGetTimestampTz(EntGetCol(i, 1, &n1));
			Datum		v = EntCopyCol(i, 2, &n2);

			if (first && t < *first)
				*first = t;
			if (n2 || t < from || t >= to)
				continue;
			AddPoint(l, t, DatumGetNumeric(v));
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
}

/* A rollup bucket cut once, at `at`: read by the smaller side (see SplitOnce). */
typedef struct OneCut
{
	TimestampTz bucket,
				first,
				last,
				at;
	Numeric		amount;
	bool		from_cut;		/* `at` is `from`: what lies before it is not counted */
} OneCut;

/*
 * The usage points of the events of the rollup bucket `hour` in [a, b), as
 * the rollups count them, into l; returns their sum.
 */
static Numeric
ReadHour(Entitlement *ent, TimestampTz hour, TimestampTz a, TimestampTz b, UsageList *l)
{
	Datum		one = TimestampTzGetDatum(hour);
	Numeric		sum = int64_to_numeric(0);

	EntReadPoints(EntOpenUsage(ent, 2, a, b,
							   construct_array(&one, 1, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE)),
				  l, PG_INT64_MIN, PG_INT64_MAX, NULL);
	for (int i = 0; i < l->n; i++)
		sum = NumAdd(sum, l->points[i].amount);
	return sum;
}

/*
 * The points of a bucket cut once: the events on the side of the cut with
 * the shorter span (the later side, when the cut is the answer's instant and
 * only events still arriving lie after it), and the rest of the bucket as
 * one point.  Both sides are exact: a bucket read this way holds no negative
 * value, so its rollup is the sum of its events.
 */
static void
SplitOnce(Entitlement *ent, OneCut *c, TimestampTz from, TimestampTz to, UsageList *out)
{
	bool		later = c->last - c->at <= c->at - c->first;
	UsageList	side = {0};
	Numeric		sum = later ? ReadHour(ent, c->bucket, c->at, c->bucket + USECS_PER_HOUR, &side)
		: ReadHour(ent, c->bucket, c->bucket, c->at, &side);

	for (int i = 0; i < side.n; i++)
	{
		TimestampTz t = side.points[i].time;

		if (t >= from && t < to && !(c->from_cut && t < c->at))
			AddPoint(out, t, side.points[i].amount);
	}
	/* the other side, as one point where it starts */
	if (later && !c->from_cut)
		AddPoint(out, c->first, NumSub(c->amount, sum));
	else if (!later && c->at < to)
		AddPoint(out, c->at, NumSub(c->amount, sum));
}

/*
 * The usage of the events of at's UTC hour before `at`, up to the watermark,
 * as the rollups count it (NULL when `at` is a whole hour): what a snapshot
 * at `at` keeps, so that its readers need not read that hour's events.
 */
Numeric
EntHourUsageBefore(Entitlement *ent, TimestampTz at)
{
	TimestampTz hour = TruncHour(at);
	UsageList	l = {0};

	return hour == at ? NULL : ReadHour(ent, hour, hour, at, &l);
}

/* One rollup bucket: its rows (one per group values) taken together. */
typedef struct Bucket
{
	TimestampTz bucket,
				first,
				last;
	Numeric		amount;
	bool		negative;
} Bucket;

/* Decides how bucket b is read: whole, cut once, or event by event (`split`). */
static void
PlaceBucket(Bucket *b, TimestampTz from, Numeric from_hour_before, TimestampTz to,
			TimestampTz *stops, int nstops, UsageList *out, OneCut **cuts, int *ncuts,
			Datum **split, int *nsplit)
{
	TimestampTz at = 0;
	int			inside;
	Bucket		rest;

	if (b->last < from || b->first >= to)
		return;

	/*
	 * The hour `from` (a snapshot's instant) falls inside, when the snapshot
	 * kept that hour's usage before it: the rest of the rollup is what lies
	 * after `from`.  (Exact: a snapshot is dropped by any later change to the
	 * events before it, and ignored while one is not rolled up.)
	 */
	if (from_hour_before && !b->negative && b->first < from && b->bucket == TruncHour(from))
	{
		rest = *b;
		rest.first = from;
		rest.amount = NumSub(b->amount, from_hour_before);
		b = &rest;
	}
	inside = StopsInside(stops, nstops, b->first, b->last, &at);
	if (!b->negative && b->first >= from && inside == 0)
	{
		AddPoint(out, b->first, b->amount);
		return;
	}

	/*
	 * Cut once (by `from` or by a stop): the smaller side's events.
	 * Otherwise, or when the bucket holds a negative value, event by event:
	 * a correction is not usage (an entitlement counts only the positive
	 * values, so that the answer never depends on where negative and
	 * positive values happen to be netted).
	 */
	if (!b->negative && inside + (b->first < from) == 1)
	{
		OneCut	   *c;

		if ((*ncuts & 7) == 0)
			*cuts = *cuts ? repalloc(*cuts, sizeof(OneCut) * (*ncuts + 8)) : palloc(sizeof(OneCut) * 8);
		c = &(*cuts)[(*ncuts)++];
		c->bucket = b->bucket;
		c->first = b->first;
		c->last = b->last;
		c->from_cut = b->first < from;
		c->at = c->from_cut ? from : at;
		c->amount = b->amount;
		return;
	}
	*split = *split ? repalloc(*split, sizeof(Datum) * (*nsplit + 1)) : palloc(sizeof(Datum));
	(*split)[(*nsplit)++] = TimestampTzGetDatum(b->bucket);
}

/*
 * The usage points of [from, to): whole rollup buckets where no stop falls
 * inside their events' span, the buckets cut once by the smaller side, the
 * events of the others, and the tail.  A bucket's rows are decided together,
 * since its events are read together.
 */
void
EntReadUsage(Entitlement *ent, TimestampTz from, Numeric from_hour_before, TimestampTz to,
			 TimestampTz *stops, int nstops, UsageList *tail, UsageList *out)
{
	Portal		portal = EntOpenUsage(ent, 1, TruncHour(from), to, NULL);
	Datum	   *split = NULL;
	int			nsplit = 0;
	OneCut	   *cuts = NULL;
	int			ncuts = 0;
	Bucket		cur = {0};
	bool		have = false;

	for (;;)
	{
		SPI_cursor_fetch(portal, true, 1000);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			bool		isnull;
			TimestampTz bucket = DatumGetTimestampTz(EntGetCol(i, 1, &isnull));
			TimestampTz first = DatumGetTimestampTz(EntGetCol(i, 2, &isnull));
			TimestampTz last = DatumGetTimestampTz(EntGetCol(i, 3, &isnull));
			bool		negative = false;
			Datum		amount;

			if (!ent->count)
			{
				Datum		min = EntGetCol(i, 5, &isnull);

				/* no minimum: no numeric value, or a rollup older than 0.2.0 */
				negative = isnull || NumCmp(DatumGetNumeric(min), int64_to_numeric(0)) < 0;
			}
			amount = EntCopyCol(i, 4, &isnull);
			if (isnull)
				continue;
			if (have && cur.bucket == bucket)
			{
				cur.first = Min(cur.first, first);
				cur.last = Max(cur.last, last);
				cur.amount = NumAdd(cur.amount, DatumGetNumeric(amount));
				cur.negative |= negative;
				continue;
			}
			if (have)
				PlaceBucket(&cur, from, from_hour_before, to, stops, nstops, out, &cuts, &ncuts, &split, &nsplit);
			cur.bucket = bucket;
			cur.first = first;
			cur.last = last;
			cur.amount = DatumGetNumeric(amount);
			cur.negative = negative;
			have = true;
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
	if (have)
		PlaceBucket(&cur, from, from_hour_before, to, stops, nstops, out, &cuts, &ncuts, &split, &nsplit);

	for (int i = 0; i < ncuts; i++)
		SplitOnce(ent, &cuts[i], from, to, out);
	if (nsplit > 0)
	{
		ArrayType  *arr = construct_array(split, nsplit, TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);

		EntReadPoints(EntOpenUsage(ent, 2, Max(from, DatumGetTimestampTz(split[0])),
							 Min(to, DatumGetTimestampTz(split[nsplit - 1]) + USECS_PER_HOUR), arr),
				   out, from, to, NULL);
	}
	for (int i = 0; i < tail->n; i++)
		if (tail->points[i].time >= from && tail->points[i].time < to)
			AddPoint(out, tail->points[i].time, tail->points[i].amount);
	qsort(out->points, out->n, sizeof(UsagePoint), ComparePoints);
}
