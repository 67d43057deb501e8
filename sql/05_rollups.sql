-- The hourly rollups behind meters stay equal to what the events say,
-- whatever is inserted, deleted or truncated, and however meters come and go.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 00:00:00+00';

-- what the rollups should hold, computed from the events alone
CREATE VIEW regress.expected_rollups AS
SELECT m.slug AS meter, e.subject, date_trunc('hour', e.time, 'UTC') AS bucket,
       metering._meter_groups(e.data, m.group_by) AS groups,
       count(*) AS events,
       count(*) FILTER (WHERE CASE m.aggregation
                                WHEN 'COUNT' THEN true
                                WHEN 'UNIQUE_COUNT' THEN metering._meter_text(e.data, m.value_property) IS NOT NULL
                                ELSE metering._meter_number(e.data, m.value_property) IS NOT NULL END) AS valued,
       CASE WHEN m.aggregation IN ('SUM', 'AVG') THEN coalesce(sum(metering._meter_number(e.data, m.value_property)), 0) END AS sum,
       CASE WHEN m.aggregation = 'MIN' THEN min(metering._meter_number(e.data, m.value_property)) END AS min,
       CASE WHEN m.aggregation = 'MAX' THEN max(metering._meter_number(e.data, m.value_property)) END AS max,
       min(e.time) AS first_time, max(e.time) AS last_time
  FROM metering.events e JOIN metering.meters m ON m.event_type = e.type AND m.deleted_at IS NULL
 GROUP BY m.slug, m.aggregation, e.subject, 3, 4;
CREATE VIEW regress.rollup_diff AS
(SELECT 'missing' AS what, * FROM regress.expected_rollups
 EXCEPT SELECT 'missing', meter, subject, bucket, groups, events, valued, sum, min, max, first_time, last_time FROM metering.meter_rollups)
UNION ALL
(SELECT 'extra', meter, subject, bucket, groups, events, valued, sum, min, max, first_time, last_time FROM metering.meter_rollups
 EXCEPT SELECT 'extra', * FROM regress.expected_rollups);

INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('s', 'e', 'SUM', '$.v', '{"k": "$.k"}'), ('c', 'e', 'COUNT', NULL, '{}'),
  ('lo', 'e', 'MIN', '$.v', '{}'), ('hi', 'e', 'MAX', '$.v', '{"k": "$.k"}');

-- 2,000 events over three days, values including rejects, in batches and singly
SELECT setseed(0.42);
SELECT sum(accepted) AS accepted FROM (
  SELECT (metering.ingest_batch(jsonb_agg(regress.ev(
            n::text, 'sub' || (n % 7), 'e',
            to_char(timestamptz '2024-05-01' + (n * 127 % 4320) * interval '1 minute', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
            CASE WHEN n % 13 = 0 THEN '{"v": "x"}'::jsonb
                 ELSE jsonb_build_object('v', round((random() * 100)::numeric, 2), 'k', 'k' || (n % 3)) END)))).accepted
    FROM generate_series(1, 1900) n GROUP BY n / 250) b;
SELECT count(*) FILTER (WHERE metering.ingest(regress.ev('x' || n, 'sub1', 'e', '2024-05-02T10:30:00Z', jsonb_build_object('v', n)))) AS single
  FROM generate_series(1, 100) n;
SELECT count(*) AS rollup_rows, sum(events) AS events FROM metering.meter_rollups WHERE meter = 's';
SELECT count(*) AS differences FROM regress.rollup_diff;

-- deleting events rebuilds the hours they were in
DELETE FROM metering.events WHERE subject = 'sub3' AND time < '2024-05-02';
DELETE FROM metering.events WHERE id IN ('x5', 'x6', '700');
SELECT count(*) AS differences FROM regress.rollup_diff;
-- MIN and MAX come back right after their extreme is deleted
SELECT subject, value FROM metering.query_meter('hi', subjects => '{sub1}');
DELETE FROM metering.events WHERE id = 'x100';
SELECT subject, value FROM metering.query_meter('hi', subjects => '{sub1}');
SELECT count(*) AS differences FROM regress.rollup_diff;

-- a new meter rolls up the stored events; a deleted one loses its rollups
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('avg', 'e', 'AVG', '$.v');
DELETE FROM metering.meters WHERE slug = 'c';
SELECT count(*) AS differences FROM regress.rollup_diff;
SELECT meter, count(*) FROM metering.meter_rollups GROUP BY 1 ORDER BY 1;

-- rolled back work leaves nothing behind
BEGIN;
SELECT * FROM metering.ingest_batch(jsonb_build_array(regress.ev('rb', 'sub9', 'e', '2024-05-03T00:00:00Z', '{"v": 1}')));
INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('tmp', 'e', 'COUNT');
ROLLBACK;
SELECT count(*) AS differences FROM regress.rollup_diff;
SELECT count(*) FROM metering.meter_rollups WHERE subject = 'sub9' OR meter = 'tmp';

-- query_meter reads rollups for whole hours and events for the rest: the two
-- agree with a plain GROUP BY over the events, for every window and zone
SELECT w, tz, count(*) AS windows,
       bool_and(q.value = x.value) AS agree,
       sum(q.value) = (SELECT sum(metering._meter_number(e.data, '$.v')) FROM metering.events e
                        WHERE e.time >= '2024-05-01T03:17:00Z' AND e.time < '2024-05-03T19:41:30Z') AS complete
  FROM unnest(ARRAY['MINUTE', 'HOUR', 'DAY']) w,
       unnest(ARRAY['UTC', 'America/New_York', 'Asia/Kolkata']) tz,
       LATERAL metering.query_meter('s', '2024-05-01T03:17:00Z', '2024-05-03T19:41:30Z', w, tz) q
  LEFT JOIN LATERAL (
    SELECT coalesce(sum(metering._meter_number(e.data, '$.v')), 0) AS value
      FROM metering.events e
     WHERE e.type = 'e' AND e.subject = q.subject
       AND e.time >= greatest(q.window_start, '2024-05-01T03:17:00Z')
       AND e.time < least(q.window_end, '2024-05-03T19:41:30Z')) x ON true
 GROUP BY 1, 2 ORDER BY 1, 2;

-- TRUNCATE empties the rollups too
TRUNCATE metering.events;
SELECT count(*) FROM metering.meter_rollups;
DROP VIEW regress.rollup_diff;
DROP VIEW regress.expected_rollups;
