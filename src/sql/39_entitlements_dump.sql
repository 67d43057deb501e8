-- pg_dump keeps the rows of the entitlement tables (snapshots are derived).
SELECT pg_catalog.pg_extension_config_dump('metering.features', '');
SELECT pg_catalog.pg_extension_config_dump('metering.entitlements', '');
SELECT pg_catalog.pg_extension_config_dump('metering.grants', '');
SELECT pg_catalog.pg_extension_config_dump('metering.resets', '');
