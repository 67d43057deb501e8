-- Issue 8: attacks on 0.2.0 by roles of setup_roles() (and by PUBLIC), each
-- written for the FIXED behaviour: on 0.2.0 the assertions of an attack that
-- works fail.  Attack 2 (the clock set before the library loads) needs fresh
-- sessions: test/security_session.sh.  Attack 6d is specs/reset_guard_no_grants.spec.
-- Every role and object made here goes with the ROLLBACK.
BEGIN;
SELECT plan(64);
SET LOCAL timezone = 'UTC';
SET LOCAL metering.now = '2024-06-01 00:00:00+00';
\o /dev/null
CREATE SCHEMA sectest;
-- what a piece of SQL raises, or 'ok' (for tests that must not abort the file)
CREATE FUNCTION sectest.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE sql;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE;
END $$;
-- the same, but whatever it did is undone
CREATE FUNCTION sectest.try_undone(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE sql;
  RAISE SQLSTATE 'SECOK';
EXCEPTION WHEN OTHERS THEN
  RETURN CASE SQLSTATE WHEN 'SECOK' THEN 'ok' ELSE SQLSTATE END;
END $$;
-- runs a piece of SQL with another search_path (restored afterwards; an
-- error in a subtransaction restores it too)
CREATE FUNCTION sectest.with_path(path text, sql text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  old text := pg_catalog.current_setting('search_path');
BEGIN
  PERFORM pg_catalog.set_config('search_path', path, true);
  EXECUTE sql;
  PERFORM pg_catalog.set_config('search_path', old, true);
END $$;
GRANT USAGE ON SCHEMA sectest TO PUBLIC;

-- the data every attack works on
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('calls', 'api', 'SUM', '$.n');
SELECT count(*) FROM (
  SELECT metering.ingest(jsonb_build_object('specversion', '1.0', 'id', 'e' || n, 'source', 's', 'type', 'api',
           'subject', s, 'time', '2024-06-01T10:00:00Z', 'data', jsonb_build_object('n', n)))
    FROM (VALUES (1, 'acme'), (2, 'acme'), (3, 'globex')) v(n, s)) x;
SELECT metering.create_feature('calls', 'API calls', 'calls') IS NOT NULL;
SELECT metering.create_feature('old', 'Old feature', 'calls') IS NOT NULL;
SELECT metering.archive_feature('old');
SELECT metering.create_entitlement('acme', 'calls', usage_period => '1 month', usage_period_anchor => '2024-06-01') AS ent \gset
SELECT metering.create_grant(:'ent', 100, '2024-06-01') AS grant1 \gset
SELECT metering.create_grant(:'ent', 50, '2024-06-01') AS grant2 \gset
SET LOCAL metering.now = '2024-06-05 00:00:00+00';
SELECT metering.reset_entitlement(:'ent', '2024-06-05');
SET LOCAL metering.now = '2024-06-10 00:00:00+00';
INSERT INTO metering.hashmap_services (name) VALUES ('api'), ('api2');
INSERT INTO metering.hashmap_fields (service_id, name) SELECT id, 'k' FROM metering.hashmap_services WHERE name = 'api';
INSERT INTO metering.hashmap_groups (name) VALUES ('g');
INSERT INTO metering.hashmap_mappings (service_id, cost, map_type) SELECT id, 0.5, 'flat' FROM metering.hashmap_services WHERE name = 'api';
INSERT INTO metering.products VALUES ('p');
INSERT INTO metering.product_dimensions VALUES ('p', 'd');
INSERT INTO metering.customers (customer_identifier, product_code, subscribed_at) VALUES ('c', 'p', '2024-01-01');

SELECT metering.setup_roles();
CREATE ROLE sec_reader IN ROLE metering_reader;
CREATE ROLE sec_writer IN ROLE metering_writer;
CREATE ROLE sec_admin IN ROLE metering_admin;
CREATE ROLE sec_admin2 IN ROLE metering_admin;
INSERT INTO metering.subject_access (role_name, subject) VALUES ('sec_reader', 'acme');
\o

------------------------------------------------------------------------------
-- 1. metering_admin becomes superuser: setup_roles grants ALL (TRIGGER too);
-- an admin's trigger on a table written by an owner-run function (ingest)
-- runs as the owner.  Fixed: CREATE TRIGGER fails with 42501 on every table;
-- no role but the owner holds TRIGGER, TRUNCATE or REFERENCES on any
-- relation of the schema, and none holds CREATE on it.
------------------------------------------------------------------------------
SET ROLE sec_admin2;
CREATE FUNCTION pg_temp.evil() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE 'ALTER ROLE sec_admin2 SUPERUSER';
  RETURN NEW;
END $$;
SELECT throws_ok($$CREATE TRIGGER zz BEFORE INSERT ON metering.events FOR EACH ROW EXECUTE FUNCTION pg_temp.evil()$$,
                 '42501', NULL, '1: an admin cannot create a trigger on metering.events');
RESET ROLE;
SET ROLE sec_writer;
SELECT metering.ingest('{"specversion": "1.0", "id": "zz", "source": "s", "type": "api", "subject": "acme", "time": "2024-06-01T10:00:00Z", "data": {"n": 0}}') AS _ \gset
RESET ROLE;
SELECT is((SELECT rolsuper FROM pg_roles WHERE rolname = 'sec_admin2'), false,
          '1: an ingest does not make the admin a superuser through its trigger');
DROP TRIGGER IF EXISTS zz ON metering.events;
DELETE FROM metering.events WHERE id = 'zz';
ALTER ROLE sec_admin2 NOSUPERUSER;
-- every table: the admin can create a trigger on none
SET ROLE sec_admin2;
SELECT is((SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c
            WHERE c.relnamespace = 'metering'::regnamespace AND c.relkind IN ('r', 'p')
              AND sectest.try_undone(format('CREATE TRIGGER zz BEFORE INSERT ON metering.%I FOR EACH ROW EXECUTE FUNCTION pg_temp.evil()', c.relname)) <> '42501'),
          NULL, '1: CREATE TRIGGER by an admin fails with 42501 on every metering table');
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT format('%s %s %s', coalesce(r.rolname, 'PUBLIC'), a.privilege_type, c.relname), ', ')
             FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
            WHERE c.relnamespace = 'metering'::regnamespace AND a.grantee <> c.relowner
              AND a.privilege_type IN ('TRIGGER', 'TRUNCATE', 'REFERENCES')),
          NULL, '1: after setup_roles() no role but the owner holds TRIGGER, TRUNCATE or REFERENCES in schema metering');
