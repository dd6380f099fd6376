#!/usr/bin/env python3
"""The benchmark matrix behind scripts/bench.sh: redis-benchmark against cachefront (in its
default layout, one client thread per CPU, and on one thread), against Valkey directly and
(for pass-through GET/SET) against twemproxy in front of the same Valkey; pgbench against
PostgreSQL for the miss rows. Prints one table.

Started by scripts/bench.sh, which owns the servers; run it by hand only against servers
you started yourself (it FLUSHALLs the Valkey and inserts 100,000 rows into employees).

Every cell is run BENCH_REPEAT times, the targets of a row taking turns; the median of each
column is shown. Before each run the script waits (at most BENCH_QUIET_MAX seconds) until
the machine is quiet: until processes other than the benchmark's own servers used less than
a quarter of a CPU over the last second. (The 1-minute load average cannot tell: after each
run it carries the benchmark's own load for a minute.) A row measured while the machine
stayed busy is marked `*`; with BENCH_QUIET=loadavg the rule is "1-minute load average
below 1.0" instead.
"""

import argparse
import csv
import hashlib
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import time

# The guide's join, byte for byte (its Python triple-quoted string): the key of its cached
# result is the SHA-256 of exactly these bytes.
GUIDE_JOIN = (
    "   \nSELECT   \n    employees.name AS employee_name,   \n    departments.name AS department_name,  \n"
    "    employees.job_title \nFROM  \n    employees  \nINNER JOIN  \n    departments   \nON \n"
    "    employees.dept_id = departments.id;   \n"
)
GUIDE_JOIN_KEY = hashlib.sha256(GUIDE_JOIN.encode()).hexdigest()

ENV = os.environ
N = int(ENV.get("BENCH_N", "100000"))
N_1K = int(ENV.get("BENCH_N_1K", "20000"))
MISS_N = int(ENV.get("BENCH_MISS_N", "20000"))
REPEAT = int(ENV.get("BENCH_REPEAT", "3"))
QUIET_MAX = float(ENV.get("BENCH_QUIET_MAX", "60"))
QUIET_MODE = ENV.get("BENCH_QUIET", "cpu")
ONLY = ENV.get("BENCH_ONLY", "")
HZ = os.sysconf("SC_CLK_TCK")
# The second cachefront of the run: the same build and config on one client thread per CPU
# (the default leaves one CPU spare, see `cores::count`).
CPUS = len(os.sched_getaffinity(0))  # what `nproc` counts, as bench.sh does
PER_CPU = f"cachefront, threads = {CPUS}"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- a minimal RESP client, for checks and INFO ----------------------------------------------
class Resp:
    def __init__(self, port, host="127.0.0.1"):
        self.s = socket.create_connection((host, port), timeout=30)
        self.buf = b""

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for x in args:
            x = x if isinstance(x, bytes) else str(x).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(x), x))
        self.s.sendall(b"".join(out))
        return self._reply()

    def _line(self):
        while b"\r\n" not in self.buf:
            c = self.s.recv(65536)
            if not c:
                raise ConnectionError("closed")
            self.buf += c
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        k, rest = line[:1], line[1:]
        if k == b"-":
            return RuntimeError(rest.decode())
        if k in (b"+", b":"):
            return rest.decode()
        if k == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.s.recv(65536)
            v, self.buf = self.buf[:n], self.buf[n + 2 :]
            return v.decode()
        if k == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def close(self):
        self.s.close()


def call(port, *args):
    r = Resp(port)
    try:
        return r.call(*args)
    finally:
        r.close()


def info(port, section):
    text = call(port, "INFO", section) or ""
    return dict(l.split(":", 1) for l in text.split("\r\n") if ":" in l and not l.startswith("#"))


# --- a quiet machine ----------------------------------------------------------------------------
def _cpu_busy():
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    # user nice system idle iowait irq softirq steal
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def _children():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                ppid = int(st[st.rindex(")") + 2 :].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError):
                pass
    return kids


