-- search_usage against an oracle: every (subject, meter, period) row, for
-- every aggregation, computed with query_meter window by window.  The
-- search reads kept periods (usage_periods) up to each meter's watermark
-- and the events above it, so it is checked with no refresh, after one,
-- with new events on top, after deletions, and after a full rebuild.
BEGIN;
SELECT plan(17);
SELECT setseed(0.42);
SET LOCAL metering.now = '2024-04-01 00:00:00+00';
SET LOCAL timezone = 'America/New_York';      -- the search is in UTC whatever the session says

INSERT INTO metering.meters (slug, event_type, aggregation, value_property)
SELECT lower(a::text), 'o', a, CASE WHEN a = 'UNIQUE_COUNT' THEN '$.u'::jsonpath
                                    WHEN a <> 'COUNT' THEN '$.v'::jsonpath END
  FROM unnest(enum_range(NULL::metering.aggregation)) a;
INSERT INTO metering.subjects (key, is_trial) VALUES ('s1', true);

-- events over two months with values that are numbers, numeric strings, junk
-- or missing, several at the same instant (LATEST picks the largest)
CREATE FUNCTION pg_temp.events(first integer, n integer) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_agg(jsonb_build_object(
           'specversion', '1.0', 'id', i::text, 'source', 'oracle', 'type', 'o',
           'subject', 's' || floor(random() * 5)::int,
           -- on a 15-minute grid (several at one instant), or anywhere
           'time', to_char(timestamptz '2024-02-20 00:00:00+00'
                           + CASE WHEN random() < 0.5 THEN floor(random() * 40 * 24 * 4) * interval '15 minutes'
                                  ELSE random() * interval '40 days' END,
                           'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'data', jsonb_strip_nulls(jsonb_build_object(
             'v', CASE WHEN r < 0.8 THEN to_jsonb(round((random() * 200 - 50)::numeric, 2))
                       WHEN r < 0.9 THEN to_jsonb(round((random() * 10)::numeric, 1)::text)
                       WHEN r < 0.95 THEN '"n/a"'::jsonb END,
             'u', CASE WHEN random() < 0.9 THEN to_jsonb('user' || floor(random() * 20)::int) END))))
    FROM (SELECT i, random() AS r FROM generate_series(first, first + n - 1) i) g
$$;

-- the oracle: query_meter over each day, week and month, from the first event's
CREATE FUNCTION pg_temp.oracle() RETURNS TABLE(id uuid, tenant text, trial boolean, meter text, kind text,
                                               start_time text, end_time text, value numeric)
