-- Prices and billing periods: unit, graduated, volume, package and
-- percentage prices over meters, priced exactly over a period (src/price.c).

CREATE TABLE metering.prices (
  id                     uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  meter_slug             text COLLATE "C" NOT NULL REFERENCES metering.meters (slug),
  meter_group_by_filters jsonb,
  subject                text COLLATE "C",
  model                  text NOT NULL,
  currency               text NOT NULL DEFAULT 'USD',
  unit_amount            numeric,
  tiers                  jsonb,
  package_size           numeric,
  package_amount         numeric,
  free_units             numeric,
  rate                   numeric,
  fixed_amount_per_event numeric,
  free_events            bigint,
  min_per_event          numeric,
  max_per_event          numeric,
  minimum_amount         numeric,
  bill                   text NOT NULL DEFAULT 'usage',
  start                  timestamptz NOT NULL DEFAULT metering.now(),
  "end"                  timestamptz,
  name                   text,
  description            text,
  created_at             timestamptz NOT NULL DEFAULT metering.now(),
  created_by             text NOT NULL DEFAULT current_user,
  updated_at             timestamptz,
  updated_by             text,
  deleted_at             timestamptz,
  deleted_by             text
);
CREATE INDEX prices_subject_idx ON metering.prices (subject, meter_slug);
CREATE INDEX prices_meter_idx ON metering.prices (meter_slug);
COMMENT ON INDEX metering.prices_subject_idx IS 'the prices of a subject (and, with NULL, everyone''s) for metering.price_usage';
COMMENT ON INDEX metering.prices_meter_idx IS 'the prices of a meter, for the uniqueness check and the meter''s foreign key';
COMMENT ON TABLE metering.prices IS
  'prices over meters for a billing period (unit, graduated, volume, package, percentage); one price per meter, filters and subject at any instant (23505); before its start a price may change, once started only its end; DELETE is a soft delete';
COMMENT ON COLUMN metering.prices.id IS 'the price id (uuid v7)';
COMMENT ON COLUMN metering.prices.meter_slug IS 'the meter whose value over the period is the quantity (SUM or COUNT; percentage: SUM)';
COMMENT ON COLUMN metering.prices.meter_group_by_filters IS 'group name -> value: only the meter''s events with these group values count (as features); NULL: all';
COMMENT ON COLUMN metering.prices.subject IS 'NULL: everyone; else only this subject, for whom it replaces the general price of the same meter and filters';
COMMENT ON COLUMN metering.prices.model IS 'unit, graduated, volume, package or percentage';
COMMENT ON COLUMN metering.prices.currency IS 'ISO 4217 code (three capital letters), default USD; rounded amounts use its minor unit (metering.currency_minor_unit)';
COMMENT ON COLUMN metering.prices.unit_amount IS 'unit: the price of one unit';
COMMENT ON COLUMN metering.prices.tiers IS 'graduated and volume: [{"up_to": n or null, "unit_amount": x, "flat_amount": y}], up_to inclusive and strictly ascending, the last null';
COMMENT ON COLUMN metering.prices.package_size IS 'package: units per package (positive)';
COMMENT ON COLUMN metering.prices.package_amount IS 'package: the price of one package, started packages count whole';
COMMENT ON COLUMN metering.prices.free_units IS 'package: units of the period that are free (default 0)';
COMMENT ON COLUMN metering.prices.rate IS 'percentage: the fee as a fraction of each event''s value (0.029 is 2.9 %)';
COMMENT ON COLUMN metering.prices.fixed_amount_per_event IS 'percentage: added to each event''s fee (default 0)';
COMMENT ON COLUMN metering.prices.free_events IS 'percentage: the first this many events of the period are free (default 0)';
COMMENT ON COLUMN metering.prices.min_per_event IS 'percentage: an event''s fee is at least this (NULL: no bound)';
COMMENT ON COLUMN metering.prices.max_per_event IS 'percentage: an event''s fee is at most this (NULL: no bound)';
COMMENT ON COLUMN metering.prices.minimum_amount IS 'the least the price bills for a period: a ''minimum'' line makes up the difference';
COMMENT ON COLUMN metering.prices.bill IS 'usage: all usage of the period; overage: only what the subject''s grants for the meter''s feature did not cover';
COMMENT ON COLUMN metering.prices.start IS 'from when it applies (default metering.now(); earlier needs metering.allow_backdated_rules)';
COMMENT ON COLUMN metering.prices."end" IS 'until when it applies (exclusive); NULL: no end';
COMMENT ON COLUMN metering.prices.name IS 'a readable name (an invoice line''s label)';
COMMENT ON COLUMN metering.prices.description IS 'free text';
COMMENT ON COLUMN metering.prices.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.prices.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.prices.updated_at IS 'when it was last changed';
COMMENT ON COLUMN metering.prices.updated_by IS 'who last changed it';
COMMENT ON COLUMN metering.prices.deleted_at IS 'when it was deleted: periods that start before then still see it';
COMMENT ON COLUMN metering.prices.deleted_by IS 'who deleted it';
SELECT pg_catalog.pg_extension_config_dump('metering.prices', '');