def proc_jiffies(pid):
    """CPU time (utime + stime, in clock ticks) one process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        f2 = st[st.rindex(")") + 2 :].split()
        return int(f2[11]) + int(f2[12])
    except (OSError, ValueError):
        return 0


class Costs:
    """What one benchmark run cost, beyond its rate: CPU per request of the target process
    (cachefront, twemproxy, or Valkey itself when measured directly) and of Valkey, and how
    many commands Valkey ran per read from its sockets (`INFO stats`): the fewer, larger
    writes a proxy makes into Valkey, the more commands per read and the less kernel time on
    both sides."""

    def __init__(self, target_pid, valkey_pid, valkey_port):
        self.pids = (target_pid, valkey_pid)
        self.port = valkey_port

    def _sample(self):
        st = info(self.port, "stats")
        return ([proc_jiffies(p) for p in self.pids],
                int(st.get("total_commands_processed", 0)), int(st.get("total_reads_processed", 0)))

    def start(self):
        self.before = self._sample()

    def stop(self, n):
        (t0, v0), c0, r0 = self.before
        (t1, v1), c1, r1 = self._sample()
        us = lambda j: (j / HZ) * 1e6 / n
        # The two INFO calls themselves are one command and one read each: left in.
        return us(t1 - t0), us(v1 - v0), (c1 - c0) / (r1 - r0) if r1 > r0 else 0.0


def _tree_jiffies(roots):
    kids = _children()
    total, todo, seen = 0, list(roots), set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
            f2 = st[st.rindex(")") + 2 :].split()
            total += int(f2[11]) + int(f2[12])  # utime stime
        except (OSError, ValueError):
            pass
        todo.extend(kids.get(p, []))
    return total


def foreign_cpu(roots, seconds=1.0):
    """CPUs' worth of time used by processes outside `roots` (and their children)."""
    b0, o0 = _cpu_busy(), _tree_jiffies(roots)
    time.sleep(seconds)
    b1, o1 = _cpu_busy(), _tree_jiffies(roots)
    return max(0.0, ((b1 - b0) - (o1 - o0)) / HZ / seconds)


QUIET_BUDGET = float(ENV.get("BENCH_QUIET_BUDGET", "900"))
_waited = [0.0]


def wait_quiet(roots):
    """True when the machine was quiet; False after QUIET_MAX seconds of waiting (or at once,
    once BENCH_QUIET_BUDGET seconds of waiting have been spent in all)."""
    t0 = time.monotonic()
    deadline = t0 + (QUIET_MAX if _waited[0] < QUIET_BUDGET else 0)
    try:
        return _wait_quiet(roots, deadline)
    finally:
        _waited[0] += time.monotonic() - t0


def _wait_quiet(roots, deadline):
    while True:
        if QUIET_MODE == "loadavg":
            with open("/proc/loadavg") as f:
                quiet = float(f.read().split()[0]) < 1.0
            if not quiet:
                time.sleep(1)
        else:
            quiet = foreign_cpu(roots) < 0.25
        if quiet:
            return True
        if time.monotonic() > deadline:
            return False


# --- the runners --------------------------------------------------------------------------------
BENIGN = re.compile(r"^(WARNING: Could not fetch server CONFIG|WARN: could not fetch server CONFIG)", re.I)


def redis_benchmark(port, clients, pipeline, n, args):
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(n),
           "-P", str(pipeline), "--csv"] + args
    p = subprocess.run(cmd, capture_output=True, timeout=900)
    out = p.stdout.decode(errors="replace")
    err = p.stderr.decode(errors="replace")
    # redis-benchmark 7 stops at the first error reply ("Error from server: ...", exit 1).
    errors = [l for l in (out + err).splitlines() if l.startswith("Error from server")]
    other = [l for l in err.splitlines() if l.strip() and not BENIGN.match(l.strip())
             and not l.startswith("Error from server")]
    result = None
    clean = "\n".join(l for l in out.splitlines() if not l.startswith("Error from server"))
    for row in csv.reader(io.StringIO(clean)):
        if len(row) >= 8 and row[0] != "test":
            try:
                result = (float(row[1]), float(row[4]), float(row[6]))
            except ValueError:
                pass
    notes = []
    if errors:
        notes.append(f"{len(errors)} error line(s), e.g. {errors[0]!r}")
    if other:
        notes.append("stderr: " + " | ".join(other[:3]))
    if p.returncode != 0:
        notes.append(f"exit {p.returncode}")
    if result is None:
        notes.append("no result: " + (out + err).strip()[-300:])
    return result, notes


