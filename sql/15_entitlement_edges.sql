-- Entitlement edge cases found in review: NULL arguments, odd windows,
-- negative usage, rollup buckets read out of order, and ways around the
-- immutability rules.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('u', 'use', 'SUM', '$.n');
SELECT metering.create_feature('f', 'F', 'u') IS NOT NULL AS feature;
SELECT metering.create_entitlement('acme', 'f', usage_period => '1 month', usage_period_anchor => '2024-06-01') AS e \gset
SELECT metering.create_grant(:'e', 1000, '2024-06-01', priority => 5) IS NOT NULL AS g;
CREATE FUNCTION pg_temp.use(id text, at text, n numeric) RETURNS boolean LANGUAGE sql AS $$
  SELECT metering.ingest(regress.ev(id, 'acme', 'use', at, jsonb_build_object('n', n)))
$$;

-- NULL arguments answer with nothing, never crash
SELECT count(*) AS balances FROM metering.grant_balances(NULL);
SELECT count(*) AS segments FROM metering.burndown_history(NULL);
SELECT count(*) AS windows FROM metering.balance_history(NULL);
SELECT regress.err(format('SELECT count(*) FROM metering._balance_history(%L, NULL, NULL, NULL, %L)', :'e', 'UTC'));
SELECT regress.err(format('SELECT count(*) FROM metering._balance_history(%L, NULL, NULL, %L, %L)', :'e', 'week', 'UTC'));

-- balance_history: a window that starts off the grid ends at the next grid point
SET metering.now = '2024-06-03 00:00:00+00';
SELECT window_start, window_end FROM metering.balance_history(:'e', '2024-06-01 10:45', '2024-06-01 13:00', 'HOUR');
SELECT window_start, window_end FROM metering.balance_history(:'e', '2024-06-01 13:00', '2024-06-03 00:00', 'DAY');

-- negative values are corrections, not usage: they never change a balance,
-- however the engine cuts the period
SELECT pg_temp.use('n1', '2024-06-01T10:10:00Z', 10), pg_temp.use('n2', '2024-06-01T11:10:00Z', -10);
SELECT balance, usage FROM metering.entitlement_value('acme', 'f', '2024-06-01 12:00');
SELECT window_start, usage, balance_at_start FROM metering.balance_history(:'e', '2024-06-01 10:00', '2024-06-01 13:00', 'HOUR');
SELECT metering.refresh_rollups() > 0 AS refreshed;
SELECT balance, usage FROM metering.entitlement_value('acme', 'f', '2024-06-01 12:00');

-- rollup buckets come back in any heap order; split buckets are still all read
SELECT metering.create_grant(:'e', 10, t, priority => 1) IS NOT NULL AS g
  FROM unnest(ARRAY['2024-06-01 14:30', '2024-06-01 16:30']::timestamptz[]) t;
SELECT pg_temp.use('o1', '2024-06-01T14:10:00Z', 1), pg_temp.use('o2', '2024-06-01T16:10:00Z', 1),
       pg_temp.use('o3', '2024-06-01T16:50:00Z', 1);
SELECT metering.refresh_rollups() > 0 AS refreshed;
SELECT pg_temp.use('o4', '2024-06-01T14:50:00Z', 1);    -- updates the 14:00 bucket: it moves in the heap
SELECT metering.refresh_rollups() > 0 AS refreshed;
SELECT balance, usage FROM metering.entitlement_value('acme', 'f', '2024-06-01 18:00');

-- immutability holds for intervals that compare equal ('1 mon' = '30 days')
SELECT regress.err(format('UPDATE metering.entitlements SET usage_period = %L WHERE id = %L', '30 days', :'e'));
SELECT regress.err(format('UPDATE metering.grants SET expiration = %L WHERE entitlement_id = %L AND priority = 5', '30 days', :'e'));
SELECT regress.err($$UPDATE metering.features SET updated_at = '1999-01-01' WHERE key = 'f'$$);
-- an update that changes nothing is skipped, and opens no door to backdated grants
BEGIN;
UPDATE metering.entitlements SET subject = subject WHERE id = :'e';
SELECT regress.err(format('SELECT metering.create_grant(%L, 100, %L)', :'e', '2024-05-01'));
ROLLBACK;
-- a new entitlement is not deleted
SELECT regress.err(format($$INSERT INTO metering.entitlements (subject, feature_id, type, deleted_at)
                            SELECT 'x', id, 'boolean', 'infinity' FROM metering.features WHERE key = 'f'$$));

-- TRUNCATE of grants is a wipe: the snapshots go with it
SET metering.now = '2024-06-05 00:00:00+00';
SELECT pg_temp.use('t1', '2024-06-04T10:00:00Z', 1);
SELECT metering.refresh_rollups() > 0 AS refreshed;
SELECT count(*) > 0 AS has_snapshots FROM metering.entitlement_snapshots;
BEGIN;
TRUNCATE metering.grants;
SELECT count(*) AS snapshots_after_truncate FROM metering.entitlement_snapshots;
ROLLBACK;

-- deleting a meter drops the snapshots of the entitlements that count it
SELECT metering.archive_feature('f');
UPDATE metering.meters SET deleted_at = now() WHERE slug = 'u';
SELECT count(*) AS snapshots_after_meter_deletion FROM metering.entitlement_snapshots;
SELECT balance, usage FROM metering.entitlement_value('acme', 'f', '2024-06-05');

-- the clock takes years 1 to 9999 in UTC
SELECT regress.err($$SET metering.now = '0001-01-01 00:00:00+01'$$);
SELECT regress.err($$SET metering.now = '9999-12-31 23:00:00-05'$$);
