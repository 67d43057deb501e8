-- Entrust-style usage search: filters, order, limits, signed cursors, and
-- walks over every page, forward and back, while usage keeps arriving.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-07-01 00:00:00+00';
INSERT INTO metering.subjects (key, is_trial) VALUES ('acme', false), ('beta', true);
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES
  ('calls', 'api', 'SUM', '$.n'), ('logins', 'login', 'COUNT', NULL);
SELECT sum(accepted) AS stored FROM (
  SELECT (metering.ingest_batch(jsonb_agg(regress.ev('e' || n, s, t, to_char(at, 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                                                     jsonb_build_object('n', n % 5 + 1))))).accepted
    FROM (SELECT n, (ARRAY['acme', 'beta', 'gamma'])[1 + n % 3] AS s, (ARRAY['api', 'login'])[1 + n % 2] AS t,
                 '2024-06-03'::timestamptz + n * interval '7 hours' AS at
            FROM generate_series(1, 60) n) x) y;
SELECT metering.refresh_rollups() > 0 AS refreshed;

CREATE FUNCTION pg_temp.search(r text) RETURNS jsonb LANGUAGE sql AS $$ SELECT metering.search_usage(r::jsonb) $$;
CREATE FUNCTION pg_temp.rows(r jsonb) RETURNS TABLE(tenant text, usage_type text, period text, start_time text, end_time text, count numeric, trial boolean)
LANGUAGE sql AS $$
  SELECT x ->> 'tenantId', x ->> 'usageType', x ->> 'aggregationPeriod', x ->> 'startTime', x ->> 'endTime',
         (x ->> 'count')::numeric, (x ->> 'trial')::boolean
    FROM jsonb_array_elements(r -> 'results') x
$$;

-- one period of each kind for one subject and meter: count is the meter's value
SELECT * FROM pg_temp.rows(pg_temp.search('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"},
  {"name": "startTime", "operator": "LESS_THAN", "value": "2024-06-11T00:00:00"},
  {"name": "tenantId", "operator": "EQUALS", "value": "acme"},
  {"name": "usageType", "operator": "EQUALS", "value": "calls"}]}'));
SELECT sum(value) AS june_calls_of_acme FROM metering.query_meter('calls', '2024-06-01T00:00:00Z', '2024-07-01T00:00:00Z', subjects => '{acme}');
-- filters: periods, trial, IN, text operators; unknown subjects are not trial
SELECT period, count(*) FROM pg_temp.rows(pg_temp.search('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"},
  {"name": "aggregationPeriod", "operator": "IN", "value": ["WEEKLY", "MONTHLY"]}]}')) GROUP BY 1 ORDER BY 1;
SELECT DISTINCT tenant, trial FROM pg_temp.rows(pg_temp.search('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"},
  {"name": "aggregationPeriod", "operator": "EQUALS", "value": "MONTHLY"}]}')) ORDER BY 1;
SELECT DISTINCT tenant FROM pg_temp.rows(pg_temp.search('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN", "value": "2024-05-01T00:00:00"},
  {"name": "isTrial", "operator": "EQUALS", "value": false},
  {"name": "tenantId", "operator": "NOT_EQUALS", "value": "acme"}]}')) ORDER BY 1;
SELECT DISTINCT tenant, usage_type FROM pg_temp.rows(pg_temp.search('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN", "value": "2024-05-01T00:00:00"},
  {"name": "tenantId", "operator": "STARTS_WITH", "value": "g"},
  {"name": "usageType", "operator": "CONTAINS", "value": "og"}]}')) ORDER BY 1, 2;
SELECT count(*) AS ending_by_june_10 FROM pg_temp.rows(pg_temp.search('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"},
  {"name": "endTime", "operator": "LESS_THAN_OR_EQUAL", "value": "2024-06-10T00:00:00"}]}'));
-- order: by count, descending, then id
SELECT tenant, usage_type, period, count FROM pg_temp.rows(pg_temp.search('{"searchByAttributes": [
  {"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}],
  "orderByAttribute": {"name": "count", "ascending": false}, "limit": 4}'));
-- ids are stable: the same row has the same id in every call
SELECT (pg_temp.search('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}]}') -> 'results' -> 0 -> 'id')
     = (pg_temp.search('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}]}') -> 'results' -> 0 -> 'id') AS stable_id;

-- the paging object: no prevCursor on the first page, no nextCursor on the last
SELECT r -> 'paging' ? 'nextCursor' AS has_next, r -> 'paging' ? 'prevCursor' AS has_prev, r -> 'paging' -> 'limit' AS lim,
       jsonb_array_length(r -> 'results') AS results
  FROM pg_temp.search('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}], "limit": 5}') r;
SELECT r -> 'paging' AS paging, jsonb_array_length(r -> 'results') AS results
  FROM pg_temp.search('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"},
                                               {"name": "tenantId", "operator": "EQUALS", "value": "nobody"}]}') r;

-- walking every page forward and then back, while usage keeps arriving:
-- each row of the starting set once each way, in order
CREATE FUNCTION pg_temp.walk(request jsonb, new_events boolean) RETURNS TABLE(direction text, pages int, rows int, distinct_rows int, missing int)
LANGUAGE plpgsql AS $$
DECLARE
  before jsonb := metering.search_usage(request || '{"limit": 100}');
  r jsonb := metering.search_usage(request);
  seen text[] := '{}';
  last jsonb;
  n int := 0;
BEGIN
  LOOP
    n := n + 1;
    seen := seen || ARRAY(SELECT x ->> 'id' FROM jsonb_array_elements(r -> 'results') x);
    last := r;
    IF new_events THEN
      -- (before the range searched: in count order, a row whose count
      -- changes while a walk is under way moves, and keyset paging may see
      -- it twice or never; rows that do not change are seen once each way)
      PERFORM metering.ingest(regress.ev('walk' || n || random(), (ARRAY['acme', 'delta'])[1 + n % 2], 'api',
                                         '2024-05-2' || (n % 9) || 'T10:00:00Z', '{"n": 1}'));
    END IF;
    EXIT WHEN NOT (r -> 'paging' ? 'nextCursor');
    r := metering.search_usage(jsonb_build_object('cursor', r -> 'paging' ->> 'nextCursor',
                                                  'searchByAttributes', '[]', 'limit', 1));  -- ignored with a cursor
  END LOOP;
  direction := 'forward'; pages := n; rows := cardinality(seen);
  distinct_rows := (SELECT count(DISTINCT s) FROM unnest(seen) s);
  missing := (SELECT count(*) FROM jsonb_array_elements(before -> 'results') x WHERE NOT (x ->> 'id') = ANY (seen));
  RETURN NEXT;
  -- and back from the last page
  seen := ARRAY(SELECT x ->> 'id' FROM jsonb_array_elements(last -> 'results') x);
  r := last;
  n := 1;
  WHILE r -> 'paging' ? 'prevCursor' LOOP
    r := metering.search_usage(jsonb_build_object('cursor', r -> 'paging' ->> 'prevCursor'));
    n := n + 1;
    seen := ARRAY(SELECT x ->> 'id' FROM jsonb_array_elements(r -> 'results') x) || seen;
  END LOOP;
  direction := 'backward'; pages := n; rows := cardinality(seen);
  distinct_rows := (SELECT count(DISTINCT s) FROM unnest(seen) s);
  missing := (SELECT count(*) FROM jsonb_array_elements(before -> 'results') x WHERE NOT (x ->> 'id') = ANY (seen));
  RETURN NEXT;
END $$;
SELECT * FROM pg_temp.walk('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}], "limit": 7}', false);
SELECT * FROM pg_temp.walk('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"},
                                                    {"name": "aggregationPeriod", "operator": "EQUALS", "value": "DAILY"}],
                             "orderByAttribute": {"name": "count", "ascending": false}, "limit": 3}', true);

-- cursors are signed: a forged or damaged one is an error, never another query
SELECT regress.err(format('SELECT metering.search_usage(%L)', jsonb_build_object('cursor', c)))
  FROM (SELECT pg_temp.search('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}], "limit": 2}')
               -> 'paging' ->> 'nextCursor' AS good) g,
       LATERAL unnest(ARRAY[
         overlay(good placing 'x' from 10 for 1),
         split_part(good, '.', 1) || '.' || metering._base64url('forged'::bytea),
         metering._base64url(convert_to('{"q": {"limit": 100, "order": {"name": "startTime"}, "search": []}, "kv": 1}', 'UTF8')) || '.' || split_part(good, '.', 2),
         'garbage', '', '..', good || '.x']) c;
SELECT regress.err($$SELECT metering.search_usage('{"cursor": 5}')$$);
-- anyone may sign a payload (the signing function is the search's own):
-- what a cursor carries is checked as a request is
SELECT regress.err(format('SELECT metering.search_usage(%L)', jsonb_build_object('cursor', metering._sign_cursor(p))))
  FROM unnest(ARRAY['{"q": {"order": {"name": "startTime"}, "search": [{"name": "startTime", "operator": "EXISTS"}]}}',
                    '{"q": {"limit": 5, "search": [{"name": "startTime", "operator": "EXISTS"}]}}',
                    '{"q": {"limit": 5, "order": {"name": "startTime"}}}',
                    '{"k": [1]}',
                    '{"q": {"limit": 5, "order": {"name": "startTime"}, "search": [{"name": "startTime", "operator": "EXISTS"}]}, "k": ["2024-06-01T00:00:00", "zz"]}',
                    '{"q": {"limit": 5, "order": {"name": "startTime"}, "search": [{"name": "startTime", "operator": "EXISTS"}]}, "k": "x"}']::jsonb[]) p;
-- bounds that leave nothing (after now, or crossed) find nothing
SELECT metering.search_usage('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2030-01-01T00:00:00"}]}');
SELECT metering.search_usage('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-10T00:00:00"},
                                                      {"name": "startTime", "operator": "LESS_THAN", "value": "2024-06-05T00:00:00"}]}');

-- bad requests: one error each (22023)
SELECT regress.err(format('SELECT metering.search_usage(%L)', r)) FROM unnest(ARRAY[
  '[]', '{}',
  '{"searchByAttributes": [{"name": "tenantId", "operator": "EQUALS", "value": "acme"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "yesterday"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T24:00:00"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "CONTAINS", "value": "2024"}]}',
  '{"searchByAttributes": [{"name": "color", "operator": "EQUALS", "value": "red"}]}',
  '{"searchByAttributes": [{"name": "startTime"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}, {"name": "aggregationPeriod", "operator": "EQUALS", "value": "HOURLY"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}, {"name": "tenantId", "operator": "IN", "value": []}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}, {"name": "isTrial", "operator": "EQUALS", "value": "yes"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}], "limit": 0}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}], "limit": 101}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}], "limit": 2.5}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}], "orderByAttribute": {"name": "color"}}',
  '{"searchByAttributes": {"name": "startTime"}}'
]) r;

-- a deleted meter's periods go with it
SELECT count(*) > 0 AS periods_before FROM metering.usage_periods WHERE meter = 'logins';
DELETE FROM metering.meters WHERE slug = 'logins';
SELECT count(*) AS periods_after FROM metering.usage_periods WHERE meter = 'logins';

-- a whole number written with decimals is a whole number; a cursor with a third part is not a cursor
SELECT metering.search_usage('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}], "limit": 1.0}') -> 'paging' ->> 'limit' AS lim;
SELECT regress.err(format('SELECT metering.search_usage(%L)', jsonb_build_object('cursor',
  (metering.search_usage('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}], "limit": 1}')
     -> 'paging' ->> 'nextCursor') || '..x')));
