#!/usr/bin/env python3
"""Isolation soak: honest clients check every reply against their own writes while hostile
clients cycle through the attacks of issue 10, for a few minutes, against one cachefront.

Started by `bash scripts/bench.sh --soak` (which owns the servers); by hand, only against
servers you started yourself (it updates rows of `employees` and writes keys under `soak:`).

Reports:
- replies to the wrong client: any reply an honest client did not expect from its own
  writes (another client's value, a pub/sub message on a plain connection, an error) — must
  be 0;
- cachefront's RSS over time (sampled every 5 s) — should be flat;
- invalidations made (committed UPDATEs) vs applied (cachefront's `notifications` and
  `invalidations` counters), and after the writes stop, how many cached answers differ from
  PostgreSQL (must be 0).
"""

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time


class Closed(Exception):
    pass


class Resp:
    """A minimal RESP2/3 client: exact control over what is sent and when it is read."""

    def __init__(self, port, timeout=10):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    @staticmethod
    def encode(*args):
        out = [b"*%d\r\n" % len(args)]
        for x in args:
            x = x if isinstance(x, bytes) else str(x).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(x), x))
        return b"".join(out)

    def send(self, *args):
        self.s.sendall(self.encode(*args))

    def call(self, *args):
        self.send(*args)
        return self.reply()

    def _line(self):
        while b"\r\n" not in self.buf:
            c = self.s.recv(65536)
            if not c:
                raise Closed()
            self.buf += c
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            c = self.s.recv(max(65536, n))
            if not c:
                raise Closed()
            self.buf += c
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self):
        line = self._line()
        k, rest = line[:1], line[1:]
        if k in (b"+", b"-", b":", b"_", b",", b"#", b"("):
            return (k, rest)
        if k in (b"$", b"=", b"!"):
            n = int(rest)
            return (k, None if n < 0 else self._exact(n))
        if k in (b"*", b"%", b"~", b">"):
            n = int(rest)
            if n < 0:
                return (k, None)
            n = n * 2 if k == b"%" else n
            return (k, [self.reply() for _ in range(n)])
        raise ValueError("bad frame %r" % line)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}
        self.wrong = []

    def inc(self, k, n=1):
        with self.lock:
            self.c[k] = self.c.get(k, 0) + n

    def bad(self, who, what):
        with self.lock:
            self.c["wrong_replies"] = self.c.get("wrong_replies", 0) + 1
            if len(self.wrong) < 20:
                self.wrong.append("%s: %s" % (who, what))


def honest(port, idx, stop, st):
    """Plain, pipelined, transactional and pub/sub traffic on keys only this client writes;
    every reply must be exactly what its own writes imply."""
    who = "honest-%d" % idx
    c = Resp(port)
    sub = Resp(port)
    chan = "soak:chan:%d" % idx
    expect = lambda got, want, what: got == want or st.bad(who, "%s: got %r want %r" % (what, got, want))
    expect(sub.call("SUBSCRIBE", chan)[0], b"*", "subscribe")
    n = 0
    while not stop.is_set():
        n += 1
        key = "soak:%d:%d" % (idx, n % 50)
        val = ("%d-%d-%s" % (idx, n, os.urandom(4).hex())).encode()
        try:
            op = n % 5
            if op == 0:
                expect(c.call("SET", key, val), (b"+", b"OK"), "SET")
                expect(c.call("GET", key), (b"$", val), "GET")
            elif op == 1:
                c.s.sendall(c.encode("SET", key, val) + c.encode("GET", key) + c.encode("PING"))
                expect(c.reply(), (b"+", b"OK"), "pipelined SET")
                expect(c.reply(), (b"$", val), "pipelined GET")
                expect(c.reply(), (b"+", b"PONG"), "pipelined PING")
            elif op == 2:
                expect(c.call("MULTI"), (b"+", b"OK"), "MULTI")
                expect(c.call("SET", key, val), (b"+", b"QUEUED"), "queued SET")
                expect(c.call("GET", key), (b"+", b"QUEUED"), "queued GET")
                expect(c.call("EXEC"), (b"*", [(b"+", b"OK"), (b"$", val)]), "EXEC")
            elif op == 3:
                got = c.call("BLPOP", "soak:q:%d" % idx, "0.01")
                expect(got[0], b"*", "BLPOP")
                expect(got[1], None, "BLPOP nil")
            else:
                expect(c.call("PUBLISH", chan, val), (b":", b"1"), "PUBLISH")
                msg = sub.reply()
                expect(msg, (b"*", [(b"$", b"message"), (b"$", chan.encode()), (b"$", val)]), "message")
            st.inc("honest_checks")
        except (Closed, OSError, ValueError) as e:
            st.bad(who, "connection failed: %r" % e)
            c.close()
            sub.close()
            c, sub = Resp(port), Resp(port)
            sub.call("SUBSCRIBE", chan)


