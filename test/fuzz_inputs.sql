-- Fuzzing every text input and JSON body: mutated CloudEvents, batches,
-- RFC 3339 strings, meter paths over random data, clock settings and AWS
-- bodies.  Each input is either accepted or rejected with the expected
-- SQLSTATE; a rejected batch leaves no row behind; nothing crashes.
BEGIN;
SELECT plan(15);
SELECT setseed(0.20261125);
SET LOCAL metering.now = '2024-06-01 12:00:00+00';

-- random text: printable ASCII, quotes, backslashes, control characters,
-- multi-byte characters, now and then very long
CREATE FUNCTION pg_temp.rand_text() RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN random() < 0.02 THEN repeat('x', 20000)
    ELSE (SELECT coalesce(string_agg(
            CASE floor(random() * 6)::int
              WHEN 0 THEN chr(32 + floor(random() * 95)::int)
              WHEN 1 THEN (ARRAY['"', '\', '''', '{', '}', '[', ']', ':', ',', '$', '@'])[1 + floor(random() * 11)::int]
              WHEN 2 THEN chr(1 + floor(random() * 31)::int)
              WHEN 3 THEN (ARRAY['é', 'ß', '中', '😀', 'ǅ', E'\u00a0'])[1 + floor(random() * 6)::int]
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
    WHEN 3 THEN ('1e' || floor(random() * 300)::int)::jsonb
    WHEN 4 THEN to_jsonb(pg_temp.rand_text())
    WHEN 5 THEN '""'::jsonb
    WHEN 6 THEN CASE WHEN depth > 0 THEN jsonb_build_array(pg_temp.rand_json(depth - 1), pg_temp.rand_json(depth - 1)) ELSE '[]' END
    WHEN 7 THEN CASE WHEN depth > 0 THEN jsonb_build_object(pg_temp.rand_text(), pg_temp.rand_json(depth - 1),
                                                            'v', pg_temp.rand_json(depth - 1)) ELSE '{}' END
    WHEN 8 THEN to_jsonb(pg_temp.mutate('2024-06-01T10:00:00.123+02:00'))
    WHEN 9 THEN to_jsonb(pg_temp.mutate('12.5'))
    ELSE '"1.0"'::jsonb END
$$;
CREATE FUNCTION pg_temp.valid_event(n integer) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_build_object('specversion', '1.0', 'id', 'fz' || n, 'source', 'fuzz', 'type', 'fuzz',
                            'subject', 'acme', 'time', '2024-06-01T10:00:00Z',
                            'data', jsonb_build_object('v', n, 'k', 'g' || (n % 3)))
$$;
-- a valid event with one random change: a field replaced, removed or added,
-- or the whole event replaced
CREATE FUNCTION pg_temp.mutated_event(n integer) RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN r < 0.05 THEN pg_temp.rand_json(2)
              WHEN r < 0.20 THEN pg_temp.valid_event(n) - f
              WHEN r < 0.30 THEN pg_temp.valid_event(n) || jsonb_build_object(pg_temp.rand_text(), pg_temp.rand_json(2))
              ELSE jsonb_set(pg_temp.valid_event(n), ARRAY[f], pg_temp.rand_json(3)) END
    FROM (SELECT random() AS r,
                 (ARRAY['specversion', 'id', 'source', 'type', 'subject', 'time', 'data', 'data'])[1 + floor(random() * 8)::int] AS f) x
$$;

-- meters with paths of every shape read the fuzzed data during ingestion
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('fz-sum', 'fuzz', 'SUM', '$.v', '{"k": "$.k", "deep": "$.**.v", "any": "$.*"}'),
  ('fz-max', 'fuzz', 'MAX', '$.v * 2', '{"sz": "$.size()", "t": "$.v.type()"}'),
  ('fz-avg', 'fuzz', 'AVG', '$.v / 0', '{"f": "$.v ? (@ > 10)"}'),
  ('fz-uniq', 'fuzz', 'UNIQUE_COUNT', '$.v.keyvalue()', '{"n": "$.v.floor()", "s": "$.v ? (@ like_regex \"^a.*\" flag \"i\")"}'),
  ('fz-last', 'fuzz', 'LATEST', 'strict $.v.double()', '{"c": "$.v.ceiling()", "a": "$.v.abs()"}'),
  ('fz-count', 'fuzz', 'COUNT', NULL, '{"first": "$.v[0]", "last": "$.v[last]", "range": "$.v[1 to 3]"}');

-- 1. single events
CREATE TEMP TABLE outcomes (kind text, input jsonb, sqlstate text, message text);
DO $$
DECLARE
  ev jsonb;
BEGIN
  FOR n IN 1 .. 3000 LOOP
    ev := pg_temp.mutated_event(n);
    BEGIN
      PERFORM metering.ingest(ev);
      INSERT INTO outcomes VALUES ('event', ev, NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO outcomes VALUES ('event', ev, SQLSTATE, SQLERRM);
    END;
  END LOOP;
END $$;
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok'))
             FROM outcomes WHERE kind = 'event'),
          ARRAY['22023', 'ok'],
          'mutated events are stored or rejected with 22023, nothing else');
SELECT ok((SELECT count(*) FROM outcomes WHERE kind = 'event' AND sqlstate IS NULL) > 500
          AND (SELECT count(*) FROM outcomes WHERE kind = 'event' AND sqlstate IS NOT NULL) > 500,
          'the fuzzer produced both valid and invalid events');
SELECT is((SELECT count(*) FROM outcomes WHERE kind = 'event' AND sqlstate IS NOT NULL
             AND message !~ '^event(:| must)'),
          0::bigint, 'every rejection names the event and its field');

-- 2. batches of five with one mutated event: all or nothing, and the
-- error names the mutated index
DO $$
DECLARE
  batch jsonb;
  pos integer;
  before bigint;
  after bigint;
BEGIN
  FOR n IN 1 .. 600 LOOP
    pos := floor(random() * 5)::int;
    batch := (SELECT jsonb_agg(CASE WHEN i = pos THEN pg_temp.mutated_event(10000 + n * 5 + i)
                                    ELSE pg_temp.valid_event(10000 + n * 5 + i) END ORDER BY i)
                FROM generate_series(0, 4) i);
    SELECT count(*) INTO before FROM metering.events;
    BEGIN
      PERFORM metering.ingest_batch(batch);
      INSERT INTO outcomes VALUES ('batch', batch, NULL, pos::text);
    EXCEPTION WHEN OTHERS THEN
      SELECT count(*) INTO after FROM metering.events;
      INSERT INTO outcomes VALUES ('batch', batch, SQLSTATE,
        CASE WHEN after <> before THEN 'ROWS LEFT BEHIND: ' ELSE '' END
        || CASE WHEN SQLERRM LIKE 'event ' || pos || '%' THEN 'index ok' ELSE SQLERRM END);
    END;
  END LOOP;
END $$;
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok'))
             FROM outcomes WHERE kind = 'batch'),
          ARRAY['22023', 'ok'], 'mutated batches are stored or rejected with 22023');
SELECT is((SELECT array_agg(DISTINCT message) FROM outcomes WHERE kind = 'batch' AND sqlstate IS NOT NULL),
          ARRAY['index ok'], 'a rejected batch stores nothing and names the bad event''s index');

-- 3. the rollups of all those meters equal a recomputation from the events
DO $$ BEGIN PERFORM metering.refresh_rollups(); END $$;
SELECT is((SELECT count(*) FROM (
             SELECT m.slug, e.subject, date_trunc('hour', e.time, 'UTC'), metering._meter_groups(e.data, m.group_by), count(*)
               FROM metering.events e JOIN metering.meters m ON m.event_type = e.type
              GROUP BY 1, 2, 3, 4
             EXCEPT
             SELECT meter, subject, bucket, groups, events FROM metering.meter_rollups) d),
          0::bigint, 'rollups over fuzzed data match the events');
SELECT lives_ok($$SELECT count(*) FROM metering.meters m, metering.query_meter(m.slug, window_size => 'MINUTE',
                                                     group_by => ARRAY(SELECT jsonb_object_keys(m.group_by)))$$,
                'every meter answers queries over fuzzed data');

-- 4. RFC 3339: random strings and near-misses never raise, and what parses
-- agrees with PostgreSQL's own reading of the same text
CREATE TEMP TABLE stamps AS
  SELECT s, metering._rfc3339(s) AS parsed
    FROM (SELECT CASE WHEN r < 0.3 THEN pg_temp.rand_text()
                      WHEN r < 0.5 THEN good
                      WHEN r < 0.8 THEN pg_temp.mutate(good)
                      ELSE pg_temp.mutate(pg_temp.mutate(good)) END AS s
            FROM (SELECT random() AS r,
                         to_char(timestamptz '2000-01-01' + random() * interval '40 years', 'YYYY-MM-DD"T"HH24:MI:SS.US')
                         || (ARRAY['Z', '+05:30', '-08:00', 'z'])[1 + floor(random() * 4)::int] AS good
                    FROM generate_series(1, 5000)) g) x;
SELECT ok((SELECT count(*) FROM stamps WHERE parsed IS NOT NULL) > 100, 'some mutated timestamps are still valid');
SELECT is((SELECT count(*) FROM stamps WHERE parsed IS NOT NULL AND parsed <> replace(upper(s), 'Z', '+00:00')::timestamptz),
          0::bigint, 'accepted RFC 3339 texts mean what timestamptz_in says they mean');

-- 5. the clock setting takes any text without crashing
DO $$
BEGIN
  FOR n IN 1 .. 500 LOOP
    BEGIN
      PERFORM set_config('metering.now', CASE WHEN random() < 0.5 THEN pg_temp.rand_text()
                                              ELSE pg_temp.mutate('2024-06-01 12:00:00+00') END, true);
      INSERT INTO outcomes VALUES ('clock', NULL, NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO outcomes VALUES ('clock', NULL, SQLSTATE, SQLERRM);
    END;
  END LOOP;
END $$;
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind = 'clock'),
          ARRAY['22023', 'ok'], 'metering.now accepts a timestamp or says 22023');
SET LOCAL metering.now = '2024-06-01 12:00:00+00';

-- 6. BatchMeterUsage bodies with one random change
INSERT INTO metering.products (product_code) VALUES ('fz');
INSERT INTO metering.product_dimensions (product_code, dimension) VALUES ('fz', 'd');
INSERT INTO metering.customers (customer_identifier, product_code, customer_aws_account_id, subscribed_at)
VALUES ('c', 'fz', '123', '2024-01-01');
CREATE FUNCTION pg_temp.valid_record(n integer) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_build_object('CustomerIdentifier', 'c', 'Dimension', 'd', 'Quantity', 3,
                            'Timestamp', to_char(timestamptz '2024-06-01 11:00:00+00' - (n % 20) * interval '1 hour', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                            'UsageAllocations', jsonb_build_array(
                              jsonb_build_object('AllocatedUsageQuantity', 1, 'Tags', jsonb_build_array(jsonb_build_object('Key', 'a', 'Value', 'x'))),
                              jsonb_build_object('AllocatedUsageQuantity', 2, 'Tags', jsonb_build_array(jsonb_build_object('Key', 'a', 'Value', 'y')))))
$$;
DO $$
DECLARE
  body jsonb;
  path text[];
  before bigint;
  after bigint;
BEGIN
  FOR n IN 1 .. 1500 LOOP
    body := jsonb_build_object('ProductCode', 'fz', 'UsageRecords',
                               jsonb_build_array(pg_temp.valid_record(n), pg_temp.valid_record(n + 7)));
    path := (ARRAY['{ProductCode}', '{UsageRecords}', '{UsageRecords,0}',
                   '{UsageRecords,1,CustomerIdentifier}', '{UsageRecords,0,Dimension}',
                   '{UsageRecords,1,Quantity}', '{UsageRecords,0,Timestamp}',
                   '{UsageRecords,1,UsageAllocations}', '{UsageRecords,0,UsageAllocations,1,Tags}',
                   '{UsageRecords,0,UsageAllocations,0,Tags,0,Value}',
                   '{UsageRecords,1,UsageAllocations,1,AllocatedUsageQuantity}'])[1 + floor(random() * 11)::int]::text[];
    body := CASE WHEN random() < 0.15 THEN body #- path ELSE jsonb_set(body, path, pg_temp.rand_json(2)) END;
    SELECT count(*) INTO before FROM metering.usage_records;
    BEGIN
      PERFORM metering.batch_meter_usage(body);
      INSERT INTO outcomes VALUES ('aws', body, NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
      SELECT count(*) INTO after FROM metering.usage_records;
      INSERT INTO outcomes VALUES ('aws', body, SQLSTATE, CASE WHEN after <> before THEN 'ROWS LEFT BEHIND' END);
    END;
  END LOOP;
END $$;
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind = 'aws'),
          ARRAY['22003', '22023', 'ok'], 'mutated BatchMeterUsage bodies succeed or fail with 22003 or 22023');
SELECT is((SELECT count(*) FROM outcomes WHERE kind = 'aws' AND message = 'ROWS LEFT BEHIND'),
          0::bigint, 'a rejected BatchMeterUsage body stores nothing');

-- 7. meter definitions: random slugs, paths and group_by bodies
DO $$
DECLARE
  gb jsonb;
BEGIN
  FOR n IN 1 .. 800 LOOP
    gb := CASE WHEN random() < 0.3 THEN pg_temp.rand_json(2)
               ELSE jsonb_build_object(pg_temp.rand_text(), CASE WHEN random() < 0.5 THEN to_jsonb(pg_temp.mutate('$.a.b[0]'))
                                                                 ELSE pg_temp.rand_json(1) END) END;
    BEGIN
      INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
      VALUES (CASE WHEN random() < 0.5 THEN 'fm' || n ELSE pg_temp.rand_text() END,
              CASE WHEN random() < 0.9 THEN 'fuzz' ELSE pg_temp.rand_text() END,
              (enum_range(NULL::metering.aggregation))[1 + floor(random() * 7)::int],
              CASE WHEN random() < 0.8 THEN pg_temp.mutate('$.v ? (@ > 1)') END::jsonpath, gb);
      INSERT INTO outcomes VALUES ('meter', gb, NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO outcomes VALUES ('meter', gb, SQLSTATE, SQLERRM);
    END;
  END LOOP;
END $$;
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind = 'meter'),
          ARRAY['22023', '42601', 'ok'], 'meter definitions are accepted, or refused with 22023 (42601 for JSONPath syntax)');

-- 8. query_meter arguments: windows, zones, group names and filters
DO $$
DECLARE
  f jsonb;
BEGIN
  FOR n IN 1 .. 800 LOOP
    f := CASE WHEN random() < 0.5 THEN pg_temp.rand_json(2)
              ELSE jsonb_build_object((ARRAY['k', 'deep', 'any', pg_temp.rand_text()])[1 + floor(random() * 4)::int],
                                      pg_temp.rand_json(1)) END;
    BEGIN
      PERFORM count(*) FROM metering.query_meter(
        (ARRAY['fz-sum', 'fz-max', 'fz-uniq', 'nope'])[1 + floor(random() * 4)::int],
        CASE WHEN random() < 0.8 THEN timestamptz '2024-06-01 09:00:00+00' + random() * interval '3 hours' END,
        CASE WHEN random() < 0.8 THEN timestamptz '2024-06-01 10:00:00+00' + random() * interval '3 hours' END,
        (ARRAY['MINUTE', 'hour', 'DAY', NULL, pg_temp.rand_text()])[1 + floor(random() * 5)::int],
        (ARRAY['UTC', 'Asia/Kolkata', 'America/New_York', '+05:30', 'EST5EDT', pg_temp.rand_text()])[1 + floor(random() * 6)::int],
        CASE WHEN random() < 0.3 THEN ARRAY['acme', pg_temp.rand_text()] END,
        CASE WHEN random() < 0.5 THEN ARRAY[(ARRAY['k', 'deep', pg_temp.rand_text()])[1 + floor(random() * 3)::int]] END,
        CASE WHEN random() < 0.6 THEN f END);
      INSERT INTO outcomes VALUES ('query', f, NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO outcomes VALUES ('query', f, SQLSTATE, SQLERRM);
    END;
  END LOOP;
END $$;
SELECT is((SELECT array_agg(DISTINCT coalesce(sqlstate, 'ok') ORDER BY coalesce(sqlstate, 'ok')) FROM outcomes WHERE kind = 'query'),
          ARRAY['22023', 'P0002', 'ok'], 'query_meter answers, or refuses its arguments with 22023 (P0002 for an unknown meter)');

-- 9. MeterUsage allocations, tokens and nonces as text
INSERT INTO metering.product_dimensions (product_code, dimension) VALUES ('fz', 'd2');
DO $$
DECLARE
  a jsonb;
BEGIN
  FOR n IN 1 .. 600 LOOP
    a := CASE WHEN random() < 0.4 THEN pg_temp.rand_json(3)
              ELSE jsonb_build_array(jsonb_build_object('AllocatedUsageQuantity', 3,
                     'Tags', jsonb_build_array(jsonb_build_object(
                               'Key', CASE WHEN random() < 0.5 THEN 'team' ELSE pg_temp.rand_text() END,
                               'Value', CASE WHEN random() < 0.5 THEN pg_temp.mutate('dev-1') ELSE pg_temp.rand_text() END)))) END;
    BEGIN
      PERFORM metering.meter_usage('fz', 'c', timestamptz '2024-06-01 11:00:00+00' - (n % 5) * interval '1 hour', 'd2', 3, a, true);
      INSERT INTO outcomes VALUES ('allocation', a, NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO outcomes VALUES ('allocation', a, SQLSTATE, SQLERRM);
    END;
    BEGIN
      PERFORM metering.resolve_customer(pg_temp.rand_text());
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO outcomes VALUES ('token', NULL, SQLSTATE, SQLERRM);
    END;
    BEGIN
      PERFORM metering.register_usage('fz', 'c', 1, pg_temp.rand_text());
      INSERT INTO outcomes VALUES ('nonce', NULL, NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO outcomes VALUES ('nonce', NULL, SQLSTATE, SQLERRM);
    END;
  END LOOP;
END $$;
SELECT is((SELECT array_agg(DISTINCT kind || ':' || coalesce(sqlstate, 'ok') ORDER BY kind || ':' || coalesce(sqlstate, 'ok'))
             FROM outcomes WHERE kind IN ('allocation', 'token', 'nonce')),
          ARRAY['allocation:22023', 'allocation:ok', 'nonce:22023', 'nonce:ok', 'token:22023'],
          'allocations, registration tokens and nonces are accepted or refused with 22023');

SELECT * FROM finish();
ROLLBACK;
