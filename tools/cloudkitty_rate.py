#!/usr/bin/python3
"""Prices points with CloudKitty's own HashMap module (the reference).

Reads a JSON document on stdin:
  {"services": [...], "fields": [{"service", "name"}], "groups": [...],
   "mappings": [{"service"|"field": [service, name], "value", "group", "cost", "type", "tenant"}],
   "thresholds": [{"service"|"field", "level", "group", "cost", "type", "tenant"}],
   "points": [{"service", "qty", "metadata": {...}, "tenant"}]}
creates the rules through CloudKitty's DB API in an in-memory SQLite
database, rates every point with its HashMap processor, and prints one
price per line.  With --bench N it rates the points N times and prints
points per second instead.
"""
import datetime
import decimal
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")

from oslo_config import cfg  # noqa: E402
from oslo_db import options as db_options  # noqa: E402

db_options.set_defaults(cfg.CONF, connection="sqlite://")
cfg.CONF([], project="cloudkitty", default_config_files=[])
cfg.CONF.set_override("connection", "sqlite://", group="database")

from cloudkitty import dataframe  # noqa: E402
from cloudkitty import db  # noqa: E402
from cloudkitty.rating.hash import HashMap  # noqa: E402
from cloudkitty.rating.hash.db import api as hash_db_api  # noqa: E402
from cloudkitty.rating.hash.db.sqlalchemy import models  # noqa: E402


def main():
    bench = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[1] == "--bench" else 0
    spec = json.load(sys.stdin, parse_float=decimal.Decimal)
    models.Base.metadata.create_all(db.get_engine())
    api = hash_db_api.get_instance()
    services = {s: api.create_service(s).service_id for s in spec["services"]}
    fields = {}
    for f in spec["fields"]:
        fields[(f["service"], f["name"])] = api.create_field(services[f["service"]], f["name"]).field_id
    groups = {g: api.create_group(g).group_id for g in spec["groups"]}

    def parent(rule):
        if "service" in rule:
            return {"service_id": services[rule["service"]]}
        return {"field_id": fields[tuple(rule["field"])]}

    for m in spec["mappings"]:
        api.create_mapping(cost=decimal.Decimal(str(m["cost"])), map_type=m["type"], value=m.get("value"),
                           group_id=groups.get(m.get("group")), tenant_id=m.get("tenant"), **parent(m))
    for t in spec["thresholds"]:
        api.create_threshold(cost=decimal.Decimal(str(t["cost"])), map_type=t["type"],
                             level=decimal.Decimal(str(t["level"])),
                             group_id=groups.get(t.get("group")), tenant_id=t.get("tenant"), **parent(t))

    # one processor per tenant, as CloudKitty rates each tenant's data
    by_tenant = {}
    for i, p in enumerate(spec["points"]):
        by_tenant.setdefault(p.get("tenant"), []).append(i)
    start = datetime.datetime(2024, 1, 1)
    prices = [None] * len(spec["points"])
    rounds = max(bench, 1)
    t0 = time.perf_counter()
    for _ in range(rounds):
        for tenant, idx in by_tenant.items():
            processor = HashMap(tenant)
            frame = dataframe.DataFrame(start=start, end=start + datetime.timedelta(hours=1))
            for i in idx:
                p = spec["points"][i]
                frame.add_point(dataframe.DataPoint("unit", decimal.Decimal(str(p["qty"])), 0, {},
                                                    p.get("metadata", {})), p["service"])
            out = processor.process(frame)
            for i, (_, point) in zip(idx, out.iterpoints()):
                prices[i] = point.price
    elapsed = time.perf_counter() - t0
    if bench:
        print(round(len(prices) * rounds / elapsed))
    else:
        for p in prices:
            print(p)


if __name__ == "__main__":
    main()
