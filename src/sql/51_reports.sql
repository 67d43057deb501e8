-- Reports for people and portals: the status of every entitlement, daily
-- usage, and the ThousandEyes-style overview of a billing cycle.

CREATE FUNCTION metering._calendar_index(anchor timestamptz, step interval, t timestamptz) RETURNS bigint
  AS 'MODULE_PATHNAME', 'metering_calendar_index'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._calendar_index(timestamptz, interval, timestamptz) IS
  'internal: the largest n with calendar_step(anchor, step, n) <= t';

-- (a distributed install's reads the entitlements first: distribute(),
-- 80_distribute.sql, replaces it; an update that changes it must replace
-- that one too)
CREATE VIEW metering.entitlement_status WITH (security_invoker = true) AS
SELECT e.subject, e.feature_key AS feature, e.type, v.has_access AS access, v.balance, v.usage, v.overage,
       v.start_of_period AS period_start,
       CASE WHEN e.type = 'metered' THEN metering._period_bound(e.id, e.subject, metering.now(), true) END AS period_end,
       v.config, e.id AS entitlement_id, v.reserved, v.available
  FROM metering.entitlements e
 CROSS JOIN LATERAL metering.entitlement_value(e.subject, e.id::text, metering.now()) v
 WHERE e.deleted_at IS NULL;
COMMENT ON VIEW metering.entitlement_status IS
  'every live entitlement as of metering.now(): access, balance, usage, overage and the current period';
COMMENT ON COLUMN metering.entitlement_status.subject IS 'the subject';
COMMENT ON COLUMN metering.entitlement_status.feature IS 'the feature key';
COMMENT ON COLUMN metering.entitlement_status.type IS 'metered, boolean or static';
COMMENT ON COLUMN metering.entitlement_status.access IS 'whether the subject may use the feature now';
COMMENT ON COLUMN metering.entitlement_status.balance IS 'metered: what the active grants hold';
COMMENT ON COLUMN metering.entitlement_status.usage IS 'metered: usage in the current period';
COMMENT ON COLUMN metering.entitlement_status.overage IS 'metered: usage no grant paid';
COMMENT ON COLUMN metering.entitlement_status.period_start IS 'metered: the current period''s start';
COMMENT ON COLUMN metering.entitlement_status.period_end IS 'metered: its end (exclusive)';
COMMENT ON COLUMN metering.entitlement_status.config IS 'static: the configuration';
COMMENT ON COLUMN metering.entitlement_status.entitlement_id IS 'the entitlement';
COMMENT ON COLUMN metering.entitlement_status.reserved IS 'metered: the amounts of the holds active now (metering.reserve)';
COMMENT ON COLUMN metering.entitlement_status.available IS 'metered: balance - reserved, what a new hold or consume may take';

CREATE VIEW metering.daily_usage WITH (security_invoker = true) AS
SELECT m.slug AS meter, q.subject, q.window_start AS day, q.window_end AS day_end, q.value
  FROM metering.meters m
 CROSS JOIN LATERAL metering.query_meter(m.slug, NULL, NULL, 'DAY', 'UTC') q
 WHERE m.deleted_at IS NULL;
COMMENT ON VIEW metering.daily_usage IS
  'each live meter''s value per subject and UTC day (days without usage have no row); filter on meter and day';
COMMENT ON COLUMN metering.daily_usage.meter IS 'the meter';
COMMENT ON COLUMN metering.daily_usage.subject IS 'the subject';
COMMENT ON COLUMN metering.daily_usage.day IS 'the UTC day''s start';
COMMENT ON COLUMN metering.daily_usage.day_end IS 'the next day''s start';
COMMENT ON COLUMN metering.daily_usage.value IS 'the meter''s value for the day';

