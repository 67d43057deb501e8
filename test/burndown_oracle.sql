-- The burndown engine against an oracle: a minute-by-minute simulation of
-- the rules written in PL/pgSQL, over random entitlements (periods, resets,
-- grants with priorities, expiries, recurrences, rollover bounds, voids) and
-- random usage.  The engine jumps from cut to cut, reads rollups and may
-- start from snapshots; the oracle steps through every minute and reads raw
-- events, so a seam in any of those shows.  Periods and recurrences here are
-- fixed-length (month arithmetic is covered by the regression tests).
BEGIN;
SELECT plan(165);
SELECT setseed(0.42);
SET LOCAL timezone = 'UTC';
SET LOCAL metering.now = '2024-01-01 00:00:00+00';

INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('o', 'o', 'SUM', '$.n');
SELECT metering.create_feature('o', 'Oracle', 'o');

-- the oracle: answers (balance/usage/overage) at minute instants, and the
-- balance of every grant at the last one
CREATE FUNCTION pg_temp.oracle(ent uuid, instants timestamptz[]) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
  e metering.entitlements;
  g record;
  ids uuid[];
  amount numeric[];
  bal numeric[];
  mn numeric[];
  mx numeric[];
  eff timestamptz[];
  fin timestamptz[];
  rec interval[];
  rec_anchor timestamptz[];
  n int;
  t timestamptz;
  t_end timestamptz := (SELECT max(x) FROM unnest(instants) x);
  anchor timestamptz;
  period_secs bigint;
  r metering.resets;
  boundary boolean;
  preserve boolean;
  usage numeric := 0;
  overage numeric := 0;
  take numeric;
  u numeric;
  total numeric := 0;
  answers text[] := '{}';
  per_minute jsonb;
BEGIN
  SELECT * INTO e FROM metering.entitlements WHERE id = ent;
  anchor := e.usage_period_anchor;
  period_secs := extract(epoch FROM e.usage_period)::bigint;
  n := 0;
  FOR g IN SELECT * FROM metering.grants WHERE entitlement_id = ent
            ORDER BY priority, expires_at NULLS LAST, created_at, id LOOP
    n := n + 1;
    ids[n] := g.id; amount[n] := g.amount; bal[n] := 0; mn[n] := g.min_rollover_amount;
    mx[n] := g.max_rollover_amount; eff[n] := g.effective_at;
    fin[n] := least(coalesce(g.expires_at, 'infinity'), coalesce(g.voided_at, 'infinity'),
                    coalesce(g.deleted_at, 'infinity'));
    rec[n] := g.recurrence; rec_anchor[n] := g.recurrence_anchor;
  END LOOP;
  SELECT coalesce(jsonb_object_agg(m, s), '{}') INTO per_minute FROM (
    SELECT date_trunc('minute', time)::text AS m, sum((data->>'n')::numeric) AS s
      FROM metering.events WHERE subject = e.subject AND type = 'o' AND time >= e.measure_usage_from
     GROUP BY 1) x;

  t := e.measure_usage_from;
  WHILE t <= t_end LOOP
    -- the cut at t: a period boundary (a manual reset, or the grid)?
    SELECT * INTO r FROM metering.resets WHERE entitlement_id = ent AND effective_at = t;
    boundary := t > e.measure_usage_from
                AND (r.effective_at IS NOT NULL
                     OR extract(epoch FROM t - anchor)::bigint % period_secs = 0);
    IF boundary THEN
      preserve := coalesce(r.preserve_overage, e.preserve_overage_at_reset);
      IF r.effective_at IS NOT NULL AND NOT r.retain_anchor THEN
        anchor := t;
      END IF;
      FOR i IN 1..n LOOP
        IF eff[i] < t AND t < fin[i] THEN
          bal[i] := least(mx[i], greatest(bal[i], mn[i]));
        END IF;
      END LOOP;
    END IF;
    -- every grant's balance after the cut
    FOR i IN 1..n LOOP
      IF NOT (eff[i] <= t AND t < fin[i]) THEN
        bal[i] := 0;
      ELSIF eff[i] = t THEN
        bal[i] := amount[i];
      ELSIF rec[i] IS NOT NULL
            AND extract(epoch FROM t - rec_anchor[i])::bigint % extract(epoch FROM rec[i])::bigint = 0 THEN
        bal[i] := amount[i];
      END IF;
    END LOOP;
    IF boundary THEN
      usage := 0;
      total := 0;
      IF NOT preserve THEN
        overage := 0;
      END IF;
    END IF;
    -- the carried overage burns first (the grants are in burn order)
    FOR i IN 1..n LOOP
      IF overage > 0 AND eff[i] <= t AND t < fin[i] THEN
        take := least(bal[i], overage);
        bal[i] := bal[i] - take; overage := overage - take; total := total + take;
      END IF;
    END LOOP;
    IF t = ANY (instants) THEN
      answers := answers || format('%s/%s/%s/%s',
                                   trim_scale((SELECT coalesce(sum(bal[i]), 0) FROM generate_series(1, n) i
                                               WHERE eff[i] <= t AND t < fin[i])),
                                   trim_scale(usage), trim_scale(overage),
                                   trim_scale(total + (SELECT coalesce(sum(bal[i]), 0) FROM generate_series(1, n) i
                                                       WHERE eff[i] <= t AND t < fin[i])));
      IF t = t_end THEN
        answers := answers || (SELECT coalesce(array_agg(format('%s=%s', ids[i], trim_scale(bal[i])) ORDER BY ids[i]), '{}')
                                 FROM generate_series(1, n) i WHERE eff[i] <= t AND t < fin[i]);
      END IF;
    END IF;
    -- this minute's usage
    u := coalesce((per_minute->>(t::text))::numeric, 0);
    usage := usage + u;
    FOR i IN 1..n LOOP
      IF u > 0 AND eff[i] <= t AND t < fin[i] THEN
        take := least(bal[i], u);
        bal[i] := bal[i] - take; u := u - take; total := total + take;
      END IF;
    END LOOP;
    overage := overage + u;
    t := t + interval '1 minute';
  END LOOP;
  RETURN answers;
