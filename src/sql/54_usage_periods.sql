-- Usage per (meter, subject, UTC day, week and month), kept for search_usage.
--
-- Like the hourly rollups, and with their watermark, the rows hold the
-- partial aggregates of a meter's events up to metering.meter_rollup_state.
-- rolled_up_to: refresh_rollups() adds what it rolls up, the deletion of
-- events recomputes the periods they were in.  search_usage adds the events
-- above the watermark at query time, so its answers are exact whether the
-- periods are current or not.  UNIQUE_COUNT meters have no rows here (their
-- partial aggregates cannot be added up); search_usage reads their events.

CREATE TABLE metering.usage_periods (
  meter        text COLLATE "C" NOT NULL,
  subject      text COLLATE "C" NOT NULL,
  kind         text NOT NULL,
  start_time   timestamptz NOT NULL,
  end_time     timestamptz NOT NULL,
  id           uuid NOT NULL,
  events       bigint NOT NULL,
  valued       bigint NOT NULL,
  sum          numeric,
  min          numeric,
  max          numeric,
  latest_time  timestamptz,
  latest_value numeric,
  PRIMARY KEY (meter, subject, kind, start_time)
);
-- search pages in (startTime, id) order, for everyone or for given subjects
CREATE INDEX usage_periods_start_idx ON metering.usage_periods (start_time, id);
CREATE INDEX usage_periods_subject_idx ON metering.usage_periods (subject, start_time, id);
COMMENT ON TABLE metering.usage_periods IS
  'derived: per meter, subject and UTC day, week (from Monday) and month, the partial aggregates of its events up to the meter''s rollup watermark (not UNIQUE_COUNT meters); written by refresh_rollups() and event deletion, never by hand; read by search_usage';
COMMENT ON COLUMN metering.usage_periods.meter IS 'the meter slug';
COMMENT ON COLUMN metering.usage_periods.subject IS 'the event subject';
COMMENT ON COLUMN metering.usage_periods.kind IS 'DAILY, WEEKLY or MONTHLY';
COMMENT ON COLUMN metering.usage_periods.start_time IS 'start of the period (UTC)';
COMMENT ON COLUMN metering.usage_periods.end_time IS 'end of the period: the start of the next one';
COMMENT ON COLUMN metering.usage_periods.id IS 'the search result id of the period';
COMMENT ON COLUMN metering.usage_periods.events IS 'events in the period';
COMMENT ON COLUMN metering.usage_periods.valued IS 'events whose value the meter could use';
COMMENT ON COLUMN metering.usage_periods.sum IS 'sum of the values';
COMMENT ON COLUMN metering.usage_periods.min IS 'smallest value';
COMMENT ON COLUMN metering.usage_periods.max IS 'largest value';
COMMENT ON COLUMN metering.usage_periods.latest_time IS 'time of the latest valued event';
COMMENT ON COLUMN metering.usage_periods.latest_value IS 'its value (the largest of those at that time)';

