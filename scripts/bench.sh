#!/usr/bin/env bash
# cachefront benchmarks against a running demo stack (start it with scripts/demo.sh):
#   1. EMP.GET hits through cachefront  vs  GET employee:1 on Valkey directly
#   2. pass-through SET / GET through cachefront  vs  the same on Valkey directly
#   each with redis-benchmark at 50 clients, without and with a pipeline of 16;
#   3. single-request latency of an EMP.GET miss vs a hit, next to a plain psycopg2 SELECT
#      (scripts/miss_latency.py).
# Prints the machine, the date, and one table: requests/s, p50 and p99 (ms, as reported by
# redis-benchmark --csv), and cachefront's throughput as a fraction of Valkey's.
#
#   scripts/bench.sh
# Environment: CACHEFRONT_PORT (6380), VALKEY_PORT (6379), PG_PORT (5432),
#   BENCH_HOST (127.0.0.1), BENCH_N (100000 requests per run), BENCH_CLIENTS (50),
#   BENCH_MISS_N (500 requests per latency row), BENCH_REPEAT (3 runs per cell; median shown).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${BENCH_HOST:-127.0.0.1}"
CF="${CACHEFRONT_PORT:-6380}"
VK="${VALKEY_PORT:-6379}"
PG="${PG_PORT:-5432}"
N="${BENCH_N:-100000}"
C="${BENCH_CLIENTS:-50}"
MISS_N="${BENCH_MISS_N:-500}"
REPEAT="${BENCH_REPEAT:-3}"

die() {
    printf 'bench: %s\n' "$*" >&2
    exit 1
}

for b in redis-benchmark redis-cli python3; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found (scripts/deps.sh installs it)"
done
[[ "$(redis-cli -h "$HOST" -p "$VK" PING 2>/dev/null)" == PONG ]] ||
    die "no Valkey on $HOST:$VK; start the demo first: bash scripts/demo.sh"
[[ "$(redis-cli -h "$HOST" -p "$CF" PING 2>/dev/null)" == PONG ]] ||
    die "no cachefront on $HOST:$CF; start the demo first: bash scripts/demo.sh"
# Warm the entry the hit benchmark reads (and check that the database is there).
[[ -n "$(redis-cli -h "$HOST" -p "$CF" EMP.GET 1 2>/dev/null)" ]] ||
    die "EMP.GET 1 through cachefront returned nothing; is PostgreSQL up with the staff data?"

info_field() { # port section field
    redis-cli -h "$HOST" -p "$1" INFO "$2" 2>/dev/null | tr -d '\r' | sed -n "s/^$3://p" | head -n 1
}

echo "# cachefront benchmark"
echo "date:        $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "machine:     $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), $(awk '/MemTotal/ {printf "%.0f GB RAM", $2/1048576}' /proc/meminfo)"
echo "kernel:      $(uname -sr)"
echo "cachefront:  $(info_field "$CF" cachefront cachefront_version) on $HOST:$CF"
echo "valkey:      $(info_field "$VK" server valkey_version || true) on $HOST:$VK"
echo "client:      $(redis-benchmark --version 2>/dev/null | head -n 1), $C clients, $N requests per run, median of $REPEAT runs"
echo "note:        client, cachefront, Valkey and PostgreSQL all share these CPUs"
echo

# One redis-benchmark run; prints "rps p50 p99" (p50/p99 in ms).
rb() { # port pipeline args...
    local port="$1" pipe="$2"
    shift 2
    redis-benchmark -h "$HOST" -p "$port" -n "$N" -c "$C" -P "$pipe" --csv "$@" 2>/dev/null |
        python3 -c '
import csv, sys
rows = [r for r in csv.reader(sys.stdin) if r and r[0] != "test"]
if not rows:
    sys.exit("redis-benchmark printed no result")
r = rows[-1]   # header: test,rps,avg,min,p50,p95,p99,max
print(r[1], r[4], r[6])
'
}

rows=()
# One table row: the cachefront and Valkey runs alternate, REPEAT times each; the row shows
# the median of each column over the repeats (this machine's run-to-run noise is large).
row() { # label pipeline cachefront-args... -- valkey-args...
    local label="$1" pipe="$2"
    shift 2
    local cf_args=() vk_args=()
    while [[ "$1" != -- ]]; do
        cf_args+=("$1")
        shift
    done
    shift
    vk_args=("$@")
    local cf=() vk=() r
    for ((r = 0; r < REPEAT; r++)); do
        cf+=("$(rb "$CF" "$pipe" "${cf_args[@]}")") || die "redis-benchmark against cachefront failed: ${cf_args[*]}"
        vk+=("$(rb "$VK" "$pipe" "${vk_args[@]}")") || die "redis-benchmark against valkey failed: ${vk_args[*]}"
        printf '.' >&2
    done
    rows+=("$label|$pipe|$(median "${cf[@]}")|$(median "${vk[@]}")")
}

# Column-wise median of "rps p50 p99" triples.
median() {
    printf '%s\n' "$@" | python3 -c '
import statistics, sys
cols = list(zip(*(map(float, l.split()) for l in sys.stdin if l.strip())))
print(" ".join("%.3f" % statistics.median(c) for c in cols))
'
}

printf 'running redis-benchmark ' >&2
row "EMP.GET 1 (hit) vs GET employee:1" 1 EMP.GET 1 -- GET employee:1
row "EMP.GET 1 (hit) vs GET employee:1" 16 EMP.GET 1 -- GET employee:1
row "pass-through SET" 1 -t set -- -t set
row "pass-through GET" 1 -t get -- -t get
row "pass-through SET" 16 -t set -- -t set
row "pass-through GET" 16 -t get -- -t get
echo >&2

printf '%s\n' "${rows[@]}" | python3 -c '
import sys
print("| workload | -P | cachefront req/s | p50 ms | p99 ms | valkey req/s | p50 ms | p99 ms | cachefront/valkey |")
print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
for line in sys.stdin:
    label, pipe, cf, vk = line.rstrip("\n").split("|")
    c, v = cf.split(), vk.split()
    ratio = float(c[0]) / float(v[0]) if float(v[0]) else 0.0
    print(f"| {label} | {pipe} | {float(c[0]):,.0f} | {float(c[1]):.3f} | {float(c[2]):.3f} | {float(v[0]):,.0f} | {float(v[1]):.3f} | {float(v[2]):.3f} | {ratio:.2f} |")
'
echo
python3 "$ROOT/scripts/miss_latency.py" -n "$MISS_N" --host "$HOST" \
    --cachefront-port "$CF" --valkey-port "$VK" --pg-port "$PG"