-- row security as on the other tables that name a subject: a role sees the
-- general prices and those of its subjects (admins see all)
ALTER TABLE metering.prices ENABLE ROW LEVEL SECURITY;
CREATE POLICY prices_by_subject ON metering.prices
  USING (subject IS NULL OR (SELECT metering._visible_subjects(current_user)) IS NULL
         OR subject = ANY (CAST((SELECT metering._visible_subjects(current_user)) AS text[])))
  WITH CHECK (true);
COMMENT ON POLICY prices_by_subject ON metering.prices IS
  'a role sees the general prices and those of its subjects and their children (metering.subject_access); admins see all';

-- the engine (src/price.c, src/price_fn.c)
CREATE FUNCTION metering._price_check(price metering.prices) RETURNS void
  AS 'MODULE_PATHNAME', 'metering_price_check'
  LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION metering._price_check(metering.prices) IS
  'internal: raises 22023 naming the field when a price''s model or parameters are not sound';

CREATE FUNCTION metering._price_amount(price metering.prices, quantity numeric,
  OUT amount numeric, OUT details jsonb)
  AS 'MODULE_PATHNAME', 'metering_price_amount'
  LANGUAGE C STABLE;
COMMENT ON FUNCTION metering._price_amount(metering.prices, numeric) IS
  'internal: the exact amount of a period''s quantity under a price (percentage: of one event of that value), with its details';

CREATE FUNCTION metering._price_fee(rate numeric, fixed numeric, min numeric, max numeric, value numeric) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_price_fee'
  LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering._price_fee(numeric, numeric, numeric, numeric, numeric) IS
  'internal: one event''s fee under a percentage price: rate x value + fixed, bounded by min and max';