def hostile(port, idx, stop, st):
    """Cycles through the attacks: dirty transactions, state inside MULTI, never reading,
    writing cachefront's keys, SQL smuggling, oversized results, protocol switches and
    garbage, leaving mid-request."""
    attacks = [
        lambda c: [c.call("MULTI"), c.call("SUBSCRIBE", "soak:evil"), c.call("EXEC"), c.send("QUIT")],
        lambda c: [c.call("MULTI"), c.call("CLIENT", "REPLY", "OFF"), c.call("SELECT", "5"), c.call("EXEC")],
        lambda c: [c.call("MULTI"), c.call("SELECT", "7"), c.call("EXEC"), c.call("SET", "soak:evil:db7", "x"), c.send("QUIT")],
        lambda c: [c.call("CLIENT", "TRACKING", "on"), c.call("GET", "soak:evil"), c.send("QUIT")],
        # The reproduction: 400 pipelined GETs of 1 MiB, never read (cut at the limit).
        lambda c: [c.s.sendall(Resp.encode("GET", "soak:big") * 400), time.sleep(2)],
        lambda c: [c.call("SET", "cachefront:v:employees", "junk"), c.call("DEL", "cachefront:e:employees")],
        lambda c: c.call("SQL.CACHED", "SELECT query_to_xml('select pg_advisory_lock(1)', true, false, '')"),
        lambda c: c.call("SQL.CACHED", "SELECT repeat('x', 1000000) FROM generate_series(1, 100)"),
        lambda c: [c.call("SELECT", "3"), c.call("HELLO", "3"), c.call("WATCH", "x"), c.send("HELLO", "2")],
        lambda c: [c.send("BLPOP", "soak:never", "5")],  # leaves while blocked
        lambda c: [c.call("HELLO", "3"), c.call("SUBSCRIBE", "soak:evil"), c.call("HELLO", "2")],
        lambda c: c.s.sendall(b"*3\r\n$3\r\nSET\r\n$-7\r\nfoo\r\n"),  # protocol error
        lambda c: c.call("EVAL", "return redis.call('SET', KEYS[1], 'x')", "1", "cachefront:tables"),
    ]
    n = idx
    while not stop.is_set():
        n += 1
        a = attacks[n % len(attacks)]
        try:
            c = Resp(port, timeout=5)
            a(c)
            st.inc("attacks")
        except (Closed, OSError, ValueError):
            st.inc("attacks")
        finally:
            try:
                c.close()
            except NameError:
                pass
        time.sleep(0.01)


def writer(psql, stop, st, ids):
    """UPDATEs employees' names; each committed UPDATE is one invalidation made."""
    n = 0
    while not stop.is_set():
        n += 1
        i = random.choice(ids)
        subprocess.run(psql + ["-c", "UPDATE employees SET name = 'soak %d' WHERE id = %d" % (n, i)],
                       check=True, capture_output=True)
        st.inc("updates")
        time.sleep(0.05)


def reader(port, stop, st, ids):
    """Keeps EMP.GET entries of the written ids hot (filled and hit)."""
    c = Resp(port)
    while not stop.is_set():
        got = c.call("EMP.GET", random.choice(ids))
        if got[0] == b"-":
            st.bad("reader", "EMP.GET error %r" % (got,))
        st.inc("reads")


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def info(port):
    text = Resp(port).call("INFO", "cachefront")[1].decode()
    return dict(l.split(":", 1) for l in text.splitlines() if ":" in l)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cachefront-port", type=int, required=True)
    ap.add_argument("--valkey-port", type=int, required=True)
    ap.add_argument("--cachefront-pid", type=int, required=True)
    ap.add_argument("--psql", required=True, help="psql command line for the staff database")
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_SECONDS", "180")))
    ap.add_argument("--honest", type=int, default=8)
    ap.add_argument("--hostile", type=int, default=4)
    a = ap.parse_args()
    port, psql = a.cachefront_port, a.psql.split()
    Resp(a.valkey_port).call("SET", "soak:big", b"b" * (1 << 20))
    ids = list(range(1, 6))
    st, stop = Stats(), threading.Event()
    before = info(port)
    threads = [threading.Thread(target=honest, args=(port, i, stop, st)) for i in range(a.honest)]
    threads += [threading.Thread(target=hostile, args=(port, i, stop, st)) for i in range(a.hostile)]
    threads += [threading.Thread(target=writer, args=(psql, stop, st, ids))]
    threads += [threading.Thread(target=reader, args=(port, stop, st, ids)) for _ in range(2)]
    for t in threads:
        t.daemon = True
        t.start()
    rss = []
    t0 = time.time()
    while time.time() - t0 < a.seconds:
        rss.append((int(time.time() - t0), rss_kb(a.cachefront_pid) // 1024))
        time.sleep(5)
    stop.set()
    for t in threads:
        t.join(timeout=15)
    time.sleep(1)  # the last invalidations land
    after = info(port)
    # Every written id, read through cachefront, must equal PostgreSQL.
    stale = 0
    c = Resp(port)
    for i in ids:
        pg = subprocess.run(psql + ["-At", "-c", "SELECT name FROM employees WHERE id = %d" % i],
                            check=True, capture_output=True, text=True).stdout.strip()
        got = c.call("EMP.GET", i)
        if got != (b"$", pg.encode()):
            stale += 1
            print("stale: id %d cached %r, PostgreSQL %r" % (i, got, pg))
    d = lambda k: int(after.get(k, 0)) - int(before.get(k, 0))
    print("soak: %d s, %d honest + %d hostile clients" % (a.seconds, a.honest, a.hostile))
    print("honest checks: %d, attacks: %d, EMP.GET reads: %d" % (st.c.get("honest_checks", 0), st.c.get("attacks", 0), st.c.get("reads", 0)))
    print("replies to the wrong client: %d" % st.c.get("wrong_replies", 0))
    for w in st.wrong:
        print("  " + w)
    print("RSS MB over time: " + " ".join("%ds:%d" % x for x in rss))
    print("invalidations made (UPDATEs committed): %d" % st.c.get("updates", 0))
    print("notifications received: %d, entries invalidated: %d, invalidation failures: %d"
          % (d("notifications"), d("invalidations"), d("invalidation_failures")))
    print("output-limit disconnects: %d" % d("client_output_limit_disconnects"))
    print("cached answers differing from PostgreSQL after the writes stopped: %d" % stale)
    return 1 if st.c.get("wrong_replies", 0) or stale else 0


if __name__ == "__main__":
    sys.exit(main())
