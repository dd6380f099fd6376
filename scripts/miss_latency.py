#!/usr/bin/env python3
"""Single-request latency of cachefront's EMP.GET, miss against hit, next to the same work
done by hand (Valkey GET, psycopg2 SELECT, and the guide's get -> SELECT -> SETEX).

One client, one request at a time, persistent connections; times are taken around each call
in Python (time.perf_counter_ns). Valkey-protocol requests go through a minimal RESP client on
a plain socket (valkey-py without hiredis adds tens of microseconds of parsing per call, which
would hide the differences measured here); PostgreSQL is reached with psycopg2 (libpq).
Needs a running demo stack (scripts/demo.sh) and psycopg2 (scripts/deps.sh installs it).

    python3 scripts/miss_latency.py [-n 500] [--cachefront-port 6380] [--part 0]
                                    [--valkey-port 6379] [--pg-port 5432]

Hits cycle over ids 1..5 (the guide's five employees). A miss is, by default, made by
deleting employee:<id> on Valkey directly before asking cachefront (the DEL is not timed);
with --ids N (a database holding ids up to N, as scripts/bench.sh makes), every miss asks for
an id never asked for before instead, so no in-process L1 entry or pending invalidation can
turn it into a hit, and the plain SELECT row reads random ids of the N.
"""

import argparse
import random
import socket
import time

import psycopg2

IDS = [1, 2, 3, 4, 5]
SQL = "SELECT name FROM employees WHERE id = %s"


class Resp:
    """Just enough RESP2 for GET/SETEX/DEL/EMP.GET replies on one blocking socket."""

    def __init__(self, host, port):
        self.s = socket.create_connection((host, port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.s.sendall(b"".join(out))
        return self._reply()

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _fill(self):
        chunk = self.s.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            v, self.buf = self.buf[:n], self.buf[n + 2 :]
            return v
        raise RuntimeError("unexpected reply %r" % line)


def percentile(sorted_ns, p):
    """Nearest-rank percentile of a sorted list of nanoseconds, in microseconds."""
    i = min(len(sorted_ns) - 1, max(0, int(round(p / 100.0 * len(sorted_ns) + 0.5)) - 1))
    return sorted_ns[i] / 1000.0


def measure(n, rows):
    """Times every row's `call(i)` n times, the rows interleaved (one request of each per
    round) so that they all meet the same machine state; `prepare(i)` runs untimed. The first
    20 rounds are a warm-up and are not kept."""
    times = [[] for _ in rows]
    for i in range(-20, n):
        for k, (_, prepare, call) in enumerate(rows):
            prepare(i)
            t0 = time.perf_counter_ns()
            call(i)
            t = time.perf_counter_ns() - t0
            if i >= 0:
                times[k].append(t)
    return [(name, sorted(ts)) for (name, _, _), ts in zip(rows, times)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=500, help="timed requests per row (default 500)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--cachefront-port", type=int, default=6380)
    ap.add_argument("--valkey-port", type=int, default=6379)
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--pg-user", default="postgres")
    ap.add_argument("--pg-db", default="staff")
    ap.add_argument("--ids", type=int, default=0,
                    help="employees have ids 1..IDS: misses on never-requested ids (default: DEL 1..5)")
    ap.add_argument("--part", type=int, default=0,
                    help="with --ids: which share of the cold ids to use, so that a later run against "
                         "the same Valkey asks for ids none before it asked for (default 0)")
    a = ap.parse_args()

    cf = Resp(a.host, a.cachefront_port)
    vk = Resp(a.host, a.valkey_port)
    pg = psycopg2.connect(host=a.host, port=a.pg_port, user=a.pg_user, dbname=a.pg_db)
    pg.autocommit = True
    cur = pg.cursor()

    def emp(i):
        return IDS[i % len(IDS)]

    def nothing(i):
        pass

    # Cold ids: a fresh one per miss request, none of them cached or asked for before.
    rng = random.Random(1)
    share = 2 * (a.n + 20)
    if a.ids:
        ids = rng.sample(range(len(IDS) + 1, a.ids + 1), min(a.ids - len(IDS), share * (a.part + 1)))
        cold = iter(ids[share * a.part:])
    else:
        cold = None
    cur_id = {}

    def drop(i):
        if cold is not None:
            cur_id["id"] = next(cold)
        else:
            cur_id["id"] = emp(i)
            vk.call("DEL", f"employee:{emp(i)}")

    def cf_get(i):
        v = cf.call("EMP.GET", emp(i))
        assert v is not None, "EMP.GET returned nil for an existing employee"

    def cf_miss(i):
        v = cf.call("EMP.GET", cur_id["id"])
        assert v is not None, "EMP.GET returned nil for an existing employee"

    def pg_select(i):
        cur.execute(SQL, (rng.randint(1, a.ids) if a.ids else emp(i),))
        assert cur.fetchone() is not None

    def vk_get(i):
        assert vk.call("GET", f"employee:{emp(i)}") is not None

    def guide_miss(i):
        # The guide's cache-aside, on persistent connections (the guide itself opens a new
        # PostgreSQL connection per call, which costs several milliseconds more).
        key = f"employee:{cur_id['id']}"
        if vk.call("GET", key) is None:
            cur.execute(SQL, (cur_id["id"],))
            row = cur.fetchone()
            vk.call("SETEX", key, 3600, row[0])

    # Make sure every id is cached before the hit rows.
    for i in range(len(IDS)):
        cf_get(i)

    # A miss row leaves its id cached again, so the hit rows that follow it still hit.
    rows = measure(
        a.n,
        [
            ("cachefront EMP.GET, hit", nothing, cf_get),
            ("cachefront EMP.GET, miss (fill from PostgreSQL)", drop, cf_miss),
            ("valkey GET employee:<id>, direct", nothing, vk_get),
            ("psycopg2 SELECT name ... WHERE id = %s", nothing, pg_select),
            ("by hand: GET miss + SELECT + SETEX (guide)", drop, guide_miss),
        ],
    )
    # Leave the cache warm for whoever runs next.
    for i in range(len(IDS)):
        cf_get(i)

    w = max(len(r[0]) for r in rows)
    print(f"{'single request, 1 client (us)':<{w}}  {'p50':>8}  {'p99':>8}  {'n':>5}")
    for name, ns in rows:
        print(f"{name:<{w}}  {percentile(ns, 50):8.0f}  {percentile(ns, 99):8.0f}  {len(ns):5d}")


if __name__ == "__main__":
    main()
