-- The rows of an entitlement (grants, resets, snapshots, the snapshot queue,
-- the turns) carry the entitlement's subject, whoever writes them: the key a
-- distributed install keeps them beside the subject's events by, and the
-- column row security reads.  Everything made here goes with the ROLLBACK.
BEGIN;
SELECT plan(19);
SET LOCAL timezone = 'UTC';
SET LOCAL metering.now = '2024-06-10 12:00:00+00';
\o /dev/null
INSERT INTO metering.meters (slug, event_type, aggregation, value_property)
VALUES ('es-tok', 'es.tokens', 'SUM', '$.n');
SELECT metering.create_feature('es-llm', 'LLM', 'es-tok');
SELECT metering.create_entitlement(s, 'es-llm', usage_period => '1 month',
                                   usage_period_anchor => '2024-06-01', measure_usage_from => '2024-06-01')
  FROM unnest(ARRAY['es-a', 'es-b']) s;
CREATE TEMP TABLE ent AS SELECT subject, id FROM metering.entitlements WHERE feature_key = 'es-llm';
-- grants by the function and by hand (no subject given), a reset, events,
-- snapshots, a hold, a consumption and an alert evaluation
SELECT metering.create_grant(id, 1000, '2024-06-01') FROM ent;
INSERT INTO metering.grants (entitlement_id, amount, effective_at, priority)
SELECT id, 50, '2024-06-10 12:00', 3 FROM ent;
SELECT metering.ingest_batch(jsonb_agg(jsonb_build_object('specversion', '1.0', 'id', 'es-' || s || k, 'source', 'es',
         'type', 'es.tokens', 'subject', s, 'time', '2024-06-05T10:00:00Z', 'data', jsonb_build_object('n', 10))))
  FROM unnest(ARRAY['es-a', 'es-b']) s, generate_series(1, 5) k;
SELECT metering.refresh_rollups();
SELECT metering.reset_entitlement(id, '2024-06-10 11:00') FROM ent WHERE subject = 'es-b';
SELECT metering.refresh_snapshots();
SELECT metering.reserve('es-a', 'es-llm', 5);
SELECT metering.consume('{"specversion": "1.0", "id": "es-c1", "source": "es", "type": "es.tokens",
                          "subject": "es-b", "data": {"n": 4}}', 'es-llm');
INSERT INTO metering.notification_rules (name, feature_key, thresholds)
VALUES ('es', 'es-llm', '[{"type": "USAGE_VALUE", "value": 1000000}]');
SELECT metering.ingest('{"specversion": "1.0", "id": "es-c2", "source": "es", "type": "es.tokens",
                         "subject": "es-a", "data": {"n": 1}}');
-- a void after the snapshots: the entitlement waits in the queue for new ones
SELECT metering.void_grant(g.id) FROM metering.grants g JOIN ent USING (subject) WHERE g.priority = 3 AND g.subject = 'es-b';
\o

CREATE TEMP VIEW rows_of AS
SELECT 'grants' AS tab, entitlement_id, subject FROM metering.grants
UNION ALL SELECT 'resets', entitlement_id, subject FROM metering.resets
UNION ALL SELECT 'entitlement_snapshots', entitlement_id, subject FROM metering.entitlement_snapshots
UNION ALL SELECT 'entitlement_snapshot_queue', entitlement_id, subject FROM metering.entitlement_snapshot_queue
UNION ALL SELECT 'entitlement_turns', entitlement_id, subject FROM metering.entitlement_turns;

SELECT is((SELECT string_agg(DISTINCT r.tab, ' ' ORDER BY r.tab) FROM rows_of r JOIN ent e ON e.id = r.entitlement_id),
          'entitlement_snapshot_queue entitlement_snapshots entitlement_turns grants resets',
          'the writers made rows of every kind for the entitlements');
SELECT is((SELECT count(*) FROM rows_of r JOIN metering.entitlements e ON e.id = r.entitlement_id
            WHERE r.subject IS DISTINCT FROM e.subject), 0::bigint,
          'each carries its entitlement''s subject (grants by the function and by hand, resets, snapshots, the queue, both turns)');
SELECT is((SELECT string_agg(DISTINCT purpose::text, ' ' ORDER BY purpose::text) FROM metering.entitlement_turns t JOIN ent e ON e.id = t.entitlement_id),
          'a u', '... the turns of the usage gate and of the alerts among them');

SELECT throws_ok($$INSERT INTO metering.grants (entitlement_id, amount, effective_at, subject)
                   SELECT id, 10, '2024-06-10 12:00', 'es-b' FROM ent WHERE subject = 'es-a'$$,
                 '22023', NULL, 'a grant naming another subject than its entitlement''s is refused (22023)');
SELECT throws_ok($$INSERT INTO metering.resets (entitlement_id, effective_at, subject)
                   SELECT id, '2024-06-10 12:00', 'es-a' FROM ent WHERE subject = 'es-b'$$,
                 '22023', NULL, '... and so is a reset');
