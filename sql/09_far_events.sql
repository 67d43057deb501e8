-- Events far in the past or the future (timestamptz goes from 4713 BC to
-- 294276 AD) are stored and counted by meters; the reports' usage periods
-- cover the years 1 to 9999 only, and such an event never stops a refresh.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES
  ('far_sum', 'far', 'SUM', '$.v'), ('far_count', 'far', 'COUNT', NULL);
INSERT INTO metering.events (id, source, subject, type, time, data) VALUES
  ('late', 's', 'acme', 'far', '294276-12-31 00:00+00', '{"v": 1}'),
  ('now', 's', 'acme', 'far', '2024-01-01 00:00+00', '{"v": 2}'),
  ('early', 's', 'acme', 'far', '4713-01-01 00:00+00 BC', '{"v": 4}');
SELECT metering.refresh_rollups() AS rolled_up;
SELECT meter, rolled_up_to > 0 AS refreshed FROM metering.meter_rollup_state ORDER BY meter;
SELECT meter, kind, start_time, events FROM metering.usage_periods ORDER BY meter, kind;
SELECT window_start, window_end, value FROM metering.query_meter('far_sum');
SELECT value FROM metering.query_meter('far_count');
-- deleting the far event rebuilds its hour without tripping over it either
DELETE FROM metering.events WHERE id = 'late';
SELECT value FROM metering.query_meter('far_sum');
