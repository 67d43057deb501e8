-- Hourly rollups: they hold each meter's events up to a watermark on
-- events.seq, readers add the rest, so answers are the same before and after
-- metering.refresh_rollups(); deletes below the watermark rebuild their hours.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 00:00:00+00';

-- what the rollups should hold: the events up to each meter's watermark
CREATE VIEW regress.expected_rollups AS
SELECT m.slug AS meter, e.subject, date_trunc('hour', e.time, 'UTC') AS bucket,
       metering._meter_groups(e.data, m.group_by) AS groups,
       count(*) AS events,
       count(*) FILTER (WHERE CASE m.aggregation
                                WHEN 'COUNT' THEN true
                                WHEN 'UNIQUE_COUNT' THEN metering._meter_text(e.data, m.value_property) IS NOT NULL
                                ELSE metering._meter_number(e.data, m.value_property) IS NOT NULL END) AS valued,
       CASE WHEN m.aggregation IN ('SUM', 'AVG') THEN coalesce(sum(metering._meter_number(e.data, m.value_property)), 0) END AS sum,
       CASE WHEN m.aggregation IN ('MIN', 'SUM') THEN min(metering._meter_number(e.data, m.value_property)) END AS min,
       CASE WHEN m.aggregation = 'MAX' THEN max(metering._meter_number(e.data, m.value_property)) END AS max,
       min(e.time) AS first_time, max(e.time) AS last_time
  FROM metering.events e
  JOIN metering.meters m ON m.event_type = e.type AND m.deleted_at IS NULL
  JOIN metering.meter_rollup_state s ON s.meter = m.slug AND e.seq <= s.rolled_up_to
 GROUP BY m.slug, m.aggregation, e.subject, 3, 4;
CREATE VIEW regress.rollup_diff AS
(SELECT 'missing' AS what, * FROM regress.expected_rollups
 EXCEPT SELECT 'missing', meter, subject, bucket, groups, events, valued, sum, min, max, first_time, last_time FROM metering.meter_rollups)
UNION ALL
(SELECT 'extra', meter, subject, bucket, groups, events, valued, sum, min, max, first_time, last_time FROM metering.meter_rollups
 EXCEPT SELECT 'extra', * FROM regress.expected_rollups);
-- every meter's answer for a fixed set of questions, to compare across refreshes
CREATE VIEW regress.answers AS
SELECT m.slug, w, q.window_start, q.subject, q.group_by, q.value
  FROM metering.meters m,
       unnest(ARRAY['HOUR', 'DAY', NULL]) w,
       LATERAL metering.query_meter(m.slug, '2024-05-01T03:17:00Z', '2024-05-03T19:41:30Z', w, 'America/New_York',
                                    group_by => ARRAY(SELECT jsonb_object_keys(m.group_by))) q
 WHERE m.deleted_at IS NULL;

INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('s', 'e', 'SUM', '$.v', '{"k": "$.k"}'), ('c', 'e', 'COUNT', NULL, '{}'),
  ('lo', 'e', 'MIN', '$.v', '{}'), ('hi', 'e', 'MAX', '$.v', '{"k": "$.k"}'),
  ('last', 'e', 'LATEST', '$.v', '{}');
SELECT meter, rolled_up_to, refreshed_at FROM metering.meter_rollup_state ORDER BY meter;

-- 2,000 events over three days, values including rejects, in batches and singly
SELECT setseed(0.42);
SELECT sum(i.accepted) AS accepted
  FROM (SELECT jsonb_agg(regress.ev(
            n::text, 'sub' || (n % 7), 'e',
            to_char(timestamptz '2024-05-01' + (n * 127 % 4320) * interval '1 minute', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
            CASE WHEN n % 13 = 0 THEN '{"v": "x"}'::jsonb
                 ELSE jsonb_build_object('v', round((random() * 100)::numeric, 2), 'k', 'k' || (n % 3)) END)) AS b
          FROM generate_series(1, 1900) n GROUP BY n / 250) batches,
       metering.ingest_batch(batches.b) i;
SELECT count(*) FILTER (WHERE metering.ingest(regress.ev('x' || n, 'sub1', 'e', '2024-05-02T10:30:00Z', jsonb_build_object('v', n)))) AS single
  FROM generate_series(1, 100) n;

-- ingestion does no rollup work: until a refresh, answers come from the events
SELECT count(*) AS rollup_rows FROM metering.meter_rollups;
CREATE TABLE regress.before_refresh AS SELECT * FROM regress.answers;
SELECT count(*) AS answers FROM regress.before_refresh;
SELECT * FROM metering.meter_rejected_values ORDER BY meter;

-- the refresh rolls up every meter's events; a second one finds nothing new
SELECT metering.refresh_rollups() AS added;
SELECT metering.refresh_rollups() AS added_again;
SELECT meter, rolled_up_to = (SELECT max(seq) FROM metering.events) AS at_the_last_event, refreshed_at
  FROM metering.meter_rollup_state ORDER BY meter;
SELECT count(*) AS differences FROM regress.rollup_diff;
SELECT count(*) AS rollup_rows FROM metering.meter_rollups;
-- the same answers, now mostly from rollups
SELECT count(*) AS changed_answers FROM (
  (SELECT * FROM regress.answers EXCEPT SELECT * FROM regress.before_refresh)
  UNION ALL
  (SELECT * FROM regress.before_refresh EXCEPT SELECT * FROM regress.answers)) d;
SELECT * FROM metering.meter_rejected_values ORDER BY meter;

-- late events (old hours) and new ones count at once, and go into the rollups at the next refresh
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('late1', 'sub1', 'e', '2024-05-02T10:45:00Z', '{"v": 1000, "k": "k0"}'),
  regress.ev('late2', 'sub2', 'e', '2024-05-01T05:00:00Z', '{"v": -5, "k": "k1"}')));
