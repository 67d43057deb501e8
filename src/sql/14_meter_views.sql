-- Views over meters.

CREATE VIEW metering.meter_rejected_values AS
SELECT m.slug AS meter,
       coalesce((SELECT sum(r.events - r.valued) FROM metering.meter_rollups r WHERE r.meter = m.slug), 0)::bigint
       + (SELECT count(*) FROM metering.events e
           WHERE e.type = m.event_type AND e.seq > coalesce(s.rolled_up_to, 0)
             AND NOT CASE m.aggregation
                       WHEN 'COUNT' THEN true
                       WHEN 'UNIQUE_COUNT' THEN metering._meter_text(e.data, m.value_property) IS NOT NULL
                       ELSE metering._meter_number(e.data, m.value_property) IS NOT NULL END) AS events
  FROM metering.meters m
  LEFT JOIN metering.meter_rollup_state s ON s.meter = m.slug
 WHERE m.deleted_at IS NULL;
COMMENT ON VIEW metering.meter_rejected_values IS
  'per live meter, how many of its events it ignored because the value was missing (or, but for UNIQUE_COUNT, not a number)';
COMMENT ON COLUMN metering.meter_rejected_values.meter IS 'the meter slug';
COMMENT ON COLUMN metering.meter_rejected_values.events IS 'events ignored by the meter';
