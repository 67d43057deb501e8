# metering: PGXS build, plus the two commands of the README (make demo, make test).
EXTENSION   = metering
EXTVERSION  = 0.2.0
MODULE_big  = metering
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))

# The install script is assembled from one file per concern in src/sql.
# Upgrade scripts: the changes to what the previous version made
# (src/upgrade/), then the files that version did not have.  The scripts of
# released versions are kept as they shipped (upgrade/).
SQL_SOURCES = $(sort $(wildcard src/sql/*.sql))
UPGRADE_0_2 = src/upgrade/0.1.0--0.2.0.sql src/sql/30_features.sql src/sql/31_entitlements.sql \
              src/sql/32_grants.sql src/sql/39_entitlements_dump.sql src/sql/40_hashmap_tables.sql \
              src/sql/41_hashmap_rules.sql src/sql/42_hashmap_rating.sql src/sql/43_hashmap_dump.sql \
              src/sql/50_subjects.sql src/sql/51_reports.sql src/sql/52_search_usage.sql src/sql/53_units_usage.sql src/sql/54_usage_periods.sql src/sql/60_access.sql \
              src/sql/95_object_comments.sql
DATA_built  = $(EXTENSION)--$(EXTVERSION).sql $(EXTENSION)--0.1.0--0.2.0.sql
DATA        = upgrade/$(EXTENSION)--0.1.0.sql

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

$(EXTENSION)--0.1.0--0.2.0.sql: $(UPGRADE_0_2)
	cat $(UPGRADE_0_2) > $@

.PHONY: deps demo test bench
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

bench: deps
	$(MAKE) all
	./tools/install
	./tools/bench
