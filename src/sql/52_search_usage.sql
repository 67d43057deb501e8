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
  IF cursor IS NULL OR body = '' OR mac = '' OR split_part(cursor, '.', 3) <> '' OR length(cursor) > 100000
     OR body !~ '^[A-Za-z0-9_-]+$' THEN
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
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  s text := value #>> '{}';
BEGIN
  IF jsonb_typeof(value) <> 'string' OR s !~ '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z?$' THEN
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
LANGUAGE sql IMMUTABLE AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') $$;
COMMENT ON FUNCTION metering._search_format(timestamptz) IS 'internal: a time as search results write it';

-- Whether a row's attribute passes one condition.
CREATE FUNCTION metering._search_match(attr text, operator text, actual jsonb, wanted jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  a text := actual #>> '{}';
BEGIN
  IF attr IN ('startTime', 'endTime') THEN
    RETURN CASE operator
      WHEN 'GREATER_THAN' THEN (a || '+00')::timestamptz > metering._search_time(wanted, attr)
      WHEN 'GREATER_THAN_OR_EQUAL' THEN (a || '+00')::timestamptz >= metering._search_time(wanted, attr)
      WHEN 'LESS_THAN' THEN (a || '+00')::timestamptz < metering._search_time(wanted, attr)
      WHEN 'LESS_THAN_OR_EQUAL' THEN (a || '+00')::timestamptz <= metering._search_time(wanted, attr)
      WHEN 'EQUALS' THEN (a || '+00')::timestamptz = metering._search_time(wanted, attr)
      WHEN 'NOT_EQUALS' THEN (a || '+00')::timestamptz <> metering._search_time(wanted, attr)
      WHEN 'EXISTS' THEN true WHEN 'NOT_EXISTS' THEN false END;
  END IF;
  RETURN CASE operator
    WHEN 'EQUALS' THEN actual = wanted
    WHEN 'NOT_EQUALS' THEN actual <> wanted
    WHEN 'IN' THEN wanted @> jsonb_build_array(actual)
    WHEN 'NOT_IN' THEN NOT wanted @> jsonb_build_array(actual)
    WHEN 'CONTAINS' THEN strpos(a, wanted #>> '{}') > 0
    WHEN 'NOT_CONTAINS' THEN strpos(a, wanted #>> '{}') = 0
    WHEN 'STARTS_WITH' THEN starts_with(a, wanted #>> '{}')
    WHEN 'ENDS_WITH' THEN right(a, length(wanted #>> '{}')) = wanted #>> '{}'
    WHEN 'EXISTS' THEN true
    WHEN 'NOT_EXISTS' THEN false END;
END $$;
COMMENT ON FUNCTION metering._search_match(text, text, jsonb, jsonb) IS 'internal: one search condition on one row';

CREATE FUNCTION metering.search_usage(request jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
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
  lim := (q ->> 'limit')::integer;
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
  -- a search with no lower bound starts at the first usage
  IF start_lo IS NULL THEN
    SELECT min(e.time) INTO start_lo FROM metering.events e;
  END IF;
  start_hi := coalesce(start_hi, metering.now());
  -- no usage yet, or bounds that exclude each other: nothing to find
  IF start_lo IS NULL OR start_lo > start_hi THEN
    RETURN jsonb_build_object('paging', jsonb_build_object('limit', lim), 'results', '[]'::jsonb);
  END IF;

  -- every (subject, meter, period) with usage whose period starts in range
  WITH m AS (
    SELECT x.slug FROM metering.meters x
     WHERE x.deleted_at IS NULL AND (meters IS NULL OR x.slug = ANY (meters))),
  -- weekly and monthly periods, in UTC whatever the session's time zone
  p AS (
    SELECT kind, s AT TIME ZONE 'UTC' AS start_time,
           (s + CASE kind WHEN 'WEEKLY' THEN interval '7 days' ELSE interval '1 month' END) AT TIME ZONE 'UTC' AS end_time
      FROM unnest(periods) kind
     CROSS JOIN LATERAL generate_series(
             date_trunc(CASE kind WHEN 'WEEKLY' THEN 'week' ELSE 'month' END, start_lo AT TIME ZONE 'UTC'),
             start_hi AT TIME ZONE 'UTC',
             CASE kind WHEN 'WEEKLY' THEN interval '7 days' ELSE interval '1 month' END) s
     WHERE kind IN ('WEEKLY', 'MONTHLY')),
  v AS (
    -- days: one windowed query per meter
    SELECT 'DAILY' AS kind, q.window_start AS start_time, q.window_end AS end_time, m.slug, q.subject, q.value
      FROM m CROSS JOIN LATERAL metering.query_meter(m.slug, date_trunc('day', start_lo, 'UTC'),
                                                     date_trunc('day', start_hi, 'UTC') + interval '1 day',
                                                     'DAY', 'UTC', subjects) q
     WHERE 'DAILY' = ANY (periods)
    UNION ALL
    SELECT p.kind, p.start_time, p.end_time, m.slug, q.subject, q.value
      FROM m CROSS JOIN p
     CROSS JOIN LATERAL metering.query_meter(m.slug, p.start_time, p.end_time, NULL, 'UTC', subjects) q),
  r AS (
    SELECT jsonb_build_object(
             'id', md5(v.subject || '|' || v.slug || '|' || v.kind || '|' || metering._search_format(v.start_time))::uuid,
             'tenantId', v.subject, 'trial', coalesce(s.is_trial, false), 'usageType', v.slug,
             'aggregationPeriod', v.kind, 'startTime', metering._search_format(v.start_time),
             'endTime', metering._search_format(v.end_time), 'count', v.value) AS row
      FROM v LEFT JOIN metering.subjects s ON s.key = v.subject),
  f AS (
    SELECT r.row, jsonb_build_array(CASE WHEN order_attr = 'isTrial' THEN r.row -> 'trial' ELSE r.row -> order_attr END,
                                    r.row -> 'id') AS k
      FROM r
     WHERE NOT EXISTS (
       SELECT 1 FROM jsonb_array_elements(q -> 'search') e
        WHERE NOT metering._search_match(e ->> 'name', e ->> 'operator',
                                         CASE WHEN e ->> 'name' = 'isTrial' THEN r.row -> 'trial' ELSE r.row -> (e ->> 'name') END,
                                         e -> 'value')))
  SELECT coalesce(jsonb_agg(f.row || jsonb_build_object('_k', f.k)
                            ORDER BY CASE WHEN ascending THEN f.k END ASC, CASE WHEN NOT ascending THEN f.k END DESC), '[]')
    INTO rows FROM f;

  -- the page: after the key going forward, before it going back
  IF key IS NULL THEN
    SELECT coalesce(jsonb_agg(x ORDER BY n), '[]') INTO page
      FROM jsonb_array_elements(rows) WITH ORDINALITY t(x, n) WHERE n <= lim;
  ELSIF NOT backward THEN
    SELECT coalesce(jsonb_agg(x ORDER BY n), '[]') INTO page FROM (
      SELECT x, n FROM jsonb_array_elements(rows) WITH ORDINALITY t(x, n)
       WHERE CASE WHEN ascending THEN x -> '_k' > key ELSE x -> '_k' < key END
       ORDER BY n LIMIT lim) s;
  ELSE
    SELECT coalesce(jsonb_agg(x ORDER BY n), '[]') INTO page FROM (
      SELECT x, n FROM jsonb_array_elements(rows) WITH ORDINALITY t(x, n)
       WHERE CASE WHEN ascending THEN x -> '_k' < key ELSE x -> '_k' > key END
       ORDER BY n DESC LIMIT lim) s;
  END IF;
  total := jsonb_array_length(page);
  first_key := page -> 0 -> '_k';
  last_key := page -> (total - 1) -> '_k';
  SELECT EXISTS (SELECT 1 FROM jsonb_array_elements(rows) x
                  WHERE CASE WHEN ascending THEN x -> '_k' > last_key ELSE x -> '_k' < last_key END) INTO more_after;
  SELECT EXISTS (SELECT 1 FROM jsonb_array_elements(rows) x
                  WHERE CASE WHEN ascending THEN x -> '_k' < first_key ELSE x -> '_k' > first_key END) INTO more_before;
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
