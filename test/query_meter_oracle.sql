-- query_meter against an oracle: a plain GROUP BY over the events, for
-- random ranges, windows, time zones, subjects, groups and filters, and for
-- every aggregation.  query_meter reads hourly rollups for whole hours and
-- raw events for the rest; the oracle reads only events, so any seam shows.
BEGIN;
SELECT plan(13);
SELECT setseed(0.7);
SET LOCAL metering.now = '2024-12-01 00:00:00+00';

INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
SELECT lower(a::text), 'o', a, CASE WHEN a = 'UNIQUE_COUNT' THEN '$.u'::jsonpath
                                    WHEN a <> 'COUNT' THEN '$.v'::jsonpath END,
       '{"k1": "$.k1", "k2": "$.k2"}'
  FROM unnest(enum_range(NULL::metering.aggregation)) a;

-- events around the March DST change, on and between hour boundaries,
-- with values that are numbers, numeric strings, junk or missing
CREATE TEMP TABLE generated AS
SELECT n, jsonb_build_object(
         'specversion', '1.0', 'id', n::text, 'source', 'oracle', 'type', 'o',
         'subject', 's' || floor(random() * 4)::int,
         'time', to_char(timestamptz '2024-03-07 00:00:00+00'
                         + CASE WHEN random() < 0.1 THEN floor(random() * 240) * interval '1 hour'
                                ELSE random() * interval '10 days' END, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
         'data', jsonb_strip_nulls(jsonb_build_object(
           'v', CASE WHEN r < 0.80 THEN to_jsonb(round((random() * 200 - 50)::numeric, 3))
                     WHEN r < 0.88 THEN to_jsonb(round((random() * 10)::numeric, 1)::text)
                     WHEN r < 0.94 THEN '"n/a"'::jsonb END,
           'u', CASE WHEN random() < 0.9 THEN to_jsonb('user' || floor(random() * 30)::int) END,
           'k1', (ARRAY['a', 'b', 'c'])[1 + floor(random() * 3)::int],
           'k2', CASE WHEN random() < 0.8 THEN (ARRAY['x', 'y'])[1 + floor(random() * 2)::int] END))) AS event
  FROM (SELECT n, random() AS r FROM generate_series(1, 4000) n) g;
SELECT is((SELECT sum(i.accepted)
             FROM (SELECT jsonb_agg(event) AS events FROM generated GROUP BY n % 8) b,
                  metering.ingest_batch(b.events) i),
          4000::numeric, '4000 events stored');

-- the oracle
CREATE FUNCTION pg_temp.oracle(meter text, from_time timestamptz, to_time timestamptz, w text, tz text,
                               subjects text[], group_by text[], filter_group_by jsonb)
RETURNS TABLE(window_start timestamptz, subject text, g jsonb, value numeric)
LANGUAGE plpgsql AS $$
DECLARE
  m metering.meters;
BEGIN
  SELECT * INTO m FROM metering.meters WHERE slug = meter;
  RETURN QUERY
  SELECT x.ws, x.subject, x.g,
         CASE m.aggregation
           WHEN 'SUM' THEN coalesce(sum(x.v), 0)
           WHEN 'COUNT' THEN count(*)::numeric
           WHEN 'AVG' THEN avg(x.v)
           WHEN 'MIN' THEN min(x.v)
           WHEN 'MAX' THEN max(x.v)
           WHEN 'UNIQUE_COUNT' THEN count(DISTINCT x.u)::numeric
           WHEN 'LATEST' THEN (array_agg(x.v ORDER BY x.time DESC, x.v DESC) FILTER (WHERE x.v IS NOT NULL))[1]
         END
    FROM (SELECT e.subject, e.time,
                 CASE WHEN w IS NULL THEN NULL ELSE date_trunc(w, e.time, tz) END AS ws,
                 coalesce((SELECT jsonb_object_agg(k, gv -> k) FROM unnest(oracle.group_by) k), '{}') AS g,
                 gv,
                 CASE WHEN m.value_property IS NOT NULL THEN metering._meter_number(e.data, m.value_property) END AS v,
                 CASE WHEN m.value_property IS NOT NULL THEN metering._meter_text(e.data, m.value_property) END AS u
            FROM metering.events e,
                 LATERAL (SELECT metering._meter_groups(e.data, m.group_by) AS gv) gg
           WHERE e.type = m.event_type
             AND (from_time IS NULL OR e.time >= from_time)
             AND (to_time IS NULL OR e.time < to_time)
             AND (oracle.subjects IS NULL OR e.subject = ANY (oracle.subjects))) x
   WHERE filter_group_by IS NULL
      OR NOT EXISTS (SELECT 1 FROM jsonb_each(filter_group_by) f
                      WHERE ((x.gv ->> f.key) = ANY (
                        CASE jsonb_typeof(f.value) WHEN 'array' THEN ARRAY(SELECT jsonb_array_elements_text(f.value))
                                                   ELSE ARRAY[f.value #>> '{}'] END)) IS NOT TRUE)
   GROUP BY 1, 2, 3;
END $$;

CREATE TEMP TABLE queries AS
SELECT q, (ARRAY['sum', 'count', 'avg', 'min', 'max', 'unique_count', 'latest'])[1 + q % 7] AS meter,
       CASE WHEN random() < 0.1 THEN NULL
            WHEN random() < 0.3 THEN timestamptz '2024-03-07 00:00:00+00' + floor(random() * 240) * interval '1 hour'
            ELSE timestamptz '2024-03-06 12:00:00+00' + random() * interval '11 days' END AS from_time,
       random() AS to_offset,
       (ARRAY[NULL, 'MINUTE', 'HOUR', 'HOUR', 'DAY', 'DAY'])[1 + floor(random() * 6)::int] AS w,
       (ARRAY['UTC', 'America/New_York', 'Asia/Kolkata', 'Australia/Lord_Howe'])[1 + floor(random() * 4)::int] AS tz,
       CASE WHEN random() < 0.5 THEN NULL ELSE (ARRAY['{s1}', '{s0,s3}', '{s2,nobody}'])[1 + floor(random() * 3)::int]::text[] END AS subjects,
       (ARRAY[NULL, '{k1}', '{k2}', '{k1,k2}'])[1 + floor(random() * 4)::int]::text[] AS group_by,
       (ARRAY[NULL, NULL, '{"k1": "a"}', '{"k2": ["x", "z"]}', '{"k1": ["b", "c"], "k2": "y"}'])[1 + floor(random() * 5)::int]::jsonb AS filter_group_by
  FROM generate_series(1, 140) q;
UPDATE queries SET from_time = NULL WHERE q % 23 = 0;
ALTER TABLE queries ADD COLUMN to_time timestamptz;
UPDATE queries SET to_time = CASE WHEN to_offset < 0.1 THEN NULL
                                  WHEN to_offset < 0.2 THEN coalesce(from_time, '2024-03-07') + floor(to_offset * 100) * interval '1 hour'
                                  ELSE coalesce(from_time, '2024-03-07') + to_offset * interval '6 days' END;

-- the questions are asked three times: before any refresh (events only),
-- after refreshing some meters and then adding late and new events (all
-- three regions), and after refreshing everything (rollups mostly)
CREATE TEMP TABLE results AS
SELECT 0 AS round, q.*, NULL::timestamptz AS window_start, NULL::timestamptz AS window_end,
       NULL::text AS subject, NULL::jsonb AS g, NULL::numeric AS value
  FROM queries q WHERE false;
CREATE TEMP TABLE expected (round integer, q integer, window_start timestamptz, subject text, g jsonb, value numeric);
CREATE FUNCTION pg_temp.ask(round integer) RETURNS void LANGUAGE sql AS $$
  INSERT INTO results
  SELECT round, q.*, r.window_start, r.window_end, r.subject, r.group_by, r.value
    FROM queries q, metering.query_meter(q.meter, q.from_time, q.to_time, q.w, q.tz, q.subjects, q.group_by, q.filter_group_by) r
$$;
CREATE FUNCTION pg_temp.expect(round integer) RETURNS void LANGUAGE sql AS $$
  INSERT INTO expected
  SELECT round, q.q, o.window_start, o.subject, o.g, o.value
    FROM queries q, pg_temp.oracle(q.meter, q.from_time, q.to_time, q.w, q.tz, q.subjects, q.group_by, q.filter_group_by) o
$$;
DO $$ BEGIN PERFORM pg_temp.ask(1); PERFORM pg_temp.expect(1); END $$;
SELECT ok(metering.refresh_rollups('sum') + metering.refresh_rollups('max') + metering.refresh_rollups('latest') > 0,
          'some meters rolled up');
SELECT is((SELECT sum(i.accepted)
             FROM (SELECT jsonb_agg(event) AS events FROM (
                     SELECT jsonb_set(jsonb_set(event, '{id}', to_jsonb('late' || n)), '{time}',
                                      to_jsonb(to_char((event ->> 'time')::timestamptz - interval '7 minutes', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))) AS event, n
                       FROM generated WHERE n % 9 = 0) l GROUP BY n % 4) b,
                  metering.ingest_batch(b.events) i),
          444::numeric, 'late events stored after the refresh');
DO $$ BEGIN PERFORM pg_temp.ask(2); PERFORM pg_temp.expect(2); END $$;
SELECT ok(metering.refresh_rollups() > 0, 'every meter rolled up');
DO $$ BEGIN PERFORM pg_temp.ask(3); PERFORM pg_temp.expect(3); END $$;

SELECT ok((SELECT count(*) FROM results WHERE round = 3) > 2000, 'the random queries return plenty of rows');
SELECT ok((SELECT count(*) FROM (SELECT q, window_start, subject, g, value FROM results WHERE round = 1
                                 EXCEPT SELECT q, window_start, subject, g, value FROM results WHERE round = 2) d) > 50,
          'the late events changed answers');
SELECT is((SELECT count(*) FROM (SELECT round, q, window_start, subject, g FROM expected
                                 EXCEPT SELECT round, q, CASE WHEN w IS NULL THEN NULL ELSE window_start END, subject, g
                                          FROM results) d),
          0::bigint, 'no window, subject or group is missing');
SELECT is((SELECT count(*) FROM (SELECT round, q, CASE WHEN w IS NULL THEN NULL ELSE window_start END, subject, g
                                   FROM results
                                 EXCEPT SELECT round, q, window_start, subject, g FROM expected) d),
          0::bigint, 'no window, subject or group is made up');
SELECT is((SELECT count(*) FROM results r JOIN expected e
             ON e.round = r.round AND e.q = r.q AND e.subject = r.subject AND e.g = r.g
            AND e.window_start IS NOT DISTINCT FROM CASE WHEN r.w IS NULL THEN NULL ELSE r.window_start END
          WHERE r.value IS DISTINCT FROM e.value),
          0::bigint, 'every value equals the oracle''s, exactly, before and after refreshes');
SELECT is((SELECT count(*) FROM results
            WHERE w IS NOT NULL
              AND NOT (window_end > window_start
                       AND date_trunc(w, window_start, tz) = window_start
                       AND date_trunc(w, window_end, tz) = window_end
                       AND date_trunc(w, window_end - interval '1 microsecond', tz) = window_start)),
          0::bigint, 'each window is exactly one MINUTE, HOUR or DAY of its time zone');
SELECT is((SELECT count(*) FROM results r
            WHERE r.w IS NULL AND r.filter_group_by IS NULL
              AND ROW(r.window_start, r.window_end) IS DISTINCT FROM (
                    SELECT ROW(coalesce(r.from_time, min(e.time)), coalesce(r.to_time, max(e.time)))
                      FROM metering.events e
                     WHERE (r.from_time IS NULL OR e.time >= r.from_time)
                       AND (r.to_time IS NULL OR e.time < r.to_time)
                       AND (r.subjects IS NULL OR e.subject = ANY (r.subjects)))),
          0::bigint, 'without a window size, the window is [from_time, to_time) or the first and last event');
-- the same answers in another session time zone
SET LOCAL timezone = 'Pacific/Chatham';
SELECT is((SELECT count(*) FROM (
             SELECT q.q, r.window_start, r.subject, r.group_by, r.value
               FROM queries q, metering.query_meter(q.meter, q.from_time, q.to_time, q.w, q.tz, q.subjects, q.group_by, q.filter_group_by) r
             EXCEPT SELECT q, window_start, subject, g, value FROM results WHERE round = 3) d),
          0::bigint, 'the session time zone changes nothing');
-- query_meter reads the rollups for whole hours: it must agree with them alone
SELECT is((SELECT sum(value) FROM metering.query_meter('sum', '2024-03-08 00:00:00+00', '2024-03-10 00:00:00+00')),
          (SELECT sum(sum) FROM metering.meter_rollups WHERE meter = 'sum'
              AND bucket >= '2024-03-08 00:00:00+00' AND bucket < '2024-03-10 00:00:00+00'),
          'whole-hour ranges equal the rollups');
SELECT * FROM finish();
ROLLBACK;
