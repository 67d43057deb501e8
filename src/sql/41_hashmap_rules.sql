-- HashMap rating: the triggers that keep the rule tables sound, and the
-- functions that change them.

CREATE FUNCTION metering.hashmap_types() RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
 VALUES ('flat'), ('rate');
END;
COMMENT ON FUNCTION metering.hashmap_types() IS 'the kinds of rule: flat (a price) and rate (a factor)';

CREATE FUNCTION metering._hashmap_unchanged_since_snapshot(parent uuid) RETURNS boolean
  AS 'MODULE_PATHNAME', 'metering_hashmap_unchanged_since_snapshot'
  LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION metering._hashmap_unchanged_since_snapshot(uuid) IS
  'internal: at REPEATABLE READ or SERIALIZABLE, raises 40001 when another transaction changed the rules (or fields) of a service, field or group after this one''s snapshot';

-- services, fields and groups: named once, never renamed; DELETE is soft
CREATE FUNCTION metering._hashmap_named_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  what text := CASE TG_TABLE_NAME WHEN 'hashmap_services' THEN 'service'
                                  WHEN 'hashmap_fields' THEN 'field' ELSE 'group' END;
BEGIN
  IF NEW.name IS NULL OR btrim(NEW.name) = '' OR length(NEW.name) > 255 THEN
    RAISE EXCEPTION 'hashmap %: name is required (up to 255 characters)', what USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT metering._restored('hashmap ' || what, NEW.created_at) THEN
    NEW.created_by := current_user;
    IF NEW.deleted_at IS NOT NULL OR NEW.deleted_by IS NOT NULL THEN
      RAISE EXCEPTION 'a new hashmap % is not deleted', what USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  -- a live field needs a live service, which must not be deleted meanwhile
  -- (through jsonb: services and groups have no service_id)
  IF TG_TABLE_NAME = 'hashmap_fields' AND NEW.deleted_at IS NULL THEN
    PERFORM 1 FROM metering.hashmap_services s
      WHERE s.id = (to_jsonb(NEW)->>'service_id')::uuid AND s.deleted_at IS NULL FOR NO KEY UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'hashmap service % does not exist', to_jsonb(NEW)->>'service_id' USING ERRCODE = 'foreign_key_violation';
    END IF;
    PERFORM metering._hashmap_unchanged_since_snapshot((to_jsonb(NEW)->>'service_id')::uuid);
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._hashmap_named_before_insert() IS
  'internal: validates a new hashmap service, field or group';

CREATE FUNCTION metering._hashmap_named_before_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  what text := CASE TG_TABLE_NAME WHEN 'hashmap_services' THEN 'service'
                                  WHEN 'hashmap_fields' THEN 'field' ELSE 'group' END;
BEGIN
  IF OLD.deleted_at IS NOT NULL THEN
    RAISE EXCEPTION 'hashmap % "%" is deleted', what, OLD.name USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF (to_jsonb(NEW) - 'deleted_at' - 'deleted_by') IS DISTINCT FROM (to_jsonb(OLD) - 'deleted_at' - 'deleted_by')
     OR NEW.deleted_at IS NULL THEN
    RAISE EXCEPTION 'hashmap % "%" cannot change; only deleting it can', what, OLD.name
      USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Create a new one.';
  END IF;
  NEW.deleted_at := metering.now();
  NEW.deleted_by := current_user;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._hashmap_named_before_update() IS
  'internal: services, fields and groups never change but to be deleted (at metering.now(), by current_user)';

