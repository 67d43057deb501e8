-- query_meter: windows, time zones, ranges, groups and filters.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-12-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by)
VALUES ('calls', 'api', 'SUM', '$.n', '{"region": "$.region", "plan": "$.plan"}');

SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('1', 'acme', 'api', '2024-03-09T04:59:00Z', '{"n": 1, "region": "us", "plan": "pro"}'),
  regress.ev('2', 'acme', 'api', '2024-03-09T05:00:00Z', '{"n": 2, "region": "us", "plan": "pro"}'),
  regress.ev('3', 'acme', 'api', '2024-03-10T04:59:59Z', '{"n": 4, "region": "eu", "plan": "pro"}'),
  regress.ev('4', 'acme', 'api', '2024-03-10T05:00:00Z', '{"n": 8, "region": "eu", "plan": "free"}'),
  regress.ev('5', 'acme', 'api', '2024-03-11T03:59:00Z', '{"n": 16, "region": "us", "plan": "free"}'),
  regress.ev('6', 'acme', 'api', '2024-03-11T04:00:00Z', '{"n": 32, "region": "ap", "plan": "pro"}'),
  regress.ev('7', 'beta', 'api', '2024-03-10T12:30:00Z', '{"n": 64, "region": "us"}'),
  regress.ev('8', 'beta', 'api', '2024-03-10T12:45:30Z', '{"n": 128, "region": "us"}')));

-- no window size: one row per subject for [from_time, to_time)
SELECT * FROM metering.query_meter('calls', '2024-03-09T00:00:00Z', '2024-03-12T00:00:00Z');
-- a NULL bound is the first (or last) event instant covered
SELECT * FROM metering.query_meter('calls');
SELECT * FROM metering.query_meter('calls', from_time => '2024-03-10T00:00:00Z');
-- ranges are half-open: an event at from_time counts, one at to_time does not
SELECT subject, value FROM metering.query_meter('calls', '2024-03-09T05:00:00Z', '2024-03-10T05:00:00Z');
SELECT subject, value FROM metering.query_meter('calls', '2024-03-10T05:00:00Z', '2024-03-10T05:00:00Z');

-- UTC days; days without events have no row
SELECT * FROM metering.query_meter('calls', '2024-03-01T00:00:00Z', '2024-04-01T00:00:00Z', 'DAY');
-- New York days start at local midnight: 2024-03-10 is 23 hours long
SELECT window_start, window_end, window_end - window_start AS length, subject, value
  FROM metering.query_meter('calls', '2024-03-01T00:00:00Z', '2024-04-01T00:00:00Z', 'DAY', 'America/New_York');
-- and 2024-11-03 is 25 hours long
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('f1', 'acme', 'api', '2024-11-03T04:00:00Z', '{"n": 1}'),
  regress.ev('f2', 'acme', 'api', '2024-11-04T04:59:59Z', '{"n": 2}'),
  regress.ev('f3', 'acme', 'api', '2024-11-04T05:00:00Z', '{"n": 4}')));
SELECT window_start, window_end, window_end - window_start AS length, value
  FROM metering.query_meter('calls', '2024-11-01T00:00:00Z', '2024-11-06T00:00:00Z', 'DAY', 'America/New_York');
-- a zone half an hour off UTC: days start at 18:30 UTC
SELECT window_start, window_end, subject, value
  FROM metering.query_meter('calls', '2024-03-09T00:00:00Z', '2024-03-12T00:00:00Z', 'DAY', 'Asia/Kolkata');
SELECT window_start, window_end, subject, value
  FROM metering.query_meter('calls', '2024-03-10T12:00:00Z', '2024-03-10T14:00:00Z', 'HOUR', 'Asia/Kolkata');

-- hours, with partial hours at both ends of the range
SELECT window_start, window_end, subject, value
  FROM metering.query_meter('calls', '2024-03-10T04:59:59Z', '2024-03-10T12:45:31Z', 'HOUR');
SELECT window_start, window_end, subject, value
  FROM metering.query_meter('calls', '2024-03-10T12:40:00Z', '2024-03-10T12:50:00Z', 'MINUTE');
-- window sizes are case-insensitive
SELECT count(*) FROM metering.query_meter('calls', window_size => 'hour');

-- the session's time zone changes nothing
SET timezone = 'Asia/Tokyo';
SELECT window_start AT TIME ZONE 'UTC' AS start_utc, subject, value
  FROM metering.query_meter('calls', '2024-03-09T00:00:00Z', '2024-03-12T00:00:00Z', 'DAY');
SET timezone = 'UTC';

-- subjects, group_by and filter_group_by
SELECT subject, value FROM metering.query_meter('calls', subjects => '{beta}');
SELECT subject, value FROM metering.query_meter('calls', subjects => '{nobody}');
SELECT subject, group_by, value FROM metering.query_meter('calls', group_by => '{region}') ORDER BY 1, 2;
SELECT subject, group_by, value FROM metering.query_meter('calls', group_by => '{region,plan}') ORDER BY 1, 2;
SELECT subject, group_by, value FROM metering.query_meter('calls', filter_group_by => '{"region": "eu"}');
SELECT subject, group_by, value FROM metering.query_meter('calls', group_by => '{plan}',
                                                          filter_group_by => '{"region": ["us", "ap"]}') ORDER BY 1, 2;
SELECT subject, group_by, value FROM metering.query_meter('calls', filter_group_by => '{"region": "us", "plan": "free"}');
SELECT window_start, subject, group_by, value
  FROM metering.query_meter('calls', '2024-03-09T00:00:00Z', '2024-03-12T00:00:00Z', 'DAY', 'UTC',
                            '{acme}', '{region}', '{"plan": "pro"}');

-- bad arguments
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', window_size => 'WEEK')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', window_time_zone => 'Mars/Olympus')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', window_time_zone => NULL)$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', '2024-03-10', '2024-03-09')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', group_by => '{country}')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', group_by => ARRAY[NULL])$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', filter_group_by => '{"country": "fr"}')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', filter_group_by => '["region"]')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', filter_group_by => '{"region": {"in": "us"}}')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', filter_group_by => '{"region": [["us"]]}')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter('calls', filter_group_by => '{"region": null}')$$);
SELECT regress.err($$SELECT * FROM metering.query_meter(NULL)$$);

-- after a refresh the answers come mostly from rollups, and are the same
SELECT metering.refresh_rollups() AS rolled_up;
SELECT window_start, window_end, window_end - window_start AS length, subject, value
  FROM metering.query_meter('calls', '2024-03-01T00:00:00Z', '2024-04-01T00:00:00Z', 'DAY', 'America/New_York');
SELECT window_start, window_end, subject, value
  FROM metering.query_meter('calls', '2024-03-09T00:00:00Z', '2024-03-12T00:00:00Z', 'DAY', 'Asia/Kolkata', '{acme}');
SELECT window_start, window_end, subject, value
  FROM metering.query_meter('calls', '2024-03-10T04:59:59Z', '2024-03-10T12:45:31Z', 'HOUR');
SELECT subject, group_by, value FROM metering.query_meter('calls', group_by => '{plan}',
                                                          filter_group_by => '{"region": ["us", "ap"]}') ORDER BY 1, 2;