def pgbench(a, clients, n):
    script = os.path.join(a.work, "emp.sql")
    with open(script, "w") as f:
        f.write("\\set id random(1, 100000)\nSELECT name FROM employees WHERE id = :id;\n")
    logdir = os.path.join(a.work, "pgbench-logs")
    os.makedirs(logdir, exist_ok=True)
    for f in os.listdir(logdir):
        os.unlink(os.path.join(logdir, f))
    per_client = max(1, n // clients)
    cmd = [a.pgbench, "-h", "127.0.0.1", "-p", str(a.pg_port), "-U", "postgres", "-n", "-M", "prepared",
           "-c", str(clients), "-j", str(min(clients, os.cpu_count() or 2)), "-t", str(per_client),
           "-f", script, "-l", "--log-prefix", os.path.join(logdir, "pgb"), "staff"]
    p = subprocess.run(cmd, capture_output=True, timeout=900, cwd=logdir)
    out = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
    m = re.search(r"tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)", out)
    lat = []
    for f in os.listdir(logdir):
        with open(os.path.join(logdir, f)) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3:
                    lat.append(int(parts[2]) / 1000.0)  # us -> ms
    notes = []
    if p.returncode != 0 or not m or not lat:
        notes.append("pgbench failed: " + out.strip()[-300:])
        return None, notes
    lat.sort()
    q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))]
    return (float(m.group(1)), q(0.50), q(0.99)), notes


# --- the matrix -----------------------------------------------------------------------------------
class Target:
    def __init__(self, name, kind, port=None, args=None, before=None):
        self.name, self.kind, self.port, self.args, self.before = name, kind, port, args, before