LANGUAGE sql AS $$
  WITH p AS (
    SELECT k.kind, k.s AT TIME ZONE 'UTC' AS s,
           (k.s + CASE k.kind WHEN 'DAILY' THEN interval '1 day' WHEN 'WEEKLY' THEN interval '7 days' ELSE interval '1 month' END)
             AT TIME ZONE 'UTC' AS e
      FROM (SELECT kind, generate_series(date_trunc(u, timestamp '2024-02-01'), timestamp '2024-04-01',
                                         CASE kind WHEN 'DAILY' THEN interval '1 day' WHEN 'WEEKLY' THEN interval '7 days'
                                                   ELSE interval '1 month' END) AS s
              FROM (VALUES ('DAILY', 'day'), ('WEEKLY', 'week'), ('MONTHLY', 'month')) v(kind, u)) k)
  SELECT encode(substring(sha256(convert_to(q.subject || '|' || m.slug || '|' || p.kind || '|' || to_char(p.s AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS'), 'UTF8')) FROM 1 FOR 16), 'hex')::uuid,
         q.subject, coalesce(sb.is_trial, false), m.slug, p.kind,
         to_char(p.s AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS'), to_char(p.e AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS'),
         q.value
    FROM metering.meters m CROSS JOIN p
   CROSS JOIN LATERAL metering.query_meter(m.slug, p.s, p.e) q
    LEFT JOIN metering.subjects sb ON sb.key = q.subject
   WHERE p.s <= metering.now()
$$;

-- every page of a search, forward
CREATE FUNCTION pg_temp.walk(request jsonb) RETURNS TABLE(id uuid, tenant text, trial boolean, meter text, kind text,
                                                          start_time text, end_time text, value numeric)
LANGUAGE plpgsql AS $$
DECLARE
  r jsonb := metering.search_usage(request);
BEGIN
  LOOP
    RETURN QUERY SELECT (x ->> 'id')::uuid, x ->> 'tenantId', (x ->> 'trial')::boolean, x ->> 'usageType',
                        x ->> 'aggregationPeriod', x ->> 'startTime', x ->> 'endTime', (x ->> 'count')::numeric
                   FROM jsonb_array_elements(r -> 'results') x;
    EXIT WHEN NOT (r -> 'paging' ? 'nextCursor');
    r := metering.search_usage(jsonb_build_object('cursor', r -> 'paging' ->> 'nextCursor'));
  END LOOP;
END $$;

CREATE FUNCTION pg_temp.differences(request jsonb) RETURNS bigint LANGUAGE sql AS $$
  WITH o AS MATERIALIZED (SELECT * FROM pg_temp.oracle()),
       w AS MATERIALIZED (SELECT * FROM pg_temp.walk(request))
  SELECT count(*) FROM ((SELECT * FROM o EXCEPT ALL SELECT * FROM w) UNION ALL (SELECT * FROM w EXCEPT ALL SELECT * FROM o)) d
$$;

-- usage_overview adds up kept days, rolled-up hours and events for SUM and
-- COUNT meters: it must say what query_meter says, at any instant, for
-- calendar months and for entitlement periods that start at odd instants
-- (s1 and s2 have entitlements whose periods start at odd instants)
SET LOCAL metering.now = '2024-02-01 00:00:00+00';
SELECT ok(metering.create_feature('f-sum', 'Sum', 'sum') IS NOT NULL AND metering.create_feature('f-count', 'Count', 'count') IS NOT NULL
          AND metering.create_entitlement('s1', 'f-sum', usage_period => '1 day', usage_period_anchor => '2024-02-01 07:30:15.5+00') IS NOT NULL
          AND metering.create_entitlement('s2', 'f-count', usage_period => '7 days', usage_period_anchor => '2024-02-01 19:45:00+00') IS NOT NULL
          AND metering.create_entitlement('s3', 'f-sum', usage_period => '1 hour', usage_period_anchor => '2024-02-01 00:15:00+00') IS NOT NULL,
          'entitlements with periods from odd instants');
SET LOCAL metering.now = '2024-04-01 00:00:00+00';
CREATE FUNCTION pg_temp.overview_differences() RETURNS bigint LANGUAGE sql AS $$
  SELECT count(*)
    FROM (SELECT 's' || (i % 5) AS subject, (ARRAY['sum', 'count'])[1 + i % 2] AS meter,
                 CASE WHEN i % 5 = 0 THEN date_trunc('hour', at) WHEN i % 5 = 1 THEN date_trunc('day', at)
                      WHEN i % 5 = 2 THEN date_trunc('hour', at) + random() * interval '20 minutes' ELSE at END AS at
            FROM (SELECT i, timestamptz '2024-02-20 00:00:00+00' + random() * interval '45 days' AS at
                    FROM generate_series(1, 250) i) r) c
   CROSS JOIN LATERAL metering.usage_overview(c.subject, c.meter, c.at) o
   WHERE o.used IS DISTINCT FROM (SELECT coalesce(sum(value), 0) FROM metering.query_meter(c.meter, o.period_start, c.at,
                                                                                          subjects => ARRAY[c.subject]))
$$;

\set all '{"searchByAttributes": [{"name": "startTime", "operator": "EXISTS"}], "limit": 37}'
\set by_count '{"searchByAttributes": [{"name": "startTime", "operator": "EXISTS"}], "orderByAttribute": {"name": "count", "ascending": false}}'

SELECT is((SELECT sum(i.accepted) FROM metering.ingest_batch(pg_temp.events(1, 3000)) i), 3000::numeric, '3000 events stored');
SELECT cmp_ok((SELECT count(*) FROM pg_temp.oracle()), '>', 1000::bigint, 'the oracle has rows for every kind of period');
SELECT is(pg_temp.differences(:'all'), 0::bigint, 'no refresh yet: every row, from the events');
SELECT is(pg_temp.overview_differences(), 0::bigint, 'no refresh yet: usage_overview says what query_meter says');
SELECT ok(metering.refresh_rollups() > 0, 'rolled up');
SELECT cmp_ok((SELECT count(*) FROM metering.usage_periods), '>', 0::bigint, 'periods kept');
SELECT is(pg_temp.differences(:'all'), 0::bigint, 'after a refresh: every row, from the kept periods');
SELECT is((SELECT sum(i.accepted) FROM metering.ingest_batch(pg_temp.events(5001, 1500)) i), 1500::numeric, 'more events');
SELECT is(pg_temp.differences(:'all'), 0::bigint, 'kept periods and newer events add up');
SELECT is(pg_temp.differences(:'by_count'), 0::bigint, 'the same rows in count order');
SELECT is(pg_temp.overview_differences(), 0::bigint, 'kept days, rolled-up hours and newer events: usage_overview says what query_meter says');
DELETE FROM metering.events WHERE id::integer % 7 = 0;
SELECT is(pg_temp.differences(:'all'), 0::bigint, 'after deleting events');
SELECT is(pg_temp.overview_differences(), 0::bigint, 'after deleting events: usage_overview says what query_meter says');
SELECT ok(metering.refresh_rollups() > 0, 'rolled up again');
DO $$ BEGIN PERFORM metering._usage_periods_rebuild(slug) FROM metering.meters; END $$;
SELECT is(pg_temp.differences(:'all'), 0::bigint, 'after rebuilding every period from the rollups');

-- a far upper bound costs no more than the last event (UNIQUE_COUNT meters are read period by period)
SELECT is(pg_temp.differences('{"searchByAttributes": [{"name": "startTime", "operator": "LESS_THAN", "value": "9999-12-31T00:00:00"}], "limit": 100}'),
          0::bigint, 'an upper bound in the year 9999 finds the same rows, quickly');

SELECT * FROM finish();
ROLLBACK;
