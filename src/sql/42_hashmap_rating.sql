-- HashMap rating: pricing points with the rules (C, over a per-backend
-- compiled copy of the rule tables).

CREATE FUNCTION metering.rate(service text, qty numeric, metadata jsonb DEFAULT '{}', tenant text DEFAULT NULL,
                              at timestamptz DEFAULT NULL, price numeric DEFAULT 0) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_rate'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering.rate(text, numeric, jsonb, text, timestamptz, numeric) IS
  'the price of qty of a service with this metadata, for a tenant, under the rules that apply at `at` (default metering.now()): `price` plus each matched group''s price; exact';

CREATE FUNCTION metering.rate_explain(service text, qty numeric, metadata jsonb DEFAULT '{}', tenant text DEFAULT NULL,
                                      at timestamptz DEFAULT NULL)
  RETURNS TABLE(group_name text, flat numeric, rate numeric, threshold_level numeric, price numeric,
                threshold_cost numeric, threshold_type text, threshold_scope text)
  AS 'MODULE_PATHNAME', 'metering_rate_explain'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering.rate_explain(text, numeric, jsonb, text, timestamptz) IS
  'how rate() prices a point: per group that something matched (NULL: the default group), the flat and rate from its mappings, the threshold that applies, and the group''s price';

CREATE FUNCTION metering._rated_total_trans(numeric, text, numeric, jsonb, text) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_rated_total_trans'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering._rated_total_trans(numeric, text, numeric, jsonb, text) IS
  'internal: transition function of metering.rated_total (each point at metering.now())';
CREATE FUNCTION metering._rated_total_trans(numeric, text, numeric, jsonb, text, timestamptz) RETURNS numeric
  AS 'MODULE_PATHNAME', 'metering_rated_total_trans'
  LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION metering._rated_total_trans(numeric, text, numeric, jsonb, text, timestamptz) IS
  'internal: transition function of metering.rated_total (each point at its own instant)';

CREATE AGGREGATE metering.rated_total(service text, qty numeric, metadata jsonb, tenant text) (
  SFUNC = metering._rated_total_trans, STYPE = numeric, COMBINEFUNC = numeric_add, PARALLEL = SAFE
);
COMMENT ON AGGREGATE metering.rated_total(text, numeric, jsonb, text) IS
  'the sum of rate(service, qty, metadata, tenant) over the rows, each rated at metering.now(); parallel safe';
CREATE AGGREGATE metering.rated_total(service text, qty numeric, metadata jsonb, tenant text, at timestamptz) (
  SFUNC = metering._rated_total_trans, STYPE = numeric, COMBINEFUNC = numeric_add, PARALLEL = SAFE
);
COMMENT ON AGGREGATE metering.rated_total(text, numeric, jsonb, text, timestamptz) IS
  'the sum of rate(service, qty, metadata, tenant, at) over the rows, each rated at its own instant (re-rating uses the rules of then); parallel safe';
