-- Ingestion: CloudEvents in, exactly once per (source, id).

CREATE FUNCTION metering._parse_events(events jsonb, batch boolean,
  OUT ord integer, OUT id text, OUT source text, OUT subject text, OUT type text,
  OUT "time" timestamptz, OUT data jsonb)
  RETURNS SETOF record
  AS 'MODULE_PATHNAME', 'metering_parse_events'
  LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION metering._parse_events(jsonb, boolean) IS
  'internal: validates one CloudEvents object (batch false) or an array of them, and returns the rows to store';

-- Stores the events of one CloudEvents object (batch false) or array and
-- returns how many were new; what stores events (ingest, ingest_batch,
-- commit_reservation, consume) stores them here.  _parse_events returns a
-- batch in (source, id) order (see ingest.c).  The conflict target is left
-- out: it is the events' one unique key, (source, id) on one node and
-- (subject, source, id) once distributed (metering.distribute()).  Stored
-- rows are counted from RETURNING: Citus's ROW_COUNT of an INSERT ... SELECT
-- counts the duplicates too.  Once distributed, the stored rows are handed
-- to their alerts (35_alerts.sql: the events' trigger runs on the shards
-- there).
CREATE FUNCTION metering._store_events(events jsonb, batch boolean) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  dist boolean := metering._distributed();
  k record;
BEGIN
  WITH stored AS (
    INSERT INTO metering.events AS e (id, source, subject, type, time, data)
    SELECT p.id, p.source, p.subject, p.type, p.time, p.data
      FROM metering._parse_events(events, batch) p
    ON CONFLICT DO NOTHING RETURNING e.subject, e.type, e.time, CASE WHEN dist THEN e.data END AS data)
  SELECT count(*) AS n, array_agg(subject) FILTER (WHERE dist) AS subjects, array_agg(type) FILTER (WHERE dist) AS types,
         array_agg(time) FILTER (WHERE dist) AS times, array_agg(data) FILTER (WHERE dist) AS datas
    INTO k FROM stored;
  IF k.subjects IS NOT NULL THEN
    PERFORM metering._alerts_for_events(k.subjects, k.types, k.times, k.datas);
  END IF;
  RETURN k.n;
END $$;
COMMENT ON FUNCTION metering._store_events(jsonb, boolean) IS
  'internal: stores the events of a CloudEvents object or array (and, distributed, evaluates their alerts); returns how many were new';
REVOKE EXECUTE ON FUNCTION metering._store_events(jsonb, boolean) FROM PUBLIC;

CREATE FUNCTION metering.ingest(event jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF event IS NULL THEN
    RAISE EXCEPTION 'event must not be NULL' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN metering._store_events(event, false) = 1;
END $$;
COMMENT ON FUNCTION metering.ingest(jsonb) IS
  'stores one CloudEvents 1.0 event; true when stored, false when (source, id) was already stored (also by a concurrent session)';

CREATE FUNCTION metering.ingest_batch(events jsonb)
  RETURNS TABLE(accepted bigint, duplicates bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF events IS NULL THEN
    RAISE EXCEPTION 'events must not be NULL' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  accepted := metering._store_events(events, true);
  duplicates := jsonb_array_length(events) - accepted;
  RETURN NEXT;
END $$;
COMMENT ON FUNCTION metering.ingest_batch(jsonb) IS
  'stores an array of CloudEvents 1.0 events, all or nothing for invalid input (the error names the index and the field); repeats of stored or earlier (source, id) are counted as duplicates';
