-- Features and entitlements: the objects and their rules.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-03-15 12:34:56+00';

INSERT INTO metering.meters (slug, event_type, aggregation, value_property, group_by) VALUES
  ('tokens', 'llm', 'SUM', '$.tokens', '{"model": "$.model"}'),
  ('calls', 'api', 'COUNT', NULL, '{}'),
  ('peak', 'gauge', 'MAX', '$.v', '{}');

-- features: key rules, meters that SUM or COUNT, filters on the meter's groups
SELECT metering.create_feature('gpt4-tokens', 'GPT-4 tokens', 'tokens', '{"model": "gpt-4"}') IS NOT NULL AS created;
SELECT metering.create_feature('api-calls', 'API calls', 'calls') IS NOT NULL AS created;
SELECT metering.create_feature('sso', 'Single sign-on') IS NOT NULL AS created;
SELECT key, name, meter_slug, meter_group_by_filters, created_at, updated_at, archived_at FROM metering.features ORDER BY key;
SELECT regress.err($$SELECT metering.create_feature('GPT', 'x')$$);
SELECT regress.err($$SELECT metering.create_feature('a--b', 'x')$$);
SELECT regress.err($$SELECT metering.create_feature('-ab', 'x')$$);
SELECT regress.err($$SELECT metering.create_feature('ok', '')$$);
SELECT regress.err($$SELECT metering.create_feature('sso', 'again')$$);
SELECT regress.err($$SELECT metering.create_feature('peaky', 'x', 'peak')$$);
SELECT regress.err($$SELECT metering.create_feature('nope', 'x', 'no-such-meter')$$);
SELECT regress.err($$SELECT metering.create_feature('f', 'x', 'tokens', '{"region": "eu"}')$$);
SELECT regress.err($$SELECT metering.create_feature('f', 'x', 'tokens', '{"model": ["a"]}')$$);
SELECT regress.err($$SELECT metering.create_feature('f', 'x', NULL, '{"model": "a"}')$$);
SELECT regress.err($$SELECT metering.create_feature('f', 'x', 'tokens', NULL, '[1]')$$);
-- a number filter is kept as text, as group values are
SELECT metering.create_feature('model-8', 'x', 'tokens', '{"model": 8}') IS NOT NULL AS created;
SELECT meter_group_by_filters FROM metering.features WHERE key = 'model-8';

-- features are never updated; archiving is one-way; DELETE is soft
SELECT c AS column, regress.err(format('UPDATE metering.features SET %I = %s WHERE key = %L', c, v, 'api-calls'))
  FROM (VALUES ('key', '''x'''), ('name', '''x'''), ('meter_slug', 'NULL'), ('meter_group_by_filters', '''{}'''),
               ('metadata', '''{}'''), ('created_at', 'now()'), ('id', 'metering.uuid_v7()')) v(c, v);
SELECT metering.archive_feature('model-8');
SELECT regress.err($$SELECT metering.archive_feature('model-8')$$);
SELECT regress.err($$UPDATE metering.features SET archived_at = NULL WHERE key = 'model-8'$$);
SELECT regress.err($$SELECT metering.archive_feature('no-such-feature')$$);
-- an archived key may be used again
SELECT metering.create_feature('model-8', 'x again', 'tokens') IS NOT NULL AS reused;
SELECT key, name, archived_at IS NOT NULL AS archived FROM metering.features WHERE key = 'model-8' ORDER BY created_at, archived;
-- a meter that features use cannot go
SELECT regress.err($$DELETE FROM metering.meters WHERE slug = 'calls'$$);

-- entitlements: metered ones need a meter and a usage period of at least an hour
SELECT metering.create_entitlement('acme', 'gpt4-tokens', usage_period => '1 month') AS e_metered \gset
SELECT subject, feature_key, type, usage_period, usage_period_anchor, measure_usage_from, is_soft_limit,
       issue_after_reset, preserve_overage_at_reset, created_at, deleted_at
  FROM metering.entitlements WHERE id = :'e_metered';
