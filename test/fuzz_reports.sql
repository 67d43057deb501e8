-- Fuzzing the usage reports: random and mutated search_usage requests,
-- damaged, forged and self-signed cursors, units_usage and usage_overview
-- arguments, and writes to metering.subjects.  Each call either answers or
-- is refused with the SQLSTATE the code documents; a call changes no row;
-- nothing crashes the backend.
BEGIN;
SELECT plan(25);
SELECT setseed(0.20261126);
SET LOCAL metering.now = '2024-07-01 12:00:00+00';

-- random text: printable ASCII, quotes, backslashes, control characters,
-- multi-byte characters, now and then very long
CREATE FUNCTION pg_temp.rand_text() RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN random() < 0.02 THEN repeat('x', 20000)
    ELSE (SELECT coalesce(string_agg(
            CASE floor(random() * 6)::int
              WHEN 0 THEN chr(32 + floor(random() * 95)::int)
              WHEN 1 THEN (ARRAY['"', '\', '''', '{', '}', '[', ']', ':', ',', '$', '%', '.'])[1 + floor(random() * 12)::int]
              WHEN 2 THEN chr(1 + floor(random() * 31)::int)
              WHEN 3 THEN (ARRAY['é', 'ß', '中', '😀', 'ǅ', E'\u00a0', '２', E'\u202e'])[1 + floor(random() * 8)::int]
              ELSE chr(48 + floor(random() * 10)::int) END, ''), '')
          FROM generate_series(1, floor(random() * 30)::int)) END
$$;
-- one random edit (replace, insert or delete a character) of a text
CREATE FUNCTION pg_temp.mutate(s text) RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT CASE floor(random() * 3)::int
    WHEN 0 THEN overlay(s placing chr(32 + floor(random() * 95)::int) from p for 1)
    WHEN 1 THEN overlay(s placing chr(32 + floor(random() * 95)::int) from p for 0)
    ELSE overlay(s placing '' from p for 1) END
  FROM (SELECT 1 + floor(random() * greatest(length(s), 1))::int AS p) x
$$;
CREATE FUNCTION pg_temp.rand_json(depth integer) RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT CASE floor(random() * 11)::int
    WHEN 0 THEN 'null'::jsonb
    WHEN 1 THEN to_jsonb(random() < 0.5)
    WHEN 2 THEN to_jsonb(round((random() * 2e6 - 1e6)::numeric, floor(random() * 8)::int))
    WHEN 3 THEN (CASE WHEN random() < 0.5 THEN '-' ELSE '' END || '1e' || floor(random() * 600 - 300)::int)::jsonb
    WHEN 4 THEN to_jsonb(pg_temp.rand_text())
    WHEN 5 THEN '""'::jsonb
    WHEN 6 THEN CASE WHEN depth > 0 THEN jsonb_build_array(pg_temp.rand_json(depth - 1), pg_temp.rand_json(depth - 1)) ELSE '[]' END
    WHEN 7 THEN CASE WHEN depth > 0 THEN jsonb_build_object(pg_temp.rand_text(), pg_temp.rand_json(depth - 1),
                                                            'name', pg_temp.rand_json(depth - 1)) ELSE '{}' END
    WHEN 8 THEN to_jsonb(pg_temp.mutate('2024-06-10T10:00:00'))
    WHEN 9 THEN to_jsonb(floor(random() * 200 - 50)::int)
    ELSE '"acme"'::jsonb END
$$;
-- text that parses as JSON, else NULL
CREATE FUNCTION pg_temp.try_jsonb(s text) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
  RETURN s::jsonb;
EXCEPTION WHEN OTHERS THEN
  RETURN NULL;
END $$;

-- a time as the search takes it (2018-08-04T18:15:30), or one near it;
-- with wide, years from 0001 to 9999 (narrow keeps upper bounds near the
-- data: UNIQUE_COUNT meters are read week by week up to the bound)
CREATE FUNCTION pg_temp.rand_time(wide boolean) RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN NOT wide AND s ~ '^[0-9]{4}' AND substr(s, 1, 4)::int NOT BETWEEN 2000 AND 2030
              THEN '2024' || substr(s, 5) ELSE s END
    FROM (SELECT CASE
      WHEN r < 0.55 THEN to_char(timestamp '2024-05-25' + random() * interval '45 days', 'YYYY-MM-DD"T"HH24:MI:SS')
      WHEN r < 0.62 THEN to_char(timestamp '2024-05-25' + random() * interval '45 days', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
      WHEN r < 0.72 THEN pg_temp.mutate('2024-06-10T12:30:00')
      WHEN r < 0.85 THEN (ARRAY['2024-02-30T00:00:00', '2023-02-29T00:00:00', '2024-06-01T24:00:00', '2024-06-01T23:59:60',
                                '2024-06-01T23:60:00', '2024-06-01T23:59:99', '2024-06-01', '2024-06-01 00:00:00',
                                '2024-06-01T00:00:00+02:00', '2024-06-01T00:00:00.1234567', '2024-06-01T00:00:00.',
                                '0000-01-01T00:00:00', '2024-13-01T00:00:00', '2024-00-10T00:00:00', 'infinity', '-infinity',
                                'now', '', ' 2024-06-01T00:00:00', '2024-06-01T00:00:00z', '２０２４-06-01T00:00:00',
                                '2024-06-01T00:00:00ZZ', E'2024-06-01T00:00:00\n', '2024-06-01T00:00:00Z'])[1 + floor(random() * 24)::int]
      WHEN r < 0.95 THEN (ARRAY['0001-01-01T00:00:00', '9999-12-31T23:59:59', '1970-01-01T00:00:00', '4713-01-01T00:00:00',
                                '2100-01-01T00:00:00', '1999-12-31T23:59:59.999999'])[1 + floor(random() * 6)::int]
      ELSE pg_temp.rand_text() END AS s
      FROM (SELECT random() AS r) x) y
$$;

-- a search condition: valid for its attribute, or with one part changed
CREATE FUNCTION pg_temp.valid_cond(wide boolean) RETURNS jsonb LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  name text := (ARRAY['startTime', 'endTime', 'tenantId', 'usageType', 'aggregationPeriod', 'isTrial'])[1 + floor(random() * 6)::int];
  ops text[] := CASE
    WHEN name IN ('startTime', 'endTime') THEN ARRAY['GREATER_THAN', 'GREATER_THAN_OR_EQUAL', 'LESS_THAN', 'LESS_THAN_OR_EQUAL',
                                                    'EQUALS', 'NOT_EQUALS', 'EXISTS', 'NOT_EXISTS']
    WHEN name IN ('tenantId', 'usageType') THEN ARRAY['EQUALS', 'IN', 'NOT_EQUALS', 'NOT_IN', 'CONTAINS', 'NOT_CONTAINS',
                                                     'STARTS_WITH', 'ENDS_WITH', 'EXISTS', 'NOT_EXISTS']
    WHEN name = 'aggregationPeriod' THEN ARRAY['EQUALS', 'IN', 'NOT_EQUALS', 'NOT_IN', 'EXISTS', 'NOT_EXISTS']
    ELSE ARRAY['EQUALS', 'NOT_EQUALS', 'EXISTS', 'NOT_EXISTS'] END;
  op text := ops[1 + floor(random() * cardinality(ops))::int];
  words text[] := CASE
    WHEN name = 'tenantId' THEN ARRAY['acme', 'beta', 'gamma', 'org', 'org-eu', 'a', 'e', '', 'ACME', pg_temp.rand_text()]
    WHEN name = 'usageType' THEN ARRAY['calls', 'logins', 'peak', 'last', 'avgv', 'users', 'nope', 'l', 's', pg_temp.rand_text()]
    ELSE ARRAY['DAILY', 'WEEKLY', 'MONTHLY', 'DAILY', 'WEEKLY', 'MONTHLY', 'HOURLY', 'daily'] END;
  v jsonb;
BEGIN
  v := CASE
    WHEN op IN ('EXISTS', 'NOT_EXISTS') THEN NULL
    WHEN name IN ('startTime', 'endTime') THEN to_jsonb(pg_temp.rand_time(wide))
    WHEN name = 'isTrial' THEN to_jsonb(random() < 0.5)
    WHEN op IN ('IN', 'NOT_IN') THEN (SELECT coalesce(jsonb_agg(words[1 + floor(random() * cardinality(words))::int]), '[]')
                                        FROM generate_series(1, floor(random() * 4)::int))
    ELSE to_jsonb(words[1 + floor(random() * cardinality(words))::int]) END;
  RETURN jsonb_strip_nulls(jsonb_build_object('name', name, 'operator', op, 'value', v));
END $$;
CREATE FUNCTION pg_temp.rand_cond(wide boolean) RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN r < 0.60 THEN c
              WHEN r < 0.70 THEN c - (ARRAY['name', 'operator', 'value'])[1 + floor(random() * 3)::int]
              WHEN r < 0.78 THEN c || jsonb_build_object('name', (ARRAY['startTime', 'endTime', 'tenantId', 'usageType',
                                   'aggregationPeriod', 'isTrial', 'count', 'id', 'StartTime', pg_temp.rand_text()])[1 + floor(random() * 10)::int])
              WHEN r < 0.86 THEN c || jsonb_build_object('operator', (ARRAY['EQUALS', 'IN', 'NOT_IN', 'CONTAINS', 'LESS_THAN',
                                   'EXISTS', 'equals', 'LIKE', pg_temp.rand_text()])[1 + floor(random() * 9)::int])
              WHEN r < 0.95 THEN c || jsonb_build_object('value', pg_temp.rand_json(2))
              WHEN r < 0.98 THEN c || jsonb_build_object(pg_temp.rand_text(), pg_temp.rand_json(1))
              ELSE pg_temp.rand_json(2) END
    FROM (SELECT random() AS r, pg_temp.valid_cond(wide) AS c) x
$$;
-- {k: v}, or {} for no v
CREATE FUNCTION pg_temp.field(k text, v jsonb) RETURNS jsonb LANGUAGE sql AS $$
  SELECT CASE WHEN v IS NULL THEN '{}'::jsonb ELSE jsonb_build_object(k, v) END
$$;
-- a request: a startTime condition (mostly), a few more, an order, a limit
CREATE FUNCTION pg_temp.rand_request(wide boolean) RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN random() < 0.03 THEN pg_temp.rand_json(3) ELSE
    pg_temp.field('searchByAttributes', CASE WHEN random() < 0.04 THEN pg_temp.rand_json(2) ELSE
      (SELECT jsonb_agg(c ORDER BY i) FROM (
         SELECT 0 AS i, CASE WHEN random() < 0.9 THEN jsonb_build_object('name', 'startTime',
                  'operator', (ARRAY['GREATER_THAN', 'GREATER_THAN_OR_EQUAL', 'EXISTS', 'EQUALS'])[1 + floor(random() * 4)::int],
                  'value', pg_temp.rand_time(wide)) ELSE pg_temp.rand_cond(wide) END AS c
         UNION ALL
         SELECT i, pg_temp.rand_cond(wide) FROM generate_series(1, floor(random() * 4)::int) i) s) END)
    || pg_temp.field('orderByAttribute', CASE WHEN o < 0.35 THEN NULL
      WHEN o < 0.80 THEN jsonb_strip_nulls(jsonb_build_object(
             'name', (ARRAY['startTime', 'endTime', 'tenantId', 'usageType', 'aggregationPeriod', 'isTrial', 'count', 'id'])[1 + floor(random() * 8)::int],
             'ascending', CASE WHEN random() < 0.8 THEN to_jsonb(random() < 0.5) END))
      ELSE (ARRAY['null', '{}', '[]', '"startTime"', '{"name": "color"}', '{"name": null}', '{"name": "count", "ascending": "yes"}',
                  '{"name": "id", "ascending": null}', '{"name": ["startTime"]}', '{"ascending": false}', '{"name": "startTime", "ascending": 1}',
                  jsonb_build_object('name', pg_temp.rand_text()), pg_temp.rand_json(2)])[1 + floor(random() * 13)::int] END)
    || pg_temp.field('limit', CASE WHEN l < 0.3 THEN NULL
      WHEN l < 0.7 THEN to_jsonb(1 + floor(random() * 8)::int)
      ELSE (ARRAY['0', '101', '100', '1', '-5', '2.5', '1.0', '100.00', '1e2', '5e0', '1E+1', '1e300', '-1e-300', '0.5e1', '99.99',
                  '"5"', 'null', 'true', '[]', '{}', '2147483648', '-2147483649', '1e-5', pg_temp.rand_json(1)::text])[1 + floor(random() * 24)::int]::jsonb END)
    || pg_temp.field('cursor', CASE WHEN random() < 0.04 THEN 'null'::jsonb END)
    || CASE WHEN random() < 0.08 THEN jsonb_build_object(pg_temp.rand_text(), pg_temp.rand_json(2)) ELSE '{}' END END
    FROM (SELECT random() AS o, random() AS l) x
$$;

-- what the reports may change: nothing
CREATE FUNCTION pg_temp.fingerprint() RETURNS text LANGUAGE sql AS $$
  SELECT concat_ws('/', (SELECT count(*) FROM metering.events), (SELECT count(*) FROM metering.meter_rollups),
                   (SELECT count(*) FROM metering.usage_periods), (SELECT count(*) FROM metering.meter_rollup_state),
                   (SELECT count(*) FROM metering.signing_keys), (SELECT count(*) FROM metering.subjects),
                   (SELECT count(*) FROM metering.meters), (SELECT count(*) FROM metering.entitlements),
                   (SELECT count(*) FROM metering.grants))
$$;
CREATE TEMP TABLE outcomes (kind text, input text, sqlstate text, message text, response jsonb, changed boolean);
-- one call, in a sub-transaction of its own
CREATE FUNCTION pg_temp.search(kind text, req jsonb, check_rows boolean DEFAULT true) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  before text := CASE WHEN check_rows THEN pg_temp.fingerprint() END;
  r jsonb;
  st text;
  msg text;
BEGIN
  BEGIN
    r := metering.search_usage(req);
  EXCEPTION WHEN OTHERS THEN
    st := SQLSTATE;
    msg := SQLERRM;
  END;
  INSERT INTO outcomes VALUES (kind, req::text, st, msg, r, check_rows AND pg_temp.fingerprint() <> before);
  RETURN r;
END $$;
CREATE FUNCTION pg_temp.units(kind text, meter text, start_date timestamptz, end_date timestamptz, account_group text,
                              cursor text, page_size integer, check_rows boolean DEFAULT true) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  before text := CASE WHEN check_rows THEN pg_temp.fingerprint() END;
  r jsonb;
  st text;
  msg text;
BEGIN
  BEGIN
    r := metering.units_usage(meter, start_date, end_date, account_group, cursor, page_size);
  EXCEPTION WHEN OTHERS THEN
    st := SQLSTATE;
    msg := SQLERRM;
  END;
  INSERT INTO outcomes VALUES (kind, format('units_usage(%L, %L, %L, %L, %L, %s)', meter, start_date, end_date, account_group,
                                           cursor, coalesce(page_size::text, 'NULL')),
                               st, msg, r, check_rows AND pg_temp.fingerprint() <> before);
  RETURN r;
END $$;
CREATE FUNCTION pg_temp.overview(kind text, subject text, meter text, at timestamptz, check_rows boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  before text := CASE WHEN check_rows THEN pg_temp.fingerprint() END;
  r jsonb;
  st text;
  msg text;
BEGIN
  BEGIN
    SELECT to_jsonb(o) INTO r FROM metering.usage_overview(subject, meter, at) o;
  EXCEPTION WHEN OTHERS THEN
    st := SQLSTATE;
    msg := SQLERRM;
  END;
  INSERT INTO outcomes VALUES (kind, format('usage_overview(%L, %L, %L)', subject, meter, at), st, msg, r,
                               check_rows AND pg_temp.fingerprint() <> before);
END $$;
-- the SQLSTATEs seen for some kinds of call, and a few of the unexpected ones
CREATE FUNCTION pg_temp.states(kinds text[]) RETURNS text[] LANGUAGE sql AS $$
  SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind = ANY (kinds)
$$;
-- ok() when the calls of these kinds ended in allowed SQLSTATEs only (and
-- extra holds); then a diagnostic for each unexpected SQLSTATE, with its
-- shortest input
CREATE FUNCTION pg_temp.check_states(kinds text[], allowed text[], description text, extra boolean DEFAULT true)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
  o record;
BEGIN
  RETURN NEXT ok(pg_temp.states(kinds) <@ allowed AND extra, description);
  FOR o IN SELECT DISTINCT ON (fn, sqlstate, what) fn, kind, sqlstate, message,
                  CASE WHEN length(input) > 600 THEN left(input, 300) || ' ... ' || right(input, 300) ELSE input END AS input,
                  count(*) OVER (PARTITION BY fn, sqlstate, what) AS n
             FROM (SELECT x.*, regexp_replace(coalesce(message, ''), '".*', '') AS what,
                          CASE WHEN input LIKE 'units_usage(%' THEN 'units_usage' WHEN input LIKE 'usage_overview(%' THEN 'usage_overview'
                               WHEN input ~ '^(INSERT|UPDATE|DELETE) ' THEN 'subjects' ELSE 'search_usage' END AS fn
                     FROM outcomes x) y
            WHERE kind = ANY (kinds) AND NOT coalesce(sqlstate, 'ok') = ANY (allowed)
            ORDER BY fn, sqlstate, what, length(input) LOOP
    RETURN NEXT diag(format('%s x %s (%s): %s, e.g. on %s', o.n, o.kind, o.fn, coalesce(o.sqlstate || ' ' || o.message, 'accepted'), o.input));
  END LOOP;
END $$;
-- a cursor's payload (what _sign_cursor was given, and its key version)
CREATE FUNCTION pg_temp.payload(c text) RETURNS jsonb LANGUAGE sql AS $$
  SELECT convert_from(decode(translate(b, '-_', '+/') || repeat('=', (4 - length(b) % 4) % 4), 'base64'), 'UTF8')::jsonb
    FROM (SELECT split_part(c, '.', 1) AS b) x
$$;

-- data: subjects, meters of every aggregation, events before and after a
-- refresh (so that searches read kept periods and newer events), some with
-- allocations; entitlements for the overview
INSERT INTO metering.subjects (key, is_trial) VALUES ('acme', false), ('beta', true), ('org', false);
INSERT INTO metering.subjects (key, parent_key) VALUES ('org-eu', 'org');
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('calls', 'api', 'SUM', '$.n', '{"agent": "$.agent"}'),
  ('logins', 'login', 'COUNT', NULL, '{}'),
  ('peak', 'api', 'MAX', '$.n', '{}'),
  ('last', 'api', 'LATEST', '$.n', '{}'),
  ('avgv', 'api', 'AVG', '$.n', '{}');
CREATE FUNCTION pg_temp.events(first integer, n integer) RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', 'r' || i, 'source', 'fuzz', 'type', (ARRAY['api', 'login'])[1 + i % 2],
                   'subject', (ARRAY['acme', 'beta', 'gamma', 'org', 'org-eu'])[1 + floor(random() * 5)::int],
                   'time', to_char(timestamptz '2024-05-28 00:00:00+00' + random() * interval '34 days', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   'data', jsonb_strip_nulls(jsonb_build_object(
                     'n', round((random() * 20)::numeric, 1), 'agent', 'a' || floor(random() * 4)::int,
                     'allocations', CASE WHEN random() < 0.2 THEN jsonb_build_array(
                       jsonb_build_object('AllocatedUsageQuantity', 1, 'Tags', jsonb_build_array(jsonb_build_object('Key', 'account_group', 'Value', 'org-eu'))),
                       jsonb_build_object('AllocatedUsageQuantity', 2, 'Tags', '[]'::jsonb)) END))))
    FROM generate_series(first, first + n - 1) i
$$;
SELECT lives_ok($$SELECT metering.ingest_batch(pg_temp.events(1, 300))$$, 'events stored');
SELECT ok(metering.refresh_rollups() > 0, 'rolled up');
SELECT lives_ok($$SELECT metering.ingest_batch(pg_temp.events(1001, 40))$$, 'more events above the watermark');
DO $$
BEGIN
  PERFORM metering.create_feature('calls', 'API calls', 'calls');
  PERFORM metering.create_feature('calls-a1', 'API calls of a1', 'calls', '{"agent": "a1"}');
  PERFORM metering.create_grant(metering.create_entitlement('acme', 'calls', usage_period => '1 month', usage_period_anchor => '2024-05-15',
                                                            measure_usage_from => '2024-05-15', issue_after_reset => 10),
                                5, '2024-05-15', recurrence => '1 week', priority => 2);
  PERFORM metering.create_entitlement('org-eu', 'calls-a1', usage_period => '1 day', measure_usage_from => '2024-05-01',
                                      issue_after_reset => 3);
  PERFORM metering._sign_cursor('{}');      -- the signing key, made on first use
END $$;

-- 1. random requests
DO $$
BEGIN
  FOR n IN 1 .. 700 LOOP
    PERFORM pg_temp.search('random', pg_temp.rand_request(true));
  END LOOP;
END $$;
SELECT * FROM pg_temp.check_states('{random}', '{22023,ok}', 'random requests are answered or refused with 22023');
SELECT ok((SELECT count(*) FILTER (WHERE sqlstate IS NULL) > 100 AND count(*) FILTER (WHERE sqlstate IS NOT NULL) > 100
             AND count(*) FILTER (WHERE jsonb_array_length(response -> 'results') > 0) > 50
             FROM outcomes WHERE kind = 'random'),
          'the fuzzer produced accepted requests with rows, and refused ones');
SELECT is((SELECT count(*) FROM outcomes WHERE kind = 'random' AND sqlstate = '22023'
             AND message !~ '^(search_usage: |cursor is not a cursor of this database)'),
          0::bigint, 'every refusal names search_usage');

-- 2. valid requests with one random edit of their text that still parses
CREATE TEMP TABLE valid_requests AS SELECT r::text AS r FROM unnest(ARRAY[
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}], "limit": 10}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-06-01T00:00:00"}, {"name": "startTime", "operator": "LESS_THAN", "value": "2024-06-11T00:00:00"}, {"name": "tenantId", "operator": "EQUALS", "value": "acme"}, {"name": "usageType", "operator": "EQUALS", "value": "calls"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}, {"name": "aggregationPeriod", "operator": "IN", "value": ["WEEKLY", "MONTHLY"]}], "limit": 5}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-05-01T00:00:00"}, {"name": "isTrial", "operator": "EQUALS", "value": false}, {"name": "tenantId", "operator": "NOT_EQUALS", "value": "acme"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN", "value": "2024-05-01T00:00:00"}, {"name": "tenantId", "operator": "STARTS_WITH", "value": "g"}, {"name": "usageType", "operator": "CONTAINS", "value": "og"}]}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}, {"name": "endTime", "operator": "LESS_THAN_OR_EQUAL", "value": "2024-06-10T00:00:00"}], "limit": 10}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}], "orderByAttribute": {"name": "count", "ascending": false}, "limit": 4}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "EXISTS"}, {"name": "tenantId", "operator": "IN", "value": ["acme", "org"]}], "orderByAttribute": {"name": "tenantId", "ascending": true}, "limit": 10}',
  '{"searchByAttributes": [{"name": "startTime", "operator": "EQUALS", "value": "2024-06-03T00:00:00"}, {"name": "aggregationPeriod", "operator": "NOT_IN", "value": ["DAILY"]}], "orderByAttribute": {"name": "endTime", "ascending": false}, "limit": 10}']) r;
DO $$
DECLARE
  req jsonb;
BEGIN
  FOR n IN 1 .. 900 LOOP
    req := pg_temp.try_jsonb(pg_temp.mutate((SELECT r FROM valid_requests ORDER BY r OFFSET floor(random() * 9)::int LIMIT 1)));
    IF req IS NOT NULL THEN
      PERFORM pg_temp.search('mutated', req);
    END IF;
  END LOOP;
END $$;
SELECT * FROM pg_temp.check_states('{mutated}', '{22023,ok}', 'mutated requests are answered or refused with 22023');
SELECT ok((SELECT count(*) FILTER (WHERE sqlstate IS NULL) > 40 AND count(*) FILTER (WHERE sqlstate IS NOT NULL) > 100
             FROM outcomes WHERE kind = 'mutated'),
          'the mutations left some requests valid and broke others');

-- every answer has the documented shape: at most limit results, each complete
SELECT is((SELECT count(*) FROM outcomes o WHERE kind IN ('random', 'mutated') AND sqlstate IS NULL
             AND NOT (jsonb_typeof(response -> 'results') = 'array'
                      AND jsonb_array_length(response -> 'results') <= (response -> 'paging' ->> 'limit')::int
                      AND (SELECT bool_and(x ?& ARRAY['id', 'tenantId', 'trial', 'usageType', 'aggregationPeriod', 'startTime', 'endTime', 'count']
                                           AND x ->> 'aggregationPeriod' IN ('DAILY', 'WEEKLY', 'MONTHLY'))
                             FROM jsonb_array_elements(response -> 'results') x) IS NOT FALSE)),
          0::bigint, 'answers hold at most limit complete rows');

-- 3. cursors: real ones from answers, then each damaged once
CREATE TEMP TABLE cursors (fn text, c text);
DO $$
DECLARE
  r jsonb;
  c text;
BEGIN
  FOR n IN 1 .. 30 LOOP
    r := metering.search_usage(jsonb_build_object(
      'searchByAttributes', jsonb_build_array(jsonb_build_object('name', 'startTime', 'operator', 'GREATER_THAN_OR_EQUAL', 'value', '2024-05-20T00:00:00')),
      'orderByAttribute', jsonb_build_object('name', (ARRAY['startTime', 'count', 'tenantId', 'id', 'endTime', 'isTrial'])[1 + n % 6], 'ascending', n % 4 < 2),
      'limit', 1 + n % 5));
    FOR p IN 1 .. 3 LOOP
      c := r -> 'paging' ->> 'nextCursor';
      EXIT WHEN c IS NULL;
      INSERT INTO cursors VALUES ('search', c);
      r := metering.search_usage(jsonb_build_object('cursor', c));
      IF r -> 'paging' ? 'prevCursor' THEN
        INSERT INTO cursors VALUES ('search', r -> 'paging' ->> 'prevCursor');
      END IF;
    END LOOP;
  END LOOP;
  FOR n IN 1 .. 10 LOOP
    c := split_part(metering.units_usage((ARRAY['calls', 'logins'])[1 + n % 2], '2024-05-01', '2024-07-01', page_size => n)
                    -> '_links' -> 'next' ->> 'href', '&cursor=', 2);
    IF c <> '' THEN
      INSERT INTO cursors VALUES ('units', c);
    END IF;
  END LOOP;
END $$;
SELECT ok((SELECT count(*) FILTER (WHERE fn = 'search') > 40 AND count(*) FILTER (WHERE fn = 'units') > 5 FROM cursors),
          'real cursors of both functions');
DO $$
DECLARE
  a text;
  b text;
  c text;
  r float8;
BEGIN
  FOR n IN 1 .. 500 LOOP
    a := (SELECT x.c FROM cursors x ORDER BY random() LIMIT 1);
    b := (SELECT x.c FROM cursors x ORDER BY random() LIMIT 1);
    r := random();
    c := CASE
      WHEN r < 0.40 THEN pg_temp.mutate(a)
      WHEN r < 0.50 THEN left(a, floor(random() * length(a))::int)
      WHEN r < 0.55 THEN right(a, floor(random() * length(a))::int)
      WHEN r < 0.60 THEN a || b
      WHEN r < 0.65 THEN a || '.' || b
      WHEN r < 0.70 THEN split_part(a, '.', 1) || '.' || split_part(b, '.', 2)
      WHEN r < 0.73 THEN split_part(a, '.', 2) || '.' || split_part(a, '.', 1)
      WHEN r < 0.76 THEN upper(a)
      WHEN r < 0.79 THEN a || (ARRAY['=', '==', ' ', E'\n', '.', '..x', '.x', '%3D'])[1 + floor(random() * 8)::int]
      WHEN r < 0.85 THEN metering._base64url(metering._random_bytes(1 + floor(random() * 200)::int)) || '.'
                         || metering._base64url(metering._random_bytes(32))
      WHEN r < 0.92 THEN metering._base64url(convert_to((pg_temp.payload(a) - 'kv' || jsonb_build_object('kv',
                           (ARRAY['1', '2', '0', '1.0', '"1"', 'null', '1e400', '-1', '[1]', '"x"'])[1 + floor(random() * 10)::int]::jsonb))::text, 'UTF8'))
                         || '.' || split_part(a, '.', 2)
      WHEN r < 0.96 THEN metering._base64url(convert_to(pg_temp.rand_json(3)::text, 'UTF8')) || '.' || split_part(a, '.', 2)
      ELSE pg_temp.rand_text() END;
    CONTINUE WHEN c IS NOT DISTINCT FROM a;
    PERFORM pg_temp.search('damaged cursor', jsonb_build_object('cursor', c));
    PERFORM pg_temp.units('damaged cursor', 'calls', NULL, NULL, NULL, c, 10);
  END LOOP;
  -- the real ones, each to its own function and to the other
  FOR a, b IN SELECT x.fn, x.c FROM cursors x LOOP
    PERFORM pg_temp.search('real cursor ' || a || ' to search', jsonb_build_object('cursor', b,
                           'searchByAttributes', pg_temp.rand_json(1), 'limit', pg_temp.rand_json(1)));   -- ignored with a cursor
    PERFORM pg_temp.units('real cursor ' || a || ' to units', pg_temp.rand_text(), NULL, NULL, NULL, b, NULL);
  END LOOP;
  -- not strings
  FOR n IN 1 .. 30 LOOP
    PERFORM pg_temp.search('cursor type', jsonb_build_object('cursor', pg_temp.rand_json(2)));
  END LOOP;
END $$;
SELECT * FROM pg_temp.check_states('{damaged cursor}', '{22023}', 'a damaged, forged or foreign cursor is refused with 22023 by both');
SELECT is((SELECT array_agg(DISTINCT kind || ': ' || coalesce(sqlstate, 'ok') ORDER BY kind || ': ' || coalesce(sqlstate, 'ok'))
             FROM outcomes WHERE kind LIKE 'real cursor%'),
          ARRAY['real cursor search to search: ok', 'real cursor search to units: 22023',
                'real cursor units to search: 22023', 'real cursor units to units: ok'],
          'a real cursor works with its own function only, whatever else the call says');
SELECT * FROM pg_temp.check_states('{cursor type}', '{22023,ok}', 'a cursor that is not a string is refused with 22023 (null means none)');

-- 4. anyone may sign a payload: what a cursor carries is checked like a request
DO $$
DECLARE
  p jsonb;
  path text[];
  v jsonb;
  r float8;
BEGIN
  FOR n IN 1 .. 500 LOOP
    r := random();
    IF r < 0.08 THEN
      p := pg_temp.rand_json(3);
    ELSIF r < 0.55 THEN
      p := pg_temp.payload((SELECT x.c FROM cursors x WHERE fn = 'search' ORDER BY random() LIMIT 1)) - 'kv';
      path := (ARRAY['{q,limit}', '{q,limit}', '{q,order}', '{q,order,name}', '{q,order,ascending}', '{q,search}', '{q,search,0}',
                     '{q,search,0,value}', '{q,search,0,operator}', '{q,search,0,name}', '{q,search,1}', '{k}', '{k,0}', '{k,1}', '{k,2}',
                     '{d}', '{q}', '{kind}'])[1 + floor(random() * 18)::int];
      v := CASE WHEN random() < 0.5 THEN pg_temp.rand_json(2)
                ELSE (ARRAY['1.0', '5.00', '1e1', '2.5', '0', '101', '"5"', 'null', '"2024-06-02T00:00:00"', '"2024-06-02"', '"9999-12-31T23:59:59"',
                            '"0000-01-01T00:00:00"', '"2024-06-01T25:00:00"', '"00000000-0000-0000-0000-000000000000"', '"zz"', '"prev"',
                            '"next"', '"search_usage"', '[]', '{}', '["2024-06-02T00:00:00", "00000000-0000-0000-0000-000000000000"]',
                            '{"name": "startTime", "operator": "EXISTS"}', '{"name": "tenantId", "operator": "IN", "value": ["acme"]}'])
                     [1 + floor(random() * 23)::int]::jsonb END;
      p := CASE WHEN random() < 0.15 THEN p #- path ELSE jsonb_set(p, path, v) END;
    ELSE
      p := pg_temp.payload((SELECT x.c FROM cursors x WHERE fn = 'units' ORDER BY random() LIMIT 1)) - 'kv';
      path := (ARRAY['{q,meter}', '{q,from}', '{q,from}', '{q,to}', '{q,to}', '{q,group}', '{q,size}', '{q,size}', '{k}', '{k,0}', '{kind}', '{q}'])
              [1 + floor(random() * 12)::int];
      v := CASE WHEN random() < 0.4 THEN pg_temp.rand_json(2)
                ELSE (ARRAY['"garbage"', '"2024-06-01"', '"2024-06-01T00:00:00Z"', '"infinity"', '"-infinity"', '"now"', '"epoch"',
                            '"294276-12-31T00:00:00Z"', '"4713-01-01 BC"', '"2024-06-31"', '2.0', '"x"', '1e20', '0', '5', '-1', '1000',
                            '1001', '"5"', '"peak"', '"logins"', '"nope"', '"acme"', 'null', '[]', '{}', '"units_usage"'])
                     [1 + floor(random() * 27)::int]::jsonb END;
      p := CASE WHEN random() < 0.15 THEN p #- path ELSE jsonb_set(p, path, v) END;
    END IF;
    PERFORM pg_temp.search('signed', jsonb_build_object('cursor', metering._sign_cursor(p)));
    PERFORM pg_temp.units('signed', NULL, NULL, NULL, NULL, metering._sign_cursor(p), NULL);
  END LOOP;
END $$;
SELECT * FROM pg_temp.check_states('{signed}', '{22023,P0002,ok}',
  'self-signed cursors are checked like requests: answered, or refused with 22023 (P0002: units_usage of an unknown meter)',
  NOT EXISTS (SELECT 1 FROM outcomes WHERE kind = 'signed' AND sqlstate = 'P0002' AND input NOT LIKE 'units_usage(%'));
SELECT ok((SELECT count(*) FILTER (WHERE sqlstate IS NULL) > 50 FROM outcomes WHERE kind = 'signed'),
          'some self-signed cursors are valid');

-- 5. units_usage: random meters, ranges, account groups and page sizes
CREATE FUNCTION pg_temp.rand_instant() RETURNS timestamptz LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN r < 0.55 THEN timestamptz '2024-05-20 00:00:00+00' + random() * interval '50 days'
              WHEN r < 0.65 THEN NULL
              WHEN r < 0.75 THEN (ARRAY['infinity', '-infinity'])[1 + floor(random() * 2)::int]::timestamptz
              WHEN r < 0.85 THEN to_timestamp(-210866803200 + random() * 9435184819200)
              ELSE (ARRAY['4714-11-24 00:00:00+00 BC', '4714-12-31 00:00:00+00 BC', '0001-01-01 00:00:00+00', '1970-01-01 00:00:00+00',
                          '9999-12-31 23:59:59+00', '294276-11-30 00:00:00+00', '294276-12-31 23:59:59.999999+00',
                          '2024-06-01 00:00:00+00', '2024-07-01 12:00:00+00'])[1 + floor(random() * 9)::int]::timestamptz END
    FROM (SELECT random() AS r) x
$$;
DO $$
BEGIN
  FOR n IN 1 .. 500 LOOP
    PERFORM pg_temp.units('units',
      (ARRAY['calls', 'calls', 'logins', 'logins', 'peak', 'nope', NULL, pg_temp.rand_text()])[1 + floor(random() * 8)::int],
      pg_temp.rand_instant(), pg_temp.rand_instant(),
      (ARRAY[NULL, NULL, NULL, 'acme', 'org', 'org-eu', 'gamma', pg_temp.rand_text()])[1 + floor(random() * 8)::int],
      CASE WHEN random() < 0.05 THEN pg_temp.rand_text() END,
      (ARRAY[1 + floor(random() * 10)::int, 1 + floor(random() * 10)::int, 100, 0, -1, 1000, 1001, 2147483647, -2147483648, NULL])[1 + floor(random() * 10)::int]);
  END LOOP;
END $$;
SELECT * FROM pg_temp.check_states('{units}', '{22023,P0002,ok}', 'units_usage answers, or refuses with 22023 (P0002 for an unknown meter)');
SELECT ok((SELECT count(*) FILTER (WHERE jsonb_array_length(response -> 'breakdowns') > 0) > 10 FROM outcomes WHERE kind = 'units'),
          'some units_usage calls found usage');

-- 6. usage_overview: random subjects, meters and instants
DO $$
BEGIN
  FOR n IN 1 .. 500 LOOP
    PERFORM pg_temp.overview('overview',
      (ARRAY['acme', 'acme', 'org-eu', 'org-eu', 'beta', 'gamma', '', NULL, pg_temp.rand_text()])[1 + floor(random() * 9)::int],
      (ARRAY['calls', 'calls', 'calls-a1', 'logins', 'peak', 'last', 'avgv', 'nope', NULL, pg_temp.rand_text()])[1 + floor(random() * 10)::int],
      pg_temp.rand_instant());
  END LOOP;
END $$;
SELECT * FROM pg_temp.check_states('{overview}', '{22023,P0002,ok}', 'usage_overview answers, or refuses with 22023 (P0002 for an unknown meter)');

-- 7. as a role that sees one organization: 42501 for the others, and only its rows
CREATE ROLE fuzz_reports_reader;
GRANT USAGE ON SCHEMA metering TO fuzz_reports_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA metering TO fuzz_reports_reader;
REVOKE SELECT ON metering.signing_keys FROM fuzz_reports_reader;
GRANT ALL ON outcomes TO fuzz_reports_reader;
INSERT INTO metering.subject_access (role_name, subject) VALUES ('fuzz_reports_reader', 'org');
SET LOCAL ROLE fuzz_reports_reader;
DO $$
BEGIN
  FOR n IN 1 .. 200 LOOP
    PERFORM pg_temp.search('restricted search', pg_temp.rand_request(true), false);
    PERFORM pg_temp.units('restricted units', (ARRAY['calls', 'logins', 'nope'])[1 + floor(random() * 3)::int],
                          pg_temp.rand_instant(), pg_temp.rand_instant(),
                          (ARRAY[NULL, NULL, 'org', 'org-eu', 'acme', 'beta', pg_temp.rand_text()])[1 + floor(random() * 7)::int],
                          NULL, 10, false);
    PERFORM pg_temp.overview('restricted overview', (ARRAY['org', 'org-eu', 'acme', 'beta', pg_temp.rand_text()])[1 + floor(random() * 5)::int],
                             (ARRAY['calls', 'calls-a1', 'logins', 'nope'])[1 + floor(random() * 4)::int], pg_temp.rand_instant(), false);
  END LOOP;
END $$;
RESET ROLE;
SELECT * FROM pg_temp.check_states('{restricted search,restricted units,restricted overview}', '{22023,42501,P0002,ok}',
  'a reader of one organization is refused the others with 42501, and otherwise answered as anyone',
  (SELECT count(*) FILTER (WHERE sqlstate = '42501') > 10 AND count(*) FILTER (WHERE sqlstate = 'P0002' AND kind = 'restricted search') = 0
     FROM outcomes WHERE kind LIKE 'restricted%'));
SELECT is((SELECT count(*) FROM outcomes o,
                  jsonb_array_elements(coalesce(o.response -> 'results', o.response -> 'breakdowns')) x
            WHERE kind IN ('restricted search', 'restricted units')
              AND NOT coalesce(x ->> 'tenantId', x ->> 'accountGroup') IN (SELECT metering.subject_tree('org'))),
          0::bigint, 'and sees only its own rows');

-- 8. with a UNIQUE_COUNT meter (read from its events, period by period), near times
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('users', 'api', 'UNIQUE_COUNT', '$.agent');
DO $$
DECLARE
  req jsonb;
  r jsonb;
BEGIN
  FOR n IN 1 .. 150 LOOP
    req := pg_temp.rand_request(false);
    -- (a random value elsewhere may still hold a far year)
    CONTINUE WHEN EXISTS (SELECT 1 FROM regexp_matches(req::text, '"([0-9]{4})-', 'g') m WHERE m[1]::int > 2030);
    r := pg_temp.search('unique', req);
    IF r -> 'paging' ? 'nextCursor' THEN
      PERFORM pg_temp.search('unique', jsonb_build_object('cursor', pg_temp.mutate(r -> 'paging' ->> 'nextCursor')));
      PERFORM pg_temp.search('unique', jsonb_build_object('cursor', r -> 'paging' ->> 'nextCursor'));
    END IF;
  END LOOP;
END $$;
SELECT * FROM pg_temp.check_states('{unique}', '{22023,ok}',
  'with a UNIQUE_COUNT meter too, requests are answered or refused with 22023',
  (SELECT count(*) FROM outcomes, jsonb_array_elements(response -> 'results') x WHERE kind = 'unique' AND x ->> 'usageType' = 'users') > 0);

-- 9. subjects: random keys, names, parents and metadata; updates and deletions
DO $$
DECLARE
  k text;
  existing text;
  stmt text;
  before bigint;
  st text;
  msg text;
BEGIN
  FOR n IN 1 .. 600 LOOP
    existing := (SELECT key FROM metering.subjects ORDER BY random() LIMIT 1);
    k := (ARRAY['s' || n, 's' || n, 's' || n, existing, '', NULL, pg_temp.rand_text(), pg_temp.rand_text()])[1 + floor(random() * 8)::int];
    stmt := CASE WHEN random() < 0.6 THEN format(
      'INSERT INTO metering.subjects (key, name, parent_key, is_trial, metadata, deleted_at) VALUES (%L, %L, %L, %L, %L, %L)',
      k, CASE WHEN random() < 0.7 THEN pg_temp.rand_text() END,
      (ARRAY[NULL, NULL, existing, existing, k, 'nobody', pg_temp.rand_text()])[1 + floor(random() * 7)::int],
      random() < 0.3,
      CASE WHEN random() < 0.4 THEN pg_temp.rand_json(2)
           WHEN random() < 0.8 THEN jsonb_build_object(pg_temp.rand_text(), pg_temp.rand_json(2)) END,
      CASE WHEN random() < 0.05 THEN metering.now() END)
    WHEN random() < 0.8 THEN format('UPDATE metering.subjects SET %s WHERE key = %L',
      (ARRAY[format('parent_key = %L', (SELECT key FROM metering.subjects ORDER BY random() LIMIT 1)),
             format('parent_key = %L', existing), 'parent_key = NULL', format('parent_key = %L', pg_temp.rand_text()),
             format('name = %L', pg_temp.rand_text()), format('metadata = %L', pg_temp.rand_json(2)),
             format('key = %L', pg_temp.rand_text()), 'deleted_at = now()', 'is_trial = NOT is_trial',
             format('created_at = %L', timestamptz '2020-01-01')])[1 + floor(random() * 10)::int], existing)
    ELSE format('DELETE FROM metering.subjects WHERE key = %L', existing) END;
    before := (SELECT count(*) FROM metering.subjects);
    st := NULL;
    msg := NULL;
    BEGIN
      SET CONSTRAINTS ALL IMMEDIATE;     -- the parent's foreign key, checked at once
      EXECUTE stmt;
      SET CONSTRAINTS ALL DEFERRED;
    EXCEPTION WHEN OTHERS THEN
      st := SQLSTATE;
      msg := SQLERRM;
    END;
    INSERT INTO outcomes VALUES ('subjects', stmt, st, msg, NULL,
                                 st IS NOT NULL AND (SELECT count(*) FROM metering.subjects) <> before);
  END LOOP;
END $$;
SELECT * FROM pg_temp.check_states('{subjects}', '{22023,23503,23505,55000,ok}',
  'subject writes succeed, or fail with 22023, 23503, 23505 or 55000');
SELECT ok((SELECT count(*) FILTER (WHERE sqlstate IS NULL AND input LIKE 'INSERT%') > 50 FROM outcomes WHERE kind = 'subjects'),
          'some random subjects were stored');
SELECT is((SELECT count(*) FROM metering.subjects s
            WHERE (s.metadata IS NOT NULL AND jsonb_typeof(s.metadata) <> 'object') OR s.key = ''
               OR (s.parent_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM metering.subjects p WHERE p.key = s.parent_key))
               OR EXISTS (WITH RECURSIVE up(key, depth) AS (
                            SELECT s.parent_key, 1
                            UNION ALL
                            SELECT p.parent_key, up.depth + 1 FROM metering.subjects p JOIN up ON p.key = up.key WHERE up.depth < 1000)
                          SELECT 1 FROM up WHERE up.key = s.key)
               OR (s.deleted_at IS NOT NULL AND s.deleted_at <> metering.now())),
          0::bigint, 'stored subjects are sound: object metadata, existing parents, no cycles');

-- no call changed a row
SELECT is((SELECT count(*) FROM outcomes WHERE changed), 0::bigint, 'no call left a row behind or took one away');

SELECT * FROM finish();
ROLLBACK;