def median3(results):
    cols = list(zip(*results))
    return tuple(statistics.median(c) for c in cols)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k in ("cachefront-port", "valkey-port", "nutcracker-port", "pg-port", "cachefront-pid",
              "valkey-pid", "nutcracker-pid", "cachefront-percpu-port", "cachefront-percpu-pid"):
        ap.add_argument("--" + k, type=int, required=True)
    ap.add_argument("--pg-data", required=True)
    ap.add_argument("--pgbench", default="pgbench")
    ap.add_argument("--psql", default="psql")
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    CF, VK, NC, CFN = a.cachefront_port, a.valkey_port, a.nutcracker_port, a.cachefront_percpu_port

    with open(os.path.join(a.pg_data, "postmaster.pid")) as f:
        pg_pid = int(f.readline())
    roots = [a.cachefront_pid, a.cachefront_percpu_pid, a.valkey_pid, a.nutcracker_pid, pg_pid, os.getpid()]

    problems = []
    notes_global = []

    def check(what, got, want):
        if got != want:
            problems.append(f"{what}: got {got!r}, expected {want!r}")
            log(f"bench: WRONG REPLY {what}: got {got!r}, expected {want!r}")

    # Warm and check what the hit rows read.
    check("EMP.GET 1 via cachefront", call(CF, "EMP.GET", "1"), "Alice Johnson")
    check(f"EMP.GET 1 via {PER_CPU}", call(CFN, "EMP.GET", "1"), "Alice Johnson")
    check(f"GET via {PER_CPU}", call(CFN, "GET", "employee:1"), "Alice Johnson")
    check("GET employee:1 on Valkey", call(VK, "GET", "employee:1"), "Alice Johnson")
    joined = call(CF, "SQL.CACHED", GUIDE_JOIN)
    check("GET <guide join key> on Valkey = SQL.CACHED reply", call(VK, "GET", GUIDE_JOIN_KEY), joined)
    if not (isinstance(joined, str) and joined.startswith("[{") and "Ethan Williams" in joined):
        problems.append(f"SQL.CACHED guide join: unexpected reply {joined!r:.200}")
    check("SET via cachefront", call(CF, "SET", "bench:probe", "cf"), "OK")
    check("GET via Valkey after SET via cachefront", call(VK, "GET", "bench:probe"), "cf")
    check("SET via twemproxy", call(NC, "SET", "bench:probe", "nc"), "OK")
    check("GET via cachefront after SET via twemproxy", call(CF, "GET", "bench:probe"), "nc")

    def flushall():
        call(VK, "FLUSHALL")
        time.sleep(0.3)  # let the tracking invalidation reach cachefront's L1

    def generate():
        log("bench: inserting 100,000 generated employees")
        subprocess.run([a.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(a.pg_port),
                        "-U", "postgres", "-d", "staff", "-c", ENV["GEN_SQL"]], check=True)
        n = subprocess.run([a.psql, "-X", "-tA", "-h", "127.0.0.1", "-p", str(a.pg_port), "-U", "postgres",
                            "-d", "staff", "-c", "SELECT count(*) FROM employees"],
                           check=True, capture_output=True).stdout.decode().strip()
        log(f"bench: employees: {n} rows")
        time.sleep(0.5)
        check("EMP.GET 1 via cachefront after the insert", call(CF, "EMP.GET", "1"), "Alice Johnson")
        check("EMP.GET 7 via cachefront (generated)", call(CF, "EMP.GET", "7"), "Employee 2")
        check("BENCH.EMP 000000000007", call(CF, "BENCH.EMP", "000000000007"), "Employee 2")
        r = call(CF, "EMP.GET", "000000000007")
        notes_global.append(f"EMP.GET 000000000007 (redis-benchmark's __rand_int__ form) answers {r!r}"
                            + ("; hence BENCH.EMP for the miss row" if isinstance(r, RuntimeError) else ""))

    pid_of = {"cachefront": a.cachefront_pid, PER_CPU: a.cachefront_percpu_pid, "valkey": a.valkey_pid,
              "twemproxy": a.nutcracker_pid}

    def gs(cmd, clients):
        return [Target("cachefront", "rb", CF, ["-t", cmd]),
                Target(PER_CPU, "rb", CFN, ["-t", cmd]),
                Target("valkey", "rb", VK, ["-t", cmd]),
                Target("twemproxy", "rb", NC, ["-t", cmd])]

    def written_by_hand():
        # The guide's application caches employee 2 itself, on a Valkey without cachefront's
        # scripts (as after a restart); the L1 item of a previous run has outlived its 1 s.
        call(VK, "SCRIPT", "FLUSH")
        call(VK, "SETEX", "employee:2", "3600", "Bob Smith")
        time.sleep(1.1)

    def emp(clients):
        return [Target("cachefront", "rb", CF, ["EMP.GET", "1"]),
                Target(PER_CPU, "rb", CFN, ["EMP.GET", "1"]),
                Target("valkey", "rb", VK, ["GET", "employee:1"])]

    # (workload, clients, pipeline, requests, targets, baseline target name, step before the row)
    rows = [
        ("SET (pass-through)", 50, 1, N, gs("set", 50), "valkey", None),
        ("GET (pass-through)", 50, 1, N, gs("get", 50), "valkey", None),
        ("SET (pass-through)", 50, 16, N, gs("set", 50), "valkey", None),
        ("GET (pass-through)", 50, 16, N, gs("get", 50), "valkey", None),
        ("SET (pass-through)", 1000, 1, N_1K, gs("set", 1000), "valkey", None),
        ("GET (pass-through)", 1000, 1, N_1K, gs("get", 1000), "valkey", None),
        ("EMP.GET 1 hit | GET employee:1", 50, 1, N, emp(50), "valkey", None),
        ("EMP.GET 1 hit | GET employee:1", 50, 16, N, emp(50), "valkey", None),
        ("EMP.GET 1 hit | GET employee:1", 1000, 1, N_1K, emp(1000), "valkey", None),
        ("EMP.GET 2 hit, entry the application wrote (SETEX), no scripts | GET employee:2", 50, 1, N,
         [Target("cachefront", "rb", CF, ["EMP.GET", "2"], before=written_by_hand),
          Target("valkey", "rb", VK, ["GET", "employee:2"])], "valkey", None),
        ("SQL.CACHED join hit | GET <sha256>", 50, 1, N,
         [Target("cachefront", "rb", CF, ["SQL.CACHED", GUIDE_JOIN]),
          Target("valkey", "rb", VK, ["GET", GUIDE_JOIN_KEY])], "valkey", None),
        ("EMP.GET random id, miss | PG SELECT", 50, 1, MISS_N,
         [Target("cachefront", "rb", CF, ["-r", "100000", "BENCH.EMP", "__rand_int__"], before=flushall),
          Target("postgres", "pgbench")], "postgres", generate),
    ]
    # The join must be cached before the generated rows exist (see bench.sh); the generated
    # rows are inserted just before the miss row.
    if ONLY:
        rows = [r for r in rows if re.search(ONLY, r[0]) or r[6] is not None]

    table = []
    t_start = time.monotonic()
    for label, clients, pipe, n, targets, base, step in rows:
        if step:
            step()
            if ONLY and not re.search(ONLY, label):
                continue
        log(f"bench: {label}, {clients} clients, -P {pipe}, {n:,} requests x {REPEAT} ...")
        res = {t.name: [] for t in targets}
        busy = {t.name: False for t in targets}
        notes = {t.name: [] for t in targets}
        extra = {t.name: "" for t in targets}
        costs = {t.name: [] for t in targets}
        for r in range(REPEAT):
            for t in targets:
                if t.before:
                    t.before()
                if t.name == "cachefront" and "miss" in label:
                    i0 = info(CF, "cachefront")
                if not wait_quiet(roots):
                    busy[t.name] = True
                if t.kind == "rb":
                    meter = Costs(pid_of[t.name], a.valkey_pid, VK)
                    meter.start()
                    out, nn = redis_benchmark(t.port, clients, pipe, n, t.args)
                    costs[t.name].append(meter.stop(n))
                else:
                    out, nn = pgbench(a, clients, n)
                if t.name == "cachefront" and "miss" in label:
                    i1 = info(CF, "cachefront")
                    d = {k: int(i1.get(k, 0)) - int(i0.get(k, 0)) for k in ("hits", "misses", "db_queries", "l1_hits", "coalesced_waits")}
                    extra[t.name] = (f"misses {d['misses']:,}, hits {d['hits']:,} (L1 {d['l1_hits']:,}), "
                                     f"db queries {d['db_queries']:,}, coalesced {d['coalesced_waits']:,} (last run)")
                notes[t.name] += nn
                if out:
                    res[t.name].append(out)
        base_rps = statistics.median([x[0] for x in res[base]]) if res[base] else 0.0
        for t in targets:
            cost = median3(costs[t.name]) if costs[t.name] else None
            if not res[t.name]:
                table.append((label, clients, pipe, t.name, None, None, None, None, busy[t.name], notes[t.name], extra[t.name], cost))
                continue
            rps, p50, p99 = median3(res[t.name])
            ratio = rps / base_rps if base_rps else None
            table.append((label, clients, pipe, t.name, rps, p50, p99, ratio, busy[t.name], notes[t.name], extra[t.name], cost))
        # Is cachefront still alive?
        try:
            if call(CF, "PING") != "PONG":
                problems.append(f"after {label}: PING did not answer PONG")
        except OSError as e:
            problems.append(f"after {label}: cachefront unreachable: {e}")
            break
    elapsed = time.monotonic() - t_start

    # --- print ---------------------------------------------------------------------------------
    def cpu_model():
        with open("/proc/cpuinfo") as f:
            for l in f:
                if l.startswith("model name"):
                    return l.split(":", 1)[1].strip()
        return "?"

    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1048576
    rbv = subprocess.run(["redis-benchmark", "--version"], capture_output=True).stdout.decode().strip()
    print("# cachefront benchmark")
    print(f"date:       {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine:    {os.cpu_count()} CPUs ({cpu_model()}), {mem:.0f} GB RAM, {os.uname().sysname} {os.uname().release}")
    print(f"cachefront: {ENV.get('BENCH_COMMIT', '?')} (release build), repository config.toml (L1 on)")
    print(f"servers:    {ENV.get('BENCH_VALKEY_VERSION', 'valkey')}; {ENV.get('BENCH_PG_VERSION', 'postgres')}; "
          f"{ENV.get('BENCH_NC_VERSION', 'nutcracker')}")
    print(f"client:     {rbv}; pgbench -M prepared; each cell the median of {REPEAT} runs; "
          f"{N:,} requests per run ({N_1K:,} at 1,000 clients, {MISS_N:,} for misses)")
    print("note:       the clients, cachefront, Valkey, twemproxy and PostgreSQL all share these CPUs")
    print()
    hdr = ("workload", "clients", "-P", "target", "req/s", "p50 ms", "p99 ms", "vs base",
           "target µs CPU/req", "Valkey µs CPU/req", "Valkey cmds/read")
    print("| " + " | ".join(hdr) + " |")
    print("|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|")
    footnotes = []
    for label, clients, pipe, tname, rps, p50, p99, ratio, b, nn, ex, cost in table:
        mark = "*" if b else ""
        if nn:
            mark += " E"
            footnotes.append(f"{label} / {clients} clients / -P {pipe} / {tname}: " + "; ".join(dict.fromkeys(nn)))
        if ex:
            footnotes.append(f"{label} / {tname}: {ex}")
        c = (f"{cost[0]:.1f} | {cost[1]:.1f} | {cost[2]:.1f}" if cost else "– | – | –")
        if rps is None:
            print(f"| {label} | {clients:,} | {pipe} | {tname}{mark} | – | – | – | – | {c} |")
            continue
        r = f"{ratio:.2f}" if ratio is not None else "–"
        print(f"| {label} | {clients:,} | {pipe} | {tname}{mark} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {r} | {c} |")
    print()
    print("vs base: req/s as a fraction of Valkey direct's in the same row (of PostgreSQL's for the miss row).")
    print("CPU/req: user + system time of the target process (cachefront, twemproxy, or Valkey when it is the")
    print("target) and of Valkey, per request; cmds/read: Valkey's total_commands_processed / total_reads_processed.")
    print("`*`: the machine stayed busy (other processes) for the whole wait before at least one run of that cell.")
    print("Misses: Valkey FLUSHALLed before each run; ids 0..99,999 at random (redis-benchmark -r 100000), through")
    print("BENCH.EMP = EMP.GET's SQL with a text id; PostgreSQL: pgbench -M prepared, the same SELECT, random(1, 100000).")
    print("cachefront reaches PostgreSQL through its pool of 16 connections; pgbench uses one per client.")
    print(f"cachefront: the default layout, one client thread per CPU but one ({max(1, CPUS - 1)} here); {PER_CPU}:")
    print(f"the same build and config with CACHEFRONT_THREADS={CPUS} (one per CPU), beside it in the same run.")
    for f in footnotes:
        print("- " + f)
    for nline in notes_global:
        print("- " + nline)
    print(f"({elapsed / 60:.1f} minutes, {_waited[0] / 60:.1f} of them waiting for a quiet machine)")
    if problems:
        print()
        print("PROBLEMS:")
        for p in problems:
            print("- " + p)


if __name__ == "__main__":
    main()
