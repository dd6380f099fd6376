#!/usr/bin/env python3
"""Memory of idle client connections: opens N TCP connections to cachefront that send
nothing, reads cachefront's VmRSS from /proc/<pid>/status before and after, checks that
the connections are served (PING on some of them), and reports RSS and bytes per connection.

    python3 scripts/bench_idle.py --port 6380 --pid <cachefront pid> [-n 9990] [--ping 100]

Run it on the machine cachefront runs on (it reads /proc). The default 9,990 stays under
cachefront's default limits.max_clients (10,000).
"""

import argparse
import resource
import socket
import sys
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def settle(pid, seconds=1.0):
    """RSS once it stops moving (or after a few seconds)."""
    last = rss_kb(pid)
    for _ in range(int(seconds * 10) * 5):
        time.sleep(0.1)
        now = rss_kb(pid)
        if now == last:
            return now
        last = now
    return last


def ping(s):
    s.sendall(b"*1\r\n$4\r\nPING\r\n")
    buf = b""
    while b"\r\n" not in buf:
        chunk = s.recv(64)
        if not chunk:
            return b"(closed)"
        buf += chunk
    return buf.split(b"\r\n")[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("-n", type=int, default=9990)
    ap.add_argument("--ping", type=int, default=100)
    ap.add_argument("--header", action="store_true",
                    help="each connection sends a request header declaring a 100-byte argument, "
                         "and never the argument (header-only connections)")
    a = ap.parse_args()

    want = max(a.n + 100, 20000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            try:  # root may raise the hard limit too
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            except (ValueError, OSError):
                want = hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard) if hard != resource.RLIM_INFINITY else hard))
        except (ValueError, OSError) as e:
            sys.exit(f"cannot raise the open-file limit to {want}: {e}")
        if want < a.n + 50:
            sys.exit(f"the open-file limit ({want}) is too low for {a.n} connections")

    before = settle(a.pid)
    socks = []
    t0 = time.monotonic()
    failed = 0
    for _ in range(a.n):
        try:
            s = socket.create_connection((a.host, a.port), timeout=10)
            if a.header:
                s.sendall(b"*1\r\n$100\r\n")
            socks.append(s)
        except OSError:
            failed += 1
    connect_s = time.monotonic() - t0
    after = settle(a.pid, 2.0)

    # Are they served? PING on connections spread over the whole set (header-only ones are
    # mid-request, so fresh connections stand in for them).
    step = max(1, len(socks) // max(1, a.ping))
    sample = socks[::step][: a.ping]
    if a.header:
        for s in socks[: min(a.ping, 10)]:
            s.close()
        socks = socks[min(a.ping, 10):]
        sample = [socket.create_connection((a.host, a.port), timeout=10) for _ in range(min(a.ping, 10))]
    pongs = 0
    bad = []
    for s in sample:
        try:
            r = ping(s)
        except OSError as e:
            r = repr(e).encode()
        if r == b"+PONG":
            pongs += 1
        elif len(bad) < 3:
            bad.append(r)
    after_ping = settle(a.pid)

    for s in socks:
        s.close()
    closed = settle(a.pid, 2.0)

    n = len(socks)
    per = (after - before) * 1024 / n if n else 0
    per_ping = (after_ping - before) * 1024 / n if n else 0
    kind = "header-only" if a.header else "idle"
    print(f"{kind} connections to cachefront (one process, RSS from /proc/<pid>/status)")
    print(f"  connections opened        {n:,} of {a.n:,} ({failed} failed) in {connect_s:.1f} s")
    print(f"  RSS before                {before / 1024:8.1f} MB")
    print(f"  RSS with {n:,} {kind}     {after / 1024:8.1f} MB   -> {per:,.0f} bytes per connection")
    print(f"  after PING on {len(sample)}          {after_ping / 1024:8.1f} MB   -> {per_ping:,.0f} bytes per connection; {pongs}/{len(sample)} answered +PONG" +
          (f" (others: {bad})" if bad else ""))
    print(f"  after closing them        {closed / 1024:8.1f} MB")
    verdict = "under" if after_ping < 64 * 1024 else "OVER"
    print(f"  target (issue 13): RSS under 64 MB with 10,000 idle clients: {verdict} ({after_ping / 1024:.1f} MB)")
    if failed or pongs != len(sample):
        sys.exit(1)


if __name__ == "__main__":
    main()
