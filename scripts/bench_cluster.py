#!/usr/bin/env python3
"""The cluster table behind `scripts/bench.sh --cluster`: redis-benchmark through cachefront
(a plain client: cachefront routes by slot) beside redis-benchmark --cluster straight to the
same three-primary Valkey Cluster, in the same run, cells taking turns.

Started by scripts/bench.sh, which owns the servers (it FLUSHALLs the cluster).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_run import (GUIDE_JOIN, GUIDE_JOIN_KEY, REPEAT, N, call, info, median3,  # noqa: E402
                       redis_benchmark, wait_quiet, log, _waited)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cachefront-port", type=int, required=True)
    ap.add_argument("--cachefront-pid", type=int, required=True)
    ap.add_argument("--node-ports", required=True, help="comma-separated cluster node ports")
    ap.add_argument("--node-pids", required=True)
    ap.add_argument("--pg-pid", type=int, required=True)
    a = ap.parse_args()
    CF = a.cachefront_port
    nodes = [int(p) for p in a.node_ports.split(",")]
    roots = [a.cachefront_pid, a.pg_pid, os.getpid()] + [int(p) for p in a.node_pids.split(",")]

    problems = []

    def check(what, got, want):
        if got != want:
            problems.append(f"{what}: got {got!r}, expected {want!r}")
            log(f"bench: WRONG REPLY {what}: got {got!r}, expected {want!r}")

    check("EMP.GET 1 via cachefront", call(CF, "EMP.GET", "1"), "Alice Johnson")
    joined = call(CF, "SQL.CACHED", GUIDE_JOIN)
    if not (isinstance(joined, str) and "Ethan Williams" in joined):
        problems.append(f"SQL.CACHED guide join: unexpected reply {joined!r:.200}")
    # Each entry's owner, found the way a cluster client would (the others answer MOVED).
    def owner(key):
        for p in nodes:
            if not isinstance(call(p, "GET", key), RuntimeError):
                return p
        return None

    def owner_get(key):
        p = owner(key)
        return call(p, "GET", key) if p else None
    check("employee:1 on its owner", owner_get("employee:1"), "Alice Johnson")
    check("<guide join key> on its owner = SQL.CACHED reply", owner_get(GUIDE_JOIN_KEY), joined)

    direct = ["--cluster"]
    seed = nodes[0]
    log(f"bench: employee:1 lives on port {owner('employee:1')}, the join on {owner(GUIDE_JOIN_KEY)}")
    rows = [
        ("SET (pass-through), random keys", 50, 1, ["-t", "set", "-r", "100000"]),
        ("GET (pass-through), random keys", 50, 1, ["-t", "get", "-r", "100000"]),
        ("SET (pass-through), random keys", 50, 16, ["-t", "set", "-r", "100000"]),
        ("GET (pass-through), random keys", 50, 16, ["-t", "get", "-r", "100000"]),
    ]
    table = []
    t0 = time.monotonic()

    def measure(label, clients, pipe, targets):
        """Runs each (name, port, args) target REPEAT times, taking turns; adds the medians."""
        log(f"bench: cluster {label}, {clients} clients, -P {pipe}, {N:,} requests x {REPEAT} ...")
        res = {name: [] for name, _, _ in targets}
        notes = {name: [] for name in res}
        for _ in range(REPEAT):
            for name, port, args in targets:
                wait_quiet(roots)
                out, nn = redis_benchmark(port, clients, pipe, N, args)
                notes[name] += nn
                if out:
                    res[name].append(out)
        base = statistics.median([x[0] for x in res["cluster direct"]]) if res["cluster direct"] else 0
        for name in res:
            if not res[name]:
                table.append((label, clients, pipe, name, None, None, None, None, notes[name]))
                continue
            rps, p50, p99 = median3(res[name])
            table.append((label, clients, pipe, name, rps, p50, p99, rps / base if base else None, notes[name]))

    for label, clients, pipe, args in rows:
        measure(label, clients, pipe, [("cachefront", CF, args), ("cluster direct", seed, direct + args)])
    # Cached reads: EMP.GET 1 / SQL.CACHED through cachefront beside a GET of the same key on
    # the node that owns it (what a cluster client does for one key; redis-benchmark
    # --cluster cannot route a given key).
    cached = [("EMP.GET 1 hit | GET employee:1", 1, ["EMP.GET", "1"], "employee:1"),
              ("EMP.GET 1 hit | GET employee:1", 16, ["EMP.GET", "1"], "employee:1"),
              ("SQL.CACHED join hit | GET <sha256>", 1, ["SQL.CACHED", GUIDE_JOIN], GUIDE_JOIN_KEY)]
    for label, pipe, ours, key in cached:
        measure(label, 50, pipe, [("cachefront", CF, ours), ("cluster direct", owner(key), ["GET", key])])
    i = info(CF, "cachefront")
    elapsed = time.monotonic() - t0

    print("# cachefront in front of a Valkey Cluster (3 primaries)")
    print(f"date:    {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"servers: {os.environ.get('BENCH_VALKEY_VERSION', 'valkey')} x 3 primaries (cluster mode), "
          f"cachefront {os.environ.get('BENCH_COMMIT', '?')} with valkey.cluster; each cell the median of {REPEAT} runs "
          f"of {N:,} requests")
    print("direct:  redis-benchmark --cluster for random keys (each connection to the node of its slot); for one key,")
    print("         redis-benchmark straight to the primary that owns it")
    print()
    print("| workload | clients | -P | target | req/s | p50 ms | p99 ms | vs direct |")
    print("|---|--:|--:|---|--:|--:|--:|--:|")
    foot = []
    for label, clients, pipe, name, rps, p50, p99, ratio, nn in table:
        mark = " E" if nn else ""
        if nn:
            foot.append(f"{label} / -P {pipe} / {name}: " + "; ".join(dict.fromkeys(nn)))
        if rps is None:
            print(f"| {label} | {clients} | {pipe} | {name}{mark} | – | – | – | – |")
            continue
        r = f"{ratio:.2f}" if ratio is not None else "–"
        print(f"| {label} | {clients} | {pipe} | {name}{mark} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {r} |")
    print()
    print(f"cachefront INFO: cluster_nodes={i.get('cluster_nodes')} cluster_slots_served={i.get('cluster_slots_served')} "
          f"cluster_moved={i.get('cluster_moved')} cluster_ask={i.get('cluster_ask')} upstream_errors={i.get('upstream_errors')}")
    for f in foot:
        print("- " + f)
    print(f"({elapsed / 60:.1f} minutes, {_waited[0] / 60:.1f} of them waiting for a quiet machine)")
    if problems:
        print()
        print("PROBLEMS:")
        for p in problems:
            print("- " + p)


if __name__ == "__main__":
    main()
