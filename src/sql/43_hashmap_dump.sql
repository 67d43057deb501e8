-- pg_dump keeps the rows of the rating tables.
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_services', '');
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_fields', '');
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_groups', '');
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_mappings', '');
SELECT pg_catalog.pg_extension_config_dump('metering.hashmap_thresholds', '');
