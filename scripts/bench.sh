#!/usr/bin/env bash
# cachefront benchmark, self-contained: installs what is missing (scripts/deps.sh, and the
# Debian package `nutcracker`, i.e. twemproxy), builds the release binary, starts its own
# throwaway Valkey, PostgreSQL (sql/staff.sql plus 100,000 generated employees), cachefront
# (twice: the default, one client thread per CPU but one, and one per CPU) and twemproxy in front of
# the same Valkey, all on free ports of 127.0.0.1, measures, and stops everything on exit.
#
#   bash scripts/bench.sh            the table (scripts/bench_run.py), the single-request
#                                    latencies (scripts/miss_latency.py) and the idle-
#                                    connection memory test (scripts/bench_idle.py)
#   bash scripts/bench.sh --profile  also profile the EMP.GET hit path and the pass-through
#                                    GET path under callgrind (or perf, when the CPU's
#                                    counters are available); the top functions are printed
#   bash scripts/bench.sh --profile-only   only the profiles
#   bash scripts/bench.sh --cluster  only the cluster table: a three-primary Valkey Cluster,
#                                    cachefront with valkey.cluster in front of it, and
#                                    redis-benchmark through cachefront beside
#                                    redis-benchmark --cluster straight to the nodes
#   bash scripts/bench.sh --services       start everything, print the ports, wait (Ctrl-C stops)
#   bash scripts/bench.sh --soak     the isolation soak (scripts/soak.py, SOAK_SECONDS, 180):
#                                    honest clients checking every reply beside hostile ones
#
# Environment:
#   BENCH_N (100000)        requests per redis-benchmark run at 50 clients
#   BENCH_N_1K (20000)      requests per run at 1,000 clients
#   BENCH_MISS_N (20000)    requests per miss run (each starts from a flushed cache)
#   BENCH_LAT_N (2000)      requests per row of the single-request latency table
#   BENCH_REPEAT (3)        runs per cell; the median is shown
#   BENCH_QUIET_MAX (60)    seconds to wait for a quiet machine before each run
#   BENCH_QUIET_BUDGET (900) seconds of such waiting in all; after that, runs start at once
#   BENCH_IDLE_CONNS (9990) idle connections for the memory test (max_clients is 10,000)
#   BENCH_PROFILE_N (20000) requests per profiled run
#   BENCH_SKIP_BUILD=1      use the existing target/release/cachefront
#   BENCH_ONLY=regex        only the table rows whose workload matches (for trying things)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

mode=all
case "${1:-}" in
"") ;;
--profile) mode=all+profile ;;
--profile-only) mode=profile ;;
--cluster) mode=cluster ;;
--services) mode=services ;;
--soak) mode=soak ;;
-h | --help)
    sed -n '2,34p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0 [--profile | --profile-only | --cluster | --services | --soak | --help]" >&2
    exit 2
    ;;
esac

say() { printf 'bench: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# --- what is needed ----------------------------------------------------------------------
bash "$ROOT/scripts/deps.sh"
# shellcheck source=scripts/deps.sh
source "$ROOT/scripts/deps.sh" # lookup functions
as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show "$1" >/dev/null 2>&1 || ! as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
        say "apt-get update"
        as_root apt-get update -qq
        as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}
NUTCRACKER="$(command -v nutcracker || true)"
[[ -z "$NUTCRACKER" && -x /usr/sbin/nutcracker ]] && NUTCRACKER=/usr/sbin/nutcracker
if [[ -z "$NUTCRACKER" ]]; then
    say "apt-get install nutcracker"
    apt_install nutcracker
    NUTCRACKER="$(command -v nutcracker || echo /usr/sbin/nutcracker)"
    # The package enables a system service; it is not ours to run (and does not start
    # without systemd anyway).
