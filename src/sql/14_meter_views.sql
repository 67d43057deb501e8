-- Views over meters.

CREATE VIEW metering.meter_rejected_values AS
SELECT m.slug AS meter,
       coalesce(sum(r.events - r.valued), 0)::bigint AS events
  FROM metering.meters m
  LEFT JOIN metering.meter_rollups r ON r.meter = m.slug
 WHERE m.deleted_at IS NULL
 GROUP BY m.slug;
COMMENT ON VIEW metering.meter_rejected_values IS
  'per live meter, how many of its events it ignored because the value was missing (or, but for UNIQUE_COUNT, not a number)';
COMMENT ON COLUMN metering.meter_rejected_values.meter IS 'the meter slug';
COMMENT ON COLUMN metering.meter_rejected_values.events IS 'events ignored by the meter';