SELECT is((SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c
            WHERE c.relnamespace = 'metering'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
              AND (has_table_privilege('metering_admin', c.oid, 'TRIGGER') OR has_table_privilege('metering_admin', c.oid, 'TRUNCATE')
                   OR has_table_privilege('metering_admin', c.oid, 'REFERENCES'))),
          NULL, '1: has_table_privilege: metering_admin has no TRIGGER, TRUNCATE or REFERENCES on any relation');
SELECT is((SELECT string_agg(coalesce(r.rolname, 'PUBLIC'), ', ')
             FROM pg_namespace n, aclexplode(n.nspacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
            WHERE n.nspname = 'metering' AND a.grantee <> n.nspowner AND a.privilege_type = 'CREATE'),
          NULL, '1: no role but the owner holds CREATE on schema metering');


------------------------------------------------------------------------------
-- 1b. A role attaches one of the extension's owner-run trigger functions to
-- a table of its own named events, and fills the statement's new rows with
-- made-up events of another subject: the function would take that
-- subject's alert turns and spend its headroom with the owner's rights.
-- Fixed: no role but the owner may execute a trigger function of the
-- schema (CREATE TRIGGER fails with 42501), and the alerts' trigger does
-- nothing on any table but metering.events.
------------------------------------------------------------------------------
SELECT is((SELECT string_agg(format('%s %s', r, p.oid::regprocedure), ', ')
             FROM pg_catalog.pg_proc p, unnest(ARRAY['public', 'metering_admin', 'metering_writer', 'metering_reader']) r
            WHERE p.pronamespace = 'metering'::regnamespace AND p.prorettype = 'trigger'::regtype
              AND has_function_privilege(r, p.oid, 'EXECUTE')),
          NULL, '1b: no role but the owner may execute a trigger function of schema metering');
CREATE SCHEMA sec_own AUTHORIZATION sec_admin2;
SET ROLE sec_admin2;
CREATE TABLE sec_own.events (id text, source text, subject text, type text, time timestamptz, data jsonb);
SELECT throws_ok($$CREATE TRIGGER zz AFTER INSERT ON sec_own.events REFERENCING NEW TABLE AS new_events
                   FOR EACH STATEMENT EXECUTE FUNCTION metering._events_alerts()$$,
                 '42501', NULL, '1b: an admin cannot attach the alerts'' trigger function to a table of its own');
RESET ROLE;
-- attached by the owner all the same, it does nothing there
INSERT INTO metering.notification_rules (name, feature_key, thresholds) VALUES ('sec', 'calls', '[{"type": "USAGE_VALUE", "value": 1}]');
CREATE TRIGGER zz AFTER INSERT ON sec_own.events REFERENCING NEW TABLE AS new_events
  FOR EACH STATEMENT EXECUTE FUNCTION metering._events_alerts();
INSERT INTO sec_own.events VALUES ('x', 'x', 'acme', 'api', '2024-06-10', '{"n": 1000}');
SELECT is((SELECT count(*) FROM metering.entitlement_turns WHERE subject = 'acme' AND purpose = 'a'), 0::bigint,
          '1b: the alerts'' trigger on another table named events takes no turn of the subject its rows name');
DELETE FROM metering.notification_rules WHERE name = 'sec';
-- a trigger a role attached before 0.3.0 revoked the functions: the
-- owner-run ones refuse a table outside the schema
CREATE TABLE sec_own.meters (slug text, deleted_at timestamptz);
CREATE TRIGGER zz AFTER UPDATE ON sec_own.meters FOR EACH ROW EXECUTE FUNCTION metering._meters_after_delete_mark();
INSERT INTO sec_own.meters VALUES ('calls', NULL);
SELECT throws_ok($$UPDATE sec_own.meters SET deleted_at = now()$$, '42501', NULL,
                 '1b: an owner-run trigger function attached to a table outside schema metering refuses to run');
------------------------------------------------------------------------------
-- 5. Restored rows: an admin who passes an old created_at skips the rules
-- for new rows.  Fixed: 22023 unless a superuser or the extension owner.
------------------------------------------------------------------------------
SET ROLE sec_admin;
-- a grant effective before the current usage period (started by the reset of June 5th)
SELECT throws_ok(format($$INSERT INTO metering.grants (entitlement_id, amount, effective_at, created_at)
                          VALUES (%L, 1000, '2024-06-01', '2024-06-01')$$, :'ent'),
                 '22023', NULL, '5: an admin cannot insert a retroactive grant by passing an old created_at');
-- and a grant that picks its place in the burn order (created_at breaks ties)
SELECT throws_ok(format($$INSERT INTO metering.grants (entitlement_id, amount, effective_at, created_at)
                          VALUES (%L, 10, '2024-06-10', '2000-01-01')$$, :'ent'),
                 '22023', NULL, '5: an admin cannot choose a grant''s place in the burn order by its created_at');
-- a reset before the last one
SELECT throws_ok(format($$INSERT INTO metering.resets (entitlement_id, effective_at, created_at)
                          VALUES (%L, '2024-06-03', '2024-06-03')$$, :'ent'),
                 '22023', NULL, '5: an admin cannot insert a reset out of order by passing an old created_at');
-- an entitlement to an archived feature
SELECT throws_ok($$INSERT INTO metering.entitlements (subject, feature_id, feature_key, type, created_at)
                   SELECT 'acme', id, key, 'boolean', '2024-01-01' FROM metering.features WHERE key = 'old'$$,
                 '22023', NULL, '5: an admin cannot insert an entitlement to an archived feature by passing an old created_at');
SELECT throws_ok($$INSERT INTO metering.features (key, name, created_at) VALUES ('new', 'New', '2020-01-01')$$,
                 '22023', NULL, '5: an admin cannot insert a feature with an old created_at');
RESET ROLE;
-- a superuser still restores
SELECT lives_ok(format($$INSERT INTO metering.grants (entitlement_id, amount, effective_at, created_at)
                         VALUES (%L, 7, '2024-06-06', '2024-06-06')$$, :'ent'),
                '5: a superuser may still restore a grant made earlier');
DELETE FROM metering.grants WHERE amount IN (7, 10, 1000);

------------------------------------------------------------------------------
-- 6a. internal functions executable by PUBLIC that raise XX000.
-- Fixed: they stay callable (they are pure, and usage_overview, which
-- readers call, calls _calendar_index), and bad input raises 22023, never
-- XX000, whoever calls.
------------------------------------------------------------------------------
SET ROLE sec_reader;
SELECT is(metering._calendar_index('2024-01-01', '1 day', '2024-02-01'), 31::bigint,
          '6a: a reader may call metering._calendar_index');
SELECT throws_ok($$SELECT metering._interval_at_least('1 day', '1 month')$$, '22023', NULL,
                 '6a: _interval_at_least with a minimum in months raises 22023 for a reader too');
RESET ROLE;
SELECT throws_ok($$SELECT metering._calendar_index('2024-01-01', '0 days', '2024-02-01')$$, '22023', NULL,
                 '6a: _calendar_index with a zero step raises 22023');
SELECT throws_ok($$SELECT metering._calendar_index('2024-01-01', '-1 day', '2024-02-01')$$, '22023', NULL,
                 '6a: _calendar_index with a negative step raises 22023');
SELECT throws_ok($$SELECT metering._interval_at_least('1 day', '1 month')$$, '22023', NULL,
                 '6a: _interval_at_least with a minimum in months raises 22023');

------------------------------------------------------------------------------
-- 6b. an assignment naming a dropped role breaks subject_access for readers
-- (the policy's pg_has_role(role_name, ...) raises 42704).  Fixed: it works.
------------------------------------------------------------------------------
CREATE ROLE sec_gone;
INSERT INTO metering.subject_access (role_name, subject) VALUES ('sec_gone', 'globex');
DROP ROLE sec_gone;
SET ROLE sec_reader;
SELECT lives_ok($$SELECT * FROM metering.subject_access$$, '6b: a reader reads subject_access with a dropped role in it');
SELECT is(sectest.try($$SELECT count(*) FROM metering.subject_access$$), 'ok', '6b: ... and counts it');
RESET ROLE;
DELETE FROM metering.subject_access WHERE role_name = 'sec_gone';

------------------------------------------------------------------------------
-- 6c. refresh_rollups() run by a role that sees only some subjects moves the
-- watermarks past events it never read.  Fixed: it rolls up everything (or
-- is refused with 42501); the meter answers what the raw events say.
-- (A bare reader granted EXECUTE on refresh_rollups fails earlier on 0.2.0,
-- 42501 on events_seq and _snapshot_meter; so the role here holds every
-- right of metering_admin but not its membership, which is what makes an
-- admin see all subjects.)
------------------------------------------------------------------------------
-- a maintenance role with every right of metering_admin but not its membership,
-- assigned to one subject
CREATE ROLE sec_job IN ROLE metering_reader;
GRANT ALL ON ALL TABLES IN SCHEMA metering TO sec_job;
GRANT ALL ON ALL SEQUENCES IN SCHEMA metering TO sec_job;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA metering TO sec_job;
INSERT INTO metering.subject_access (role_name, subject) VALUES ('sec_job', 'acme');
SET ROLE sec_job;
SELECT sectest.try($$SELECT metering.refresh_rollups()$$) AS job_refresh \gset
RESET ROLE;
SELECT is((SELECT sum(value) FROM metering.query_meter('calls')),
          (SELECT sum((data ->> 'n')::numeric) FROM metering.events WHERE type = 'api'),
          '6c: after a partial reader''s refresh the meter still counts every event');
SELECT is((SELECT string_agg(subject || '=' || value, ',' ORDER BY subject) FROM metering.query_meter('calls', group_by => NULL, subjects => ARRAY['acme', 'globex'])),
          'acme=3,globex=3', '6c: ... for each subject');
SELECT metering.refresh_rollups() AS _ \gset
SELECT is((SELECT sum(value) FROM metering.query_meter('calls')), 6::numeric,
          '6c: ... and after the next full refresh');

------------------------------------------------------------------------------
-- 4a. Immutability bypassed by an admin: the update triggers compare
-- to_jsonb(NEW) with to_jsonb(OLD), unqualified; the admin's own
-- adm.to_jsonb(<table>) (a value that differs only in deleted_at) with
-- search_path adm, pg_catalog lets any change through.  Fixed: 55000.
------------------------------------------------------------------------------
CREATE SCHEMA adm AUTHORIZATION sec_admin;
SET ROLE sec_admin;
DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['grants', 'entitlements', 'features', 'hashmap_services', 'hashmap_fields', 'hashmap_groups'] LOOP
    EXECUTE format('CREATE FUNCTION adm.to_jsonb(metering.%I) RETURNS jsonb LANGUAGE sql VOLATILE
                    AS $f$SELECT pg_catalog.jsonb_build_object(''deleted_at'', pg_catalog.random())$f$', t);
  END LOOP;
END $$;
SELECT throws_ok(format('SELECT sectest.with_path(%L, %L)', 'adm, pg_catalog', format('UPDATE metering.grants SET amount = 1000000 WHERE id = %L', :'grant1')),
                 '55000', NULL, '4a: an admin''s to_jsonb does not let UPDATE metering.grants SET amount through');
SELECT throws_ok(format('SELECT sectest.with_path(%L, %L)', 'adm, pg_catalog', format('UPDATE metering.entitlements SET usage_period = ''1 day'' WHERE id = %L', :'ent')),
                 '55000', NULL, '4a: ... nor UPDATE metering.entitlements SET usage_period');
SELECT throws_ok($$SELECT sectest.with_path('adm, pg_catalog', 'UPDATE metering.features SET name = ''Renamed'' WHERE key = ''calls''')$$,
                 '55000', NULL, '4a: ... nor UPDATE metering.features SET name');
SELECT throws_ok($$SELECT sectest.with_path('adm, pg_catalog', 'UPDATE metering.hashmap_services SET name = ''renamed'', deleted_at = metering.now() WHERE name = ''api2''')$$,
                 '55000', NULL, '4a: ... nor renaming a hashmap service as it is deleted');
SELECT throws_ok($$SELECT sectest.with_path('adm, pg_catalog', 'UPDATE metering.hashmap_fields SET name = ''renamed'', deleted_at = metering.now() WHERE name = ''k''')$$,
                 '55000', NULL, '4a: ... nor renaming a hashmap field as it is deleted');
SELECT throws_ok($$SELECT sectest.with_path('adm, pg_catalog', 'UPDATE metering.hashmap_groups SET name = ''renamed'', deleted_at = metering.now() WHERE name = ''g''')$$,
                 '55000', NULL, '4a: ... nor renaming a hashmap group as it is deleted');
RESET ROLE;
SELECT is((SELECT amount FROM metering.grants WHERE id = :'grant1'), 100::numeric, '4a: the grant keeps its amount');
DROP SCHEMA adm CASCADE;

------------------------------------------------------------------------------
-- 3. search_path hijack of invoker functions: where PUBLIC may create in
-- public, a reader puts there functions, aggregates and operators named like
-- the built-ins the extension calls unqualified; a superuser whose
-- search_path is public, pg_catalog then runs the reader's code with its
-- rights.  Each hijacker logs itself (and who ran it) and then does what the
-- built-in does, so every call still works.  Fixed: every call works and
-- the log stays empty.
------------------------------------------------------------------------------
GRANT CREATE ON SCHEMA public TO PUBLIC;
CREATE ROLE sec_thief IN ROLE metering_reader;   -- any role with USAGE on schema metering
SET ROLE sec_thief;
CREATE TABLE public.hijacked (name text PRIMARY KEY, who name);
GRANT INSERT, SELECT, DELETE ON public.hijacked TO PUBLIC;
-- logs, and when the caller is a superuser inside the extension's code
-- makes the thief one (pgTAP's own functions, which this file runs with
-- public on the path, are not the extension's to protect)
CREATE FUNCTION public.hj_log(name text) RETURNS void LANGUAGE plpgsql VOLATILE AS $f$
DECLARE
  ctx text;
BEGIN
  INSERT INTO public.hijacked VALUES (name, current_user) ON CONFLICT DO NOTHING;
  GET DIAGNOSTICS ctx = PG_CONTEXT;
  IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user)
     AND pg_catalog.strpos(ctx, 'function metering.') OPERATOR(pg_catalog.>) 0 THEN
    EXECUTE 'ALTER ROLE sec_thief SUPERUSER';
  END IF;
END $f$;
DO $$
DECLARE
  t text;
BEGIN
  -- to_jsonb(<row type>): an exact match beats to_jsonb(anyelement) on any search_path that has public
  FOREACH t IN ARRAY ARRAY['grants', 'entitlements', 'features', 'resets', 'meters', 'hashmap_services', 'hashmap_fields',
                           'hashmap_groups', 'hashmap_mappings', 'hashmap_thresholds'] LOOP
    EXECUTE format('CREATE FUNCTION public.to_jsonb(metering.%I) RETURNS jsonb LANGUAGE sql VOLATILE
                    AS $f$SELECT public.hj_log(''to_jsonb(%s)''); SELECT pg_catalog.to_jsonb($1)$f$', t, t);
  END LOOP;
  -- array_agg(<type>): likewise an exact match beats array_agg(anynonarray)
  FOREACH t IN ARRAY ARRAY['numeric', 'text', 'uuid', 'timestamptz', 'jsonb', 'bigint', 'integer', 'boolean'] LOOP
    EXECUTE format('CREATE FUNCTION public.hj_agg_%s(%s[], %s) RETURNS %s[] LANGUAGE sql VOLATILE
                    AS $f$SELECT public.hj_log(''array_agg(%s)''); SELECT pg_catalog.array_append($1, $2)$f$', t, t, t, t, t);
    EXECUTE format('CREATE AGGREGATE public.array_agg(%s) (SFUNC = public.hj_agg_%s, STYPE = %s[])', t, t, t);
  END LOOP;
END $$;
-- the same signature as the built-in: wins when public comes first
CREATE FUNCTION public.format(text, text) RETURNS text LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('format(text, text)'); SELECT pg_catalog.format($1, $2)$f$;
CREATE FUNCTION public.format(text, text, text) RETURNS text LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('format(text, text, text)'); SELECT pg_catalog.format($1, $2, $3)$f$;
CREATE FUNCTION public.jsonb_typeof(jsonb) RETURNS text LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('jsonb_typeof(jsonb)'); SELECT pg_catalog.jsonb_typeof($1)$f$;
CREATE FUNCTION public.jsonb_array_elements(from_json jsonb, OUT value jsonb) RETURNS SETOF jsonb LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('jsonb_array_elements(jsonb)'); SELECT pg_catalog.jsonb_array_elements($1)$f$;
CREATE FUNCTION public.date_trunc(text, timestamptz) RETURNS timestamptz LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('date_trunc(text, timestamptz)'); SELECT pg_catalog.date_trunc($1, $2)$f$;
CREATE FUNCTION public.date_trunc(text, timestamptz, text) RETURNS timestamptz LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('date_trunc(text, timestamptz, text)'); SELECT pg_catalog.date_trunc($1, $2, $3)$f$;
CREATE FUNCTION public.isfinite(timestamptz) RETURNS boolean LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('isfinite(timestamptz)'); SELECT pg_catalog.isfinite($1)$f$;
CREATE FUNCTION public.hj_sum(numeric, numeric) RETURNS numeric LANGUAGE sql VOLATILE STRICT
  AS $f$SELECT public.hj_log('sum(numeric)'); SELECT pg_catalog.numeric_add($1, $2)$f$;
CREATE AGGREGATE public.sum(numeric) (SFUNC = public.hj_sum, STYPE = numeric);
CREATE FUNCTION public.hj_min(timestamptz, timestamptz) RETURNS timestamptz LANGUAGE sql VOLATILE STRICT
  AS $f$SELECT public.hj_log('min(timestamptz)'); SELECT pg_catalog.timestamptz_smaller($1, $2)$f$;
CREATE AGGREGATE public.min(timestamptz) (SFUNC = public.hj_min, STYPE = timestamptz);
CREATE FUNCTION public.hj_max(timestamptz, timestamptz) RETURNS timestamptz LANGUAGE sql VOLATILE STRICT
  AS $f$SELECT public.hj_log('max(timestamptz)'); SELECT pg_catalog.timestamptz_larger($1, $2)$f$;
CREATE AGGREGATE public.max(timestamptz) (SFUNC = public.hj_max, STYPE = timestamptz);
-- operators: the same signature as the built-in, so public first wins
-- (IS DISTINCT FROM looks up = too)
CREATE FUNCTION public.hj_eq_tstz(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('=(timestamptz, timestamptz)'); SELECT pg_catalog.timestamptz_eq($1, $2)$f$;
CREATE OPERATOR public.= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = public.hj_eq_tstz);
CREATE FUNCTION public.hj_eq_uuid(uuid, uuid) RETURNS boolean LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('=(uuid, uuid)'); SELECT pg_catalog.uuid_eq($1, $2)$f$;
CREATE OPERATOR public.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.hj_eq_uuid);
CREATE FUNCTION public.hj_cat(text, text) RETURNS text LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('||(text, text)'); SELECT pg_catalog.textcat($1, $2)$f$;
CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = public.hj_cat);
CREATE FUNCTION public.hj_jsonb_minus(jsonb, text) RETURNS jsonb LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('-(jsonb, text)'); SELECT pg_catalog.jsonb_delete($1, $2)$f$;
CREATE OPERATOR public.- (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = public.hj_jsonb_minus);
CREATE FUNCTION public.hj_jsonb_get(jsonb, text) RETURNS text LANGUAGE sql VOLATILE
  AS $f$SELECT public.hj_log('->>(jsonb, text)'); SELECT pg_catalog.jsonb_object_field_text($1, $2)$f$;
CREATE OPERATOR public.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = public.hj_jsonb_get);
RESET ROLE;

-- runs a call as the victim (this superuser) with search_path public,
-- pg_catalog; returns which of the thief's objects ran (NULL: none) or the
-- error the call raised
CREATE FUNCTION sectest.victim(sql text, path text DEFAULT 'public, pg_catalog') RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  ran text;
BEGIN
  DELETE FROM public.hijacked;
  BEGIN
    PERFORM sectest.with_path(path, sql);
  EXCEPTION WHEN OTHERS THEN
    RETURN 'the call failed: ' || SQLSTATE || ' ' || SQLERRM;
  END;
  SELECT pg_catalog.string_agg(h.name || ' as ' || h.who, ', ' ORDER BY h.name) INTO ran FROM public.hijacked h;
  RETURN ran;
END $$;

SELECT metering.ingest('{"specversion": "1.0", "id": "h1", "source": "s", "type": "api", "subject": "acme", "time": "2024-06-09T10:00:00Z", "data": {"n": 4}}') AS _ \gset
SELECT is(sectest.victim($$SELECT metering.refresh_rollups()$$), NULL, '3: refresh_rollups() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT * FROM metering.query_meter('calls', window_size => 'HOUR', subjects => ARRAY['acme'])$$), NULL,
          '3: query_meter() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.search_usage('{"searchByAttributes": [{"name": "startTime", "operator": "GREATER_THAN_OR_EQUAL", "value": "2024-06-01T00:00:00"}]}')$$),
          NULL, '3: search_usage() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.units_usage('calls', '2024-06-01', '2024-06-10')$$), NULL,
          '3: units_usage() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT * FROM metering.usage_overview('acme', 'calls')$$), NULL,
          '3: usage_overview() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT * FROM metering.entitlement_value('acme', 'calls')$$), NULL,
          '3: entitlement_value() runs none of the reader''s code');
SELECT is(sectest.victim(format($$SELECT * FROM metering.burndown_history(%L)$$, :'ent')), NULL,
          '3: burndown_history() runs none of the reader''s code');
SELECT is(sectest.victim(format($$SELECT metering.create_grant(%L, 5, '2024-06-10')$$, :'ent')), NULL,
          '3: create_grant() runs none of the reader''s code');
SELECT is(sectest.victim(format($$SELECT metering.void_grant(%L)$$, :'grant2')), NULL,
          '3: void_grant() runs none of the reader''s code');
SELECT is(sectest.victim(format($$SELECT metering.reset_entitlement(%L)$$, :'ent')), NULL,
          '3: reset_entitlement() runs none of the reader''s code');
SELECT is(sectest.victim($$INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('m2', 'api', 'MAX', '$.n')$$), NULL,
          '3: inserting a meter runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.create_feature('f2', 'F2', 'calls')$$), NULL,
          '3: create_feature() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.create_entitlement('globex', 'f2', usage_period => '1 month')$$), NULL,
          '3: create_entitlement() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.delete_entitlement(id) FROM metering.entitlements WHERE subject = 'globex'$$), NULL,
          '3: delete_entitlement() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.archive_feature('f2')$$), NULL,
          '3: archive_feature() runs none of the reader''s code');
SELECT is(sectest.victim($$WITH g AS (INSERT INTO metering.hashmap_groups (name) VALUES ('g3') RETURNING id)
                           INSERT INTO metering.hashmap_mappings (service_id, group_id, cost, map_type)
                           SELECT s.id, g.id, 1, 'flat' FROM metering.hashmap_services s, g WHERE s.name = 'api'$$), NULL,
          '3: inserting a hashmap group and rule runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.rate('api', 2)$$), NULL, '3: rate() runs none of the reader''s code');
INSERT INTO metering.hashmap_groups (name) VALUES ('g4');
SELECT is(sectest.victim($$SELECT metering.delete_hashmap_group(id) FROM metering.hashmap_groups WHERE name = 'g4'$$), NULL,
          '3: delete_hashmap_group() runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.meter_usage('p', 'c', '2024-06-09 23:00+00', 'd', 5)$$), NULL,
          '3: meter_usage() (SECURITY DEFINER, pinned path) runs none of the reader''s code');
SELECT is(sectest.victim($$SELECT metering.ingest('{"specversion": "1.0", "id": "h2", "source": "s", "type": "api", "subject": "acme", "time": "2024-06-09T11:00:00Z", "data": {"n": 1}}')$$),
          NULL, '3: ingest() (SECURITY DEFINER, pinned path) runs none of the reader''s code');
-- public need not even come first: an exact match on the row type wins anywhere on the path
SELECT is(sectest.victim(format($$SELECT metering.void_grant(id) FROM metering.grants WHERE entitlement_id = %L AND voided_at IS NULL AND amount = 5$$, :'ent'),
                         '"$user", public'), NULL,
          '3: with the default search_path too, void_grant() runs none of the reader''s code');
SELECT is((SELECT rolsuper FROM pg_roles WHERE rolname = 'sec_thief'), false, '3: the reader is still not a superuser');

------------------------------------------------------------------------------
-- 4b. An admin truncates what must stay (usage already sent to AWS, the
-- entitlements and their grants, the rating rules), writes an event with its
-- own seq (below the rollup watermark, it vanishes from every answer), or
-- moves the event sequence back.  Fixed: 42501 for each.  (Last: on 0.2.0
-- they succeed and empty the tables.)
------------------------------------------------------------------------------
SET ROLE sec_admin;
SELECT throws_ok($$TRUNCATE metering.usage_records$$, '42501', NULL, '4b: an admin cannot TRUNCATE metering.usage_records');
SELECT throws_ok($$TRUNCATE metering.entitlements CASCADE$$, '42501', NULL, '4b: an admin cannot TRUNCATE metering.entitlements CASCADE');
SELECT throws_ok($$TRUNCATE metering.hashmap_mappings$$, '42501', NULL, '4b: an admin cannot TRUNCATE metering.hashmap_mappings');
SELECT throws_ok($$TRUNCATE metering.hashmap_thresholds$$, '42501', NULL, '4b: an admin cannot TRUNCATE metering.hashmap_thresholds');
SELECT throws_ok($$TRUNCATE metering.hashmap_services, metering.hashmap_fields, metering.hashmap_groups CASCADE$$, '42501', NULL,
                 '4b: an admin cannot TRUNCATE the hashmap services, fields and groups');
SELECT throws_ok($$INSERT INTO metering.events (id, source, subject, type, time, data, seq) OVERRIDING SYSTEM VALUE
                   VALUES ('low', 's', 'acme', 'api', '2024-06-01T10:00:00Z', '{"n": 1000}', 1)$$,
                 '42501', NULL, '4b: an admin cannot insert an event with its own seq (OVERRIDING SYSTEM VALUE)');
SELECT throws_ok($$SELECT setval('metering.events_seq', 1)$$, '42501', NULL, '4b: an admin cannot move metering.events_seq back');
RESET ROLE;

------------------------------------------------------------------------------
-- 3, for every function: none reaches an object by the caller's
-- search_path.  SQL functions have SQL-standard bodies (parsed once, at
-- install), the others pin search_path, but for C functions that run no SQL.
------------------------------------------------------------------------------
SELECT is(ARRAY(SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
                 WHERE p.pronamespace = 'metering'::regnamespace AND p.prokind IN ('f', 'p')
                   AND NOT coalesce(p.proconfig, '{}') @> ARRAY['search_path=pg_catalog, pg_temp']
                   AND NOT (l.lanname = 'sql' AND p.prosqlbody IS NOT NULL) AND l.lanname <> 'c'
                 ORDER BY 1), '{}'::text[],
          '3: every SQL function has a parsed body and every other non-C function pins search_path');
SELECT is(ARRAY(SELECT p.proname::text FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
                 WHERE p.pronamespace = 'metering'::regnamespace AND p.prokind = 'f' AND l.lanname = 'c'
                   AND NOT coalesce(p.proconfig, '{}') @> ARRAY['search_path=pg_catalog, pg_temp']
                 ORDER BY 1),
          ARRAY['_base64url', '_burndown_final', '_burndown_trans', '_burndown_trans', '_calendar_index', '_created_here', '_hashmap_invalidate',
                '_hmac_sha256', '_interval_at_least', '_jwt_hs256', '_meter_groups', '_meter_number',
                '_meter_path_problem', '_meter_text', '_minute', '_note_created', '_outer_role', '_parse_events', '_price_fee', '_random_bytes',
                '_rated_total_trans', '_rated_total_trans', '_rfc3339', '_time_in_range', '_usage_max_age', '_valid_time_zone', 'calendar_step',
                'now', 'rate', 'rate_explain', 'rollover', 'uuid_v7', 'uuid_v7_time'],
          '3: the C functions without a pinned search_path are those that run no SQL (rate pins its own)');

SELECT * FROM finish();
ROLLBACK;
