-- search_usage and usage_overview speed over 10 million events of 1,000
-- subjects in 30 days (two meters), refreshed a minute ago (a minute of
-- events on top, what refresh_rollups() every minute leaves), then an hour
-- ago:
--   search_usage, first page and tenth page (100 rows each, startTime order,
--   all three periods), and the first page of one subject;
--   usage_overview of a subject with a metered entitlement, and of one without;
--   baseline: the first page by a hand-written GROUP BY over the events, the
--   way one would answer the same question without the extension.
-- Targets: each search page and the overview under 20 ms and 2 ms median.
--   psql -X -d metering_bench -f bench/search_usage.sql          (make bench runs it)
\set ON_ERROR_STOP 1
-- it empties metering tables: only in a database made for it
SELECT current_database() LIKE 'metering_bench%' AS bench_db \gset
\if :bench_db
\else
\echo 'bench: run me in a database named metering_bench* (I replace the data of metering tables); make bench does'
\quit
\endif
\pset footer off
SET client_min_messages = warning;
SELECT setseed(0.5);
TRUNCATE metering.events, metering.meters, metering.meter_rollups, metering.meter_rollup_state CASCADE;
TRUNCATE metering.features, metering.subjects CASCADE;
SET metering.now = '2024-07-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('tokens', 'llm.tokens', 'SUM', '$.tokens', '{"model": "$.model"}'),
       ('calls', 'llm.tokens', 'COUNT', NULL, '{}');
INSERT INTO metering.subjects (key, is_trial) SELECT 'customer-' || n, n % 10 = 0 FROM generate_series(0, 999) n;

\echo loading 10,000,000 events...
DO $$
BEGIN
  FOR chunk IN 0 .. 9 LOOP
    INSERT INTO metering.events (id, source, subject, type, time, data)
    SELECT 'e' || n, 'bench', 'customer-' || floor(random() * 1000)::int, 'llm.tokens',
           timestamptz '2024-06-01 00:00:00+00' + (n + random()) * interval '259.2 milliseconds',
           jsonb_build_object('tokens', floor(random() * 5000)::int,
                              'model', (ARRAY['small', 'medium', 'large'])[1 + floor(random() * 3)::int])
      FROM generate_series(chunk * 1000000, chunk * 1000000 + 999999) n;
    COMMIT;
  END LOOP;
END $$;
VACUUM ANALYZE metering.events;
\echo refreshing rollups and usage periods...
SELECT metering.refresh_rollups() AS rolled_up;
VACUUM ANALYZE metering.usage_periods;
SELECT count(*) AS kept_periods, pg_size_pretty(pg_total_relation_size('metering.usage_periods')) AS size
  FROM metering.usage_periods;
-- a minute of new events since the refresh (10 M events in 30 days: 231 a minute)
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'late' || n, 'bench', 'customer-' || floor(random() * 1000)::int, 'llm.tokens',
       timestamptz '2024-06-30 23:59:00+00' + random() * interval '1 minute',
       jsonb_build_object('tokens', floor(random() * 5000)::int, 'model', 'small')
  FROM generate_series(1, 231) n;
-- a metered entitlement with a monthly grant for one subject
SELECT metering.create_feature('tokens', 'Tokens', 'tokens');
SET metering.now = '2024-06-01 00:00:00+00';
SELECT metering.create_entitlement('customer-42', 'tokens', usage_period => '1 month') IS NOT NULL AS entitled;
SELECT metering.create_grant(id, 1000000, '2024-06-01 00:00:00+00', recurrence => '1 month') IS NOT NULL AS granted
  FROM metering.entitlements WHERE subject = 'customer-42';
SET metering.now = '2024-06-30 12:00:00+00';

CREATE FUNCTION pg_temp.median_ms(sql text, runs integer) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz;
  times float8[] := '{}';
BEGIN
  EXECUTE sql;                          -- warm the cache
  FOR i IN 1 .. runs LOOP
    t0 := clock_timestamp();
    EXECUTE sql;
    times := times || extract(epoch FROM clock_timestamp() - t0) * 1000;
  END LOOP;
  RETURN round((SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM unnest(times) x)::numeric, 2);
END $$;