END $$;

-- the engine's answers in the same shape
CREATE FUNCTION pg_temp.engine(ent uuid, instants timestamptz[]) RETURNS text[]
LANGUAGE sql AS $$
  SELECT array_agg(format('%s/%s/%s/%s', trim_scale(v.balance), trim_scale(v.usage), trim_scale(v.overage),
                          trim_scale(v.total_available_grant_amount)) ORDER BY at)
         || (SELECT coalesce(array_agg(format('%s=%s', b.grant_id, trim_scale(b.balance)) ORDER BY b.grant_id), '{}')
               FROM metering.grant_balances(ent, (SELECT max(x) FROM unnest(instants) x)) b)
    FROM unnest(instants) at,
         LATERAL metering.entitlement_value((SELECT subject FROM metering.entitlements WHERE id = ent), ent::text, at) v
$$;

-- a random scenario over two days from t0
CREATE TEMP TABLE pending (at timestamptz, what text, id uuid, flag1 boolean, flag2 boolean);
CREATE FUNCTION pg_temp.scenario(k int) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz := '2024-01-01 00:00:00+00';
  subject text := 'scenario-' || k;
  ent uuid;
  g uuid;
  changes record;
BEGIN
  PERFORM set_config('metering.now', t0::text, true);
  ent := metering.create_entitlement(subject, 'o',
           usage_period => (ARRAY['1 hour', '6 hours', '1 day', '2 days'])[1 + floor(random() * 4)::int]::interval,
           usage_period_anchor => t0 + floor(random() * 600) * interval '1 minute',
           measure_usage_from => t0,
           preserve_overage_at_reset => random() < 0.5,
           is_soft_limit => true);
  TRUNCATE pending;
  FOR i IN 1..(1 + floor(random() * 8)::int) LOOP
    g := metering.create_grant(ent,
           amount => round((random() * 300)::numeric + 0.01, (floor(random() * 3))::int),
           effective_at => t0 + floor(random() * 2400) * interval '1 minute',
           priority => floor(random() * 3)::int,
           expiration => CASE WHEN random() < 0.4 THEN floor(1 + random() * 2000) * interval '1 minute' END,
           recurrence => CASE WHEN random() < 0.4 THEN (ARRAY['1 hour', '3 hours', '1 day'])[1 + floor(random() * 3)::int]::interval END,
           min_rollover_amount => 0,
           max_rollover_amount => round((random() * 200)::numeric));
    IF random() < 0.3 THEN
      INSERT INTO pending VALUES (t0 + floor(random() * 2400) * interval '1 minute', 'void', g);
    END IF;
  END LOOP;
  -- min rollover for some grants: through a second grant with min = max (a top-up)
  IF random() < 0.3 THEN
    PERFORM metering.create_grant(ent, 50, t0, priority => 1, min_rollover_amount => 20, max_rollover_amount => 30);
  END IF;
  FOR i IN 1..floor(random() * 3)::int LOOP
    INSERT INTO pending VALUES (t0 + floor(random() * 2400) * interval '1 minute', 'reset', NULL,
                                random() < 0.5, CASE WHEN random() < 0.3 THEN NULL ELSE random() < 0.5 END);
  END LOOP;
  -- voids and resets happen at metering.now, in time order
  FOR changes IN SELECT * FROM pending ORDER BY at LOOP
    PERFORM set_config('metering.now', changes.at::text, true);
    BEGIN
      IF changes.what = 'void' THEN
        PERFORM metering.void_grant(changes.id);
      ELSE
        PERFORM metering.reset_entitlement(ent, changes.at, retain_anchor => changes.flag1,
                                           preserve_overage => changes.flag2);
      END IF;
    EXCEPTION WHEN object_not_in_prerequisite_state OR invalid_parameter_value THEN
      NULL;  -- an expired grant, or a reset at the same minute as the last: skip it
    END;
  END LOOP;
  -- usage: on minute boundaries, inside minutes, in bursts
  PERFORM set_config('metering.now', (t0 + interval '3 days')::text, true);
  PERFORM metering.ingest_batch(jsonb_agg(jsonb_build_object(
            'specversion', '1.0', 'id', subject || '-' || i, 'source', 'oracle', 'type', 'o', 'subject', subject,
            'time', to_char(t0 + floor(random() * 2880) * interval '1 minute'
                            + CASE WHEN random() < 0.5 THEN floor(random() * 60) * interval '1 second' ELSE '0' END,
                            'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
            'data', jsonb_build_object('n', round((random() * 20)::numeric, (floor(random() * 3))::int)))))
    FROM generate_series(1, 50 + floor(random() * 300)::int) i;
  RETURN ent;
END $$;

CREATE TEMP TABLE scenarios AS SELECT k, pg_temp.scenario(k) AS ent FROM generate_series(1, 40) k;
CREATE TEMP TABLE instants AS
SELECT array_agg(DISTINCT t ORDER BY t) AS ts
  FROM (SELECT '2024-01-01 00:00:00+00'::timestamptz + floor(random() * 2880) * interval '1 minute' AS t
          FROM generate_series(1, 40)
        UNION ALL SELECT '2024-01-02 23:59:00+00') x;

-- the scenarios exercise what they should
SELECT cmp_ok((SELECT count(*) FROM metering.resets), '>=', 20::bigint, 'manual resets');
SELECT cmp_ok((SELECT count(*) FROM metering.grants WHERE voided_at IS NOT NULL), '>=', 10::bigint, 'voided grants');

-- engine = oracle, before any refresh (raw events only)
SELECT is(pg_temp.engine(ent, (SELECT ts FROM instants)), pg_temp.oracle(ent, (SELECT ts FROM instants)),
          'scenario ' || k || ': engine from raw events = oracle')
  FROM scenarios ORDER BY k;

-- with snapshots saved every three hours (as refresh_rollups would as time
-- passes), the same answers
CREATE FUNCTION pg_temp.save_snapshots() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  written bigint := 0;
BEGIN
  FOR h IN 1..16 LOOP
    PERFORM set_config('metering.now', ('2024-01-01 00:00:00+00'::timestamptz + h * interval '3 hours')::text, true);
    written := written + metering.refresh_snapshots();
  END LOOP;
  PERFORM set_config('metering.now', '2024-01-04 00:00:00+00', true);
  RETURN written;
END $$;
SELECT cmp_ok(pg_temp.save_snapshots(), '>', 40::bigint, 'snapshots saved along the way');
SELECT is(pg_temp.engine(ent, (SELECT ts FROM instants)), pg_temp.oracle(ent, (SELECT ts FROM instants)),
          'scenario ' || k || ': engine from snapshots = oracle')
  FROM scenarios ORDER BY k;

-- with the events rolled up too: whole hourly buckets, buckets cut once by
-- an instant (read by the shorter side) and buckets cut more often
SELECT cmp_ok(metering.refresh_rollups(), '>', 0::bigint, 'events rolled up');
SELECT is(pg_temp.engine(ent, (SELECT ts FROM instants)), pg_temp.oracle(ent, (SELECT ts FROM instants)),
          'scenario ' || k || ': engine from rollups and snapshots = oracle')
  FROM scenarios ORDER BY k;

-- snapshots saved along the way again, now over the rollups: those at a cut
-- inside an hour keep that hour's usage before them, which readers take
-- from the hour's rollup instead of reading its events
SELECT cmp_ok(pg_temp.save_snapshots(), '>', 40::bigint, 'snapshots saved again, over the rollups');
SELECT is(pg_temp.engine(ent, (SELECT ts FROM instants)), pg_temp.oracle(ent, (SELECT ts FROM instants)),
          'scenario ' || k || ': engine from rollups and snapshots inside hours = oracle')
  FROM scenarios ORDER BY k;
ROLLBACK;
