-- The refresh summarizes the events' BRIN ranges filled since the last one
-- (reads of the latest events scan every range not summarized yet, and
-- autovacuum's summarization falls behind under heavy ingest).
BEGIN;
SELECT plan(3);
SET LOCAL metering.now = '2024-03-01 00:00:00+00';
INSERT INTO metering.meters (slug, event_type, aggregation) VALUES ('brin', 'brin.e', 'COUNT');
INSERT INTO metering.events (id, source, subject, type, time, data)
SELECT 'b' || i, 'brin', 's' || (i % 50), 'brin.e', '2024-02-29 12:00+00'::timestamptz + i * interval '1 second',
       jsonb_build_object('pad', repeat('x', 200))
  FROM generate_series(1, 20000) i;
SELECT cmp_ok(pg_relation_size('metering.events') / 8192, '>', 100::bigint, 'the events fill several 32-page ranges');
SELECT cmp_ok(metering.refresh_rollups(), '=', 20000::bigint, 'the refresh rolls them up');
SELECT is(brin_summarize_new_values('metering.events_seq_time_brin'), 0,
          'and leaves no full range of the events'' BRIN index unsummarized');
SELECT * FROM finish();
ROLLBACK;
