-- What the background refresh did (worker.c): one row per round, the last
-- thousand kept.  Derived: written by the worker, not dumped.

CREATE TABLE metering.refresh_rounds (
  started_at timestamptz PRIMARY KEY,
  ended_at   timestamptz NOT NULL,
  meters     integer NOT NULL,
  failed     integer NOT NULL,
  events     bigint NOT NULL,
  snapshots  bigint NOT NULL,
  last_error text
);
COMMENT ON TABLE metering.refresh_rounds IS
  'derived: the rounds of the background refresh of this database (metering in shared_preload_libraries), the last thousand; written by the worker';
COMMENT ON COLUMN metering.refresh_rounds.started_at IS 'when the round started';
COMMENT ON COLUMN metering.refresh_rounds.ended_at IS 'when it ended';
COMMENT ON COLUMN metering.refresh_rounds.meters IS 'the live meters it refreshed, each in a transaction of its own';
COMMENT ON COLUMN metering.refresh_rounds.failed IS 'the steps that failed (tried again next round)';
COMMENT ON COLUMN metering.refresh_rounds.events IS '(meter, event) pairs rolled up';
COMMENT ON COLUMN metering.refresh_rounds.snapshots IS 'entitlement snapshots written';
COMMENT ON COLUMN metering.refresh_rounds.last_error IS 'the last failure of the round: the step and the error';

CREATE VIEW metering.refresh_status WITH (security_invoker = true) AS
SELECT r.started_at, r.ended_at, r.meters, r.failed, r.events, r.snapshots, r.last_error,
       (SELECT min(s.refreshed_at) FROM metering.meter_rollup_state s) AS oldest_refresh
  FROM metering.refresh_rounds r
 ORDER BY r.started_at DESC
 LIMIT 20;
COMMENT ON VIEW metering.refresh_status IS
  'the last 20 rounds of the background refresh of this database, newest first; oldest_refresh is the least recent refresh of any live meter (by the worker or by refresh_rollups())';
COMMENT ON COLUMN metering.refresh_status.started_at IS 'when the round started';
COMMENT ON COLUMN metering.refresh_status.ended_at IS 'when it ended';
COMMENT ON COLUMN metering.refresh_status.meters IS 'the live meters it refreshed';
COMMENT ON COLUMN metering.refresh_status.failed IS 'the steps that failed (tried again next round)';
COMMENT ON COLUMN metering.refresh_status.events IS '(meter, event) pairs rolled up';
COMMENT ON COLUMN metering.refresh_status.snapshots IS 'entitlement snapshots written';
COMMENT ON COLUMN metering.refresh_status.last_error IS 'the last failure of the round';
COMMENT ON COLUMN metering.refresh_status.oldest_refresh IS 'the least recent refresh_rollups of any live meter';
