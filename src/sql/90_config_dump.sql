-- pg_dump keeps the rows of every user table (derived tables such as
-- meter_rollups start empty and are rebuilt by metering.refresh_rollups()).
SELECT pg_catalog.pg_extension_config_dump('metering.meters', '');
SELECT pg_catalog.pg_extension_config_dump('metering.events', '');
-- the sequence too: restored events keep their numbers, and new ones must follow them
SELECT pg_catalog.pg_extension_config_dump('metering.events_seq', '');
SELECT pg_catalog.pg_extension_config_dump('metering.signing_keys', '');
SELECT pg_catalog.pg_extension_config_dump('metering.products', '');
SELECT pg_catalog.pg_extension_config_dump('metering.product_dimensions', '');
SELECT pg_catalog.pg_extension_config_dump('metering.customers', '');
SELECT pg_catalog.pg_extension_config_dump('metering.usage_records', '');
SELECT pg_catalog.pg_extension_config_dump('metering.registrations', '');
