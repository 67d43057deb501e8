# metering: PGXS build, plus the two commands of the README (make demo, make test).
EXTENSION   = metering
EXTVERSION  = 0.3.0
MODULE_big  = metering
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))

# The install script is assembled from one file per concern in src/sql.
# The scripts of released versions are kept as they shipped (upgrade/).
# The update from the previous release (PREVVERSION) to this one is made of:
#  1. src/upgrade/PREV--THIS.sql: hand-written changes to what the previous
#     release made (ALTER TABLE, DROP of functions whose signature or result
#     type changes, data fixes);
#  2. NEW_SQL: the src/sql files the previous release did not have;
#  3. the current definitions of the functions and views listed in
#     src/upgrade/PREV--THIS.objects, copied from src/sql by tools/sql-extract
#     (CREATE OR REPLACE, with their COMMENT, ALTER, GRANT and REVOKE); make
#     warns of functions and views that differ from upgrade/PREV's script and
#     are not listed (tools/sql-extract --unlisted);
#  4. src/upgrade/PREV--THIS.post.sql, if there is one: data fixes that need
#     the new definitions;
#  5. FINAL_SQL: idempotent files that every update runs again, last.
# At a release: copy both built scripts into upgrade/ and add them to DATA,
# set PREVVERSION to the release, empty NEW_SQL, start the next src/upgrade pair.
PREVVERSION = 0.2.0
NEW_SQL     = src/sql/34_holds.sql src/sql/35_alerts.sql src/sql/58_refresh_status.sql src/sql/70_prices.sql src/sql/80_distribute.sql src/sql/81_config_copies.sql
FINAL_SQL   = src/sql/95_object_comments.sql src/sql/96_search_path.sql src/sql/97_trigger_functions.sql
SQL_SOURCES = $(sort $(wildcard src/sql/*.sql))
UPGRADE     = $(EXTENSION)--$(PREVVERSION)--$(EXTVERSION).sql
UPGRADE_SRC = src/upgrade/$(PREVVERSION)--$(EXTVERSION)
UPGRADE_POST = $(wildcard $(UPGRADE_SRC).post.sql)
DATA_built  = $(EXTENSION)--$(EXTVERSION).sql $(UPGRADE)
DATA        = upgrade/$(EXTENSION)--0.1.0.sql upgrade/$(EXTENSION)--0.2.0.sql \
              upgrade/$(EXTENSION)--0.1.0--0.2.0.sql

# pg_regress suites (sql/ + expected/) and isolation specs (specs/ + expected/).
REGRESS      = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --inputdir=. --load-extension=metering
ISOLATION    = $(patsubst specs/%.spec,%,$(sort $(wildcard specs/*.spec)))
ISOLATION_OPTS = --load-extension=metering

PG_CFLAGS   = -Wall -Wextra -Werror -Wno-unused-parameter
EXTRA_CLEAN = $(DATA_built) results/ regression.diffs regression.out output_iso/ tmp_check_iso/

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
# On a fresh machine the server headers are not there yet: only the targets
# below work until `make deps` (run by demo and test) has installed them.
ifneq ($(wildcard $(PGXS)),)
include $(PGXS)
endif

$(EXTENSION)--$(EXTVERSION).sql: $(SQL_SOURCES)
	cat $(SQL_SOURCES) > $@

$(UPGRADE): $(UPGRADE_SRC).sql $(NEW_SQL) $(UPGRADE_SRC).objects $(UPGRADE_POST) $(SQL_SOURCES) tools/sql-extract
	{ cat $(UPGRADE_SRC).sql $(NEW_SQL) && \
	  ./tools/sql-extract $(UPGRADE_SRC).objects $(SQL_SOURCES) && \
	  cat $(UPGRADE_POST) $(FINAL_SQL); } > $@.tmp || { rm -f $@.tmp; exit 1; }
	mv $@.tmp $@
	@./tools/sql-extract --unlisted upgrade/$(EXTENSION)--$(PREVVERSION).sql $(UPGRADE_SRC).objects \
	  $(filter-out $(NEW_SQL) $(FINAL_SQL),$(SQL_SOURCES))

.PHONY: deps demo test test-citus bench
# Installs the Debian packages the build and the suites need (as root only).
deps:
	@./tools/deps

demo: deps
	$(MAKE) all
	./tools/install
	./tools/demo

test: deps
	$(MAKE) all
	./tools/install
	./tools/test

# Only the scale-out suite: Citus is built from ../shared/vendor/citus when
# missing (tools/citus), then test/citus.sh starts its own three nodes.
test-citus: deps
	$(MAKE) all
	./tools/install
	./tools/citus
	prove -v test/citus.sh

bench: deps
	$(MAKE) all
	./tools/install
	./tools/bench

# Optional, not in make test: pg_regress and the isolation specs against a
# throwaway cluster whose server runs under valgrind memcheck (tools/valgrind:
# fails on an error with a frame in metering.so).  Use a private installation:
#   make valgrind PG_CONFIG=/path/to/pg_config [VALGRIND_SUITES="regress isolation pgtap"]
.PHONY: valgrind
valgrind: all
	./tools/install
	./tools/valgrind $(VALGRIND_SUITES)
