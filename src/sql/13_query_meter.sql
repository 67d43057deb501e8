-- Querying meters: values per window, subject and group.

CREATE TYPE metering.meter_value AS (
  window_start timestamptz,
  window_end   timestamptz,
  subject      text,
  group_by     jsonb,
  value        numeric
);
COMMENT ON TYPE metering.meter_value IS
  'one row of metering.query_meter: the meter''s value in [window_start, window_end) for a subject and group';

-- The start of the window containing instant `expr` (SQL text), for a
-- window size and a time zone placeholder; NULL window: the whole range.
CREATE FUNCTION metering._window_start_sql(window_size text, expr text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
  SELECT CASE WHEN window_size IS NULL THEN 'NULL::timestamptz'
              ELSE format('date_trunc(%L, %s, $6)', lower(window_size), expr) END;
END;
COMMENT ON FUNCTION metering._window_start_sql(text, text) IS
  'internal: SQL text of the window start of an instant';

-- The end of a window is the start of the next one, found by truncating an
-- instant safely inside it: this gives 23- and 25-hour days on DST changes.
CREATE FUNCTION metering._window_end_sql(window_size text, expr text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
  SELECT format('date_trunc(%L, %s + interval %L, $6)', lower(window_size), expr,
                CASE window_size WHEN 'MINUTE' THEN '90 seconds'
                                 WHEN 'HOUR' THEN '90 minutes'
                                 ELSE '36 hours' END);
END;
COMMENT ON FUNCTION metering._window_end_sql(text, text) IS
  'internal: SQL text of the end of the window starting at an instant';

CREATE FUNCTION metering.query_meter(
  meter text,
  from_time timestamptz DEFAULT NULL,
  to_time timestamptz DEFAULT NULL,
  window_size text DEFAULT NULL,
  window_time_zone text DEFAULT 'UTC',
  subjects text[] DEFAULT NULL,
  group_by text[] DEFAULT NULL,
  filter_group_by jsonb DEFAULT NULL)
RETURNS SETOF metering.meter_value
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  m metering.meters;
  w text := upper(window_size);
  names text[];
  drop_names text[];
  name text;
  filter_sql text := '';
  f record;
  vals text[];
  lo_h timestamptz;             -- rollups cover [lo_h, hi_h)
  hi_h timestamptz;
  use_rollups boolean;
  raw_where text;
  watermark bigint;
  raw_cols text;
  subject_sql text;
  straddles text;
  parts text[] := '{}';
  value_sql text;
  raw_value text;
  raw_valued text;
  raw_text text := 'NULL::text';
  sql text;
BEGIN
  SELECT * INTO m FROM metering.meters mm WHERE mm.slug = meter AND mm.deleted_at IS NULL;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'meter "%" does not exist', meter USING ERRCODE = 'no_data_found';
  END IF;
  IF w IS NOT NULL AND w NOT IN ('MINUTE', 'HOUR', 'DAY') THEN
    RAISE EXCEPTION 'window_size must be MINUTE, HOUR or DAY, not "%"', window_size
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF window_time_zone IS NULL OR NOT metering._valid_time_zone(window_time_zone) THEN
    RAISE EXCEPTION 'window_time_zone "%" is not a known time zone', window_time_zone
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use a name of pg_timezone_names, such as America/New_York.';
  END IF;
  IF from_time > to_time THEN
    RAISE EXCEPTION 'from_time (%) is after to_time (%)', from_time, to_time
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  names := ARRAY(SELECT jsonb_object_keys(m.group_by));
  FOREACH name IN ARRAY coalesce(group_by, '{}') LOOP
    IF name IS NULL OR NOT name = ANY (names) THEN
      RAISE EXCEPTION 'group_by "%" is not a group of meter "%"', name, m.slug
        USING ERRCODE = 'invalid_parameter_value',
              HINT = format('The meter groups by: %s.', coalesce(nullif(array_to_string(names, ', '), ''), 'nothing'));
    END IF;
  END LOOP;
  drop_names := ARRAY(SELECT unnest(names) EXCEPT SELECT unnest(group_by));

  IF filter_group_by IS NOT NULL THEN
    IF jsonb_typeof(filter_group_by) <> 'object' THEN
      RAISE EXCEPTION 'filter_group_by must be a JSON object such as {"name": "value"} or {"name": ["v1", "v2"]}'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR f IN SELECT key, value FROM jsonb_each(filter_group_by) LOOP
      IF NOT f.key = ANY (names) THEN
        RAISE EXCEPTION 'filter_group_by "%" is not a group of meter "%"', f.key, m.slug
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF jsonb_typeof(f.value) = 'array' THEN
        IF EXISTS (SELECT 1 FROM jsonb_array_elements(f.value) v
                    WHERE jsonb_typeof(v) IN ('array', 'object', 'null')) THEN
          RAISE EXCEPTION 'filter_group_by "%" must be a value or an array of values', f.key
            USING ERRCODE = 'invalid_parameter_value';
        END IF;
        vals := ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(f.value) v);
      ELSIF jsonb_typeof(f.value) IN ('string', 'number', 'boolean') THEN
        vals := ARRAY[f.value #>> '{}'];
      ELSE
        RAISE EXCEPTION 'filter_group_by "%" must be a value or an array of values', f.key
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      filter_sql := filter_sql || format(' AND (p.groups ->> %L) = ANY (%L::text[])', f.key, vals);
    END LOOP;
  END IF;

  -- Three regions, read in one statement so they share one snapshot:
  --   whole UTC hours of the range, from the rollups (events up to the
  --     meter's watermark), but for hours that straddle two windows (a time
  --     zone whose offset is not a whole hour at that moment);
  --   the same hours from the events: those above the watermark, and all
  --     of a straddling hour;
  --   the partial hours at either end, from the events.
  -- MINUTE windows and UNIQUE_COUNT read the events only.
  lo_h := CASE WHEN from_time IS NULL THEN '-infinity'
               ELSE date_trunc('hour', from_time, 'UTC')
                    + CASE WHEN date_trunc('hour', from_time, 'UTC') < from_time
                           THEN interval '1 hour' ELSE interval '0' END END;
  hi_h := CASE WHEN to_time IS NULL THEN 'infinity' ELSE date_trunc('hour', to_time, 'UTC') END;
  use_rollups := m.aggregation <> 'UNIQUE_COUNT' AND coalesce(w, '') <> 'MINUTE' AND lo_h < hi_h;
  IF use_rollups AND w IS NOT NULL AND window_time_zone <> 'UTC' THEN
    straddles := format('date_trunc(%1$L, %%1$s, $6) <> date_trunc(%1$L, %%1$s + interval %2$L, $6)',
                        lower(w), '59 minutes 59.999999 seconds');
  END IF;

  IF m.aggregation = 'COUNT' THEN
    raw_value := 'NULL::numeric';
    raw_valued := '1::bigint';
  ELSIF m.aggregation = 'UNIQUE_COUNT' THEN
    raw_value := 'NULL::numeric';
    raw_text := 'metering._meter_text(e.data, $3)';
    raw_valued := format('(%s IS NOT NULL)::int::bigint', raw_text);
  ELSE
    raw_value := 'metering._meter_number(e.data, $3)';
    raw_valued := '(x.v IS NOT NULL)::int::bigint';
  END IF;
  -- the columns of a rollup row, for one event
  raw_cols := format(
    'e.subject, %s AS ws, %s AS groups, 1::bigint AS events, %s AS valued,
     x.v AS sum, x.v AS min, x.v AS max, e.time AS first_time, e.time AS last_time,
     CASE WHEN x.v IS NOT NULL THEN e.time END AS latest_time, x.v AS latest_value, %s AS utext',
    metering._window_start_sql(w, 'e.time'),
    -- group values only when the question groups or filters by them
    CASE WHEN m.group_by = '{}' OR (group_by IS NULL AND filter_group_by IS NULL) THEN '''{}''::jsonb'
         ELSE 'metering._meter_groups(e.data, $4)' END,
    raw_valued, raw_text);
  subject_sql := CASE WHEN subjects IS NOT NULL THEN 'AND e.subject = ANY ($5)' ELSE '' END;

  IF use_rollups THEN
    -- given subjects, one index range per subject whatever the statistics say
    parts := parts || format(
      'SELECT r.subject, %s AS ws, r.groups, r.events, r.valued, r.sum, r.min, r.max,
              r.first_time, r.last_time, r.latest_time, r.latest_value, NULL::text AS utext
         FROM %s
        WHERE r.meter = $1 AND r.bucket >= $9 AND r.bucket < $10 %s',
      metering._window_start_sql(w, 'r.bucket'),
      CASE WHEN subjects IS NOT NULL
           THEN '(SELECT DISTINCT unnest($5) AS subject) s
                 CROSS JOIN LATERAL (SELECT * FROM metering.meter_rollups r0
                                      WHERE r0.meter = $1 AND r0.subject = s.subject
                                        AND r0.bucket >= $9 AND r0.bucket < $10) r'
           ELSE 'metering.meter_rollups r' END,
      CASE WHEN straddles IS NOT NULL THEN 'AND NOT (' || format(straddles, 'r.bucket') || ')' ELSE '' END);
    raw_where := array_to_string(ARRAY[
      CASE WHEN from_time < lo_h THEN '(e.time >= $7 AND e.time < $9)' END,
      CASE WHEN hi_h < to_time THEN '(e.time >= $10 AND e.time < $8)' END,
      '(e.time >= $9 AND e.time < $10 AND e.seq > $12)'], ' OR ');
    parts := parts || format(
      'SELECT %s FROM metering.events e CROSS JOIN LATERAL (SELECT %s AS v) x
        WHERE e.type = $2 %s AND (%s)',
      raw_cols, raw_value, subject_sql, raw_where);
    IF straddles IS NOT NULL THEN
      parts := parts || format(
        'SELECT %s
           FROM (SELECT DISTINCT r.subject, r.bucket FROM metering.meter_rollups r
                  WHERE r.meter = $1 AND r.bucket >= $9 AND r.bucket < $10 AND %s %s) sb
           JOIN metering.events e ON e.subject = sb.subject AND e.type = $2
                                 AND e.time >= sb.bucket AND e.time < sb.bucket + interval ''1 hour''
           CROSS JOIN LATERAL (SELECT %s AS v) x
          WHERE e.seq <= $12',
        raw_cols, format(straddles, 'r.bucket'),
        CASE WHEN subjects IS NOT NULL THEN 'AND r.subject = ANY ($5)' ELSE '' END, raw_value);
    END IF;
  ELSE
    parts := parts || format(
      'SELECT %s FROM metering.events e CROSS JOIN LATERAL (SELECT %s AS v) x
        WHERE e.type = $2 %s %s %s',
      raw_cols, raw_value, subject_sql,
      CASE WHEN from_time IS NOT NULL THEN 'AND e.time >= $7' ELSE '' END,
      CASE WHEN to_time IS NOT NULL THEN 'AND e.time < $8' ELSE '' END);
  END IF;

  value_sql := CASE m.aggregation
    WHEN 'SUM' THEN 'coalesce(sum(p.sum), 0)'
    WHEN 'COUNT' THEN 'sum(p.events)::numeric'
    WHEN 'AVG' THEN 'sum(p.sum) / nullif(sum(p.valued), 0)'
    WHEN 'MIN' THEN 'min(p.min)'
    WHEN 'MAX' THEN 'max(p.max)'
    WHEN 'LATEST' THEN '(max(metering._latest_key(p.latest_time, p.latest_value)) FILTER (WHERE p.latest_time IS NOT NULL))[2]'
    WHEN 'UNIQUE_COUNT' THEN 'count(DISTINCT p.utext)::numeric'
  END;

  sql := format($q$
    WITH p AS (%1$s),
    a AS (
      SELECT p.ws, p.subject, p.groups - $11 AS g, %2$s AS value,
             min(p.first_time) AS ft, max(p.last_time) AS lt
        FROM p
       WHERE true %3$s
       GROUP BY 1, 2, 3
    )
    SELECT %4$s, %5$s, a.subject, a.g, a.value
      FROM a
     ORDER BY 1, 3, 4$q$,
    array_to_string(parts, ' UNION ALL '),
    value_sql,
    filter_sql,
    CASE WHEN w IS NULL THEN 'coalesce($7, min(a.ft) OVER ())' ELSE 'a.ws' END,
    CASE WHEN w IS NULL THEN 'coalesce($8, max(a.lt) OVER ())'
         ELSE metering._window_end_sql(w, 'a.ws') END);

  -- The watermark is passed in as a value, so that the planner knows how few
  -- events lie above it.  A STABLE function reads with one snapshot, so the
  -- rollups the statement reads are the ones this watermark describes.
  watermark := coalesce((SELECT s.rolled_up_to FROM metering.meter_rollup_state s WHERE s.meter = m.slug), 0);
  RETURN QUERY EXECUTE sql
    USING m.slug, m.event_type, m.value_property, m.group_by, subjects,
          window_time_zone, from_time, to_time, lo_h, hi_h, drop_names, watermark;
END $fn$;
COMMENT ON FUNCTION metering.query_meter(text, timestamptz, timestamptz, text, text, text[], text[], jsonb) IS
  'the meter''s value per window, subject and group in [from_time, to_time); windows MINUTE, HOUR or DAY aligned in window_time_zone, or one window for the whole range';