-- the minor unit of a currency (ISO 4217): 2 but for the ones listed
CREATE FUNCTION metering.currency_minor_unit(currency text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN CASE WHEN currency IN ('JPY', 'KRW') THEN 0
            WHEN currency IN ('BHD', 'KWD', 'OMR') THEN 3
            ELSE 2 END;
COMMENT ON FUNCTION metering.currency_minor_unit(text) IS
  'the decimals a currency''s amounts are rounded to: 0 for JPY and KRW, 3 for BHD, KWD and OMR, else 2';

CREATE FUNCTION metering._prices_unchanged_since_snapshot(meter text) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_prices_unchanged_since_snapshot'
  LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION metering._prices_unchanged_since_snapshot(text) IS
  'internal: at REPEATABLE READ or SERIALIZABLE, raises 40001 when another transaction changed the meter''s prices after this one''s snapshot';

CREATE FUNCTION metering._prices_before_write() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  backdated boolean := current_setting('metering.allow_backdated_rules')::boolean;
  fresh boolean;
  shape boolean := true;
  nv jsonb := to_jsonb(NEW);
  ov jsonb;
  m metering.meters;
  f record;
  dup uuid;
BEGIN
  IF TG_OP = 'UPDATE' THEN
    ov := to_jsonb(OLD);
    IF OLD.deleted_at IS NOT NULL THEN
      RAISE EXCEPTION 'price: the price is deleted'
        USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Price %s, deleted at %s.', OLD.id, OLD.deleted_at);
    END IF;
    IF (NEW.id, NEW.created_at, NEW.created_by) IS DISTINCT FROM (OLD.id, OLD.created_at, OLD.created_by) THEN
      RAISE EXCEPTION 'price: id, created_at and created_by never change' USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF NEW.deleted_at IS NOT NULL THEN
      IF (nv - 'deleted_at' - 'deleted_by') IS DISTINCT FROM (ov - 'deleted_at' - 'deleted_by') THEN
        RAISE EXCEPTION 'price: a deletion changes nothing else' USING ERRCODE = 'object_not_in_prerequisite_state';
      END IF;
      NEW.deleted_at := now;
      NEW.deleted_by := current_user;
      RETURN NEW;
    END IF;
    IF NEW.deleted_by IS NOT NULL THEN
      RAISE EXCEPTION 'price: deleted_by comes with a deletion' USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF OLD.start <= now THEN
      -- started: only the end may change, and not into the past
      IF (nv - 'end' - 'updated_at' - 'updated_by') IS DISTINCT FROM (ov - 'end' - 'updated_at' - 'updated_by') THEN
        RAISE EXCEPTION 'price: the price has started (%): only its end may change', OLD.start
          USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Price %s.', OLD.id),
                HINT = 'Set its end and create a new price from then.';
      END IF;
      IF OLD."end" <= now AND NEW."end" IS DISTINCT FROM OLD."end" AND NOT backdated THEN
        RAISE EXCEPTION 'price: the price ended at %: it cannot be reopened', OLD."end"
          USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Price %s.', OLD.id),
                HINT = 'Create a new price from now.';
      END IF;
      IF NEW."end" IS NOT NULL AND NEW."end" < now AND NOT backdated THEN
        RAISE EXCEPTION 'price: end % is in the past', NEW."end"
          USING ERRCODE = 'invalid_parameter_value', HINT = 'Prices are not changed retroactively.';
      END IF;
      fresh := false;
      shape := false;
    ELSE
      fresh := true;             -- not started yet: checked like a new price
    END IF;
    NEW.updated_at := now;
    NEW.updated_by := current_user;
  ELSE
    fresh := NOT metering._restored('price', NEW.created_at);
    IF fresh THEN
      NEW.created_by := current_user;
      IF NEW.updated_at IS NOT NULL OR NEW.updated_by IS NOT NULL
         OR NEW.deleted_at IS NOT NULL OR NEW.deleted_by IS NOT NULL THEN
        RAISE EXCEPTION 'price: a new price is neither updated nor deleted' USING ERRCODE = 'invalid_parameter_value';
      END IF;
    END IF;
  END IF;

  IF shape THEN
    -- the meter: SUM or COUNT (percentage: SUM); a restored price may name a meter deleted since
    SELECT * INTO m FROM metering.meters mm WHERE mm.slug = NEW.meter_slug AND (mm.deleted_at IS NULL OR NOT fresh);
    IF NOT FOUND THEN
      RAISE EXCEPTION 'price: meter % does not exist', coalesce(quote_literal(NEW.meter_slug), 'NULL')
        USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF m.aggregation NOT IN ('SUM', 'COUNT') THEN
      RAISE EXCEPTION 'price: meter_slug "%" aggregates with %, but a price''s meter must SUM or COUNT', m.slug, m.aggregation
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.model = 'percentage' AND m.aggregation <> 'SUM' THEN
      RAISE EXCEPTION 'price: a percentage price needs a SUM meter (of transaction amounts), meter_slug "%" aggregates with %', m.slug, m.aggregation
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.meter_group_by_filters IS NOT NULL THEN
      IF jsonb_typeof(NEW.meter_group_by_filters) <> 'object' THEN
        RAISE EXCEPTION 'price: meter_group_by_filters must be a JSON object of group name to value, got %', NEW.meter_group_by_filters
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      FOR f IN SELECT key, value FROM jsonb_each(NEW.meter_group_by_filters) LOOP
        IF NOT m.group_by ? f.key THEN
          RAISE EXCEPTION 'price: meter_group_by_filters "%" is not a group of meter "%"', f.key, m.slug
            USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(f.value) NOT IN ('string', 'number', 'boolean') THEN
          RAISE EXCEPTION 'price: meter_group_by_filters "%" must be a single value, got %', f.key, f.value
            USING ERRCODE = 'invalid_parameter_value';
        END IF;
      END LOOP;
      -- group values compare as text, as the meter stores them; {} is no filter
      NEW.meter_group_by_filters := (SELECT jsonb_object_agg(key, value #>> '{}') FROM jsonb_each(NEW.meter_group_by_filters));
    END IF;
    IF NEW.subject = '' THEN
      RAISE EXCEPTION 'price: subject is NULL (everyone) or a subject, not empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.currency IS NULL OR NEW.currency !~ '^[A-Z]{3}$' THEN
      RAISE EXCEPTION 'price: currency must be an ISO 4217 code (three capital letters), got %', coalesce(quote_literal(NEW.currency), 'NULL')
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.bill IS NULL OR NEW.bill NOT IN ('usage', 'overage') THEN
      RAISE EXCEPTION 'price: bill must be usage or overage, got %', coalesce(quote_literal(NEW.bill), 'NULL')
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.bill = 'overage' AND NEW.model = 'percentage' THEN
      RAISE EXCEPTION 'price: bill overage does not apply to a percentage price (its fees are per event)'
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM metering._price_check(NEW);
  END IF;
  IF NEW.start IS NULL OR NOT isfinite(NEW.start) THEN
    RAISE EXCEPTION 'price: start must be a finite time' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW."end" IS NOT NULL AND (NEW."end" <= NEW.start OR NOT isfinite(NEW."end")) THEN
    RAISE EXCEPTION 'price: end (%) must be after start (%)', NEW."end", NEW.start USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF fresh THEN
    IF NEW.start < now AND NOT backdated THEN
      RAISE EXCEPTION 'price: start % is in the past', NEW.start
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'SET metering.allow_backdated_rules = on to re-price the past on purpose.';
    END IF;
    IF NEW."end" < now AND NOT backdated THEN
      RAISE EXCEPTION 'price: end % is in the past', NEW."end"
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'SET metering.allow_backdated_rules = on to re-price the past on purpose.';
    END IF;
  END IF;

  -- one price per meter, filters and subject at any instant: writers of one
  -- meter take turns, so that the check below sees the others' prices
  PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('metering.prices ' || NEW.meter_slug));
  PERFORM metering._prices_unchanged_since_snapshot(NEW.meter_slug);
  SELECT p.id INTO dup FROM metering.prices p
   WHERE p.id <> NEW.id AND p.meter_slug = NEW.meter_slug
     AND p.subject IS NOT DISTINCT FROM NEW.subject
     AND p.meter_group_by_filters IS NOT DISTINCT FROM NEW.meter_group_by_filters
     AND p.start < coalesce(least(p."end", p.deleted_at), 'infinity')
     AND p.start < coalesce(least(NEW."end", NEW.deleted_at), 'infinity')
     AND NEW.start < coalesce(least(p."end", p.deleted_at), 'infinity')
   LIMIT 1;
  IF dup IS NOT NULL THEN
    RAISE EXCEPTION 'price: another price of meter "%" applies at the same time to the same filters and subject', NEW.meter_slug
      USING ERRCODE = 'unique_violation', DETAIL = format('The other one is %s.', dup),
            HINT = 'End the other one first, or give this one a start after its end.';
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._prices_before_write() IS
  'internal: validates a price, its validity period and its uniqueness; started prices may only get an end; deletions are stamped';

CREATE FUNCTION metering._prices_soft_delete() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF OLD.deleted_at IS NULL THEN
    UPDATE metering.prices SET deleted_at = metering.now() WHERE id = OLD.id;
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._prices_soft_delete() IS 'internal: DELETE keeps the price and marks it deleted';

CREATE TRIGGER prices_before_write BEFORE INSERT OR UPDATE ON metering.prices
  FOR EACH ROW EXECUTE FUNCTION metering._prices_before_write();
CREATE TRIGGER prices_soft_delete BEFORE DELETE ON metering.prices
  FOR EACH ROW EXECUTE FUNCTION metering._prices_soft_delete();
COMMENT ON TRIGGER prices_before_write ON metering.prices IS 'validates prices and keeps their audit columns';
COMMENT ON TRIGGER prices_soft_delete ON metering.prices IS 'DELETE is a soft delete';

CREATE FUNCTION metering.price_quote(price_id uuid, quantity numeric)
  RETURNS TABLE(amount numeric, details jsonb)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  p metering.prices;
BEGIN
  SELECT * INTO p FROM metering.prices pp WHERE pp.id = price_quote.price_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'price % does not exist', price_quote.price_id USING ERRCODE = 'no_data_found';
  END IF;
  RETURN QUERY SELECT a.amount, a.details FROM metering._price_amount(p, price_quote.quantity) a;
END $$;
COMMENT ON FUNCTION metering.price_quote(uuid, numeric) IS
  'what a price makes of a quantity for one period (percentage: of one paying event of that value), exact, with the details';

-- The overage of a subject's entitlement to the meter's feature in
-- [from_time, to_time): the growth of the overage within each segment of
-- its burndown (rollover segments [R, R] and the forgiving of overage at a
-- reset are not usage).  NULL when the subject has no such entitlement.
CREATE FUNCTION metering._price_overage(subject text, meter text, filters jsonb, from_time timestamptz, to_time timestamptz)
  RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  ent uuid;
  since timestamptz;
  result numeric;
BEGIN
  SELECT e.id, e.measure_usage_from INTO ent, since
    FROM metering.entitlements e JOIN metering.features f ON f.id = e.feature_id
   WHERE e.subject = _price_overage.subject AND e.type = 'metered'
     AND f.meter_slug = _price_overage.meter
     AND coalesce(f.meter_group_by_filters, '{}') = coalesce(_price_overage.filters, '{}')
     AND (e.deleted_at IS NULL OR e.deleted_at > from_time)
   ORDER BY e.created_at DESC, e.id DESC LIMIT 1;
  IF ent IS NULL THEN
    RETURN NULL;
  END IF;
  IF since >= to_time THEN
    RETURN 0;
  END IF;
  SELECT coalesce(sum(h.overage - h.overage_at_start), 0) INTO result
    FROM metering.burndown_history(ent, greatest(from_time, since), to_time) h
   WHERE h.segment_end > h.segment_start;
  RETURN result;
END $$;
COMMENT ON FUNCTION metering._price_overage(text, text, jsonb, timestamptz, timestamptz) IS
  'internal: the usage above what the subject''s grants covered in [from_time, to_time), from the burndown of its entitlement to the meter''s feature; NULL without one';

-- Whether any event was numbered after `seq`: when none was, a meter whose
-- watermark is at the sequence's last number has no events above it, and
-- price_usage reads the rollups alone.  SECURITY DEFINER: the roles may not
-- read the sequence; this tells them no more than whether any event was
-- stored since the meter's last refresh.
CREATE FUNCTION metering._events_after_watermark(meter text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
  -- (of one meter's watermark, not of any number a caller picks: the
  -- answer says only whether events were stored since its last refresh;
  -- STABLE, so the watermark is read in the caller's snapshot, the one its
  -- rollups are read in)
  SELECT coalesce(pg_catalog.pg_sequence_last_value('metering.events_seq'::pg_catalog.regclass)
                  > (SELECT s.rolled_up_to FROM metering.meter_rollup_state s WHERE s.meter = _events_after_watermark.meter),
                  true);
END;
COMMENT ON FUNCTION metering._events_after_watermark(text) IS
  'internal: whether metering.events_seq has handed out a number above the meter''s watermark (an event may be stored above it)';

CREATE FUNCTION metering.price_usage(subject text, from_time timestamptz, to_time timestamptz)
  RETURNS TABLE(price_id uuid, meter text, model text, currency text, quantity numeric,
                amount numeric, rounded numeric, details jsonb)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  p metering.prices;
  m metering.meters;
  qty numeric;
  usage numeric;
  over numeric;
  amt numeric;
  det jsonb;
  digits integer;
  n bigint;
  nfree bigint;
  wm bigint;
  lo timestamptz;               -- rollups cover the whole UTC hours [lo, hi)
  hi timestamptz;
BEGIN
  IF subject IS NULL OR from_time IS NULL OR to_time IS NULL OR NOT isfinite(from_time) OR NOT isfinite(to_time) THEN
    RAISE EXCEPTION 'price_usage: subject, from_time and to_time are required (finite times)' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF to_time <= from_time THEN
    RAISE EXCEPTION 'price_usage: to_time (%) must be after from_time (%)', to_time, from_time USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM metering._require_subject(subject);
  lo := date_trunc('hour', from_time, 'UTC');
  IF lo < from_time THEN
    lo := lo + interval '1 hour';
  END IF;
  hi := date_trunc('hour', to_time, 'UTC');
  IF lo >= hi THEN              -- within one hour: the events only
    lo := to_time;
    hi := to_time;
  END IF;
  FOR p IN
    SELECT pp.* FROM metering.prices pp
     WHERE (pp.subject = price_usage.subject OR pp.subject IS NULL)
       AND pp.start <= from_time AND from_time < coalesce(least(pp."end", pp.deleted_at), 'infinity')
       AND (pp.subject IS NOT NULL OR NOT EXISTS (
             SELECT 1 FROM metering.prices o
              WHERE o.subject = price_usage.subject AND o.meter_slug = pp.meter_slug
                AND o.meter_group_by_filters IS NOT DISTINCT FROM pp.meter_group_by_filters
                AND o.start <= from_time AND from_time < coalesce(least(o."end", o.deleted_at), 'infinity')))
     ORDER BY pp.meter_slug, pp.meter_group_by_filters::text NULLS FIRST, pp.id
  LOOP
    digits := metering.currency_minor_unit(p.currency);
    SELECT * INTO m FROM metering.meters mm WHERE mm.slug = p.meter_slug;
    IF p.model = 'percentage' THEN
      SELECT count(*), coalesce(sum(x.v), 0), count(*) FILTER (WHERE x.rn <= coalesce(p.free_events, 0)),
             coalesce(sum(metering._price_fee(p.rate, p.fixed_amount_per_event, p.min_per_event, p.max_per_event, x.v))
                        FILTER (WHERE x.rn > coalesce(p.free_events, 0)), 0)
        INTO n, qty, nfree, amt
        FROM (SELECT v.v, row_number() OVER (ORDER BY e.time, e.seq) AS rn
                FROM metering.events e
                CROSS JOIN LATERAL (SELECT metering._meter_number(e.data, m.value_property) AS v) v
               WHERE e.type = m.event_type AND e.subject = price_usage.subject
                 AND e.time >= from_time AND e.time < to_time AND v.v IS NOT NULL
                 AND (p.meter_group_by_filters IS NULL
                      OR metering._meter_groups(e.data, m.group_by) @> p.meter_group_by_filters)) x;
      det := jsonb_build_object('events', n, 'free_events', nfree, 'paid_events', n - nfree, 'value', qty,
                                'rate', p.rate, 'fixed_amount_per_event', coalesce(p.fixed_amount_per_event, 0),
                                'min_per_event', p.min_per_event, 'max_per_event', p.max_per_event,
                                'fees', amt, 'amount', amt);
    ELSE
      -- the meter's value over the period, as metering.query_meter reads it
      -- (one window) but in a statement whose plan is kept: whole UTC hours
      -- from the rollups (events up to the meter's watermark), the events
      -- above the watermark and those of the partial hours at either end
      wm := coalesce((SELECT s.rolled_up_to FROM metering.meter_rollup_state s WHERE s.meter = m.slug), 0);
      qty := coalesce((SELECT CASE WHEN m.aggregation = 'COUNT' THEN sum(r.events)::numeric ELSE sum(r.sum) END
                         FROM metering.meter_rollups r
                        WHERE r.meter = m.slug AND r.subject = price_usage.subject AND r.bucket >= lo AND r.bucket < hi
                          AND (p.meter_group_by_filters IS NULL OR r.groups @> p.meter_group_by_filters)), 0)
           + CASE WHEN lo = from_time AND hi = to_time AND NOT metering._events_after_watermark(m.slug) THEN 0 ELSE
             coalesce((SELECT CASE WHEN m.aggregation = 'COUNT' THEN count(*)::numeric
                                   ELSE sum(metering._meter_number(e.data, m.value_property)) END
                         FROM metering.events e
                        WHERE e.type = m.event_type AND e.subject = price_usage.subject
                          AND ((e.time >= from_time AND e.time < lo) OR (e.time >= hi AND e.time < to_time)
                               OR (e.seq > wm AND e.time >= lo AND e.time < hi))
                          AND (p.meter_group_by_filters IS NULL
                               OR metering._meter_groups(e.data, m.group_by) @> p.meter_group_by_filters)), 0) END;
      IF p.bill = 'overage' THEN
        usage := qty;
        over := metering._price_overage(price_usage.subject, p.meter_slug, p.meter_group_by_filters, from_time, to_time);
        qty := coalesce(over, usage);
      END IF;
      SELECT a.amount, a.details INTO amt, det FROM metering._price_amount(p, qty) a;
      IF p.bill = 'overage' THEN
        det := det || jsonb_build_object('bill', 'overage', 'usage', usage, 'entitlement', over IS NOT NULL);
      END IF;
    END IF;
    price_id := p.id; meter := p.meter_slug; model := p.model; currency := p.currency;
    quantity := qty; amount := amt; rounded := round(amt, digits); details := det;
    RETURN NEXT;
    IF p.minimum_amount IS NOT NULL AND amt < p.minimum_amount THEN
      -- the rounded lines of a price add up to its rounded minimum
      model := 'minimum'; quantity := NULL;
      amount := p.minimum_amount - amt;
      rounded := round(p.minimum_amount, digits) - round(amt, digits);
      details := jsonb_build_object('minimum_amount', p.minimum_amount, 'priced', amt);
      RETURN NEXT;
    END IF;
  END LOOP;
END $$;
COMMENT ON FUNCTION metering.price_usage(text, timestamptz, timestamptz) IS
  'one line per price that applies to the subject, over [from_time, to_time) as one billing period, with the prices valid at from_time: quantity, exact amount, amount rounded to the currency''s minor unit, details; plus a ''minimum'' line where a price''s minimum_amount was not reached';

REVOKE EXECUTE ON FUNCTION metering._prices_before_write(), metering._prices_soft_delete() FROM PUBLIC;
