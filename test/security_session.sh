#!/bin/sh
# Issue 8, attack 2: a reader or a writer moves the extension's clock (or
# turns on metering.allow_backdated_rules) by setting it before the library
# is loaded.  In a fresh session the setting is only a placeholder; the
# privilege check runs when the library loads, and the first C function is
# often called inside an owner-run (SECURITY DEFINER) function: ingest, or
# the row-security helper behind a reader's SELECT on metering.events.  The
# check then sees the owner, passes, and metering.now() is the attacker's.
# Expected (fixed): the placeholder value is dropped (a WARNING is fine), a
# SET after the library is loaded fails with 42501, and a superuser can still
# set both settings.
# Emits TAP; needs PGHOST/PGPORT/PGUSER (a superuser) of a running server.
# Makes its own database and LOGIN roles (with the password of PGPASSWORD,
# as pg_virtualenv asks for one) and drops them at the end.
db=metering_sec_session
reader=metering_sec_reader
writer=metering_sec_writer
n=1
q() { psql -X -A -t -q -d $db "$@" 2>/dev/null | tail -1; }
check() {  # description, got, expected
  if [ "$2" = "$3" ]; then echo "ok $n - $1"; else echo "not ok $n - $1"; echo "#   got: $2"; echo "#   expected: $3"; fi
  n=$((n + 1))
}
check_not() {  # description, got, not expected
  if [ "$2" != "$3" ]; then echo "ok $n - $1"; else echo "not ok $n - $1"; echo "#   got: $2"; fi
  n=$((n + 1))
}
sqlstate() {  # the first SQLSTATE psql reports, or "none"
  s=$(psql -X -A -t -q -d $db -c '\set VERBOSITY sqlstate' "$@" 2>&1 | sed -n 's/^ERROR:  \([0-9A-Z]\{5\}\).*/\1/p' | head -1)
  echo "${s:-none}"
}

ev='{"specversion": "1.0", "id": "x1", "source": "s", "type": "e", "subject": "acme", "time": "2024-06-01T10:00:00Z", "data": {"v": 1}}'
clock="SELECT to_char(metering.now() AT TIME ZONE 'UTC', 'YYYY')"
year=$(date -u +%Y)

echo "1..14"
dropdb --if-exists $db >/dev/null 2>&1
psql -X -q -d postgres -c "DROP ROLE IF EXISTS $reader" -c "DROP ROLE IF EXISTS $writer" >/dev/null 2>&1
createdb $db
psql -X -q -v ON_ERROR_STOP=1 -d $db >/dev/null 2>&1 <<SQL
CREATE EXTENSION metering;
SELECT metering.setup_roles();
CREATE ROLE $reader LOGIN PASSWORD '${PGPASSWORD:-unused}' IN ROLE metering_reader;
CREATE ROLE $writer LOGIN PASSWORD '${PGPASSWORD:-unused}' IN ROLE metering_writer;
INSERT INTO metering.meters (slug, event_type, aggregation, value_property) VALUES ('t', 'e', 'SUM', '\$.v');
INSERT INTO metering.subject_access (role_name, subject) VALUES ('$reader', 'acme');
-- a row for the row-security helper to be asked about (an empty table asks nothing)
SELECT metering.ingest('$ev');
SQL

# 1-2. a reader's SET before the library loads, kept through the row-security
# helper (an owner-run function) of a plain SELECT
check "reader: SET metering.now before the library loads is dropped (SELECT on events)" \
  "$(q -U $reader -c "SET metering.now = '2020-01-01 00:00+00'" -c "SELECT count(*) FROM metering.events" -c "$clock")" "$year"
# (with metering in shared_preload_libraries the setting is known when the
# session starts, and PostgreSQL refuses the connection instead: the clock is
# not moved either way)
check_not "reader: PGOPTIONS -c metering.now is dropped or refused (SELECT on events)" \
  "$(PGOPTIONS='-c metering.now=2020-01-01T00:00:00+00' q -U $reader -c "SELECT count(*) FROM metering.events" -c "$clock")" "2020"
# 3-4. a writer's, kept through ingest (SECURITY DEFINER)
check "writer: SET metering.now before the library loads is dropped (ingest)" \
  "$(q -U $writer -c "SET metering.now = '2020-01-01 00:00+00'" -c "SELECT metering.ingest('$ev')" -c "$clock")" "$year"
check_not "writer: PGOPTIONS -c metering.now is dropped or refused (ingest)" \
  "$(PGOPTIONS='-c metering.now=2020-01-01T00:00:00+00' q -U $writer -c "SELECT metering.ingest('$ev')" -c "$clock")" "2020"
# 5-6. once the library is loaded, SET is refused
check "reader: SET metering.now after the library is loaded fails with 42501" \
  "$(sqlstate -U $reader -c "SELECT metering.now()" -c "SET metering.now = '2020-01-01 00:00+00'")" "42501"
check "writer: SET metering.now after the library is loaded fails with 42501" \
  "$(sqlstate -U $writer -c "SELECT metering.now()" -c "SET metering.now = '2020-01-01 00:00+00'")" "42501"
# 7-10. metering.allow_backdated_rules: the same rules
check "reader: SET metering.allow_backdated_rules after the library is loaded fails with 42501" \
  "$(sqlstate -U $reader -c "SELECT metering.now()" -c "SET metering.allow_backdated_rules = on")" "42501"
check "writer: SET metering.allow_backdated_rules after the library is loaded fails with 42501" \
  "$(sqlstate -U $writer -c "SELECT metering.now()" -c "SET metering.allow_backdated_rules = on")" "42501"
check "reader: SET metering.allow_backdated_rules before the library loads is dropped" \
  "$(q -U $reader -c "SET metering.allow_backdated_rules = on" -c "SELECT count(*) FROM metering.events" -c "SELECT current_setting('metering.allow_backdated_rules')")" "off"
check_not "writer: PGOPTIONS -c metering.allow_backdated_rules is dropped or refused (ingest)" \
  "$(PGOPTIONS='-c metering.allow_backdated_rules=on' q -U $writer -c "SELECT metering.ingest('$ev')" -c "SELECT current_setting('metering.allow_backdated_rules')")" "on"
# 11-14. a superuser still sets both, before and after the library loads
check "superuser: SET metering.now before the library loads is kept" \
  "$(q -c "SET metering.now = '2020-01-01 00:00+00'" -c "SELECT count(*) FROM metering.events" -c "$clock")" "2020"
check "superuser: PGOPTIONS -c metering.now is kept" \
  "$(PGOPTIONS='-c metering.now=2020-01-01T00:00:00+00' q -c "SELECT metering.ingest('$ev')" -c "$clock")" "2020"
check "superuser: SET metering.now after the library is loaded works" \
  "$(q -c "SELECT metering.now()" -c "SET metering.now = '2020-01-01 00:00+00'" -c "$clock")" "2020"
check "superuser: SET metering.allow_backdated_rules works, before and after the library loads" \
  "$(q -c "SET metering.allow_backdated_rules = on" -c "SELECT metering.now()" -c "SELECT current_setting('metering.allow_backdated_rules')")/$(q -c "SELECT metering.now()" -c "SET metering.allow_backdated_rules = on" -c "SELECT current_setting('metering.allow_backdated_rules')")" "on/on"

[ -n "$KEEP" ] && exit 0
dropdb $db
psql -X -q -d postgres -c "DROP ROLE $reader" -c "DROP ROLE $writer" >/dev/null
