-- Snapshots: refresh_rollups() saves the engine's state; every change that
-- reaches a saved state removes it in the same transaction; answers never
-- depend on whether a snapshot exists.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-01-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('u', 'use', 'SUM', '$.n');
SELECT metering.create_feature('f', 'F', 'u') IS NOT NULL AS feature;
SELECT metering.create_entitlement('acme', 'f', usage_period => '1 month') AS e \gset
SELECT metering.create_grant(:'e', 1000, '2024-01-01', priority => 1, expiration => '10 days') IS NOT NULL AS g,
       metering.create_grant(:'e', 50, '2024-01-01', priority => 2, recurrence => '1 day') IS NOT NULL AS g,
       metering.create_grant(:'e', 5000, '2024-01-01', priority => 3) IS NOT NULL AS g;

CREATE FUNCTION pg_temp.use(id text, at timestamptz, n numeric) RETURNS boolean LANGUAGE sql AS $$
  SELECT metering.ingest(regress.ev(id, 'acme', 'use', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                                    jsonb_build_object('n', n)))
$$;
-- every answer at every 7th hour of the month, as one text
CREATE FUNCTION pg_temp.answers() RETURNS text LANGUAGE sql AS $$
  SELECT string_agg(format('%s:%s/%s/%s/%s', at, v.balance, v.usage, v.overage, v.total_available_grant_amount), ' ' ORDER BY at)
    FROM generate_series('2024-01-01 00:00'::timestamptz, '2024-01-25', '7 hours') at,
         LATERAL metering.entitlement_value('acme', 'f', at) v
$$;
CREATE FUNCTION pg_temp.snapshots() RETURNS TABLE(at timestamptz, usage numeric, overage numeric, balances numeric[])
LANGUAGE sql AS $$
  SELECT at, usage, overage, balances FROM metering.entitlement_snapshots ORDER BY at
$$;

SET metering.now = '2024-01-20 12:00:00+00';
SELECT bool_and(pg_temp.use('e' || i, '2024-01-01'::timestamptz + i * interval '37 minutes', i % 7)) AS ingested
  FROM generate_series(1, 600) i;
CREATE TEMP TABLE before AS SELECT pg_temp.answers() AS a;
SELECT * FROM metering.entitlement_value('acme', 'f');

