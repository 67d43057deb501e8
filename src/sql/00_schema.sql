-- metering: usage metering, entitlements, credit grants and rating.
\echo Use "CREATE EXTENSION metering" to load this file. \quit

COMMENT ON SCHEMA metering IS
  'usage metering, entitlements, credit grants and rating (the metering extension)';

-- Internal helpers (names starting with _) are not part of the public
-- surface; nobody but the extension owner may run them.
