-- Entrust-style usage search: metering.search_usage(request jsonb), one
-- row per (subject, meter, period) that has usage, paged by signed keyset
-- cursors that carry the whole query.

-- Cursors: base64url(payload) "." base64url(HMAC-SHA256 of the payload with
-- the database's signing key), the key's version inside.  SECURITY DEFINER:
-- they use the secret, which callers may not read.
CREATE FUNCTION metering._sign_cursor(payload jsonb) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  k metering.signing_keys := metering._current_signing_key();
  body text := metering._base64url(convert_to((payload || jsonb_build_object('kv', k.version))::text, 'UTF8'));
BEGIN
  -- a key of its own, derived from the secret: signing cursors for anyone
  -- must not sign anything else (RegisterUsage tokens use the secret itself)
  RETURN body || '.' || metering._base64url(metering._hmac_sha256(body, metering._hmac_sha256('metering cursor', k.secret)));
END $$;
COMMENT ON FUNCTION metering._sign_cursor(jsonb) IS 'internal: a tamper-evident cursor for a payload';

CREATE FUNCTION metering._read_cursor(cursor text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  body text := split_part(cursor, '.', 1);
  mac text := split_part(cursor, '.', 2);
  payload jsonb;
  secret bytea;
BEGIN
  IF cursor IS NULL OR length(cursor) > 100000 OR cursor !~ '^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$' THEN
    RAISE EXCEPTION 'cursor is not a cursor of this database' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  BEGIN
    payload := convert_from(decode(translate(body, '-_', '+/') || repeat('=', (4 - length(body) % 4) % 4), 'base64'),
                            'UTF8')::jsonb;
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'cursor is not a cursor of this database' USING ERRCODE = 'invalid_parameter_value';
  END;
  SELECT k.secret INTO secret FROM metering.signing_keys k
   WHERE jsonb_typeof(payload -> 'kv') = 'number' AND k.version = (payload ->> 'kv')::numeric;
  IF secret IS NULL
     OR metering._base64url(metering._hmac_sha256(body, metering._hmac_sha256('metering cursor', secret))) <> mac THEN
    RAISE EXCEPTION 'cursor is not a cursor of this database' USING ERRCODE = 'invalid_parameter_value',
      HINT = 'Cursors are signed: use them exactly as a response gave them.';
  END IF;
  RETURN payload;
END $$;
COMMENT ON FUNCTION metering._read_cursor(text) IS 'internal: the payload of a cursor this database signed, else 22023';

-- "2018-08-04T18:15:30", as the reference writes times (UTC, no zone)
CREATE FUNCTION metering._search_time(value jsonb, what text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s text := value #>> '{}';
BEGIN
  IF jsonb_typeof(value) <> 'string' OR s !~ '^\d{4}-\d{2}-\d{2}T([01]\d|2[0-3]):\d{2}:\d{2}(\.\d{1,6})?Z?$' THEN
    RAISE EXCEPTION 'search_usage: % must be a UTC time like 2018-08-04T18:15:30, got %', what, value
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  BEGIN
    RETURN (rtrim(s, 'Z') || '+00')::timestamptz;
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'search_usage: % must be a UTC time like 2018-08-04T18:15:30, got %', what, value
      USING ERRCODE = 'invalid_parameter_value';
  END;
END $$;
COMMENT ON FUNCTION metering._search_time(jsonb, text) IS 'internal: a search time value';

CREATE FUNCTION metering._search_format(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
 SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS');
END;
COMMENT ON FUNCTION metering._search_format(timestamptz) IS 'internal: a time as search results write it';

-- The conditions of a search (checked already) as SQL over columns
-- start_time, end_time, subject, meter, kind and trial; values are quoted.
CREATE FUNCTION metering._search_where(search jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  c record;
  col text;
  lit text;
  parts text[] := ARRAY['true'];
BEGIN
  FOR c IN SELECT e ->> 'name' AS name, e ->> 'operator' AS op, e -> 'value' AS value
             FROM jsonb_array_elements(search) e LOOP
    col := CASE c.name WHEN 'startTime' THEN 'start_time' WHEN 'endTime' THEN 'end_time' WHEN 'tenantId' THEN 'subject'
                       WHEN 'usageType' THEN 'meter' WHEN 'aggregationPeriod' THEN 'kind' WHEN 'isTrial' THEN 'trial' END;
    IF c.op IN ('EXISTS', 'NOT_EXISTS') THEN
      parts := parts || CASE c.op WHEN 'EXISTS' THEN 'true' ELSE 'false' END;
      CONTINUE;
    END IF;
    -- times in ISO 8601 with their offset read back the same whatever DateStyle says
    lit := CASE WHEN c.name IN ('startTime', 'endTime')
                THEN format('%L::timestamptz', to_char(metering._search_time(c.value, c.name) AT TIME ZONE 'UTC',
                                                      'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00')
                WHEN c.name = 'isTrial' THEN format('%L::boolean', c.value #>> '{}')
                WHEN c.op IN ('IN', 'NOT_IN') THEN format('%L::text[]', ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(c.value) v))
                ELSE format('%L::text', c.value #>> '{}') END;
    parts := parts || CASE c.op
      WHEN 'GREATER_THAN' THEN format('%s > %s', col, lit)
      WHEN 'GREATER_THAN_OR_EQUAL' THEN format('%s >= %s', col, lit)
      WHEN 'LESS_THAN' THEN format('%s < %s', col, lit)
      WHEN 'LESS_THAN_OR_EQUAL' THEN format('%s <= %s', col, lit)
      WHEN 'EQUALS' THEN format('%s = %s', col, lit)
      WHEN 'NOT_EQUALS' THEN format('%s <> %s', col, lit)
      WHEN 'IN' THEN format('%s = ANY (%s)', col, lit)
      WHEN 'NOT_IN' THEN format('NOT (%s = ANY (%s))', col, lit)
      WHEN 'CONTAINS' THEN format('strpos(%s, %s) > 0', col, lit)
      WHEN 'NOT_CONTAINS' THEN format('strpos(%s, %s) = 0', col, lit)
      WHEN 'STARTS_WITH' THEN format('starts_with(%s, %s)', col, lit)
      WHEN 'ENDS_WITH' THEN format('right(%s, length(%s)) = %s', col, lit, lit) END;
  END LOOP;
  RETURN array_to_string(parts, ' AND ');
END $$;
COMMENT ON FUNCTION metering._search_where(jsonb) IS 'internal: the conditions of a search as SQL';

CREATE FUNCTION metering.search_usage(request jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  q jsonb;                      -- the query: conditions, order, limit
  c jsonb;
  cond record;
  key jsonb;                    -- the keyset position, or NULL for the first page
  backward boolean := false;
  lim integer;
  order_attr text;
  ascending boolean;
  start_lo timestamptz;
  start_hi timestamptz;
  periods text[] := ARRAY['DAILY', 'WEEKLY', 'MONTHLY'];
  meters text[];
  subjects text[];
  has_start boolean := false;
  rows jsonb;
  page jsonb;
  total integer;
  first_key jsonb;
  last_key jsonb;
  more_after boolean;
  more_before boolean;
  more boolean;
  fast_meters text[];
  slow_meters text[];
  fetch_asc boolean;
  dir text;
  cmp text;
  where_sql text;
  keyset_sql text;
  base_sql text;
  order_sql text;
  key_ts timestamptz;
  key_id uuid;
  slow_lo timestamptz;
  slow_hi timestamptz;
  tail_lo timestamptz;
  tail_hi timestamptz;
  page_lo timestamptz;
  page_hi timestamptz;
  n_base bigint;
  ops jsonb := '{"startTime": ["GREATER_THAN", "GREATER_THAN_OR_EQUAL", "LESS_THAN", "LESS_THAN_OR_EQUAL", "EQUALS", "NOT_EQUALS", "EXISTS", "NOT_EXISTS"],
                 "endTime": ["GREATER_THAN", "GREATER_THAN_OR_EQUAL", "LESS_THAN", "LESS_THAN_OR_EQUAL", "EQUALS", "NOT_EQUALS", "EXISTS", "NOT_EXISTS"],
                 "tenantId": ["EQUALS", "IN", "NOT_EQUALS", "NOT_IN", "CONTAINS", "NOT_CONTAINS", "STARTS_WITH", "ENDS_WITH", "EXISTS", "NOT_EXISTS"],
                 "usageType": ["EQUALS", "IN", "NOT_EQUALS", "NOT_IN", "CONTAINS", "NOT_CONTAINS", "STARTS_WITH", "ENDS_WITH", "EXISTS", "NOT_EXISTS"],
                 "aggregationPeriod": ["EQUALS", "IN", "NOT_EQUALS", "NOT_IN", "EXISTS", "NOT_EXISTS"],
                 "isTrial": ["EQUALS", "NOT_EQUALS", "EXISTS", "NOT_EXISTS"]}';
BEGIN
  IF request IS NULL OR jsonb_typeof(request) <> 'object' THEN
    RAISE EXCEPTION 'search_usage: the request must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- a cursor carries the whole query; the request's own attributes are then ignored
  IF request ? 'cursor' AND request -> 'cursor' <> 'null' THEN
    IF jsonb_typeof(request -> 'cursor') <> 'string' THEN
      RAISE EXCEPTION 'search_usage: cursor must be a string' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    c := metering._read_cursor(request ->> 'cursor');
    IF c ? 'kind' THEN
      RAISE EXCEPTION 'search_usage: cursor is a cursor of %, not of search_usage', c ->> 'kind'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- (anyone may sign a cursor: what it carries is checked like a request)
    q := c -> 'q';
    key := c -> 'k';
    backward := (c ->> 'd') = 'prev';
  ELSE
    q := jsonb_build_object('search', coalesce(request -> 'searchByAttributes', '[]'),
                            'order', coalesce(request -> 'orderByAttribute', '{"name": "startTime", "ascending": true}'),
                            'limit', coalesce(request -> 'limit', '100'));
  END IF;

  -- the limit
  IF jsonb_typeof(q) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION 'search_usage: cursor carries no query' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(q -> 'limit') IS DISTINCT FROM 'number' OR (q ->> 'limit')::numeric <> trunc((q ->> 'limit')::numeric)
     OR (q ->> 'limit')::numeric NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'search_usage: limit must be an integer from 1 to 100, got %', q -> 'limit'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  lim := (q ->> 'limit')::numeric::integer;
  -- the order
  IF jsonb_typeof(q -> 'order') IS DISTINCT FROM 'object'
     OR NOT coalesce(ops ? (q -> 'order' ->> 'name') OR (q -> 'order' ->> 'name') IN ('count', 'id'), false)
     OR jsonb_typeof(coalesce(q -> 'order' -> 'ascending', 'true')) <> 'boolean' THEN
    RAISE EXCEPTION 'search_usage: orderByAttribute must be {"name": <attribute>, "ascending": true|false}, got %', q -> 'order'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  order_attr := q -> 'order' ->> 'name';
  ascending := coalesce((q -> 'order' ->> 'ascending')::boolean, true);

  -- the conditions: their shape, and what narrows the computation
  IF jsonb_typeof(q -> 'search') IS DISTINCT FROM 'array' THEN
    RAISE EXCEPTION 'search_usage: searchByAttributes must be an array' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR cond IN SELECT e AS raw, e ->> 'name' AS name, e ->> 'operator' AS op, e -> 'value' AS value
                FROM jsonb_array_elements(q -> 'search') e LOOP
    IF jsonb_typeof(cond.raw) <> 'object' OR cond.name IS NULL OR cond.op IS NULL THEN
      RAISE EXCEPTION 'search_usage: each search attribute needs a name and an operator, got %', cond.raw
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT ops ? cond.name THEN
      RAISE EXCEPTION 'search_usage: unknown attribute "%"', cond.name USING ERRCODE = 'invalid_parameter_value',
        HINT = 'Attributes: startTime, endTime, tenantId, isTrial, usageType, aggregationPeriod.';
    END IF;
    IF NOT (ops -> cond.name) ? cond.op THEN
      RAISE EXCEPTION 'search_usage: operator % does not apply to %', cond.op, cond.name
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cond.op NOT IN ('EXISTS', 'NOT_EXISTS') THEN
      IF cond.value IS NULL THEN
        RAISE EXCEPTION 'search_usage: % % needs a value', cond.name, cond.op USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF cond.op IN ('IN', 'NOT_IN') AND (jsonb_typeof(cond.value) <> 'array' OR jsonb_array_length(cond.value) = 0
           OR EXISTS (SELECT 1 FROM jsonb_array_elements(cond.value) v WHERE jsonb_typeof(v) <> 'string')) THEN
        RAISE EXCEPTION 'search_usage: % % needs a non-empty array of strings, got %', cond.name, cond.op, cond.value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF cond.op NOT IN ('IN', 'NOT_IN') AND cond.name <> 'isTrial' AND jsonb_typeof(cond.value) <> 'string' THEN
        RAISE EXCEPTION 'search_usage: % % needs a string, got %', cond.name, cond.op, cond.value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF cond.name = 'isTrial' AND jsonb_typeof(cond.value) <> 'boolean' THEN
        RAISE EXCEPTION 'search_usage: isTrial % needs true or false, got %', cond.op, cond.value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF cond.name = 'aggregationPeriod' AND EXISTS (
           SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(cond.value) = 'array' THEN cond.value
                                                   ELSE jsonb_build_array(cond.value) END) v
            WHERE v #>> '{}' NOT IN ('DAILY', 'WEEKLY', 'MONTHLY')) THEN
        RAISE EXCEPTION 'search_usage: aggregationPeriod is DAILY, WEEKLY or MONTHLY, got %', cond.value
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
    END IF;
    CASE cond.name
      WHEN 'startTime' THEN
        has_start := true;
        IF cond.op IN ('GREATER_THAN', 'GREATER_THAN_OR_EQUAL', 'EQUALS') THEN
          start_lo := greatest(start_lo, metering._search_time(cond.value, 'startTime'));
        END IF;
        IF cond.op IN ('LESS_THAN', 'LESS_THAN_OR_EQUAL', 'EQUALS') THEN
          start_hi := least(start_hi, metering._search_time(cond.value, 'startTime'));
        END IF;
        IF cond.op IN ('NOT_EQUALS') THEN
          PERFORM metering._search_time(cond.value, 'startTime');
        END IF;
      WHEN 'endTime' THEN
        IF cond.op NOT IN ('EXISTS', 'NOT_EXISTS') THEN
          PERFORM metering._search_time(cond.value, 'endTime');
        END IF;
      WHEN 'tenantId' THEN
        IF cond.op = 'EQUALS' THEN
          subjects := ARRAY[cond.value #>> '{}'];
        ELSIF cond.op = 'IN' THEN
          subjects := ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(cond.value) v);
        END IF;
      WHEN 'usageType' THEN
        IF cond.op = 'EQUALS' THEN
          meters := ARRAY[cond.value #>> '{}'];
        ELSIF cond.op = 'IN' THEN
          meters := ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(cond.value) v);
        END IF;
      WHEN 'aggregationPeriod' THEN
        IF cond.op = 'EQUALS' THEN
          periods := ARRAY[cond.value #>> '{}'];
        ELSIF cond.op = 'IN' THEN
          periods := ARRAY(SELECT v #>> '{}' FROM jsonb_array_elements(cond.value) v);
        END IF;
      ELSE NULL;
    END CASE;
  END LOOP;
  IF NOT has_start THEN
    RAISE EXCEPTION 'search_usage: a startTime attribute is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- subjects named outright must be yours
  IF subjects IS NOT NULL THEN
    PERFORM metering._require_subject(s) FROM unnest(subjects) s;
  END IF;
  start_lo := coalesce(start_lo, '-infinity');
  -- without an upper bound, periods that start after now are left out
  start_hi := coalesce(start_hi, metering.now());
  IF start_lo > start_hi THEN
    RETURN jsonb_build_object('paging', jsonb_build_object('limit', lim), 'results', '[]'::jsonb);
  END IF;
  -- meters whose periods are kept (usage_periods), and UNIQUE_COUNT ones, read from their events
  SELECT coalesce(array_agg(x.slug) FILTER (WHERE x.aggregation <> 'UNIQUE_COUNT'), '{}'),
         coalesce(array_agg(x.slug) FILTER (WHERE x.aggregation = 'UNIQUE_COUNT'), '{}')
    INTO fast_meters, slow_meters
    FROM metering.meters x WHERE x.deleted_at IS NULL AND (meters IS NULL OR x.slug = ANY (meters));

  -- UNIQUE_COUNT meters are read period by period from their first event
  -- to their last (not to a far bound: no period after it has usage)
  IF cardinality(slow_meters) > 0 THEN
    SELECT greatest(start_lo, min(e.time)), least(start_hi, max(e.time)) INTO slow_lo, slow_hi
      FROM metering.events e
     WHERE e.type IN (SELECT x.event_type FROM metering.meters x WHERE x.slug = ANY (slow_meters));
  END IF;

  -- the page is fetched in this order (the other way round going back)
  fetch_asc := ascending <> backward;
  dir := CASE WHEN fetch_asc THEN 'ASC' ELSE 'DESC' END;
  cmp := CASE WHEN fetch_asc THEN '>' ELSE '<' END;
  where_sql := metering._search_where(q -> 'search');
  IF order_attr = 'startTime' THEN
    -- in (start_time, id) order the kept periods are read by index, a page at a time
    IF key IS NOT NULL THEN
      IF jsonb_typeof(key) IS DISTINCT FROM 'array' OR jsonb_array_length(key) <> 2 THEN
        RAISE EXCEPTION 'search_usage: cursor carries no position' USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF jsonb_typeof(key -> 1) IS DISTINCT FROM 'string'
         OR key ->> 1 !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'search_usage: cursor carries no position' USING ERRCODE = 'invalid_parameter_value';
      END IF;
      key_ts := metering._search_time(key -> 0, 'the cursor''s startTime');
      key_id := (key ->> 1)::uuid;
      keyset_sql := format('(start_time, id) %s ($7, $8)', cmp);
    ELSE
      keyset_sql := 'true';
    END IF;
    base_sql := format('AND %s AND %s ORDER BY p.start_time %s, p.id %s LIMIT $6', where_sql, keyset_sql, dir, dir);
    order_sql := format('start_time %s, id %s', dir, dir);
    -- a page holds no row beyond the kept period that ends it (when there
    -- are that many): newer events matter only up to its start.  (A query of
    -- its own, run again below as the base: passed in as values, the bounds
    -- let the planner see how few events remain; computed inside, they
    -- made it pick a nested loop ten times slower.)
    EXECUTE format('SELECT min(start_time), max(start_time), count(*) FROM (
                      SELECT p.start_time FROM metering.usage_periods p
                       CROSS JOIN LATERAL (SELECT coalesce((SELECT s.is_trial FROM metering.subjects s WHERE s.key = p.subject), false) AS trial) tr
                       WHERE p.meter = ANY ($1) AND p.kind = ANY ($2) AND p.start_time >= $3 AND p.start_time <= $4
                         AND ($5 IS NULL OR p.subject = ANY ($5)) %s) b', base_sql)
      INTO page_lo, page_hi, n_base
      USING fast_meters, periods, start_lo, start_hi, subjects, lim + 1, key_ts, key_id;
    IF fetch_asc THEN
      tail_lo := coalesce(key_ts, '-infinity');
      tail_hi := CASE WHEN n_base > lim THEN page_hi ELSE 'infinity' END;
    ELSE
      tail_lo := CASE WHEN n_base > lim THEN page_lo ELSE '-infinity' END;
      tail_hi := coalesce(key_ts, 'infinity');
    END IF;
  ELSE
    keyset_sql := CASE WHEN key IS NOT NULL THEN format('k %s $9', cmp) ELSE 'true' END;
    tail_lo := '-infinity';
    tail_hi := 'infinity';
    base_sql := format('AND %s', where_sql);
    order_sql := format('k %s', dir);
  END IF;

  EXECUTE format($q$
    WITH ms AS (
      SELECT m.slug, m.event_type, m.aggregation, m.value_property, coalesce(s.rolled_up_to, 0) AS wm
        FROM metering.meters m LEFT JOIN metering.meter_rollup_state s ON s.meter = m.slug
       WHERE m.slug = ANY ($1)),
    -- events above the watermark: not in usage_periods yet ($11: the lowest
    -- watermark, which lets the btree on (seq, subject) skip the rolled-up
    -- events; $12, $13: the range of period starts the page can hold);
    -- LATEST meters apart, as only they need their values in order
    tail_raw AS MATERIALIZED (
      SELECT e.type, e.seq, e.subject, e.time, e.data, k.kind, k.start_time, k.end_time
        FROM metering.events e CROSS JOIN LATERAL metering._usage_periods_of(e.time) k
       WHERE e.seq > $11 AND e.type IN (SELECT ms.event_type FROM ms)
         AND k.kind = ANY ($2) AND k.start_time >= $3 AND k.start_time <= $4 AND ($5 IS NULL OR e.subject = ANY ($5))
         AND k.start_time >= $12 AND k.start_time <= $13),
    tail_events AS (
      SELECT ms.slug AS meter, ms.aggregation, r.subject, r.time, r.kind, r.start_time, r.end_time, x.v
        FROM tail_raw r JOIN ms ON ms.event_type = r.type AND r.seq > ms.wm
       CROSS JOIN LATERAL (SELECT CASE WHEN ms.aggregation = 'COUNT' THEN NULL
                                       ELSE metering._meter_number(r.data, ms.value_property) END AS v) x),
    tail AS (
      SELECT meter, subject, kind, start_time, min(end_time) AS end_time,
             count(*) AS events, count(v) AS valued, sum(v) AS sum, min(v) AS min, max(v) AS max,
             NULL::timestamptz AS latest_time, NULL::numeric AS latest_value
        FROM tail_events WHERE aggregation <> 'LATEST' GROUP BY 1, 2, 3, 4
      UNION ALL
      SELECT meter, subject, kind, start_time, min(end_time), count(*), count(v), NULL, NULL, NULL,
             max(time) FILTER (WHERE v IS NOT NULL),
             (max(metering._latest_key(time, v)) FILTER (WHERE v IS NOT NULL))[2]
        FROM tail_events WHERE aggregation = 'LATEST' GROUP BY 1, 2, 3, 4),
    base AS (
      SELECT p.meter, p.subject, p.kind, p.start_time
        FROM metering.usage_periods p
       CROSS JOIN LATERAL (SELECT coalesce((SELECT s.is_trial FROM metering.subjects s WHERE s.key = p.subject), false) AS trial) tr
       WHERE p.meter = ANY ($1) AND p.kind = ANY ($2) AND p.start_time >= $3 AND p.start_time <= $4
         AND ($5 IS NULL OR p.subject = ANY ($5)) %1$s),
    keys AS (SELECT meter, subject, kind, start_time FROM base
             UNION SELECT meter, subject, kind, start_time FROM tail),
    merged AS (
      SELECT k.meter, k.subject, k.kind, k.start_time, coalesce(p.end_time, t.end_time) AS end_time,
             CASE ms.aggregation
               WHEN 'SUM' THEN coalesce(p.sum, 0) + coalesce(t.sum, 0)
               WHEN 'COUNT' THEN (coalesce(p.events, 0) + coalesce(t.events, 0))::numeric
               WHEN 'AVG' THEN (coalesce(p.sum, 0) + coalesce(t.sum, 0)) / nullif(coalesce(p.valued, 0) + coalesce(t.valued, 0), 0)
               WHEN 'MIN' THEN least(p.min, t.min)
               WHEN 'MAX' THEN greatest(p.max, t.max)
               WHEN 'LATEST' THEN CASE WHEN t.latest_time IS NOT NULL AND (p.latest_time IS NULL
                                            OR metering._latest_key(t.latest_time, t.latest_value) > metering._latest_key(p.latest_time, p.latest_value))
                                       THEN t.latest_value ELSE p.latest_value END
             END AS value
        FROM keys k JOIN ms ON ms.slug = k.meter
        LEFT JOIN metering.usage_periods p
               ON p.meter = k.meter AND p.subject = k.subject AND p.kind = k.kind AND p.start_time = k.start_time
        LEFT JOIN tail t
               ON t.meter = k.meter AND t.subject = k.subject AND t.kind = k.kind AND t.start_time = k.start_time),
    -- UNIQUE_COUNT meters: from their events, day by day and period by period
    slow_from AS (SELECT $14::timestamptz AS lo),
    slow AS (
      SELECT m.slug AS meter, q.subject, 'DAILY' AS kind, q.window_start AS start_time, q.window_end AS end_time, q.value
        FROM unnest($10) m(slug), slow_from
       CROSS JOIN LATERAL metering.query_meter(m.slug, date_trunc('day', slow_from.lo, 'UTC'),
                                               date_trunc('day', $15, 'UTC') + interval '1 day', 'DAY', 'UTC', $5) q
       WHERE 'DAILY' = ANY ($2) AND slow_from.lo IS NOT NULL AND slow_from.lo <= $15
      UNION ALL
      SELECT m.slug, q.subject, p.kind, p.start_time, p.end_time, q.value
        FROM unnest($10) m(slug), slow_from
       CROSS JOIN LATERAL (
         SELECT kind, s AT TIME ZONE 'UTC' AS start_time, metering._usage_period_end(kind, s AT TIME ZONE 'UTC') AS end_time
           FROM unnest($2) kind
          CROSS JOIN LATERAL generate_series(date_trunc(CASE kind WHEN 'WEEKLY' THEN 'week' ELSE 'month' END, slow_from.lo AT TIME ZONE 'UTC'),
                                             $15 AT TIME ZONE 'UTC',
                                             CASE kind WHEN 'WEEKLY' THEN interval '7 days' ELSE interval '1 month' END) s
          WHERE kind IN ('WEEKLY', 'MONTHLY')) p
       CROSS JOIN LATERAL metering.query_meter(m.slug, p.start_time, p.end_time, NULL, 'UTC', $5) q
       WHERE slow_from.lo IS NOT NULL AND slow_from.lo <= $15),
    all_rows AS (
      SELECT r.*, metering._usage_period_id(r.subject, r.meter, r.kind, r.start_time) AS id,
             coalesce((SELECT s.is_trial FROM metering.subjects s WHERE s.key = r.subject), false) AS trial
        FROM (SELECT * FROM merged
              UNION ALL
              SELECT * FROM slow WHERE start_time >= $3 AND start_time <= $4) r),
    f AS (
      SELECT r.*, jsonb_build_array(%2$s, r.id::text) AS k FROM all_rows r WHERE %3$s)
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'id', x.id, 'tenantId', x.subject, 'trial', x.trial, 'usageType', x.meter, 'aggregationPeriod', x.kind,
             'startTime', metering._search_format(x.start_time), 'endTime', metering._search_format(x.end_time),
             'count', x.value, '_k', x.k) ORDER BY x.n), '[]')
      FROM (SELECT f.*, row_number() OVER (ORDER BY %4$s) AS n FROM f WHERE %5$s ORDER BY %4$s LIMIT $6) x
    $q$,
    base_sql,
    CASE order_attr
      WHEN 'startTime' THEN 'to_jsonb(metering._search_format(r.start_time))'
      WHEN 'endTime' THEN 'to_jsonb(metering._search_format(r.end_time))'
      WHEN 'tenantId' THEN 'to_jsonb(r.subject)'
      WHEN 'usageType' THEN 'to_jsonb(r.meter)'
      WHEN 'aggregationPeriod' THEN 'to_jsonb(r.kind)'
      WHEN 'isTrial' THEN 'to_jsonb(r.trial)'
      WHEN 'count' THEN 'to_jsonb(r.value)'
      ELSE 'to_jsonb(r.id::text)' END,
    where_sql, order_sql, keyset_sql)
  INTO rows
  USING fast_meters, periods, start_lo, start_hi, subjects, lim + 1, key_ts, key_id, key, slow_meters,
        (SELECT coalesce(min(coalesce(st.rolled_up_to, 0)), 0) FROM unnest(fast_meters) f(slug)
           LEFT JOIN metering.meter_rollup_state st ON st.meter = f.slug),
        tail_lo, tail_hi, slow_lo, slow_hi;

  -- one row more than the page says whether more follow in that direction
  more := jsonb_array_length(rows) > lim;
  SELECT coalesce(jsonb_agg(x ORDER BY CASE WHEN backward THEN -n ELSE n END), '[]') INTO page
    FROM jsonb_array_elements(rows) WITH ORDINALITY t(x, n) WHERE n <= lim;
  total := jsonb_array_length(page);
  first_key := page -> 0 -> '_k';
  last_key := page -> (total - 1) -> '_k';
  more_after := CASE WHEN backward THEN true ELSE more END;
  more_before := CASE WHEN backward THEN more ELSE key IS NOT NULL END;
  RETURN jsonb_build_object(
    'paging', jsonb_strip_nulls(jsonb_build_object(
      'limit', lim,
      'nextCursor', CASE WHEN total > 0 AND more_after
                         THEN metering._sign_cursor(jsonb_build_object('q', q, 'k', last_key, 'd', 'next')) END,
      'prevCursor', CASE WHEN total > 0 AND more_before
                         THEN metering._sign_cursor(jsonb_build_object('q', q, 'k', first_key, 'd', 'prev')) END)),
    'results', (SELECT coalesce(jsonb_agg(x - '_k' ORDER BY n), '[]') FROM jsonb_array_elements(page) WITH ORDINALITY t(x, n)));
END $$;
COMMENT ON FUNCTION metering.search_usage(jsonb) IS
  'Entrust tenant usage search: rows per (subject, meter, DAILY/WEEKLY/MONTHLY period) with usage, filtered by searchByAttributes, ordered by orderByAttribute then id, paged by signed cursors that carry the whole query';
