#!/usr/bin/env python3
"""Misses of several cachefront instances (two builds, say) and of the guide's hand-written
cache-aside, taking turns request by request, so that each is measured under the same noise.

One client; each request asks for an employee id nobody asked for before (ids from --start
up, one per request), so every one is a miss. Needs a stack with that many employees, such as
`bash scripts/bench.sh --services` (it prints the psql command that generates 100,000), and
psycopg2 (scripts/deps.sh installs it).

    python3 scripts/miss_interleaved.py --ports 7101,7102 [--start 10000] [-n 2000]
                                         [--valkey-port 6379] [--pg-port 5432]
"""

import argparse
import os
import sys
import time

import psycopg2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from miss_latency import SQL, Resp, percentile  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ports", required=True, help="cachefront ports, comma-separated")
    ap.add_argument("--start", type=int, default=10000, help="first employee id asked for")
    ap.add_argument("-n", type=int, default=2000, help="misses per target")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--valkey-port", type=int, default=6379)
    ap.add_argument("--pg-port", type=int, default=5432)
    a = ap.parse_args()
    ports = [int(p) for p in a.ports.split(",")]
    cfs = [Resp(a.host, p) for p in ports]
    vk = Resp(a.host, a.valkey_port)
    pg = psycopg2.connect(host=a.host, port=a.pg_port, user="postgres", dbname="staff")
    pg.autocommit = True
    cur = pg.cursor()

    def by_hand(i):
        key = "employee:%d" % i
        if vk.call("GET", key) is None:
            cur.execute(SQL, (i,))
            row = cur.fetchone()
            if row:
                vk.call("SETEX", key, 3600, row[0])

    times = {p: [] for p in ports}
    times["by hand"] = []
    i = a.start
    for _ in range(a.n):
        for p, c in zip(ports, cfs):
            t = time.perf_counter_ns()
            c.call("EMP.GET", i)
            times[p].append(time.perf_counter_ns() - t)
            i += 1
        t = time.perf_counter_ns()
        by_hand(i)
        times["by hand"].append(time.perf_counter_ns() - t)
        i += 1
    print("misses, interleaved (us)            p50      p90      n")
    for name, ts in times.items():
        ts.sort()
        label = name if isinstance(name, str) else "cachefront :%d" % name
        print("%-32s %7.0f  %7.0f  %5d" % (label, percentile(ts, 50), percentile(ts, 90), len(ts)))


if __name__ == "__main__":
    main()