fi
[[ -x "$NUTCRACKER" ]] || die "nutcracker not found"
PGBIN="$(pg_bin_dir)" || die "PostgreSQL binaries not found"
VALKEY_SERVER="$(valkey_server_bin)" || die "valkey-server not found"
[[ -x "$PGBIN/pgbench" ]] || command -v pgbench >/dev/null || apt_install postgresql-contrib
PGBENCH="$PGBIN/pgbench"
[[ -x "$PGBENCH" ]] || PGBENCH="$(command -v pgbench)"

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    say "cargo build --release"
    cargo build --release -q
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
CACHEFRONT="$TARGET_DIR/release/cachefront"
[[ -x "$CACHEFRONT" ]] || die "$CACHEFRONT not built"

# 10,000 idle clients and 1,000-client runs need file descriptors (cachefront, Valkey,
# twemproxy and the clients inherit this limit).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ "$(ulimit -n)" != unlimited && "$(ulimit -n)" -lt 20000 ]]; then
    ulimit -Hn 20000 2>/dev/null && ulimit -n 20000 2>/dev/null || true
fi

# --- a throwaway directory and free ports --------------------------------------------------
WORK="$(mktemp -d /var/tmp/cachefront-bench.XXXXXX)"
chmod 755 "$WORK"
read -r VALKEY_PORT PG_PORT CF_PORT CFN_PORT NC_PORT CFP_PORT NC_STATS_PORT < <(python3 - <<'PY'
import socket
socks = []
for _ in range(7):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)

PG_USER=""
if [[ $EUID -eq 0 ]]; then
    if id postgres >/dev/null 2>&1; then PG_USER=postgres; else PG_USER=nobody; fi
fi
as_pg() {
    if [[ -z "$PG_USER" ]]; then
        (cd / && "$@")
    elif command -v setpriv >/dev/null 2>&1; then
        (cd / && setpriv --reuid "$PG_USER" --regid "$(id -g "$PG_USER")" --init-groups -- "$@")
    else
        (cd / && runuser -u "$PG_USER" -- "$@")
    fi
}

VALKEY_PID="" CF_PID="" CFN_PID="" CFP_PID="" NC_PID="" PG_DATA="$WORK/pg" CLUSTER_PIDS=() CFC_PID=""
stop_pid() { # pid: TERM, up to 5 s, then KILL
    local pid="$1" i
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    stop_pid "$CF_PID"
    stop_pid "$CFN_PID"
    stop_pid "$CFC_PID"
    for p in "${CLUSTER_PIDS[@]}"; do stop_pid "$p"; done
    stop_pid "$CFP_PID"
    stop_pid "$NC_PID"
    stop_pid "$VALKEY_PID"
    if [[ -f "$PG_DATA/postmaster.pid" ]]; then
        as_pg "$PGBIN/pg_ctl" -D "$PG_DATA" -m immediate -w -t 20 stop >/dev/null 2>&1
    fi
    if [[ "${BENCH_KEEP_WORK:-0}" == 1 ]]; then say "left $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port seconds what [log]
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    [[ -n "${4:-}" && -f "${4:-}" ]] && tail -n 20 "$4" >&2
    die "$3 did not start on port $1"
}

# --- Valkey ----------------------------------------------------------------------------
mkdir -p "$WORK/valkey"
"$VALKEY_SERVER" --port "$VALKEY_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK/valkey" --logfile "$WORK/valkey.log" --maxclients 12000 &
VALKEY_PID=$!
wait_port "$VALKEY_PORT" 10 valkey-server "$WORK/valkey.log"
say "valkey-server on 127.0.0.1:$VALKEY_PORT (pid $VALKEY_PID)"