SELECT metering.create_entitlement('acme', 'sso', 'boolean') AS e_bool \gset
SELECT metering.create_entitlement('acme', 'api-calls', 'static', config => '{"rate_limit": 100}') AS e_static \gset
SELECT regress.err($$SELECT metering.create_entitlement('acme', 'sso', 'boolean')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'sso')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens', usage_period => '59 minutes')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens', usage_period => '1 month -40 days')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens', usage_period => '1 day', issue_after_reset => 0)$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens', usage_period => '1 day', issue_after_reset => 5, issue_after_reset_priority => 256)$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens', usage_period => '1 day', issue_after_reset => 'NaN')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens', usage_period => '1 day', measure_usage_from => '-infinity')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens', usage_period => '1 day', usage_period_anchor => 'infinity')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'gpt4-tokens', usage_period => '1 day', config => '{}')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'sso', 'boolean', usage_period => '1 day')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'sso', 'boolean', config => '{}')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'api-calls', 'static')$$);
SELECT regress.err($$SELECT metering.create_entitlement('', 'sso', 'boolean')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'no-such-feature', 'boolean')$$);
SELECT regress.err($$SELECT metering.create_entitlement('beta', 'sso', 'gold')$$);
-- an archived feature takes no new entitlements, and keeps its old ones
SELECT metering.create_entitlement('beta', 'model-8', usage_period => '1 day') AS e_archived \gset
SELECT metering.archive_feature('model-8');
SELECT regress.err($$SELECT metering.create_entitlement('gamma', (SELECT id::text FROM metering.features WHERE name = 'x again'), usage_period => '1 day')$$);
SELECT count(*) AS kept FROM metering.entitlements WHERE id = :'e_archived' AND deleted_at IS NULL;

-- access: boolean while active, static with its config, none without an entitlement
SELECT * FROM metering.entitlement_value('acme', 'sso');
SELECT * FROM metering.entitlement_value('acme', 'api-calls');
SELECT * FROM metering.entitlement_value('acme', :'e_static');
SELECT * FROM metering.entitlement_value('nobody', 'sso');
SELECT * FROM metering.entitlement_value('acme', 'no-such-feature');
SELECT * FROM metering.entitlement_value(NULL, 'sso');
-- before it was created there was no access
SELECT has_access FROM metering.entitlement_value('acme', 'sso', '2024-03-15 12:00:00+00');
-- a metered entitlement without grants: numbers are 0, not NULL, and no access
SELECT * FROM metering.entitlement_value('acme', 'gpt4-tokens');

-- entitlements are never updated; deleting keeps the row and the past
SELECT c AS column, regress.err(format('UPDATE metering.entitlements SET %I = %s WHERE id = %L', c, v, :'e_metered'))
  FROM (VALUES ('subject', '''x'''), ('feature_id', 'metering.uuid_v7()'), ('feature_key', '''x'''),
               ('type', '''boolean'''), ('config', '''{}'''), ('usage_period', '''2 days'''),
               ('usage_period_anchor', 'now()'), ('measure_usage_from', 'now()'), ('is_soft_limit', 'true'),
               ('issue_after_reset', '1'), ('issue_after_reset_priority', '2'),
               ('preserve_overage_at_reset', 'true'), ('metadata', '''{}'''), ('created_at', 'now()')) v(c, v);
SET metering.now = '2024-03-20 00:00:00+00';
SELECT metering.delete_entitlement(:'e_bool');
SELECT deleted_at FROM metering.entitlements WHERE id = :'e_bool';
SELECT has_access FROM metering.entitlement_value('acme', 'sso', '2024-03-19 23:59:59+00') AS before_deletion;
SELECT has_access FROM metering.entitlement_value('acme', 'sso', '2024-03-20 00:00:00+00') AS at_deletion;
SELECT regress.err(format('SELECT metering.delete_entitlement(%L)', :'e_bool'));
SELECT regress.err($$SELECT metering.delete_entitlement('01a2138f-fb08-7164-94b7-f9375b039482')$$);
-- a new one may follow; DELETE is a soft delete too
SELECT metering.create_entitlement('acme', 'sso', 'boolean') IS NOT NULL AS recreated;
DELETE FROM metering.entitlements WHERE subject = 'acme' AND feature_key = 'sso' AND deleted_at IS NULL;
SELECT count(*) AS rows_kept, count(*) FILTER (WHERE deleted_at IS NULL) AS live
  FROM metering.entitlements WHERE subject = 'acme' AND feature_key = 'sso';

-- usage counted from long ago: an entitlement created now answers questions about the past
SELECT metering.create_entitlement('early', 'gpt4-tokens', usage_period => '1 month',
                                   measure_usage_from => '2024-01-01 00:00:30+00') AS e_early \gset
SELECT usage_period_anchor, measure_usage_from FROM metering.entitlements WHERE id = :'e_early';
SELECT has_access, start_of_period FROM metering.entitlement_value('early', 'gpt4-tokens', '2024-02-10');
SELECT has_access, start_of_period FROM metering.entitlement_value('early', 'gpt4-tokens', '2023-12-31');

-- issue_after_reset: a grant made with the entitlement
SELECT metering.create_entitlement('iar', 'gpt4-tokens', usage_period => '1 day', issue_after_reset => 500,
                                   issue_after_reset_priority => 3) AS e_iar \gset
SELECT amount, priority, effective_at, expiration, min_rollover_amount, max_rollover_amount, metadata
  FROM metering.grants WHERE entitlement_id = :'e_iar';
SELECT has_access, balance FROM metering.entitlement_value('iar', 'gpt4-tokens');