SELECT value FROM metering.query_meter('hi', '2024-05-02T10:00:00Z', '2024-05-02T11:00:00Z', subjects => '{sub1}');
SELECT value FROM metering.query_meter('lo', '2024-05-01T05:00:00Z', '2024-05-01T06:00:00Z', subjects => '{sub2}');
SELECT value FROM metering.query_meter('last', '2024-05-02T10:00:00Z', '2024-05-02T11:00:00Z', subjects => '{sub1}');
SELECT metering.refresh_rollups('hi') AS added_for_one_meter;
SELECT meter, rolled_up_to = (SELECT max(seq) FROM metering.events) AS at_the_last_event
  FROM metering.meter_rollup_state ORDER BY meter;
SELECT value FROM metering.query_meter('hi', '2024-05-02T10:00:00Z', '2024-05-02T11:00:00Z', subjects => '{sub1}');
SELECT count(*) AS differences FROM regress.rollup_diff;

-- deleting events rebuilds their hours below the watermark, and only there
DELETE FROM metering.events WHERE subject = 'sub3' AND time < '2024-05-02';
DELETE FROM metering.events WHERE id IN ('x5', 'x6', '700', 'late2');
SELECT count(*) AS differences FROM regress.rollup_diff;
SELECT value FROM metering.query_meter('lo', '2024-05-01T05:00:00Z', '2024-05-01T06:00:00Z', subjects => '{sub2}');
DELETE FROM metering.events WHERE id = 'late1';
SELECT value FROM metering.query_meter('hi', '2024-05-02T10:00:00Z', '2024-05-02T11:00:00Z', subjects => '{sub1}');
SELECT count(*) AS differences FROM regress.rollup_diff;

-- a new meter starts empty and reads the events; a deleted one loses its rollups
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('avg', 'e', 'AVG', '$.v');
SELECT rolled_up_to FROM metering.meter_rollup_state WHERE meter = 'avg';
SELECT round(value, 6) AS avg FROM metering.query_meter('avg', subjects => '{sub1}');
SELECT metering.refresh_rollups() > 0 AS backfilled;
SELECT round(value, 6) AS avg FROM metering.query_meter('avg', subjects => '{sub1}');
DELETE FROM metering.meters WHERE slug = 'c';
SELECT count(*) AS rollups_of_deleted, (SELECT count(*) FROM metering.meter_rollup_state WHERE meter = 'c') AS state_of_deleted
  FROM metering.meter_rollups WHERE meter = 'c';
SELECT count(*) AS differences FROM regress.rollup_diff;
SELECT meter, count(*) FROM metering.meter_rollups GROUP BY 1 ORDER BY 1;

-- answers still agree with the ones before any refresh (but for the changes since)
SELECT count(*) AS changed_answers FROM (
  (SELECT * FROM regress.answers WHERE slug IN ('s', 'hi') AND window_start < '2024-05-01'
   EXCEPT SELECT * FROM regress.before_refresh)) d;

-- a rolled back refresh leaves nothing behind
SELECT metering.ingest(regress.ev('rb', 'sub9', 'e', '2024-05-03T00:00:00Z', '{"v": 1}'));
BEGIN;
SELECT metering.refresh_rollups() > 0 AS added;
ROLLBACK;
SELECT count(*) FROM metering.meter_rollups WHERE subject = 'sub9';
SELECT count(*) AS differences FROM regress.rollup_diff;

-- numbers must come one at a time from the sequence, or the watermark would lie
ALTER SEQUENCE metering.events_seq CACHE 20;
SELECT regress.err('SELECT metering.refresh_rollups()');
ALTER SEQUENCE metering.events_seq CACHE 1;

-- the refresh waits for concurrent writers, so it needs READ COMMITTED
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT regress.err('SELECT metering.refresh_rollups()');
ROLLBACK;

-- query_meter agrees with a plain GROUP BY over the events, for every window and zone
SELECT metering.refresh_rollups() > 0 AS refreshed;
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

-- a group value longer than a btree entry holds (6,400 random bytes) is
-- rolled up like any other: the rollups are keyed by a hash of the groups
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('long-groups', 'lg', 'SUM', '$.n', '{"model": "$.model"}');
CREATE TEMP TABLE long_value AS SELECT string_agg(md5(i::text), '') AS v FROM generate_series(1, 200) i;
SELECT metering.ingest(jsonb_build_object('specversion', '1.0', 'id', 'lg' || k, 'source', 'test', 'type', 'lg', 'subject', 'acme',
                                          'time', '2024-05-02T10:00:00Z', 'data', jsonb_build_object('n', k, 'model', m)))
  FROM (VALUES (1, (SELECT v FROM long_value)), (2, (SELECT v FROM long_value)), (3, 'short')) x(k, m);
SELECT metering.refresh_rollups('long-groups') >= 0 AS refreshed;
SELECT length(groups ->> 'model') AS model_length, events, sum FROM metering.meter_rollups WHERE meter = 'long-groups' ORDER BY 1;
SELECT length(group_by ->> 'model') AS model_length, value
  FROM metering.query_meter('long-groups', NULL, NULL, NULL, 'UTC', NULL, ARRAY['model']) ORDER BY 1;
DELETE FROM metering.meters WHERE slug = 'long-groups';

-- TRUNCATE empties the rollups and resets the watermarks
TRUNCATE metering.events;
SELECT count(*) AS rollup_rows, (SELECT max(rolled_up_to) FROM metering.meter_rollup_state) AS watermark
  FROM metering.meter_rollups;
DROP VIEW regress.answers;
DROP TABLE regress.before_refresh;
DROP VIEW regress.rollup_diff;
DROP VIEW regress.expected_rollups;
