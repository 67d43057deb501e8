-- Grants and resets: the rules of the objects.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-03-15 12:34:56+00';
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('u', 'use', 'SUM', '$.n');
SELECT metering.create_feature('f', 'F', 'u') IS NOT NULL AS feature;
SELECT metering.create_feature('b', 'B') IS NOT NULL AS feature;
-- monthly, anchored on the 1st: the current period is [2024-03-01, 2024-04-01)
SELECT metering.create_entitlement('acme', 'f', usage_period => '1 month', usage_period_anchor => '2024-01-01',
                                   measure_usage_from => '2024-01-01') AS e \gset
SELECT metering.create_entitlement('acme', 'b', 'boolean') AS e_bool \gset
SELECT metering._period_start(:'e', 'acme', metering.now()) AS current_period_start;

-- a grant: times truncated to the minute, expires_at from the expiration, UTC month arithmetic
SELECT metering.create_grant(:'e', 100, '2024-03-31 10:15:42+00', priority => 2, expiration => '1 month',
                             recurrence => '1 day', min_rollover_amount => 10, max_rollover_amount => 20,
                             metadata => '{"po": "123"}') AS g \gset
SELECT amount, priority, effective_at, expiration, expires_at, recurrence, recurrence_anchor,
       min_rollover_amount, max_rollover_amount, voided_at, deleted_at, metadata, created_at
  FROM metering.grants WHERE id = :'g';
SET timezone = 'Pacific/Auckland';
SELECT metering.create_grant(:'e', 1, '2024-03-31 10:00:00+00', expiration => '1 month') AS g_nz \gset
SET timezone = 'UTC';
SELECT expires_at AS same_in_any_session_zone FROM metering.grants WHERE id = :'g_nz';

-- the rules, one error each
SELECT regress.err(format('SELECT metering.create_grant(%L, %s)', :'e', a))
  FROM unnest(ARRAY[
    '0, ''2024-03-20''', '-5, ''2024-03-20''', 'NULL, ''2024-03-20''',
    '10, NULL',
    '10, ''2024-03-20'', priority => -1', '10, ''2024-03-20'', priority => 256',
    '10, ''2024-03-20'', expiration => ''0 days''', '10, ''2024-03-20'', expiration => ''-1 day''',
    '10, ''2024-03-20'', recurrence => ''59 minutes''',
    '10, ''2024-03-20'', recurrence_anchor => ''2024-03-20''',
    '10, ''2024-03-20'', min_rollover_amount => -1',
    '10, ''2024-03-20'', min_rollover_amount => 5, max_rollover_amount => 4',
    '10, ''2024-02-29 23:59''',
    '10, ''2024-03-20'', metadata => ''[]''',
    '''NaN'', ''2024-03-20''', '''Infinity'', ''2024-03-20''', '10, ''infinity''', '10, ''-infinity''',
    '10, ''2024-03-20'', max_rollover_amount => ''Infinity''',
    '10, ''2024-03-20'', min_rollover_amount => ''NaN'', max_rollover_amount => ''NaN''',
    '10, ''2024-03-20'', recurrence => ''1 day'', recurrence_anchor => ''infinity'''
  ]) a;
SELECT regress.err(format('SELECT metering.create_grant(%L, 10, %L)', :'e_bool', '2024-03-20'));
SELECT regress.err($$SELECT metering.create_grant('01a2138f-fb08-7164-94b7-f9375b039482', 10, '2024-03-20')$$);
-- the current period's start is fine, and so is the future
SELECT metering.create_grant(:'e', 10, '2024-03-01') IS NOT NULL AS period_start_ok;
SELECT metering.create_grant(:'e', 10, '2030-01-01') IS NOT NULL AS future_ok;
-- backdating is allowed for the first grants of an entitlement made in the same transaction
BEGIN;
SELECT metering.create_entitlement('migrated', 'f', usage_period => '1 month', measure_usage_from => '2023-01-01') AS e_mig \gset
SELECT metering.create_grant(:'e_mig', 10, '2023-01-01') IS NOT NULL AS backdated_ok;
COMMIT;
SELECT regress.err(format('SELECT metering.create_grant(%L, 10, %L)', :'e_mig', '2023-06-01'));

