-- What a meter reads from event data (src/meter_value.c) against the
-- server's JSONPath executor: a path of keys only ($.a.b, lax) over objects
-- is read directly, every other path and shape is left to the executor,
-- and both must answer as jsonb_path_query_first(data, path, '{}', true)
-- does.  Random documents (objects, arrays of objects, scalars, nulls,
-- numeric strings, keys with spaces and quotes) against paths of keys, of
-- keys through arrays, strict, with subscripts, wildcards and filters.
BEGIN;
SELECT plan(5);
SELECT setseed(0.29);

CREATE SCHEMA oracle;
-- a random JSON value of at most `depth` levels, over a few keys
CREATE FUNCTION oracle.doc(depth int) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  r double precision := random();
  o jsonb := '{}';
  keys text[] := ARRAY['a', 'b', 'n', 'x y', 'q"'];
BEGIN
  IF depth <= 0 OR r < 0.35 THEN
    RETURN (ARRAY['1', '-2.5', '"3.25"', '" 4"', '"abc"', 'null', 'true', '0', '1e3', '"1e3"', '[]', '{}'])
           [1 + floor(random() * 12)::int]::jsonb;
  END IF;
  IF r < 0.5 THEN
    RETURN jsonb_build_array(oracle.doc(depth - 1), oracle.doc(depth - 1));
  END IF;
  FOR i IN 1..1 + floor(random() * 3)::int LOOP
    o := o || jsonb_build_object(keys[1 + floor(random() * 5)::int], oracle.doc(depth - 1));
  END LOOP;
  RETURN o;
END $$;
CREATE FUNCTION oracle.text_of(v jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN v IS NULL OR jsonb_typeof(v) = 'null' THEN NULL
              WHEN jsonb_typeof(v) = 'string' THEN v #>> '{}'
              ELSE v::text END
$$;

CREATE TEMP TABLE docs AS
SELECT n, CASE WHEN n % 10 = 0 THEN oracle.doc(0) ELSE oracle.doc(4) END AS data
  FROM generate_series(1, 3000) n;
CREATE TEMP TABLE paths (path jsonpath, direct boolean);
INSERT INTO paths VALUES
  ('$.a', true), ('$.n', true), ('$.a.b', true), ('$.a.b.n', true), ('$."x y"', true),
  ('$."q\""', true), ('$.a."x y".b', true), ('lax $.b.a', true),
  ('strict $.a', false), ('strict $.a.b', false), ('$.a[0]', false), ('$.a[*].b', false),
  ('$.*', false), ('$.a ? (@ > 0)', false), ('$', false), ('$.a.size()', false);

CREATE TEMP TABLE answers AS
SELECT d.n, p.path, p.direct, d.data,
       metering._meter_text(d.data, p.path) AS got_text,
       oracle.text_of(jsonb_path_query_first(d.data, p.path, '{}', true)) AS want_text,
       metering._meter_number(d.data, p.path) AS got_number,
       jsonb_path_query_first(d.data, p.path, '{}', true) AS want_value
  FROM docs d, paths p;

SELECT is((SELECT count(*) FROM answers WHERE got_text IS DISTINCT FROM want_text), 0::bigint,
          'the value as text: the same as the executor''s for every path and document');
-- a number: a JSON number or a plain numeric string, as the executor finds it
CREATE TEMP VIEW numbers AS
SELECT a.*, CASE WHEN jsonb_typeof(want_value) = 'number'
                   OR (jsonb_typeof(want_value) = 'string'
                       AND want_value #>> '{}' ~ '^[+-]?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]{1,3})?$')
                 THEN (want_value #>> '{}')::numeric END AS want_number
  FROM answers a;
SELECT is((SELECT count(*) FROM numbers WHERE got_number IS DISTINCT FROM want_number), 0::bigint,
          'the value as a number: the same as the executor''s');
-- not a comparison of nothing: the direct paths found values, missing keys and keys of scalars
SELECT cmp_ok((SELECT count(*) FROM answers WHERE direct AND jsonb_typeof(want_value) NOT IN ('object', 'array', 'null')),
              '>', 500::bigint, 'key paths found scalar values');
SELECT cmp_ok((SELECT count(*) FROM answers WHERE direct AND want_value IS NULL), '>', 2000::bigint,
              'key paths found nothing (missing keys, keys of scalars, scalar documents)');
SELECT cmp_ok((SELECT count(*) FROM answers
                WHERE direct AND path::text = '$."a"."b"' AND jsonb_typeof(data -> 'a') = 'array' AND want_value IS NOT NULL),
              '>', 20::bigint, 'key paths through arrays (lax unwrapping) found values');
SELECT * FROM finish();
ROLLBACK;
