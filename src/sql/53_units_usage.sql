-- ThousandEyes-style units usage: a meter's usage per account group and
-- per consumer (the meter's first group-by dimension), with shared usage
-- distributed to the account groups its allocations name.

-- The allocations of an event (AWS UsageAllocations in data.allocations):
-- each quantity, and the account group its tags name, if any.
CREATE FUNCTION metering._allocations(data jsonb) RETURNS TABLE(qty numeric, account_group text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
  SELECT (x ->> 'AllocatedUsageQuantity')::numeric,
         (SELECT t ->> 'Value' FROM jsonb_array_elements(CASE WHEN jsonb_typeof(x -> 'Tags') = 'array' THEN x -> 'Tags' ELSE '[]' END) t
           WHERE t ->> 'Key' = 'account_group' LIMIT 1)
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(data -> 'allocations') = 'array' THEN data -> 'allocations' ELSE '[]' END) x
   WHERE jsonb_typeof(x -> 'AllocatedUsageQuantity') = 'number';
END;
COMMENT ON FUNCTION metering._allocations(jsonb) IS 'internal: the quantities and account groups of an event''s allocations';

-- Percent-encoding of a query string value (RFC 3986 unreserved characters stay).
CREATE FUNCTION metering._url_encode(value text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
BEGIN ATOMIC
  SELECT coalesce(string_agg(CASE WHEN c ~ '^[A-Za-z0-9_.~-]$' THEN c
                                  ELSE upper(regexp_replace(encode(convert_to(c, 'UTF8'), 'hex'), '(..)', '%\1', 'g')) END,
                             '' ORDER BY i), '')
    FROM regexp_split_to_table(value, '') WITH ORDINALITY x(c, i);
END;
COMMENT ON FUNCTION metering._url_encode(text) IS 'internal: percent-encodes a value for a link';

CREATE FUNCTION metering.units_usage(meter text, start_date timestamptz DEFAULT NULL, end_date timestamptz DEFAULT NULL,
  account_group text DEFAULT NULL, cursor text DEFAULT NULL, page_size integer DEFAULT 100) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  m metering.meters;
  q jsonb;
  key jsonb;
  c jsonb;
  t_from timestamptz;
  t_to timestamptz;
  cycle_end timestamptz;
  consumer_key text;
  rows jsonb;
  page jsonb;
  n integer;
  href text;
BEGIN
  IF cursor IS NOT NULL THEN
    c := metering._read_cursor(cursor);
    IF c ->> 'kind' IS DISTINCT FROM 'units_usage' THEN
      RAISE EXCEPTION 'units_usage: cursor is a cursor of %, not of units_usage', coalesce(c ->> 'kind', 'search_usage')
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- (anyone may sign a cursor: what it carries is checked like arguments)
    q := c -> 'q';
    key := c -> 'k';
  ELSE
    t_to := metering._report_time(coalesce(end_date, metering.now()), 'units_usage: end_date');
    t_from := metering._report_time(coalesce(start_date, date_trunc('month', t_to, 'UTC')), 'units_usage: start_date');
    q := jsonb_build_object('meter', meter, 'from', t_from, 'to', t_to, 'group', account_group, 'size', page_size);
  END IF;
  IF jsonb_typeof(q) IS DISTINCT FROM 'object' OR jsonb_typeof(q -> 'from') IS DISTINCT FROM 'string'
     OR jsonb_typeof(q -> 'to') IS DISTINCT FROM 'string' THEN
    RAISE EXCEPTION 'units_usage: cursor carries no query' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  BEGIN
    t_from := (q ->> 'from')::timestamptz;
    t_to := (q ->> 'to')::timestamptz;
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'units_usage: cursor carries no query' USING ERRCODE = 'invalid_parameter_value';
  END;
  PERFORM metering._report_time(t_from, 'units_usage: start_date'), metering._report_time(t_to, 'units_usage: end_date');
  IF q ->> 'meter' IS NULL THEN
    RAISE EXCEPTION 'units_usage: meter is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT * INTO m FROM metering.meters x WHERE x.slug = q ->> 'meter' AND x.deleted_at IS NULL;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'meter "%" does not exist', q ->> 'meter' USING ERRCODE = 'no_data_found';
  END IF;
  IF m.aggregation NOT IN ('SUM', 'COUNT') THEN
    RAISE EXCEPTION 'units_usage: meter "%" aggregates with %, units add up: SUM or COUNT', m.slug, m.aggregation
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF t_from IS NULL OR t_to IS NULL OR NOT (isfinite(t_from) AND isfinite(t_to)) OR t_from >= t_to THEN
    RAISE EXCEPTION 'units_usage: start_date (%) must be before end_date (%), both finite', t_from, t_to
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(q -> 'size') IS DISTINCT FROM 'number' OR (q ->> 'size')::numeric NOT BETWEEN 1 AND 1000
     OR (q ->> 'size')::numeric <> trunc((q ->> 'size')::numeric) THEN
    RAISE EXCEPTION 'units_usage: page_size must be from 1 to 1000, got %', coalesce(q ->> 'size', 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF q ->> 'group' IS NOT NULL THEN
    PERFORM metering._require_subject(q ->> 'group');
  END IF;
  -- the billing cycle the period belongs to: the UTC calendar month of its start
  cycle_end := date_trunc('month', date_trunc('month', t_from, 'UTC') + interval '32 days', 'UTC');
  SELECT k INTO consumer_key FROM jsonb_object_keys(m.group_by) k ORDER BY k LIMIT 1;

  WITH e AS (
    SELECT e.subject, e.data,
           CASE WHEN m.aggregation = 'COUNT' THEN 1 ELSE metering._meter_number(e.data, m.value_property) END AS value,
           CASE WHEN consumer_key IS NOT NULL THEN metering._meter_groups(e.data, m.group_by) ->> consumer_key END AS consumer
      FROM metering.events e
     WHERE e.type = m.event_type AND e.time >= t_from AND e.time < t_to),
  -- SUM meters: an allocation tagged with an account group counts for that
  -- group, an untagged one for the event's subject, and what the allocations
  -- leave of the event's value for its subject too, so that the rows add up
  -- to the meter's value; a COUNT meter counts each event once, for its subject
  a AS (
    SELECT e.subject, e.consumer, e.value, x.qty, x.account_group
      FROM e CROSS JOIN LATERAL metering._allocations(e.data) x
     WHERE m.aggregation = 'SUM' AND e.value IS NOT NULL),
  parts AS (
    SELECT coalesce(a.account_group, a.subject) AS account_group, a.consumer, a.qty AS used FROM a
    UNION ALL
    SELECT e.subject, e.consumer, e.value - coalesce(s.allocated, 0)
      FROM e LEFT JOIN LATERAL (SELECT sum(x.qty) AS allocated FROM metering._allocations(e.data) x
                                 WHERE m.aggregation = 'SUM') s ON true
     WHERE e.value IS NOT NULL AND (s.allocated IS NULL OR e.value <> s.allocated)),
  visible AS (SELECT metering._visible_subjects(current_user) AS v),
  agg AS (
    SELECT p.account_group, p.consumer, sum(p.used) AS used
      FROM parts p, visible
     WHERE (q ->> 'group' IS NULL OR p.account_group = q ->> 'group')
       AND (visible.v IS NULL OR p.account_group = ANY (visible.v))
     GROUP BY 1, 2)
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'accountGroup', a.account_group, 'consumer', a.consumer, 'used', a.used,
           'projected', CASE WHEN t_to >= cycle_end THEN a.used
                             ELSE trim_scale(a.used * extract(epoch FROM cycle_end - t_from) / extract(epoch FROM t_to - t_from)) END,
           '_k', jsonb_build_array(a.account_group, coalesce(a.consumer, '')))
         ORDER BY a.account_group, coalesce(a.consumer, '')), '[]')
    INTO rows FROM agg a;

  SELECT coalesce(jsonb_agg(x - '_k' ORDER BY i), '[]'), max(i) INTO page, n
    FROM (SELECT x, i FROM jsonb_array_elements(rows) WITH ORDINALITY r(x, i)
           WHERE key IS NULL OR x -> '_k' > key ORDER BY i LIMIT (q ->> 'size')::numeric::integer) s;
  href := format('units_usage?meter=%s&start_date=%s&end_date=%s%s', metering._url_encode(m.slug),
                 metering._search_format(t_from), metering._search_format(t_to),
                 CASE WHEN q ->> 'group' IS NOT NULL THEN '&account_group=' || metering._url_encode(q ->> 'group') ELSE '' END);
  RETURN jsonb_build_object(
    'breakdowns', page,
    '_links', jsonb_strip_nulls(jsonb_build_object(
      'self', jsonb_build_object('href', href || CASE WHEN cursor IS NOT NULL THEN '&cursor=' || cursor ELSE '' END),
      'next', CASE WHEN n IS NOT NULL AND n < jsonb_array_length(rows)
                   THEN jsonb_build_object('href', href || '&cursor=' || metering._sign_cursor(jsonb_build_object(
                          'kind', 'units_usage', 'q', q, 'k', rows -> (n - 1) -> '_k'))) END)));
END $$;
COMMENT ON FUNCTION metering.units_usage(text, timestamptz, timestamptz, text, text, integer) IS
  'ThousandEyes units usage: a SUM or COUNT meter''s usage per account group and consumer (the meter''s first group-by dimension) over [start_date, end_date) (default: this UTC month to now), allocations tagged account_group counted for their group, with the projection to the end of the month; paged by a signed cursor in _links.next';
