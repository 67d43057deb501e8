#!/usr/bin/python3
"""metering.rate against CloudKitty's own HashMap module, the reference.

Random services, fields, groups, mappings, thresholds and tenant overrides
are created in both; random points are priced by both and compared price by
price.  CloudKitty keeps costs in SQLite as floats and rounds to 28
significant digits, we are exact: prices must agree to 10 significant digits.
The rules avoid what the two do differently on purpose (two rules for one
key, equal threshold levels of different fields, non-string metadata).
Prints TAP; needs PGHOST/PGPORT/PGUSER of a server with the extension built.
"""
import decimal
import json
import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RATE = os.path.join(HERE, "..", "tools", "cloudkitty_rate.py")
DB = "metering_rating_oracle"
SCENARIOS = 20
POINTS = 150


def psql(sql, db=DB):
    out = subprocess.run(["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", db],
                         input=sql, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return out.stdout


def q(s):
    return "NULL" if s is None else "'" + str(s).replace("'", "''") + "'"


def cost(rng):
    return decimal.Decimal(rng.randint(1, 3000)) / 1000


def scenario(rng):
    spec = {"services": [], "fields": [], "groups": [], "mappings": [], "thresholds": [], "points": []}
    groups = [None] + ["g%d" % i for i in range(rng.randint(1, 3))]
    spec["groups"] = groups[1:]
    tenants = ["t1", "t2", "t3"]
    values = ["a", "b", "c", "d"]
    for s in range(rng.randint(1, 3)):
        service = "svc%d" % s
        spec["services"].append(service)
        fields = ["f%d" % i for i in range(rng.randint(0, 4))]
        numeric_fields = set(f for f in fields if rng.random() < 0.4)
        for f in fields:
            spec["fields"].append({"service": service, "name": f})
        levels = rng.sample(range(0, 400), 40)     # distinct levels: no ties between parents
        # service mappings: one per group and tenant
        for g in groups:
            if rng.random() < 0.6:
                spec["mappings"].append({"service": service, "group": g, "cost": cost(rng),
                                         "type": rng.choice(["flat", "flat", "rate"])})
                if rng.random() < 0.3:
                    spec["mappings"].append({"service": service, "group": g, "cost": cost(rng),
                                             "type": rng.choice(["flat", "rate"]), "tenant": rng.choice(tenants)})
        # field mappings: one per value, group and tenant
        # (CloudKitty 17 also keeps a value to one group per field and tenant)
        for f in fields:
            vals = [str(v) for v in range(1, 6)] if f in numeric_fields else values
            for v in vals:
                if rng.random() < 0.6:
                    g = rng.choice(groups)
                    spec["mappings"].append({"field": [service, f], "value": v, "group": g, "cost": cost(rng),
                                             "type": rng.choice(["flat", "flat", "rate"])})
                    if rng.random() < 0.25:
                        spec["mappings"].append({"field": [service, f], "value": v, "group": g,
                                                 "cost": cost(rng), "type": rng.choice(["flat", "rate"]),
                                                 "tenant": rng.choice(tenants)})
        # thresholds: service ones on qty, field ones on numeric fields
        parents = [{"service": service}] + [{"field": [service, f]} for f in numeric_fields]
        for parent in parents:
            for g in groups:
                for _ in range(rng.randint(0, 2)):
                    level = levels.pop() if "service" in parent else levels.pop() % 6
                    # one level per parent (CloudKitty 17), and no equal levels of two fields
                    if "field" in parent and any(t.get("field") and t["field"][0] == service
                                                 and t["level"] == level for t in spec["thresholds"]):
                        continue
                    if "service" in parent and any(t.get("service") == service and t["level"] == level
                                                   for t in spec["thresholds"]):
                        continue
                    rule = dict(parent, group=g, level=level, cost=cost(rng), type=rng.choice(["flat", "rate"]))
                    spec["thresholds"].append(rule)
                    if rng.random() < 0.3:
                        spec["thresholds"].append(dict(rule, cost=cost(rng), tenant=rng.choice(tenants)))
        for _ in range(POINTS // 3):
            md = {}
            for f in fields:
                if rng.random() < 0.8:
                    md[f] = str(rng.randint(1, 6)) if f in numeric_fields else rng.choice(values + ["zz"])
            spec["points"].append({"service": service, "qty": rng.choice([rng.randint(0, 450), rng.randint(1, 9999) / 100]),
                                   "metadata": md, "tenant": rng.choice([None, None] + tenants)})
    spec["points"].append({"service": "unknown", "qty": 5, "metadata": {}, "tenant": None})
    return spec


def sql_for(spec):
    out = ["SET metering.now = '2024-06-01 00:00:00+00';",
           "TRUNCATE metering.hashmap_mappings, metering.hashmap_thresholds, metering.hashmap_fields,"
           " metering.hashmap_services, metering.hashmap_groups;"]
    for s in spec["services"]:
        out.append("INSERT INTO metering.hashmap_services (name) VALUES (%s);" % q(s))
    for f in spec["fields"]:
        out.append("INSERT INTO metering.hashmap_fields (service_id, name) SELECT id, %s FROM metering.hashmap_services"
                   " WHERE name = %s;" % (q(f["name"]), q(f["service"])))
    for g in spec["groups"]:
        out.append("INSERT INTO metering.hashmap_groups (name) VALUES (%s);" % q(g))

    def parent(r):
        if "service" in r:
            return "(SELECT id FROM metering.hashmap_services WHERE name = %s), NULL" % q(r["service"])
        return ("NULL, (SELECT f.id FROM metering.hashmap_fields f JOIN metering.hashmap_services s"
                " ON s.id = f.service_id WHERE s.name = %s AND f.name = %s)" % (q(r["field"][0]), q(r["field"][1])))

    def group(r):
        return "NULL" if r.get("group") is None else "(SELECT id FROM metering.hashmap_groups WHERE name = %s)" % q(r["group"])

    for m in spec["mappings"]:
        out.append("INSERT INTO metering.hashmap_mappings (service_id, field_id, group_id, value, cost, map_type, tenant_id)"
                   " VALUES (%s, %s, %s, %s, %s, %s);" % (parent(m), group(m), q(m.get("value")), m["cost"],
                                                          q(m["type"]), q(m.get("tenant"))))
    for t in spec["thresholds"]:
        out.append("INSERT INTO metering.hashmap_thresholds (service_id, field_id, group_id, level, cost, map_type, tenant_id)"
                   " VALUES (%s, %s, %s, %s, %s, %s);" % (parent(t), group(t), t["level"], t["cost"],
                                                          q(t["type"]), q(t.get("tenant"))))
    rows = ", ".join("(%d, %s, %s, %s::jsonb, %s)" % (i, q(p["service"]), p["qty"], q(json.dumps(p["metadata"])),
                                                      q(p.get("tenant")))
                     for i, p in enumerate(spec["points"]))
    out.append("SELECT metering.rate(s, qty, md, tenant) FROM (VALUES %s) v(i, s, qty, md, tenant) ORDER BY i;" % rows)
    return "\n".join(out)


def agree(ours, theirs):
    a, b = decimal.Decimal(ours), decimal.Decimal(theirs)
    return abs(a - b) <= decimal.Decimal("1e-10") * max(1, abs(b))


def main():
    rng = random.Random(20241125)
    subprocess.run(["dropdb", "--if-exists", DB], capture_output=True)
    subprocess.run(["createdb", DB], check=True)
    psql("CREATE EXTENSION metering;")
    print("1..%d" % (SCENARIOS + 1))
    total = 0
    priced = 0
    for n in range(1, SCENARIOS + 1):
        spec = scenario(rng)
        ck = subprocess.run(["/usr/bin/python3", RATE], input=json.dumps(spec, default=str),
                            capture_output=True, text=True)
        if ck.returncode != 0:
            print("not ok %d - scenario %d: CloudKitty failed" % (n, n))
            print("# " + ck.stderr.strip().replace("\n", "\n# ")[-2000:])
            continue
        theirs = ck.stdout.split()
        ours = psql(sql_for(spec)).split()
        bad = [(i, o, t) for i, (o, t) in enumerate(zip(ours, theirs)) if not agree(o, t)]
        total += len(ours)
        priced += sum(1 for o in ours if decimal.Decimal(o) != 0)
        if len(ours) == len(theirs) == len(spec["points"]) and not bad:
            print("ok %d - scenario %d: %d points, %d mappings, %d thresholds priced as CloudKitty prices them"
                  % (n, n, len(ours), len(spec["mappings"]), len(spec["thresholds"])))
        else:
            print("not ok %d - scenario %d: %d of %d prices differ" % (n, n, len(bad), len(spec["points"])))
            for i, o, t in bad[:5]:
                print("#   point %s: ours %s, CloudKitty %s" % (json.dumps(spec["points"][i]), o, t))
    # the comparison means something only if most points cost something
    print("%s %d - %d points compared, %d of them with a price" % ("ok" if priced > total // 2 else "not ok",
                                                                 SCENARIOS + 1, total, priced))
    subprocess.run(["dropdb", "--if-exists", DB], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