-- Report times are instants of the years 1 to 9999, as everywhere in the
-- extension: calendar bounds around them stay representable.
CREATE FUNCTION metering._report_time(t timestamptz, what text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF t IS NULL OR NOT metering._time_in_range(t) THEN
    RAISE EXCEPTION '%: must be a finite time in the years 1 to 9999, got %', what, coalesce(t::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN t;
END $$;
COMMENT ON FUNCTION metering._report_time(timestamptz, text) IS 'internal: a report time, checked (22023 outside the years 1 to 9999)';

CREATE FUNCTION metering.usage_overview(subject text, meter text, at timestamptz DEFAULT NULL,
  OUT period_start timestamptz, OUT period_end timestamptz, OUT included numeric, OUT used numeric,
  OUT projected numeric)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t timestamptz := coalesce(at, metering.now());
  m metering.meters;
  ent uuid;
  filters jsonb;
  lower timestamptz;
  upper timestamptz;
  g record;
  refills bigint;
  day_from timestamptz;
  day_to timestamptz;
  hour_from timestamptz;
  hour_to timestamptz;
  head_from timestamptz;
  tail_to timestamptz;
  wm bigint;
BEGIN
  IF subject IS NULL OR meter IS NULL THEN
    RAISE EXCEPTION 'usage_overview: subject and meter are required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM metering._report_time(t, 'usage_overview: at');
  PERFORM metering._require_subject(usage_overview.subject);
  SELECT * INTO m FROM metering.meters x WHERE x.slug = usage_overview.meter AND x.deleted_at IS NULL;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'meter "%" does not exist', usage_overview.meter USING ERRCODE = 'no_data_found';
  END IF;
  -- the billing cycle: the usage period of the subject's entitlement on this meter
  SELECT n.id, f.meter_group_by_filters INTO ent, filters
    FROM metering.entitlements n JOIN metering.features f ON f.id = n.feature_id
   WHERE n.subject = usage_overview.subject AND f.meter_slug = usage_overview.meter AND n.type = 'metered'
     AND n.measure_usage_from <= t AND (n.deleted_at IS NULL OR n.deleted_at > t)
   ORDER BY n.created_at DESC, n.id DESC LIMIT 1;
  IF FOUND THEN
    period_start := metering._period_bound(ent, usage_overview.subject, t, false);
    period_end := metering._period_bound(ent, usage_overview.subject, t, true);
    -- what the grants active in the cycle put in it: a recurring grant once per refill
    included := 0;
    FOR g IN SELECT * FROM metering.grants x WHERE x.entitlement_id = ent AND x.subject = usage_overview.subject LOOP
      lower := greatest(period_start, g.effective_at);
      upper := least(period_end, g.expires_at, g.voided_at, g.deleted_at);
      CONTINUE WHEN upper IS NOT NULL AND upper <= lower;
      upper := coalesce(upper, period_end);
      refills := 1;
      IF g.recurrence IS NOT NULL THEN
        refills := metering._calendar_index(g.recurrence_anchor, g.recurrence, upper - interval '1 microsecond')
                 - metering._calendar_index(g.recurrence_anchor, g.recurrence, lower - interval '1 microsecond')
                 + CASE WHEN g.effective_at >= period_start
                         AND metering.calendar_step(g.recurrence_anchor, g.recurrence,
                               metering._calendar_index(g.recurrence_anchor, g.recurrence, g.effective_at)) <> g.effective_at
                        THEN 1 ELSE 0 END;
        refills := greatest(refills, 1);
      END IF;
      included := included + g.amount * refills;
    END LOOP;
  ELSE
    period_start := date_trunc('month', t, 'UTC');
    period_end := date_trunc('month', period_start + interval '32 days', 'UTC');
    included := NULL;
  END IF;
  -- SUM and COUNT add up, so without group filters the cycle is read from
  -- the coarsest parts that fit: kept days (usage_periods), rolled-up hours,
  -- the events of the partial hours at either end, and the events above the
  -- watermark; the same parts query_meter reads, without its planning
  IF m.aggregation IN ('SUM', 'COUNT') AND coalesce(filters, '{}') = '{}' THEN
    wm := coalesce((SELECT s.rolled_up_to FROM metering.meter_rollup_state s WHERE s.meter = m.slug), 0);
    -- whole hours [hour_from, hour_to), whole days [day_from, day_to) in them
    hour_from := date_trunc('hour', period_start, 'UTC');
    hour_from := CASE WHEN hour_from < period_start THEN hour_from + interval '1 hour' ELSE hour_from END;
    hour_to := date_trunc('hour', t, 'UTC');
    IF hour_from >= hour_to THEN
      hour_from := t;
      hour_to := t;
    END IF;
    day_from := date_trunc('day', hour_from, 'UTC');
    day_from := CASE WHEN day_from < hour_from THEN day_from + interval '1 day' ELSE day_from END;
    day_to := date_trunc('day', hour_to, 'UTC');
    IF day_from >= day_to THEN
      day_from := hour_to;
      day_to := hour_to;
    END IF;
    SELECT coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(p.sum, 0) ELSE p.events END), 0) INTO used
      FROM metering.usage_periods p
     WHERE p.meter = m.slug AND p.subject = usage_overview.subject AND p.kind = 'DAILY'
       AND p.start_time >= day_from AND p.start_time < day_to;
    SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(r.sum, 0) ELSE r.events END), 0) INTO used
      FROM metering.meter_rollups r
     WHERE r.meter = m.slug AND r.subject = usage_overview.subject
       AND ((r.bucket >= hour_from AND r.bucket < day_from) OR (r.bucket >= day_to AND r.bucket < hour_to));
    -- the partial hours at either end: their rolled-up hour when none of its
    -- events lies outside the cycle (at now, the usual case), else their
    -- events below the watermark
    head_from := period_start;
    tail_to := t;
    IF period_start < hour_from AND date_trunc('hour', hour_from, 'UTC') = hour_from AND NOT EXISTS (
         SELECT 1 FROM metering.meter_rollups r WHERE r.meter = m.slug AND r.subject = usage_overview.subject
            AND r.bucket = hour_from - interval '1 hour' AND r.first_time < period_start) THEN
      SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(r.sum, 0) ELSE r.events END), 0) INTO used
        FROM metering.meter_rollups r
       WHERE r.meter = m.slug AND r.subject = usage_overview.subject AND r.bucket = hour_from - interval '1 hour';
      head_from := hour_from;
    END IF;
    IF hour_to < t AND date_trunc('hour', t, 'UTC') = hour_to AND NOT EXISTS (
         SELECT 1 FROM metering.meter_rollups r WHERE r.meter = m.slug AND r.subject = usage_overview.subject
            AND r.bucket = hour_to AND r.last_time >= t) THEN
      SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(r.sum, 0) ELSE r.events END), 0) INTO used
        FROM metering.meter_rollups r
       WHERE r.meter = m.slug AND r.subject = usage_overview.subject AND r.bucket = hour_to;
      tail_to := hour_to;
    END IF;
    IF head_from < hour_from OR hour_to < tail_to THEN
      SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(metering._meter_number(e.data, m.value_property), 0)
                                      ELSE 1 END), 0) INTO used
        FROM metering.events e
       WHERE e.type = m.event_type AND e.subject = usage_overview.subject AND e.seq <= wm
         AND ((e.time >= head_from AND e.time < hour_from) OR (e.time >= hour_to AND e.time < tail_to));
    END IF;
    -- ...and every event above it (few: found by seq; the time is not an index condition)
    SELECT used + coalesce(sum(CASE WHEN m.aggregation = 'SUM' THEN coalesce(metering._meter_number(e.data, m.value_property), 0)
                                    ELSE 1 END), 0) INTO used
      FROM metering.events e
     WHERE e.type = m.event_type AND e.subject = usage_overview.subject AND e.seq > wm
       AND (e.time >= period_start AND e.time < t) IS TRUE;
  ELSE
    SELECT coalesce(sum(q.value), 0) INTO used
      FROM metering.query_meter(usage_overview.meter, period_start, t, NULL, 'UTC', ARRAY[usage_overview.subject], NULL,
                                filters) q;
  END IF;
  IF t > period_start THEN
    projected := trim_scale(used * extract(epoch FROM period_end - period_start) / extract(epoch FROM t - period_start));
  END IF;
END $$;
COMMENT ON FUNCTION metering.usage_overview(text, text, timestamptz) IS
  'ThousandEyes usage overview: the billing cycle containing `at` (the subject''s entitlement period on the meter, else the UTC calendar month), the units the grants include, the usage up to `at`, and the usage projected to the cycle''s end';