-- grants are immutable, column by column
SELECT c AS column, regress.err(format('UPDATE metering.grants SET %I = %s WHERE id = %L', c, v, :'g'))
  FROM (VALUES ('id', 'metering.uuid_v7()'), ('entitlement_id', 'metering.uuid_v7()'), ('amount', '1'),
               ('priority', '5'), ('effective_at', 'now()'), ('expiration', '''2 days'''),
               ('expires_at', 'now()'), ('recurrence', '''2 days'''), ('recurrence_anchor', 'now()'),
               ('min_rollover_amount', '0'), ('max_rollover_amount', '30'), ('metadata', '''{}'''),
               ('created_at', 'now()')) v(c, v);

-- voiding: at metering.now() to the minute, once, not when expired
SELECT metering.void_grant(:'g');
SELECT voided_at FROM metering.grants WHERE id = :'g';
SELECT regress.err(format('SELECT metering.void_grant(%L)', :'g'));
SELECT regress.err(format('UPDATE metering.grants SET voided_at = NULL WHERE id = %L', :'g'));
SELECT regress.err($$SELECT metering.void_grant('01a2138f-fb08-7164-94b7-f9375b039482')$$);
SELECT metering.create_grant(:'e', 5, '2024-03-10', expiration => '1 day') AS g_expired \gset
SELECT regress.err(format('SELECT metering.void_grant(%L)', :'g_expired'));
-- a direct UPDATE voids at metering.now() too, whatever it says
SELECT metering.create_grant(:'e', 5, '2024-03-10') AS g2 \gset
UPDATE metering.grants SET voided_at = '2020-01-01' WHERE id = :'g2';
SELECT voided_at FROM metering.grants WHERE id = :'g2';
-- DELETE marks deleted_at; a deleted grant cannot change
DELETE FROM metering.grants WHERE id = :'g_expired';
SELECT deleted_at FROM metering.grants WHERE id = :'g_expired';
SELECT regress.err(format('UPDATE metering.grants SET voided_at = now() WHERE id = %L', :'g_expired'));
-- no grants on a deleted entitlement
SELECT metering.create_entitlement('gone', 'f', usage_period => '1 day') AS e_gone \gset
SELECT metering.delete_entitlement(:'e_gone');
SELECT regress.err(format('SELECT metering.create_grant(%L, 10, %L)', :'e_gone', '2024-03-16'));

-- resets: not in the future, not before the current period or measure_usage_from, after the last one
SELECT regress.err(format('SELECT metering.reset_entitlement(%L, %L)', :'e', r))
  FROM unnest(ARRAY['2024-03-15 12:36:00+00', '2024-02-29 23:59:00+00']) r;
SELECT metering.reset_entitlement(:'e', '2024-03-10 08:30:59+00');
SELECT regress.err(format('SELECT metering.reset_entitlement(%L, %L)', :'e', '2024-03-10 08:30:00+00'));
SELECT regress.err(format('SELECT metering.reset_entitlement(%L, %L)', :'e', '2024-03-05 00:00:00+00'));
SELECT metering.reset_entitlement(:'e');
SELECT effective_at, retain_anchor, preserve_overage FROM metering.resets WHERE entitlement_id = :'e' ORDER BY 1;
SELECT metering._period_start(:'e', 'acme', metering.now()) AS period_now_starts;
SELECT regress.err(format('SELECT metering.reset_entitlement(%L)', :'e_bool'));
SELECT regress.err(format('SELECT metering.reset_entitlement(%L)', :'e_gone'));
SELECT regress.err($$SELECT metering.reset_entitlement('01a2138f-fb08-7164-94b7-f9375b039482')$$);
SELECT regress.err(format('UPDATE metering.resets SET retain_anchor = true WHERE entitlement_id = %L', :'e'));
SELECT regress.err(format('DELETE FROM metering.resets WHERE entitlement_id = %L', :'e'));
-- after a reset the grants of the old period cannot be backdated into it
SELECT regress.err(format('SELECT metering.create_grant(%L, 10, %L)', :'e', '2024-03-15 12:00:00+00'));

-- rollover, the building block
SELECT metering.rollover(90, 0, 50) AS capped, metering.rollover(10, 50, 50) AS topped_up,
       metering.rollover(30, 10, 50) AS kept, metering.rollover(0.3, 0, 0.25) AS exact;

-- UTC calendar arithmetic: never chained, the day clamped to the month's end
SELECT n, metering.calendar_step('2024-01-31 10:00+00', '1 month', n) AS boundary
  FROM generate_series(-2, 4) n;