SELECT lives_ok($$INSERT INTO metering.grants (entitlement_id, amount, effective_at, subject)
                  SELECT id, 10, '2024-06-10 12:00', 'es-a' FROM ent WHERE subject = 'es-a'$$,
                'a grant naming its entitlement''s subject is taken');
SELECT throws_ok($$UPDATE metering.grants g SET subject = 'es-b' FROM ent WHERE ent.id = g.entitlement_id AND ent.subject = 'es-a'$$,
                 '55000', NULL, 'a grant''s subject cannot be changed (grants are immutable)');
SELECT throws_ok($$UPDATE metering.resets SET subject = 'es-a'$$,
                 '55000', NULL, '... nor a reset''s');

-- row security reads the column: a reader of es-a sees es-a's rows only
-- (new snapshots for both, then es-b's taken away by a void: it waits in the queue)
\o /dev/null
SELECT metering.refresh_snapshots();
SELECT metering.void_grant(g.id) FROM metering.grants g WHERE g.subject = 'es-b' AND g.voided_at IS NULL;
SELECT metering.setup_roles();
CREATE ROLE es_reader;
GRANT metering_reader TO es_reader;
INSERT INTO metering.subject_access (role_name, subject) VALUES ('es_reader', 'es-a');
\o
SET LOCAL ROLE es_reader;
SELECT is((SELECT count(*) FROM metering.grants WHERE subject <> 'es-a'), 0::bigint, 'a reader of one subject sees its grants only');
SELECT ok((SELECT count(*) FROM metering.grants) >= 2, '... and sees them');
SELECT is((SELECT count(*) FROM metering.resets), 0::bigint, '... no other subject''s reset');
SELECT is((SELECT count(DISTINCT subject) || ' ' || min(subject) FROM metering.entitlement_snapshots), '1 es-a',
          '... its snapshots only');
SELECT is((SELECT count(DISTINCT subject) || ' ' || min(subject) FROM metering.entitlement_turns), '1 es-a',
          '... its turns only');
SELECT is((SELECT count(*) FROM metering.entitlement_snapshot_queue WHERE subject <> 'es-a'), 0::bigint,
          '... nor another subject''s place in the snapshot queue');
RESET ROLE;
SELECT ok((SELECT bool_or(subject = 'es-b') FROM metering.entitlement_snapshot_queue), '(which is there)');

-- which entitlements the transaction made is noted as each is made (no
-- xmin: a distributed table's cannot be read), before its row is stored
SELECT lives_ok($$WITH e AS (INSERT INTO metering.entitlements (subject, feature_id, usage_period, usage_period_anchor, measure_usage_from)
                              SELECT 'es-cte', id, '1 month', '2024-01-01', '2024-01-01' FROM metering.features WHERE key = 'es-llm'
                              RETURNING id)
                 INSERT INTO metering.grants (entitlement_id, amount, effective_at) SELECT id, 10, '2024-01-01' FROM e$$,
                'a grant in the statement that made its entitlement may start before the current period (a migration''s writable CTE)');

-- a restored entitlement may come before its feature in a restore of one
-- transaction (the dump of a distributed install): the foreign key checks
-- the feature at commit; every rule that needs no feature still applies
SELECT lives_ok($$INSERT INTO metering.entitlements (id, subject, feature_id, feature_key, usage_period, usage_period_anchor,
                                                      measure_usage_from, created_at)
                  VALUES ('01900000-0000-7000-8000-0000000000e1', 'es-r', '01900000-0000-7000-8000-0000000000f1', 'es-later',
                          '1 month', '2024-01-01', '2024-01-01', '2024-01-01');
                  INSERT INTO metering.features (id, key, name, meter_slug, created_at, updated_at)
                  VALUES ('01900000-0000-7000-8000-0000000000f1', 'es-later', 'Later', 'es-tok', '2024-01-01', '2024-01-01');
                  SET CONSTRAINTS metering.entitlements_feature_id_fkey IMMEDIATE$$,
                '... a restored entitlement whose feature the same transaction restores after it is taken');
SELECT throws_ok($$INSERT INTO metering.entitlements (id, subject, feature_id, feature_key, usage_period_anchor, measure_usage_from, created_at)
                   VALUES ('01900000-0000-7000-8000-0000000000e2', 'es-r2', '01900000-0000-7000-8000-0000000000f2', 'es-never',
                           '2024-01-01', '2024-01-01', '2024-01-01')$$,
                 '22023', NULL, '... but not without a usage period (the rules that need no feature apply)');
SELECT throws_ok($$INSERT INTO metering.entitlements (id, subject, feature_id, feature_key, usage_period, usage_period_anchor,
                                                       measure_usage_from, created_at)
                   VALUES ('01900000-0000-7000-8000-0000000000e3', 'es-r3', '01900000-0000-7000-8000-0000000000f3', 'es-never',
                           '1 month', '2024-01-01', '2024-01-01', '2024-01-01');
                   SET CONSTRAINTS metering.entitlements_feature_id_fkey IMMEDIATE$$,
                 '23503', NULL, '... and one whose feature never comes fails at commit');

SELECT * FROM finish();
ROLLBACK;
