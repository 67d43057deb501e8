-- ThousandEyes-style units usage: per account group and consumer, shared
-- usage distributed by its allocations, projected to the month's end, paged.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-16 00:00:00+00';
INSERT INTO metering.subjects (key) VALUES ('org');
INSERT INTO metering.subjects (key, parent_key) VALUES ('eu', 'org'), ('us', 'org');
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('units', 'test', 'SUM', '$.units', '{"test": "$.test", "agent": "$.agent"}');
SELECT count(*) AS ingested FROM (SELECT metering.ingest(regress.ev(id, s, 'test', t, d::jsonb)) FROM (VALUES
  ('u1', 'eu', '2024-06-02T10:00:00Z', '{"units": 10, "test": "http", "agent": "a1"}'),
  ('u2', 'eu', '2024-06-03T10:00:00Z', '{"units": 5, "test": "dns", "agent": "a1"}'),
  ('u3', 'us', '2024-06-03T11:00:00Z', '{"units": 7, "test": "http", "agent": "a2"}'),
  -- shared: sent by org, caused by eu (6) and us (3); 1 unit left untagged stays with org
  ('u4', 'org', '2024-06-04T10:00:00Z', '{"units": 10, "test": "http", "allocations": [
      {"AllocatedUsageQuantity": 6, "Tags": [{"Key": "account_group", "Value": "eu"}]},
      {"AllocatedUsageQuantity": 3, "Tags": [{"Key": "account_group", "Value": "us"}, {"Key": "team", "Value": "x"}]},
      {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "team", "Value": "y"}]}]}'),
  ('u5', 'eu', '2024-05-31T23:00:00Z', '{"units": 100, "test": "http"}')) v(id, s, t, d)) x;

-- this month to now (half of June): used, and projected to June's end
SELECT jsonb_pretty(metering.units_usage('units'));
-- one account group; an explicit range that ends with the month needs no projection
SELECT b ->> 'accountGroup' AS account_group, b ->> 'consumer' AS consumer, b -> 'used' AS used, b -> 'projected' AS projected
  FROM jsonb_array_elements(metering.units_usage('units', '2024-06-01', '2024-07-01', 'eu') -> 'breakdowns') b;
-- paging: the next link carries a signed cursor; the last page has none
CREATE FUNCTION pg_temp.walk(size int) RETURNS TABLE(pages int, rows int, keys text) LANGUAGE plpgsql AS $$
DECLARE
  r jsonb := metering.units_usage('units', page_size => size);
  k text[] := '{}';
BEGIN
  pages := 0;
  LOOP
    pages := pages + 1;
    k := k || ARRAY(SELECT (b ->> 'accountGroup') || '/' || coalesce(b ->> 'consumer', '-') FROM jsonb_array_elements(r -> 'breakdowns') b);
    EXIT WHEN NOT (r -> '_links' ? 'next');
    r := metering.units_usage(NULL, cursor => split_part(r -> '_links' -> 'next' ->> 'href', '&cursor=', 2));
  END LOOP;
  rows := cardinality(k);
  keys := array_to_string(k, ',');
  RETURN NEXT;
END $$;
SELECT * FROM pg_temp.walk(2);
SELECT * FROM pg_temp.walk(100);
SELECT metering.units_usage('units', page_size => 2) -> '_links' -> 'self' AS self;
-- errors
SELECT regress.err(s) FROM unnest(ARRAY[
  $$SELECT metering.units_usage('nope')$$,
  $$SELECT metering.units_usage(NULL)$$,
  $$SELECT metering.units_usage('units', '2024-06-10', '2024-06-01')$$,
  $$SELECT metering.units_usage('units', page_size => 0)$$,
  $$SELECT metering.units_usage('units', cursor => 'forged.cursor')$$]) s;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('peak', 'test', 'MAX', '$.units');
SELECT regress.err($$SELECT metering.units_usage('peak')$$);

-- allocations that do not add up to the value: the rest stays with the
-- subject, so that the rows add up to the meter's value
SELECT metering.ingest(regress.ev('u6', 'org', 'test', '2024-06-05T10:00:00Z',
  '{"units": 10, "test": "tcp", "allocations": [{"AllocatedUsageQuantity": 4, "Tags": [{"Key": "account_group", "Value": "us"}]}]}')) AS ingested;
SELECT b ->> 'accountGroup' AS account_group, b -> 'used' AS used
  FROM jsonb_array_elements(metering.units_usage('units', '2024-06-05', '2024-06-06') -> 'breakdowns') b;
SELECT (SELECT sum((b ->> 'used')::numeric) FROM jsonb_array_elements(metering.units_usage('units', '2024-06-01', '2024-06-16') -> 'breakdowns') b)
     = (SELECT sum(value) FROM metering.query_meter('units', '2024-06-01', '2024-06-16')) AS adds_up;
-- a COUNT meter counts events, once each, whatever their allocations
INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('tests', 'test', 'COUNT');
SELECT b ->> 'accountGroup' AS account_group, b -> 'used' AS used
  FROM jsonb_array_elements(metering.units_usage('tests', '2024-06-01', '2024-06-16') -> 'breakdowns') b;
-- links are percent-encoded
INSERT INTO metering.subjects (key, parent_key) VALUES ('r&d team', 'org');
SELECT metering.units_usage('units', '2024-06-01', '2024-06-16', 'r&d team') -> '_links' -> 'self' AS self;
-- one function's cursor is not another's
SELECT regress.err(format('SELECT metering.search_usage(%L)', jsonb_build_object('cursor',
  split_part(metering.units_usage('units', page_size => 1) -> '_links' -> 'next' ->> 'href', '&cursor=', 2))));
-- what a cursor carries is checked as arguments are (anyone may sign one); times are of the years 1 to 9999
SELECT regress.err(format('SELECT metering.units_usage(NULL, cursor => %L)', metering._sign_cursor(p)))
  FROM unnest(ARRAY['{"kind": "units_usage", "q": {"meter": "units", "from": "garbage", "to": "2024-06-10", "size": 5}}',
                    '{"kind": "units_usage", "q": {"meter": "units", "from": "2024-06-01", "to": 1e20, "size": 5}}',
                    '{"kind": "units_usage", "q": {"meter": "units", "from": "2024-06-01", "to": "2024-06-10", "size": "x"}}',
                    '{"kind": "units_usage", "q": {"meter": "units", "from": "2024-06-01", "to": "2024-06-10", "size": 1e20}}',
                    '{"kind": "units_usage", "q": "units"}']::jsonb[]) p;
SELECT jsonb_array_length(metering.units_usage(NULL, cursor => metering._sign_cursor(
  '{"kind": "units_usage", "q": {"meter": "units", "from": "2024-06-01", "to": "2024-06-10", "size": 2.0}}')) -> 'breakdowns') AS rows_of_size_2;
SELECT regress.err(s) FROM unnest(ARRAY[
  $$SELECT metering.units_usage('units', '4714-11-24 00:00:00+00 BC', '2024-06-01')$$,
  $$SELECT metering.units_usage('units', '9999-12-01', '10000-01-02')$$,
  $$SELECT metering.usage_overview('eu', 'units', '0001-01-01 00:00:00+00 BC')$$]) s;
