-- Subjects and the reports over them: unknown subjects, entitlement status,
-- daily usage and the ThousandEyes-style usage overview.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-06-01 00:00:00+00';

-- subjects: an organization and its account groups
INSERT INTO metering.subjects (key, name) VALUES ('org', 'Org Inc.');
INSERT INTO metering.subjects (key, name, parent_key, is_trial) VALUES ('org-eu', 'Org EU', 'org', false), ('org-us', 'Org US', 'org', true);
INSERT INTO metering.subjects (key, name, parent_key) VALUES ('org-eu-dev', 'Org EU dev', 'org-eu');
SELECT key, name, parent_key, is_trial, created_at FROM metering.subjects ORDER BY key;
SELECT * FROM metering.subject_tree('org-eu') ORDER BY 1;
SELECT regress.err($$INSERT INTO metering.subjects (key, parent_key) VALUES ('x', 'nope')$$);
SELECT regress.err($$INSERT INTO metering.subjects (key) VALUES ('')$$);
SELECT regress.err($$INSERT INTO metering.subjects (key) VALUES ('org')$$);
SELECT regress.err($$UPDATE metering.subjects SET parent_key = 'org-eu-dev' WHERE key = 'org'$$);
SELECT regress.err($$UPDATE metering.subjects SET key = 'org2' WHERE key = 'org'$$);
SELECT regress.err($$INSERT INTO metering.subjects (key, metadata) VALUES ('y', '[]')$$);
UPDATE metering.subjects SET name = 'Org Incorporated', is_trial = true WHERE key = 'org';
DELETE FROM metering.subjects WHERE key = 'org-eu-dev';
SELECT key, name, is_trial, deleted_at FROM metering.subjects ORDER BY key;

-- events for known and unknown subjects are all stored; the unknown ones are listed
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('calls', 'api', 'SUM', '$.n');
SELECT metering.ingest(regress.ev('e' || n, s, 'api', '2024-06-' || lpad(d::text, 2, '0') || 'T10:00:00Z', jsonb_build_object('n', n)))
  FROM (VALUES (1, 'org-eu', 1), (2, 'org-eu', 2), (3, 'stranger', 1), (4, 'org-us', 3), (5, 'stranger', 4)) v(n, s, d);
SELECT * FROM metering.unknown_subjects ORDER BY subject;

-- daily usage, readable in psql
SELECT * FROM metering.daily_usage WHERE meter = 'calls' ORDER BY subject, day;

-- entitlement status of every live entitlement
SELECT metering.create_feature('calls', 'API calls', 'calls') IS NOT NULL AS feature;
SELECT metering.create_feature('sso', 'SSO') IS NOT NULL AS feature;
SELECT metering.create_entitlement('org-eu', 'calls', usage_period => '1 month', usage_period_anchor => '2024-06-01',
                                   issue_after_reset => 10) AS e \gset
SELECT metering.create_grant(:'e', 5, '2024-06-01', recurrence => '1 week', priority => 2) IS NOT NULL AS g;
SELECT metering.create_entitlement('org-eu', 'sso', 'boolean') IS NOT NULL AS e;
SET metering.now = '2024-06-10 00:00:00+00';
SELECT subject, feature, type, access, balance, usage, overage, period_start, period_end FROM metering.entitlement_status ORDER BY feature;

-- usage overview: the entitlement's period, what the grants include (the weekly
-- grant once per refill in the period: 5 refills in June), used, projected
SELECT * FROM metering.usage_overview('org-eu', 'calls');
SELECT * FROM metering.usage_overview('org-eu', 'calls', '2024-06-02 10:00');
-- without an entitlement: the UTC calendar month, nothing included
SELECT * FROM metering.usage_overview('org-us', 'calls');
SELECT * FROM metering.usage_overview('stranger', 'calls', '2024-06-05 10:00');
-- at the very start of a cycle nothing can be projected
SELECT * FROM metering.usage_overview('org-us', 'calls', '2024-06-01 00:00');
SELECT regress.err($$SELECT * FROM metering.usage_overview('org-eu', 'nope')$$);
SELECT regress.err($$SELECT * FROM metering.usage_overview(NULL, 'calls')$$);
SELECT regress.err($$SELECT * FROM metering.usage_overview('org-eu', 'calls', 'infinity')$$);