-- what goes with a deleted service or field: its fields and rules
CREATE FUNCTION metering._hashmap_named_after_delete() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
BEGIN
  -- at REPEATABLE READ: a rule or field added meanwhile would be missed below
  PERFORM metering._hashmap_unchanged_since_snapshot(NEW.id);
  IF TG_TABLE_NAME = 'hashmap_groups' THEN
    -- rules not started yet move to the default group; running ones end now
    -- and go on there as copies; ended ones stay (the past keeps its prices)
    UPDATE metering.hashmap_mappings SET group_id = NULL
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start >= now;
    UPDATE metering.hashmap_thresholds SET group_id = NULL
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start >= now;
    INSERT INTO metering.hashmap_mappings (service_id, field_id, value, cost, map_type, tenant_id, start, "end", name, description)
    SELECT service_id, field_id, value, cost, map_type, tenant_id, now, "end", name, description
      FROM metering.hashmap_mappings
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start < now AND ("end" IS NULL OR "end" > now)
     ORDER BY id;
    INSERT INTO metering.hashmap_thresholds (service_id, field_id, level, cost, map_type, tenant_id, start, "end", name, description)
    SELECT service_id, field_id, level, cost, map_type, tenant_id, now, "end", name, description
      FROM metering.hashmap_thresholds
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start < now AND ("end" IS NULL OR "end" > now)
     ORDER BY id;
    UPDATE metering.hashmap_mappings SET "end" = now
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start < now AND ("end" IS NULL OR "end" > now);
    UPDATE metering.hashmap_thresholds SET "end" = now
     WHERE group_id = NEW.id AND deleted_at IS NULL AND start < now AND ("end" IS NULL OR "end" > now);
  ELSIF TG_TABLE_NAME = 'hashmap_services' THEN
    UPDATE metering.hashmap_fields SET deleted_at = metering.now() WHERE service_id = NEW.id AND deleted_at IS NULL;
    UPDATE metering.hashmap_mappings SET deleted_at = metering.now() WHERE service_id = NEW.id AND deleted_at IS NULL;
    UPDATE metering.hashmap_thresholds SET deleted_at = metering.now() WHERE service_id = NEW.id AND deleted_at IS NULL;
  ELSIF TG_TABLE_NAME = 'hashmap_fields' THEN
    UPDATE metering.hashmap_mappings SET deleted_at = metering.now() WHERE field_id = NEW.id AND deleted_at IS NULL;
    UPDATE metering.hashmap_thresholds SET deleted_at = metering.now() WHERE field_id = NEW.id AND deleted_at IS NULL;
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._hashmap_named_after_delete() IS
  'internal: deleting a service deletes its fields and rules; deleting a field, its rules; deleting a group hands its running and future rules to the default group';

CREATE FUNCTION metering._hashmap_soft_delete() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF OLD.deleted_at IS NULL THEN
    IF TG_TABLE_NAME = 'hashmap_groups' THEN
      PERFORM metering.delete_hashmap_group(OLD.id, false);
    ELSE
      EXECUTE format('UPDATE %s SET deleted_at = metering.now() WHERE id = $1', TG_RELID::regclass) USING OLD.id;
    END IF;
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION metering._hashmap_soft_delete() IS
  'internal: DELETE keeps the row and marks it deleted (a group''s rules go on in the default group)';

-- mappings and thresholds
CREATE FUNCTION metering._hashmap_rule_before_write() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  now timestamptz := metering.now();
  mapping boolean := TG_TABLE_NAME = 'hashmap_mappings';
  what text := CASE WHEN TG_TABLE_NAME = 'hashmap_mappings' THEN 'mapping' ELSE 'threshold' END;
  backdated boolean := current_setting('metering.allow_backdated_rules')::boolean;
  fresh boolean;
  nv jsonb := to_jsonb(NEW);
  ov jsonb;
  dup uuid;
  parent uuid;
  joins_group boolean;
