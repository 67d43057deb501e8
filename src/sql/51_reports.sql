-- Reports for people and portals: the status of every entitlement, daily
-- usage, and the ThousandEyes-style overview of a billing cycle.

CREATE FUNCTION metering._calendar_index(anchor timestamptz, step interval, t timestamptz) RETURNS bigint
  AS 'MODULE_PATHNAME', 'metering_calendar_index'
  LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION metering._calendar_index(timestamptz, interval, timestamptz) IS
  'internal: the largest n with calendar_step(anchor, step, n) <= t';

CREATE VIEW metering.entitlement_status WITH (security_invoker = true) AS
SELECT e.subject, e.feature_key AS feature, e.type, v.has_access AS access, v.balance, v.usage, v.overage,
       v.start_of_period AS period_start,
       CASE WHEN e.type = 'metered' THEN metering._period_bound(e.id, metering.now(), true) END AS period_end,
       v.config, e.id AS entitlement_id
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

CREATE FUNCTION metering.usage_overview(subject text, meter text, at timestamptz DEFAULT NULL,
  OUT period_start timestamptz, OUT period_end timestamptz, OUT included numeric, OUT used numeric,
  OUT projected numeric)
LANGUAGE plpgsql STABLE AS $$
DECLARE
  t timestamptz := coalesce(at, metering.now());
  m metering.meters;
  ent uuid;
  filters jsonb;
  lower timestamptz;
  upper timestamptz;
  g record;
  refills bigint;
BEGIN
  IF subject IS NULL OR meter IS NULL THEN
    RAISE EXCEPTION 'usage_overview: subject and meter are required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT isfinite(t) THEN
    RAISE EXCEPTION 'usage_overview: at must be a finite time' USING ERRCODE = 'invalid_parameter_value';
  END IF;
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
    period_start := metering._period_bound(ent, t, false);
    period_end := metering._period_bound(ent, t, true);
    -- what the grants active in the cycle put in it: a recurring grant once per refill
    included := 0;
    FOR g IN SELECT * FROM metering.grants x WHERE x.entitlement_id = ent LOOP
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
  SELECT coalesce(sum(q.value), 0) INTO used
    FROM metering.query_meter(usage_overview.meter, period_start, t, NULL, 'UTC', ARRAY[usage_overview.subject], NULL,
                              filters) q;
  IF t > period_start THEN
    projected := trim_scale(used * extract(epoch FROM period_end - period_start) / extract(epoch FROM t - period_start));
  END IF;
END $$;
COMMENT ON FUNCTION metering.usage_overview(text, text, timestamptz) IS
  'ThousandEyes usage overview: the billing cycle containing `at` (the subject''s entitlement period on the meter, else the UTC calendar month), the units the grants include, the usage up to `at`, and the usage projected to the cycle''s end';
