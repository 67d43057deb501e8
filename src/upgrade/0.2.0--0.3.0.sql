\echo Use "ALTER EXTENSION metering UPDATE TO '0.3.0'" to load this file. \quit
-- metering 0.2.0 -> 0.3.0, the hand-written part: changes to what 0.2.0 made
-- that a fresh install does not express as a replaceable definition
-- (ALTER TABLE, DROP of a function whose signature or result type changes,
-- data fixes).  make appends the src/sql files 0.2.0 did not have (NEW_SQL),
-- the current definitions of the functions and views listed in
-- 0.2.0--0.3.0.objects (tools/sql-extract) and the files every update runs
-- again (FINAL_SQL) to build metering--0.2.0--0.3.0.sql.