CREATE FUNCTION metering._usage_period_end(kind text, start_time timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
  -- in UTC wall-clock time: in the session's zone a day may have 23 hours
  SELECT ((start_time AT TIME ZONE 'UTC') + CASE kind WHEN 'DAILY' THEN interval '1 day' WHEN 'WEEKLY' THEN interval '7 days'
                                                      ELSE interval '1 month' END) AT TIME ZONE 'UTC';
END;
COMMENT ON FUNCTION metering._usage_period_end(text, timestamptz) IS 'internal: the end of a usage period (the next one''s start)';

-- The three periods an instant is in.
CREATE FUNCTION metering._usage_periods_of(t timestamptz) RETURNS TABLE(kind text, start_time timestamptz, end_time timestamptz)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
  -- truncated in UTC wall-clock time, whatever the session's zone; only in
  -- the years 1 to 9999, those of the reports (an event at 294276-12-31
  -- has no month to end in, and must not stop the refresh)
  SELECT k.kind, k.s AT TIME ZONE 'UTC', metering._usage_period_end(k.kind, k.s AT TIME ZONE 'UTC')
    FROM (SELECT t AT TIME ZONE 'UTC' AS u) x,
         LATERAL (VALUES ('DAILY', date_trunc('day', x.u)), ('WEEKLY', date_trunc('week', x.u)),
                         ('MONTHLY', date_trunc('month', x.u))) k(kind, s)
   WHERE metering._time_in_range(t);
END;
COMMENT ON FUNCTION metering._usage_periods_of(timestamptz) IS 'internal: the UTC day, week and month of an instant (none outside the years 1 to 9999)';

CREATE FUNCTION metering._usage_period_id(subject text, meter text, kind text, start_time timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
  -- (sha256, not md5: md5 is refused on FIPS builds)
  SELECT encode(substring(sha256(convert_to(subject || '|' || meter || '|' || kind || '|' || metering._search_format(start_time), 'UTF8'))
                          FROM 1 FOR 16), 'hex')::uuid;
END;
COMMENT ON FUNCTION metering._usage_period_id(text, text, text, timestamptz) IS
  'internal: the stable search result id of a (subject, meter, period)';

-- Recomputes a meter's periods from its rollups: all of them, or those of
-- the given (subject, instant) pairs.
CREATE FUNCTION metering._usage_periods_rebuild(meter text, subjects text[] DEFAULT NULL, times timestamptz[] DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  -- the touched periods, as three parallel arrays (NULL: all of them)
  t_subjects text[];
  t_kinds text[];
  t_starts timestamptz[];
BEGIN
  IF subjects IS NULL THEN
    DELETE FROM metering.usage_periods p WHERE p.meter = _usage_periods_rebuild.meter;
  ELSE
    SELECT array_agg(d.subject), array_agg(d.kind), array_agg(d.start_time) INTO t_subjects, t_kinds, t_starts
      FROM (SELECT DISTINCT x.subject, k.kind, k.start_time
              FROM unnest(subjects, times) x(subject, t) CROSS JOIN LATERAL metering._usage_periods_of(x.t) k) d;
    DELETE FROM metering.usage_periods p
     USING unnest(t_subjects, t_kinds, t_starts) k(subject, kind, start_time)
     WHERE p.meter = _usage_periods_rebuild.meter
       AND p.subject = k.subject AND p.kind = k.kind AND p.start_time = k.start_time;
  END IF;
  IF (SELECT m.aggregation FROM metering.meters m WHERE m.slug = _usage_periods_rebuild.meter) = 'UNIQUE_COUNT' THEN
    RETURN;
  END IF;
  -- Every period, from the rollups grouped by subject (on a Citus cluster
  -- each shard's own, where its rollups are); or each touched period from
  -- its own hours of rollups.  Two statements: Citus refuses a UNION of the
  -- two, whose second half joins a list of subjects.
  IF subjects IS NULL THEN
    INSERT INTO metering.usage_periods AS p
      (meter, subject, kind, start_time, end_time, id, events, valued, sum, min, max, latest_time, latest_value)
    SELECT _usage_periods_rebuild.meter, r.subject, k.kind, k.start_time, min(k.end_time),
           metering._usage_period_id(r.subject, _usage_periods_rebuild.meter, k.kind, k.start_time),
           sum(r.events), sum(r.valued), sum(r.sum), min(r.min), max(r.max),
           max(r.latest_time),
           (max(metering._latest_key(r.latest_time, r.latest_value)) FILTER (WHERE r.latest_time IS NOT NULL))[2]
      FROM metering.meter_rollups r CROSS JOIN LATERAL metering._usage_periods_of(r.bucket) k
     WHERE r.meter = _usage_periods_rebuild.meter
     GROUP BY r.subject, k.kind, k.start_time;
  ELSE
    INSERT INTO metering.usage_periods AS p
      (meter, subject, kind, start_time, end_time, id, events, valued, sum, min, max, latest_time, latest_value)
    SELECT _usage_periods_rebuild.meter, r.subject, t.kind, t.start_time, metering._usage_period_end(t.kind, t.start_time),
           metering._usage_period_id(r.subject, _usage_periods_rebuild.meter, t.kind, t.start_time),
           sum(r.events), sum(r.valued), sum(r.sum), min(r.min), max(r.max),
           max(r.latest_time),
           (max(metering._latest_key(r.latest_time, r.latest_value)) FILTER (WHERE r.latest_time IS NOT NULL))[2]
      FROM unnest(t_subjects, t_kinds, t_starts) t(subject, kind, start_time)
      JOIN metering.meter_rollups r
        ON r.meter = _usage_periods_rebuild.meter AND r.subject = t.subject
       AND r.bucket >= t.start_time AND r.bucket < metering._usage_period_end(t.kind, t.start_time)
     GROUP BY r.subject, t.kind, t.start_time;
  END IF;
END $$;
COMMENT ON FUNCTION metering._usage_periods_rebuild(text, text[], timestamptz[]) IS
  'internal: recomputes a meter''s usage periods (all, or those of the given subjects and instants) from its rollups';

-- refresh_rollups() calls this once it has rolled up a meter's events in
-- (from_seq, to_seq]: a few events are added in, many rebuild from the rollups.
CREATE FUNCTION metering._usage_periods_add(meter text, from_seq bigint, to_seq bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  m metering.meters;
BEGIN
  SELECT * INTO m FROM metering.meters x WHERE x.slug = _usage_periods_add.meter;
  IF NOT FOUND OR m.aggregation = 'UNIQUE_COUNT' THEN
    RETURN;
  END IF;
  IF to_seq - from_seq > 100000 THEN
    PERFORM metering._usage_periods_rebuild(m.slug);
    RETURN;
  END IF;
  INSERT INTO metering.usage_periods AS p
    (meter, subject, kind, start_time, end_time, id, events, valued, sum, min, max, latest_time, latest_value)
  SELECT m.slug, e.subject, k.kind, k.start_time, min(k.end_time),
         metering._usage_period_id(e.subject, m.slug, k.kind, k.start_time),
         count(*), count(x.v), sum(x.v), min(x.v), max(x.v),
         max(e.time) FILTER (WHERE x.v IS NOT NULL),
         (max(metering._latest_key(e.time, x.v)) FILTER (WHERE x.v IS NOT NULL))[2]
    FROM metering.events e
   CROSS JOIN LATERAL (SELECT CASE WHEN m.aggregation = 'COUNT' THEN NULL
                                   ELSE metering._meter_number(e.data, m.value_property) END AS v) x
   CROSS JOIN LATERAL metering._usage_periods_of(e.time) k
   WHERE e.type = m.event_type AND e.seq > from_seq AND e.seq <= to_seq
   GROUP BY e.subject, k.kind, k.start_time
  ON CONFLICT ON CONSTRAINT usage_periods_pkey DO UPDATE SET
    events = p.events + excluded.events,
    valued = p.valued + excluded.valued,
    sum = CASE WHEN p.sum IS NULL THEN excluded.sum WHEN excluded.sum IS NULL THEN p.sum ELSE p.sum + excluded.sum END,
    min = least(p.min, excluded.min),
    max = greatest(p.max, excluded.max),
    -- (new events without a value leave the latest as it is)
    latest_time = CASE WHEN p.latest_time IS NULL OR (excluded.latest_time IS NOT NULL AND
                       metering._latest_key(excluded.latest_time, excluded.latest_value) > metering._latest_key(p.latest_time, p.latest_value))
                       THEN excluded.latest_time ELSE p.latest_time END,
    latest_value = CASE WHEN p.latest_time IS NULL OR (excluded.latest_time IS NOT NULL AND
                        metering._latest_key(excluded.latest_time, excluded.latest_value) > metering._latest_key(p.latest_time, p.latest_value))
                        THEN excluded.latest_value ELSE p.latest_value END;
END $$;
COMMENT ON FUNCTION metering._usage_periods_add(text, bigint, bigint) IS
  'internal: adds a meter''s newly rolled-up events to its usage periods';

-- Deleted events: their periods are recomputed from the rollups, right after
-- the rollups of their hours, by the events_deleted trigger (rollup.c).
