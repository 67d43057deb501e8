-- HashMap rating (CloudKitty): services, fields, groups, and the rules
-- (mappings and thresholds) that price a point of usage.

CREATE TABLE metering.hashmap_services (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  name        text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE UNIQUE INDEX hashmap_services_live_name ON metering.hashmap_services (name) WHERE deleted_at IS NULL;
COMMENT ON TABLE metering.hashmap_services IS
  'what is rated: a usage type such as compute or volume.size; never renamed; DELETE is a soft delete that takes its fields and rules with it';
COMMENT ON COLUMN metering.hashmap_services.id IS 'the service id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_services.name IS 'the usage type points are rated under; unique among services not deleted';
COMMENT ON COLUMN metering.hashmap_services.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_services.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_services.deleted_at IS 'when it was deleted; points rated before then still see its rules';
COMMENT ON COLUMN metering.hashmap_services.deleted_by IS 'who deleted it';

CREATE TABLE metering.hashmap_fields (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  service_id  uuid NOT NULL REFERENCES metering.hashmap_services (id),
  name        text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE UNIQUE INDEX hashmap_fields_live_name ON metering.hashmap_fields (service_id, name) WHERE deleted_at IS NULL;
COMMENT ON TABLE metering.hashmap_fields IS
  'a metadata key of a service (flavor, volume_type) that mappings and thresholds look at; DELETE is a soft delete that takes its rules with it';
COMMENT ON COLUMN metering.hashmap_fields.id IS 'the field id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_fields.service_id IS 'the service whose points carry this metadata key';
COMMENT ON COLUMN metering.hashmap_fields.name IS 'the metadata key; unique per service among fields not deleted';
COMMENT ON COLUMN metering.hashmap_fields.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_fields.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_fields.deleted_at IS 'when it was deleted';
COMMENT ON COLUMN metering.hashmap_fields.deleted_by IS 'who deleted it';

CREATE TABLE metering.hashmap_groups (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  name        text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE UNIQUE INDEX hashmap_groups_live_name ON metering.hashmap_groups (name) WHERE deleted_at IS NULL;
COMMENT ON TABLE metering.hashmap_groups IS
  'a division of the calculation: each group prices a point on its own and the prices add up; rules without a group are in the default group';
COMMENT ON COLUMN metering.hashmap_groups.id IS 'the group id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_groups.name IS 'unique among groups not deleted';
COMMENT ON COLUMN metering.hashmap_groups.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_groups.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_groups.deleted_at IS 'when it was deleted (delete_hashmap_group)';
COMMENT ON COLUMN metering.hashmap_groups.deleted_by IS 'who deleted it';

CREATE TABLE metering.hashmap_mappings (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  service_id  uuid REFERENCES metering.hashmap_services (id),
  field_id    uuid REFERENCES metering.hashmap_fields (id),
  group_id    uuid REFERENCES metering.hashmap_groups (id),
  value       text,
  cost        numeric NOT NULL,
  map_type    text NOT NULL DEFAULT 'rate',
  tenant_id   text,
  start       timestamptz NOT NULL DEFAULT metering.now(),
  "end"       timestamptz,
  name        text,
  description text,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  updated_at  timestamptz,
  updated_by  text,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE INDEX hashmap_mappings_service_idx ON metering.hashmap_mappings (service_id);
CREATE INDEX hashmap_mappings_field_idx ON metering.hashmap_mappings (field_id, value);
CREATE INDEX hashmap_mappings_group_idx ON metering.hashmap_mappings (group_id);
COMMENT ON TABLE metering.hashmap_mappings IS
  'a price rule of a service (every point) or of a field (points whose metadata value equals `value`): flat sets the group''s flat price to the largest matching cost, rate multiplies the group''s rate; started rules may only get an end; DELETE is a soft delete';
COMMENT ON COLUMN metering.hashmap_mappings.id IS 'the rule id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_mappings.service_id IS 'the service it applies to (or field_id)';
COMMENT ON COLUMN metering.hashmap_mappings.field_id IS 'the field it applies to (or service_id)';
COMMENT ON COLUMN metering.hashmap_mappings.group_id IS 'its group; NULL: the default group';
COMMENT ON COLUMN metering.hashmap_mappings.value IS 'field mappings: the metadata value (as text, JSON spelling for numbers, true, false, null) that matches';
COMMENT ON COLUMN metering.hashmap_mappings.cost IS 'the flat price or the rate factor, exact';
COMMENT ON COLUMN metering.hashmap_mappings.map_type IS 'flat or rate';
COMMENT ON COLUMN metering.hashmap_mappings.tenant_id IS 'NULL: every tenant; else only this tenant, for whom it replaces the global rule with the same parent, group and value';
COMMENT ON COLUMN metering.hashmap_mappings.start IS 'from when it applies (default metering.now(); earlier needs metering.allow_backdated_rules)';
COMMENT ON COLUMN metering.hashmap_mappings."end" IS 'until when it applies (exclusive); NULL: no end';
COMMENT ON COLUMN metering.hashmap_mappings.name IS 'a readable name';
COMMENT ON COLUMN metering.hashmap_mappings.description IS 'free text';
COMMENT ON COLUMN metering.hashmap_mappings.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_mappings.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_mappings.updated_at IS 'when it was last changed';
COMMENT ON COLUMN metering.hashmap_mappings.updated_by IS 'who last changed it';
COMMENT ON COLUMN metering.hashmap_mappings.deleted_at IS 'when it was deleted: points rated before then still see it';
COMMENT ON COLUMN metering.hashmap_mappings.deleted_by IS 'who deleted it';

CREATE TABLE metering.hashmap_thresholds (
  id          uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  service_id  uuid REFERENCES metering.hashmap_services (id),
  field_id    uuid REFERENCES metering.hashmap_fields (id),
  group_id    uuid REFERENCES metering.hashmap_groups (id),
  level       numeric NOT NULL,
  cost        numeric NOT NULL,
  map_type    text NOT NULL DEFAULT 'rate',
  tenant_id   text,
  start       timestamptz NOT NULL DEFAULT metering.now(),
  "end"       timestamptz,
  name        text,
  description text,
  created_at  timestamptz NOT NULL DEFAULT metering.now(),
  created_by  text NOT NULL DEFAULT current_user,
  updated_at  timestamptz,
  updated_by  text,
  deleted_at  timestamptz,
  deleted_by  text
);
CREATE INDEX hashmap_thresholds_service_idx ON metering.hashmap_thresholds (service_id);
CREATE INDEX hashmap_thresholds_field_idx ON metering.hashmap_thresholds (field_id);
CREATE INDEX hashmap_thresholds_group_idx ON metering.hashmap_thresholds (group_id);
COMMENT ON TABLE metering.hashmap_thresholds IS
  'a price rule that applies from a level of the quantity (service thresholds) or of a numeric metadata value (field thresholds); per group only the highest level reached applies; started rules may only get an end; DELETE is a soft delete';
COMMENT ON COLUMN metering.hashmap_thresholds.id IS 'the rule id (uuid v7)';
COMMENT ON COLUMN metering.hashmap_thresholds.service_id IS 'the service whose quantity is compared (or field_id)';
COMMENT ON COLUMN metering.hashmap_thresholds.field_id IS 'the field whose metadata value, as a number, is compared (or service_id)';
COMMENT ON COLUMN metering.hashmap_thresholds.group_id IS 'its group; NULL: the default group';
COMMENT ON COLUMN metering.hashmap_thresholds.level IS 'it applies when the compared value is at least this; -1 and below never apply';
COMMENT ON COLUMN metering.hashmap_thresholds.cost IS 'flat: added (to the flat price of a field threshold, once to the group price of a service threshold); rate: a factor';
COMMENT ON COLUMN metering.hashmap_thresholds.map_type IS 'flat or rate';
COMMENT ON COLUMN metering.hashmap_thresholds.tenant_id IS 'NULL: every tenant; else only this tenant, for whom it replaces the global rule with the same parent, group and level';
COMMENT ON COLUMN metering.hashmap_thresholds.start IS 'from when it applies (default metering.now(); earlier needs metering.allow_backdated_rules)';
COMMENT ON COLUMN metering.hashmap_thresholds."end" IS 'until when it applies (exclusive); NULL: no end';
COMMENT ON COLUMN metering.hashmap_thresholds.name IS 'a readable name';
COMMENT ON COLUMN metering.hashmap_thresholds.description IS 'free text';
COMMENT ON COLUMN metering.hashmap_thresholds.created_at IS 'when it was created (metering.now())';
COMMENT ON COLUMN metering.hashmap_thresholds.created_by IS 'who created it (current_user)';
COMMENT ON COLUMN metering.hashmap_thresholds.updated_at IS 'when it was last changed';
COMMENT ON COLUMN metering.hashmap_thresholds.updated_by IS 'who last changed it';
COMMENT ON COLUMN metering.hashmap_thresholds.deleted_at IS 'when it was deleted: points rated before then still see it';
COMMENT ON COLUMN metering.hashmap_thresholds.deleted_by IS 'who deleted it';