# --- PostgreSQL ------------------------------------------------------------------------
mkdir -p "$PG_DATA"
chmod 700 "$PG_DATA"
[[ -n "$PG_USER" ]] && chown "$PG_USER" "$PG_DATA" && touch "$WORK/postgres.log" && chown "$PG_USER" "$WORK/postgres.log"
as_pg "$PGBIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C -N >"$WORK/initdb.log" 2>&1 ||
    { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
# A throwaway cluster: no durability needed. 200 connections: pgbench's 50 clients plus
# cachefront's pool.
as_pg "$PGBIN/pg_ctl" -D "$PG_DATA" -l "$WORK/postgres.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    >/dev/null || { tail -n 20 "$WORK/postgres.log" >&2; die "postgres did not start"; }
say "postgres on 127.0.0.1:$PG_PORT (data $PG_DATA)"
PSQL=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE staff"
"${PSQL[@]}" -d staff -f "$ROOT/sql/staff.sql" >/dev/null
# The 100,000 generated employees are inserted by bench_run.py after the SQL.CACHED rows:
# over them the guide's join would return 100,005 rows (more than sql.max_rows, and an
# 8 MB value), so the join is measured on the guide's five rows.
GEN_SQL="INSERT INTO employees (name, job_title, dept_id)
SELECT 'Employee ' || g, 'Job title ' || (g % 97), 1 + g % 5 FROM generate_series(1, 100000) AS g;
ANALYZE employees;"

# --- cachefront --------------------------------------------------------------------------
export CACHEFRONT_VALKEY_URL="redis://127.0.0.1:$VALKEY_PORT"
export CACHEFRONT_POSTGRES_URL="postgres://postgres@127.0.0.1:$PG_PORT/staff"
export RUST_LOG="${RUST_LOG:-warn}"
# The repository's config plus one bench-only named query: redis-benchmark's __rand_int__
# is a zero-padded 12-digit number ("000000012345"), which EMP.GET refuses (its id is an
# "int", parsed as strictly as Valkey parses integers). BENCH.EMP is EMP.GET with a text
# argument: the same SQL and the same named-query path; PostgreSQL reads '000000012345' as
# 12345; the key is employee:000000012345.
CONFIG="$WORK/config.toml"
cat "$ROOT/config.toml" - >"$CONFIG" <<'EOF'

# --- added by scripts/bench.sh ---
[[query]]
command = "BENCH.EMP"
sql = "SELECT name FROM employees WHERE id = $1"
key = "employee:{1}"
ttl = 3600
reply = "value"
args = ["text"]
summary = "EMP.GET for redis-benchmark's zero-padded __rand_int__ ids"
EOF
"$CACHEFRONT" --check-config --config "$CONFIG" >/dev/null || die "bench config refused"

start_cachefront() { # port [wrapper...]
    local port="$1"
    shift
    CACHEFRONT_LISTEN="127.0.0.1:$port" "$@" "$CACHEFRONT" --config "$CONFIG" >>"$WORK/cachefront.log" 2>&1 &
    STARTED_PID=$!
}
start_cachefront "$CF_PORT"
CF_PID=$STARTED_PID
wait_port "$CF_PORT" 20 cachefront "$WORK/cachefront.log"
say "cachefront on 127.0.0.1:$CF_PORT (pid $CF_PID)"
# The same build and config on one client thread per CPU (the default leaves one spare), for
# the rows that compare thread layouts: here the load generator and Valkey share the CPUs.
if [[ "$mode" == all || "$mode" == all+profile || "$mode" == services ]]; then
    start_cachefront "$CFN_PORT" env CACHEFRONT_THREADS="$(nproc)"
    CFN_PID=$STARTED_PID
    wait_port "$CFN_PORT" 20 "cachefront (threads = $(nproc))" "$WORK/cachefront.log"
    say "cachefront, threads = $(nproc), on 127.0.0.1:$CFN_PORT (pid $CFN_PID)"
fi

# --- twemproxy in front of the same Valkey ---------------------------------------------------
cat >"$WORK/nutcracker.yml" <<EOF
bench:
  listen: 127.0.0.1:$NC_PORT
  hash: fnv1a_64
  distribution: ketama
  redis: true
  auto_eject_hosts: false
  timeout: 5000
  servers:
   - 127.0.0.1:$VALKEY_PORT:1
EOF
"$NUTCRACKER" -c "$WORK/nutcracker.yml" -o "$WORK/nutcracker.log" -s "$NC_STATS_PORT" -a 127.0.0.1 \
    -p "$WORK/nutcracker.pid" -v 4 &
NC_PID=$!
wait_port "$NC_PORT" 10 nutcracker "$WORK/nutcracker.log"
say "nutcracker (twemproxy) on 127.0.0.1:$NC_PORT (pid $NC_PID)"

export BENCH_VALKEY_VERSION="$("$VALKEY_SERVER" --version | head -n 1)"
export BENCH_PG_VERSION="$("$PGBIN/postgres" --version)"
export BENCH_NC_VERSION="$("$NUTCRACKER" --version 2>&1 | head -n 1)"
export BENCH_COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+dirty')"

run_args=(--cachefront-port "$CF_PORT" --valkey-port "$VALKEY_PORT" --nutcracker-port "$NC_PORT"
    --pg-port "$PG_PORT" --cachefront-pid "$CF_PID" --valkey-pid "$VALKEY_PID" --nutcracker-pid "$NC_PID"
    --cachefront-percpu-port "$CFN_PORT" --cachefront-percpu-pid "$CFN_PID"
    --pg-data "$PG_DATA" --pgbench "$PGBENCH" --psql "$PGBIN/psql" --work "$WORK")

if [[ "$mode" == services ]]; then
    cat <<EOF
VALKEY_PORT=$VALKEY_PORT
PG_PORT=$PG_PORT
CACHEFRONT_PORT=$CF_PORT   (pid $CF_PID)
CACHEFRONT_PERCPU_PORT=$CFN_PORT   (pid $CFN_PID, threads = $(nproc))
NUTCRACKER_PORT=$NC_PORT
WORK=$WORK
generate the 100,000 employees: ${PSQL[*]} -d staff -c "\$GEN_SQL"
EOF
    say "running; Ctrl-C stops everything"
    export GEN_SQL
    wait "$CF_PID" || true
    exit 0
fi

if [[ "$mode" == soak ]]; then
    python3 "$ROOT/scripts/soak.py" --cachefront-port "$CF_PORT" --valkey-port "$VALKEY_PORT" \
        --cachefront-pid "$CF_PID" --psql "$PGBIN/psql -X -q -h 127.0.0.1 -p $PG_PORT -U postgres -d staff"
    exit $?
fi

if [[ "$mode" == cluster ]]; then
    # Three primaries, slots split evenly, joined with CLUSTER MEET (what valkey-cli --cluster
    # create does, without its replicas).
    NODE_PORTS=() BUS_PORTS=()
    for i in 0 1 2; do
        read -r port bus < <(python3 -c 'import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')
        mkdir -p "$WORK/node$i"
        # The bus port is given: the default (port + 10000) does not exist above 55535.
        "$VALKEY_SERVER" --port "$port" --bind 127.0.0.1 --save "" --appendonly no --cluster-enabled yes \
            --cluster-port "$bus" --cluster-config-file nodes.conf --dir "$WORK/node$i" --logfile "$WORK/node$i.log" --maxclients 12000 &
        CLUSTER_PIDS+=($!)
        NODE_PORTS+=("$port")
        BUS_PORTS+=("$bus")
        wait_port "$port" 10 "cluster node $i" "$WORK/node$i.log"
    done
    for i in 0 1 2; do
        redis-cli -p "${NODE_PORTS[$i]}" CLUSTER ADDSLOTSRANGE $((i * 16384 / 3)) $(((i + 1) * 16384 / 3 - 1)) >/dev/null
    done
    for i in 1 2; do redis-cli -p "${NODE_PORTS[0]}" CLUSTER MEET 127.0.0.1 "${NODE_PORTS[$i]}" "${BUS_PORTS[$i]}" >/dev/null; done
    for ((i = 0; i < 300; i++)); do
        ok=0
        for p in "${NODE_PORTS[@]}"; do
            redis-cli -p "$p" CLUSTER INFO | grep -q 'cluster_state:ok' && ok=$((ok + 1))
        done
        [[ $ok == 3 ]] && break
        sleep 0.1
    done
    [[ $ok == 3 ]] || die "the cluster did not converge"
    say "valkey cluster on 127.0.0.1:${NODE_PORTS[*]}"
    CFC_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    CACHEFRONT_VALKEY_CLUSTER="127.0.0.1:${NODE_PORTS[0]}" start_cachefront "$CFC_PORT"
    CFC_PID=$STARTED_PID
    wait_port "$CFC_PORT" 20 "cachefront (cluster)" "$WORK/cachefront.log"
    say "cachefront (valkey.cluster) on 127.0.0.1:$CFC_PORT (pid $CFC_PID)"
    python3 "$ROOT/scripts/bench_cluster.py" --cachefront-port "$CFC_PORT" --cachefront-pid "$CFC_PID" \
        --node-ports "$(IFS=,; echo "${NODE_PORTS[*]}")" --node-pids "$(IFS=,; echo "${CLUSTER_PIDS[*]}")" \
        --pg-pid "$(head -n 1 "$PG_DATA/postmaster.pid")"
    if grep -qiE 'panic|ERROR' "$WORK/cachefront.log"; then
        echo
        grep -iE 'panic|ERROR|WARN' "$WORK/cachefront.log" | head -n 40
    fi
fi

if [[ "$mode" == all || "$mode" == all+profile ]]; then
    # Memory first, on a fresh process: 10,000 is limits.max_clients, minus a few for the
    # benchmark's own connections.
    python3 "$ROOT/scripts/bench_idle.py" --port "$CF_PORT" --pid "$CF_PID" \
        -n "${BENCH_IDLE_CONNS:-9990}" --ping 100 >"$WORK/idle.txt" ||
        say "idle-connection test failed"
    GEN_SQL="$GEN_SQL" python3 "$ROOT/scripts/bench_run.py" "${run_args[@]}"
    echo
    cat "$WORK/idle.txt"
    echo
    # Single requests, one client: cold misses on never-requested ids of the 100,000 — with
    # the default config, then with cache.reply_before_store = true (a second instance).
    python3 "$ROOT/scripts/miss_latency.py" -n "${BENCH_LAT_N:-2000}" --ids 100000 \
        --cachefront-port "$CF_PORT" --valkey-port "$VALKEY_PORT" --pg-port "$PG_PORT"
    CFP_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    start_cachefront "$CFP_PORT" env CACHEFRONT_CACHE_REPLY_BEFORE_STORE=true
    CFP_PID=$STARTED_PID
    wait_port "$CFP_PORT" 20 cachefront "$WORK/cachefront.log"
    echo
    echo "With cache.reply_before_store = true:"
    python3 "$ROOT/scripts/miss_latency.py" -n "${BENCH_LAT_N:-2000}" --ids 100000 \
        --cachefront-port "$CFP_PORT" --valkey-port "$VALKEY_PORT" --pg-port "$PG_PORT" --part 1
    stop_pid "$CFP_PID" || true
    CFP_PID=""
    if grep -qiE 'panic|ERROR' "$WORK/cachefront.log"; then
        echo
        echo "cachefront log (warnings and errors):"
        grep -iE 'panic|ERROR|WARN' "$WORK/cachefront.log" | head -n 40
    fi
fi

if [[ "$mode" == profile || "$mode" == all+profile ]]; then
    if [[ "$mode" == profile ]]; then
        "${PSQL[@]}" -d staff -c "$GEN_SQL" >/dev/null
    fi
    echo
    # shellcheck source=scripts/bench_profile.sh
    source "$ROOT/scripts/bench_profile.sh"
fi