-- the refresh saves the state at the last whole hour at least ten minutes
-- before now (past today's refill, the last cut): a reader starting there
-- reads whole hourly rollups
SELECT metering.refresh_rollups() > 0 AS refreshed;
SELECT * FROM pg_temp.snapshots();
SELECT pg_temp.answers() = (SELECT a FROM before) AS same_answers;

-- the snapshot is really used: falsify it and the answer follows it...
UPDATE metering.entitlement_snapshots SET balances = '{7,7}';
SELECT balance FROM metering.entitlement_value('acme', 'f', '2024-01-20 11:30');
-- ...unless its inputs no longer match (a change it missed), then it is ignored
UPDATE metering.entitlement_snapshots SET inputs = inputs + 1;
SELECT balance FROM metering.entitlement_value('acme', 'f', '2024-01-20 11:30');
TRUNCATE metering.entitlement_snapshots;
SELECT metering.refresh_rollups();
SELECT metering._snapshot_meter('u', 0, 1000000) AS written;
SELECT count(*) AS snapshots FROM metering.entitlement_snapshots;

-- a late event before the snapshot counts at once, and the next refresh replaces the snapshot
SELECT pg_temp.use('late-1', '2024-01-19 12:00', 500);
SELECT balance, usage FROM metering.entitlement_value('acme', 'f');
SELECT metering.refresh_rollups() AS refreshed;
SELECT * FROM pg_temp.snapshots();
SELECT balance, usage FROM metering.entitlement_value('acme', 'f');
-- an event after the snapshot leaves it in place
SELECT pg_temp.use('after-1', '2024-01-20 06:00', 1);
SELECT metering.refresh_rollups() AS refreshed;
SELECT count(*) AS snapshots FROM metering.entitlement_snapshots;

-- a grant effective before the snapshot removes it in the same transaction
BEGIN;
SELECT metering.create_grant(:'e', 10, '2024-01-15') IS NOT NULL AS g;
SELECT count(*) AS snapshots FROM metering.entitlement_snapshots;
SELECT balance FROM metering.entitlement_value('acme', 'f');
ROLLBACK;
SELECT count(*) AS snapshots_after_rollback FROM metering.entitlement_snapshots;
SELECT metering.create_grant(:'e', 10, '2024-01-15') IS NOT NULL AS g;
SELECT count(*) AS snapshots FROM metering.entitlement_snapshots;
SELECT metering.refresh_rollups() AS refreshed_nothing_new;
-- the refresh saved a new snapshot all the same: the grant queued the entitlement
SELECT count(*) AS snapshots, (SELECT count(*) FROM metering.entitlement_snapshot_queue) AS queued
  FROM metering.entitlement_snapshots;
-- a grant effective later does not
SELECT metering.create_grant(:'e', 10, '2024-01-25') IS NOT NULL AS g;
SELECT metering.refresh_rollups() >= 0 AS refreshed;
SELECT pg_temp.use('x-1', '2024-01-20 07:00', 1);
SELECT metering.refresh_rollups() AS refreshed;
SELECT count(*) AS snapshots FROM metering.entitlement_snapshots;
SELECT metering.create_grant(:'e', 10, '2024-01-25') IS NOT NULL AS g;
SELECT count(*) AS snapshots FROM metering.entitlement_snapshots;

-- answers with and without snapshots agree after all of this
CREATE TEMP TABLE with_snap AS SELECT pg_temp.answers() AS a;
TRUNCATE metering.entitlement_snapshots;
SELECT pg_temp.answers() = (SELECT a FROM with_snap) AS same_answers;

-- a void removes the snapshots at or after it (voids happen at now; here a cut is at now)
SET metering.now = '2024-01-21 00:00:00+00';
SELECT pg_temp.use('x-2', '2024-01-20 20:00', 1);
SELECT metering.refresh_rollups() AS refreshed;
SELECT * FROM pg_temp.snapshots();
SELECT metering.void_grant(id) FROM metering.grants WHERE entitlement_id = :'e' AND amount = 5000;
SELECT * FROM pg_temp.snapshots();
SELECT balance, overage FROM metering.entitlement_value('acme', 'f');

-- a reset removes those after it
SET metering.now = '2024-01-22 00:00:00+00';
SELECT pg_temp.use('x-3', '2024-01-21 10:00', 1);
SELECT metering.refresh_rollups() AS refreshed;
SELECT * FROM pg_temp.snapshots();
SELECT metering.reset_entitlement(:'e', '2024-01-21 12:00');
SELECT * FROM pg_temp.snapshots();
SELECT balance, usage, start_of_period FROM metering.entitlement_value('acme', 'f');

-- deleting events removes the snapshots they reach
SET metering.now = '2024-01-23 00:00:00+00';
SELECT pg_temp.use('x-4', '2024-01-22 01:00', 3);
SELECT metering.refresh_rollups() AS refreshed;
SELECT * FROM pg_temp.snapshots();
SELECT balance, usage FROM metering.entitlement_value('acme', 'f');
DELETE FROM metering.events WHERE id = 'x-4';
SELECT * FROM pg_temp.snapshots();
SELECT balance, usage FROM metering.entitlement_value('acme', 'f');

-- after all of this, answers with and without snapshots still agree
SELECT pg_temp.use('x-5', '2024-01-22 02:00', 3);
SELECT metering.refresh_rollups() AS refreshed;
CREATE TEMP TABLE with_snap2 AS SELECT pg_temp.answers() AS a;
SELECT count(*) AS snapshots FROM metering.entitlement_snapshots;
BEGIN;
TRUNCATE metering.entitlement_snapshots;
SELECT pg_temp.answers() = (SELECT a FROM with_snap2) AS same_answers;
ROLLBACK;

-- hourly snapshots: past the last cut (today's refill at midnight), the
-- state at the last whole hour ten minutes before now; a newer one replaces
-- the older, the cut's stays
SET metering.now = '2024-01-23 05:30:00+00';
SELECT pg_temp.use('x-6', '2024-01-23 03:10', 2);
SELECT metering.refresh_rollups() AS refreshed;
SELECT * FROM pg_temp.snapshots() WHERE at >= '2024-01-23';
SET metering.now = '2024-01-23 07:05:00+00';
SELECT pg_temp.use('x-7', '2024-01-23 06:10', 2), pg_temp.use('x-8', '2024-01-23 07:01', 4);
SELECT metering.refresh_rollups() AS refreshed;
SELECT * FROM pg_temp.snapshots() WHERE at >= '2024-01-23';
-- a reader after 06:00 starts there; an instant inside the 06:00 hour cuts
-- its bucket once; the answers are those without snapshots
CREATE TEMP TABLE hourly AS
SELECT at, v.balance, v.usage FROM unnest(ARRAY['2024-01-23 06:00', '2024-01-23 06:10', '2024-01-23 06:30',
                                                '2024-01-23 07:01', '2024-01-23 07:05']::timestamptz[]) at,
       LATERAL metering.entitlement_value('acme', 'f', at) v;
SELECT * FROM hourly ORDER BY at;
BEGIN;
TRUNCATE metering.entitlement_snapshots;
SELECT count(*) AS differing FROM hourly h, LATERAL metering.entitlement_value('acme', 'f', h.at) v
 WHERE (v.balance, v.usage) IS DISTINCT FROM (h.balance, h.usage);
ROLLBACK;

-- deleting the entitlement removes the snapshots from its deletion on
SELECT metering.delete_entitlement(:'e');
SELECT * FROM pg_temp.snapshots();
-- snapshots are derived data: not dumped, rebuilt by refresh_rollups()
SELECT count(*) AS dumped FROM pg_extension x, unnest(x.extconfig) c
 WHERE x.extname = 'metering' AND c = 'metering.entitlement_snapshots'::regclass;