BEGIN
  IF TG_OP = 'UPDATE' THEN
    ov := to_jsonb(OLD);
    IF OLD.deleted_at IS NOT NULL THEN
      RAISE EXCEPTION 'hashmap %: the rule is deleted', what
        USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Rule %s, deleted at %s.', OLD.id, OLD.deleted_at);
    END IF;
    IF (NEW.id, NEW.created_at, NEW.created_by) IS DISTINCT FROM (OLD.id, OLD.created_at, OLD.created_by) THEN
      RAISE EXCEPTION 'hashmap %: id, created_at and created_by never change', what
        USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- a soft delete (DELETE, or the deletion of its service, field or group)
    IF NEW.deleted_at IS NOT NULL THEN
      IF (nv - 'deleted_at' - 'deleted_by') IS DISTINCT FROM (ov - 'deleted_at' - 'deleted_by') THEN
        RAISE EXCEPTION 'hashmap %: a deletion changes nothing else', what
          USING ERRCODE = 'object_not_in_prerequisite_state';
      END IF;
      NEW.deleted_at := now;
      NEW.deleted_by := current_user;
      RETURN NEW;
    END IF;
    IF NEW.deleted_by IS NOT NULL THEN
      RAISE EXCEPTION 'hashmap %: deleted_by comes with a deletion', what USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- the rules of a deleted group that have not started move to the
    -- default group (see _hashmap_named_after_delete)
    IF NEW.group_id IS NULL AND OLD.group_id IS NOT NULL AND OLD.start >= now
       AND (nv - 'group_id') = (ov - 'group_id')
       AND EXISTS (SELECT 1 FROM metering.hashmap_groups g WHERE g.id = OLD.group_id AND g.deleted_at IS NOT NULL) THEN
      fresh := false;
    ELSIF OLD.start <= now THEN
      -- started: only the end may change, and not into the past
      IF (nv - 'end' - 'updated_at' - 'updated_by') IS DISTINCT FROM (ov - 'end' - 'updated_at' - 'updated_by') THEN
        RAISE EXCEPTION 'hashmap %: the rule has started (%): only its end may change', what, OLD.start
          USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Rule %s.', OLD.id),
                HINT = 'Set its end and create a new rule from then.';
      END IF;
      -- an ended rule stays ended: reopening it would price the gap anew
      IF OLD."end" <= now AND NEW."end" IS DISTINCT FROM OLD."end" AND NOT backdated THEN
        RAISE EXCEPTION 'hashmap %: the rule ended at %: it cannot be reopened', what, OLD."end"
          USING ERRCODE = 'object_not_in_prerequisite_state', DETAIL = format('Rule %s.', OLD.id),
                HINT = 'Create a new rule from now.';
      END IF;
      IF NEW."end" IS NOT NULL AND NEW."end" < now AND NOT backdated THEN
        RAISE EXCEPTION 'hashmap %: end % is in the past', what, NEW."end"
          USING ERRCODE = 'invalid_parameter_value', HINT = 'Rules are not changed retroactively.';
      END IF;
      fresh := false;
    ELSE
      fresh := true;             -- not started yet: checked like a new rule
    END IF;
    NEW.updated_at := now;
    NEW.updated_by := current_user;
  ELSE
    -- a row made now is new; one with another created_at is restored
    fresh := NOT metering._restored('hashmap ' || what, NEW.created_at);
    IF fresh THEN
      NEW.created_by := current_user;
      IF NEW.updated_at IS NOT NULL OR NEW.updated_by IS NOT NULL
         OR NEW.deleted_at IS NOT NULL OR NEW.deleted_by IS NOT NULL THEN
        RAISE EXCEPTION 'hashmap %: a new rule is neither updated nor deleted', what
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
    END IF;
  END IF;

  -- the shape of the rule
  IF (NEW.service_id IS NULL) = (NEW.field_id IS NULL) THEN
    RAISE EXCEPTION 'hashmap % belongs to exactly one service or one field, got %', what,
      CASE WHEN NEW.service_id IS NULL THEN 'neither' ELSE 'both' END
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF mapping AND NEW.service_id IS NOT NULL AND nv->>'value' IS NOT NULL THEN
    RAISE EXCEPTION 'hashmap mapping: a service mapping has no value (it applies to every point), got %', quote_literal(nv->>'value')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF mapping AND NEW.field_id IS NOT NULL AND nv->>'value' IS NULL THEN
    RAISE EXCEPTION 'hashmap mapping: a field mapping needs the value it matches'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.map_type IS NULL OR NEW.map_type NOT IN ('flat', 'rate') THEN
    RAISE EXCEPTION 'hashmap %: map_type must be flat or rate, got %', what, coalesce(quote_literal(NEW.map_type), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- numeric sorts NaN above Infinity above every number
  IF NEW.cost IS NULL OR NEW.cost >= 'Infinity' OR NEW.cost <= '-Infinity' THEN
    RAISE EXCEPTION 'hashmap %: cost must be a finite number, got %', what, coalesce(NEW.cost::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT mapping AND (nv->>'level' IS NULL OR (nv->>'level')::numeric >= 'Infinity' OR (nv->>'level')::numeric <= '-Infinity') THEN
    RAISE EXCEPTION 'hashmap threshold: level must be a finite number, got %', coalesce(nv->>'level', 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.tenant_id = '' THEN
    RAISE EXCEPTION 'hashmap %: tenant_id is NULL (every tenant) or a tenant, not empty', what
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW.start IS NULL OR NOT isfinite(NEW.start) THEN
    RAISE EXCEPTION 'hashmap %: start must be a finite time', what USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NEW."end" IS NOT NULL AND (NEW."end" <= NEW.start OR NOT isfinite(NEW."end")) THEN
    RAISE EXCEPTION 'hashmap %: end (%) must be after start (%)', what, NEW."end", NEW.start
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF fresh THEN
    IF NEW.start < now AND NOT backdated THEN
      RAISE EXCEPTION 'hashmap %: start % is in the past', what, NEW.start
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'SET metering.allow_backdated_rules = on to re-rate the past on purpose.';
    END IF;
    IF NEW."end" < now AND NOT backdated THEN
      RAISE EXCEPTION 'hashmap %: end % is in the past', what, NEW."end"
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'SET metering.allow_backdated_rules = on to re-rate the past on purpose.';
    END IF;
  END IF;

  -- a live rule needs a live service or field (and group), which must not be
  -- deleted meanwhile; writers of one parent take turns, so that the check
  -- below sees the others' rules: one rule per key and tenant at any
  -- instant, or the price would depend on row order.  The group is locked
  -- first, as delete_hashmap_group locks it before the rules' parents.
  -- (A group is checked when the rule joins it: ending a rule of a group
  -- being deleted is part of that deletion.  A restored rule may belong to
  -- a group deleted after it ended.)
  joins_group := NEW.group_id IS NOT NULL AND NEW.deleted_at IS NULL AND (TG_OP = 'INSERT' OR fresh);
  IF joins_group THEN
    PERFORM 1 FROM metering.hashmap_groups g
      WHERE g.id = NEW.group_id
        AND (g.deleted_at IS NULL OR (NOT fresh AND least(NEW."end", NEW.deleted_at) <= g.deleted_at))
      FOR SHARE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'hashmap group % does not exist', NEW.group_id USING ERRCODE = 'foreign_key_violation';
    END IF;
  END IF;
  IF NEW.service_id IS NOT NULL THEN
    SELECT s.id INTO parent FROM metering.hashmap_services s
     WHERE s.id = NEW.service_id AND (s.deleted_at IS NULL OR NEW.deleted_at IS NOT NULL) FOR NO KEY UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'hashmap service % does not exist', NEW.service_id USING ERRCODE = 'foreign_key_violation';
    END IF;
  ELSE
    SELECT f.id INTO parent FROM metering.hashmap_fields f
     WHERE f.id = NEW.field_id AND (f.deleted_at IS NULL OR NEW.deleted_at IS NOT NULL) FOR NO KEY UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'hashmap field % does not exist', NEW.field_id USING ERRCODE = 'foreign_key_violation';
    END IF;
  END IF;
  PERFORM metering._hashmap_unchanged_since_snapshot(parent);
  IF joins_group THEN
    PERFORM metering._hashmap_unchanged_since_snapshot(NEW.group_id);
  END IF;

  IF mapping THEN
    SELECT m.id INTO dup FROM metering.hashmap_mappings m
     WHERE m.id <> NEW.id
       AND m.service_id IS NOT DISTINCT FROM NEW.service_id AND m.field_id IS NOT DISTINCT FROM NEW.field_id
       AND m.group_id IS NOT DISTINCT FROM NEW.group_id AND m.tenant_id IS NOT DISTINCT FROM NEW.tenant_id
       AND m.value IS NOT DISTINCT FROM nv->>'value'
       AND m.start < coalesce(least(m."end", m.deleted_at), 'infinity')
       AND m.start < coalesce(least(NEW."end", NEW.deleted_at), 'infinity')
       AND NEW.start < coalesce(least(m."end", m.deleted_at), 'infinity')
     LIMIT 1;
  ELSE
    SELECT t.id INTO dup FROM metering.hashmap_thresholds t
     WHERE t.id <> NEW.id
       AND t.service_id IS NOT DISTINCT FROM NEW.service_id AND t.field_id IS NOT DISTINCT FROM NEW.field_id
       AND t.group_id IS NOT DISTINCT FROM NEW.group_id AND t.tenant_id IS NOT DISTINCT FROM NEW.tenant_id
       AND t.level = (nv->>'level')::numeric
       AND t.start < coalesce(least(t."end", t.deleted_at), 'infinity')
       AND t.start < coalesce(least(NEW."end", NEW.deleted_at), 'infinity')
       AND NEW.start < coalesce(least(t."end", t.deleted_at), 'infinity')
     LIMIT 1;
  END IF;
  IF dup IS NOT NULL THEN
    RAISE EXCEPTION 'hashmap %: another % applies at the same time to the same %, group and tenant', what, what,
      CASE WHEN mapping AND NEW.field_id IS NOT NULL THEN 'field and value'
           WHEN mapping THEN 'service' ELSE 'parent and level' END
      USING ERRCODE = 'unique_violation', DETAIL = format('The other one is %s.', dup),
            HINT = 'End the other one first, or give this one a start after its end.';
  END IF;
  RETURN NEW;
END $$;
COMMENT ON FUNCTION metering._hashmap_rule_before_write() IS
  'internal: validates a mapping or threshold, its validity period and its uniqueness; started rules may only get an end; deletions are stamped';

CREATE FUNCTION metering._hashmap_invalidate() RETURNS trigger
  AS 'MODULE_PATHNAME', 'metering_hashmap_invalidate'
  LANGUAGE C;
COMMENT ON FUNCTION metering._hashmap_invalidate() IS
  'internal: tells every backend that the rules changed (their compiled copies are rebuilt at next use)';

DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['hashmap_services', 'hashmap_fields', 'hashmap_groups'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT ON metering.%I FOR EACH ROW EXECUTE FUNCTION metering._hashmap_named_before_insert()', t || '_before_insert', t);
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON metering.%I FOR EACH ROW EXECUTE FUNCTION metering._hashmap_named_before_update()', t || '_before_update', t);
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE OF deleted_at ON metering.%I FOR EACH ROW WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL) EXECUTE FUNCTION metering._hashmap_named_after_delete()', t || '_after_delete', t);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['hashmap_mappings', 'hashmap_thresholds'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON metering.%I FOR EACH ROW EXECUTE FUNCTION metering._hashmap_rule_before_write()', t || '_before_write', t);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['hashmap_services', 'hashmap_fields', 'hashmap_groups', 'hashmap_mappings', 'hashmap_thresholds'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE DELETE ON metering.%I FOR EACH ROW EXECUTE FUNCTION metering._hashmap_soft_delete()', t || '_soft_delete', t);
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON metering.%I FOR EACH STATEMENT EXECUTE FUNCTION metering._hashmap_invalidate()', t || '_invalidate', t);
    -- caches must hear of changes applied by replication too
    EXECUTE format('ALTER TABLE metering.%I ENABLE ALWAYS TRIGGER %I', t, t || '_invalidate');
  END LOOP;
END $$;

CREATE FUNCTION metering.delete_hashmap_group(group_id uuid, recursive boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  g metering.hashmap_groups;
BEGIN
  SELECT * INTO g FROM metering.hashmap_groups WHERE id = delete_hashmap_group.group_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'hashmap group % does not exist', delete_hashmap_group.group_id USING ERRCODE = 'no_data_found';
  END IF;
  IF g.deleted_at IS NOT NULL THEN
    RAISE EXCEPTION 'hashmap group "%" is already deleted', g.name USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF coalesce(recursive, false) THEN
    UPDATE metering.hashmap_mappings m SET deleted_at = metering.now() WHERE m.group_id = g.id AND m.deleted_at IS NULL;
    UPDATE metering.hashmap_thresholds t SET deleted_at = metering.now() WHERE t.group_id = g.id AND t.deleted_at IS NULL;
  END IF;
  -- what is left goes on in the default group (_hashmap_named_after_delete)
  UPDATE metering.hashmap_groups SET deleted_at = metering.now() WHERE id = g.id;
END $$;
COMMENT ON FUNCTION metering.delete_hashmap_group(uuid, boolean) IS
  'deletes a group; with recursive its rules too, else its running and future rules go on in the default group from now (23505 if that makes two rules for one key); ended rules keep pricing the past';
