-- What a balance read and a refresh read of the events: the events above
-- the rollups' watermark are found through the btree on (seq, subject), so
-- a subject's balance reads its own recent rows (not every subject's, not
-- every range of the table) and a refresh reads the new events (not the
-- ranges they share with older ones).  Counted with the statistics of the
-- transaction (rows the scans returned from the events' heap), not timed.
BEGIN;
SELECT plan(5);
SET LOCAL metering.now = '2024-06-01 00:00:00+00';

INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('tr', 'tr.tokens', 'SUM', '$.n');
SELECT metering.create_feature('tr', 'Tail read', 'tr') IS NOT NULL AS feature;
SELECT metering.create_entitlement('tr-a', 'tr', usage_period => '1 month', usage_period_anchor => '2024-06-01') AS ent \gset
SELECT metering.create_grant(:'ent', 1000000, '2024-06-01') IS NOT NULL AS grant;
SET LOCAL metering.now = '2024-06-01 12:00:00+00';
-- 40,000 events of 400 subjects in the last hours, rolled up
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'old-' || n, 'tr', 'tr-' || CASE WHEN n % 400 = 0 THEN 'a' ELSE (n % 400)::text END, 'tr.tokens',
       timestamptz '2024-06-01 11:59:00+00' - (n % 36000) * interval '1 second', '{"n": 1}'
  FROM generate_series(1, 40000) n;
SELECT metering.refresh_rollups() > 0 AS refreshed;
ANALYZE metering.events;

CREATE TEMP TABLE reads (what text, n bigint);
CREATE FUNCTION pg_temp.events_read() RETURNS bigint LANGUAGE sql AS
  $$SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables
     WHERE relid = 'metering.events'::regclass$$;

-- then 3 events of tr-a and 600 of the others
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'new-' || n, 'tr', CASE WHEN n <= 3 THEN 'tr-a' ELSE 'tr-' || (1 + n % 399) END, 'tr.tokens',
       timestamptz '2024-06-01 11:59:00+00', '{"n": 10}'
  FROM generate_series(1, 603) n;

INSERT INTO reads SELECT 'before', pg_temp.events_read();
SELECT is((SELECT usage FROM metering.entitlement_value('tr-a', 'tr')), 100 + 30::numeric,
          'the balance counts the rolled-up usage and the 3 events above the watermark');
INSERT INTO reads SELECT 'value', pg_temp.events_read();
SELECT cmp_ok((SELECT n FROM reads WHERE what = 'value') - (SELECT n FROM reads WHERE what = 'before'), '<=', 20::bigint,
              'entitlement_value read at most 20 rows of the events (its own 3 recent ones), not the 600 of others');

SELECT is((SELECT granted FROM metering.consume(jsonb_build_object('specversion', '1.0', 'id', 'c1', 'source', 'tr',
          'type', 'tr.tokens', 'subject', 'tr-a', 'time', '2024-06-01T11:59:30Z', 'data', jsonb_build_object('n', 5)), 'tr')),
          true, 'consume is granted');
INSERT INTO reads SELECT 'consume', pg_temp.events_read();
SELECT cmp_ok((SELECT n FROM reads WHERE what = 'consume') - (SELECT n FROM reads WHERE what = 'value'), '<=', 20::bigint,
              'consume read at most 20 rows of the events');

-- a refresh reads the 604 new events (once to count them, once for the
-- rollups, once for the usage periods, once for the snapshots), not the older rows of their pages' ranges
-- (their BRIN ranges are summarized first: the refresh's own summarizing
-- would read the rows of the ranges that are new since the last one)
SELECT brin_summarize_new_values('metering.events_seq_time_brin') >= 0 AS summarized;
INSERT INTO reads SELECT 'summarized', pg_temp.events_read();
SELECT metering.refresh_rollups() > 0 AS refreshed;
INSERT INTO reads SELECT 'refresh', pg_temp.events_read();
SELECT cmp_ok((SELECT n FROM reads WHERE what = 'refresh') - (SELECT n FROM reads WHERE what = 'summarized'), '<=', 4 * 604 + 20::bigint,
              'refresh_rollups read the 604 new events four times, not the older rows around them');
SELECT * FROM finish();
ROLLBACK;
