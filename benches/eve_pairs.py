#!/usr/bin/env python3
"""Compare the unique (sid, flow) pairs of two EVE alert files.
usage: eve_pairs.py A.json B.json  -> prints counts and differences, exits 1 if they differ.
A flow is its unordered endpoints and protocol, so Suricata's and virtsec's flow ids and
alert directions do not matter."""
import json, sys


def pairs(path):
    out = set()
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            if e.get("event_type") != "alert":
                continue
            a = (e["src_ip"], e.get("src_port", 0))
            b = (e["dest_ip"], e.get("dest_port", 0))
            out.add((e["alert"]["signature_id"], e["proto"].upper(), min(a, b), max(a, b)))
    return out


a, b = pairs(sys.argv[1]), pairs(sys.argv[2])
print(json.dumps({"a": len(a), "b": len(b), "common": len(a & b),
                  "only_a": sorted(map(list, a - b)), "only_b": sorted(map(list, b - a))}))
sys.exit(0 if a == b else 1)
