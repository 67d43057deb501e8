-- pg_dump keeps the rows of every user table (derived tables such as
-- meter_rollups are rebuilt by the triggers when the rows come back).
SELECT pg_catalog.pg_extension_config_dump('metering.meters', '');
SELECT pg_catalog.pg_extension_config_dump('metering.events', '');
SELECT pg_catalog.pg_extension_config_dump('metering.signing_keys', '');
SELECT pg_catalog.pg_extension_config_dump('metering.products', '');
SELECT pg_catalog.pg_extension_config_dump('metering.product_dimensions', '');
SELECT pg_catalog.pg_extension_config_dump('metering.customers', '');
SELECT pg_catalog.pg_extension_config_dump('metering.usage_records', '');
SELECT pg_catalog.pg_extension_config_dump('metering.registrations', '');