\set request '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}], "limit": 100}'
\set one_subject '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}, {"name": "tenantId", "operator": "EQUALS", "value": "customer-42"}], "limit": 100}'
-- the cursor of the tenth page (a first search makes the database's signing key)
SELECT metering.search_usage(:'request') IS NOT NULL AS searched;
CREATE TEMP TABLE tenth AS
WITH RECURSIVE walk(n, page) AS (
  SELECT 1, metering.search_usage(:'request')
  UNION ALL
  SELECT n + 1, metering.search_usage(jsonb_build_object('cursor', page -> 'paging' ->> 'nextCursor')) FROM walk WHERE n < 9)
SELECT jsonb_build_object('cursor', page -> 'paging' ->> 'nextCursor') AS request FROM walk WHERE n = 9;
SELECT request AS tenth_request FROM tenth \gset

-- the hand-written first page: every (subject, meter, period) from the events, then the first 100
\set hand 'WITH v AS (SELECT e.subject, m.slug, k.kind, k.s, CASE WHEN m.aggregation = ''COUNT'' THEN count(*) ELSE sum((e.data ->> ''tokens'')::numeric) END AS value FROM metering.events e JOIN metering.meters m ON m.event_type = e.type CROSS JOIN LATERAL (VALUES (''DAILY'', date_trunc(''day'', e.time, ''UTC'')), (''WEEKLY'', date_trunc(''week'', e.time, ''UTC'')), (''MONTHLY'', date_trunc(''month'', e.time, ''UTC''))) k(kind, s) WHERE e.time >= ''2024-06-01'' GROUP BY 1, 2, 3, 4, m.aggregation) SELECT * FROM v WHERE s >= ''2024-06-01'' ORDER BY s, md5(subject || ''|'' || slug || ''|'' || kind || ''|'' || to_char(s AT TIME ZONE ''UTC'', ''YYYY-MM-DD"T"HH24:MI:SS''))::uuid LIMIT 100'

-- the same rows, or the comparison means nothing
SELECT (SELECT count(*) FROM (:hand) h
          JOIN jsonb_array_elements(metering.search_usage(:'request') -> 'results') x
            ON x ->> 'tenantId' = h.subject AND x ->> 'usageType' = h.slug AND x ->> 'aggregationPeriod' = h.kind
           AND (x ->> 'count')::numeric = h.value) AS matching_rows_of_100;

CREATE TEMP TABLE figures (what text, ms numeric);
INSERT INTO figures VALUES ('search_usage, first page', pg_temp.median_ms(format('SELECT metering.search_usage(%L)', :'request'), 21));
INSERT INTO figures VALUES ('search_usage, tenth page', pg_temp.median_ms(format('SELECT metering.search_usage(%L)', :'tenth_request'), 21));
INSERT INTO figures VALUES ('search_usage, first page of one subject', pg_temp.median_ms(format('SELECT metering.search_usage(%L)', :'one_subject'), 21));
INSERT INTO figures VALUES ('usage_overview, with an entitlement', pg_temp.median_ms($$SELECT * FROM metering.usage_overview('customer-42', 'tokens')$$, 101));
INSERT INTO figures VALUES ('usage_overview, calendar month', pg_temp.median_ms($$SELECT * FROM metering.usage_overview('customer-7', 'tokens')$$, 101));
INSERT INTO figures VALUES ('hand-written GROUP BY, first page', pg_temp.median_ms(:'hand', 1));
-- the rest of the hour: 13,769 more events since the refresh
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'later' || n, 'bench', 'customer-' || floor(random() * 1000)::int, 'llm.tokens',
       timestamptz '2024-06-30 23:00:00+00' + random() * interval '59 minutes',
       jsonb_build_object('tokens', floor(random() * 5000)::int, 'model', 'small')
  FROM generate_series(1, 13769) n;
INSERT INTO figures VALUES ('search_usage, first page, refreshed an hour ago', pg_temp.median_ms(format('SELECT metering.search_usage(%L)', :'request'), 21));

SELECT what, ms AS median_ms FROM figures;
SELECT round((SELECT ms FROM figures WHERE what = 'search_usage, first page')
             / (SELECT ms FROM figures WHERE what = 'hand-written GROUP BY, first page'), 4) AS ratio_first_page_vs_hand_written;
