#!/usr/bin/env bash
# cachefront demo ("command 1"): installs what is missing, builds the release binary,
# starts a throwaway Valkey and PostgreSQL on 127.0.0.1 (data under .demo/ in the repo),
# loads sql/staff.sql into database `staff`, and runs cachefront in the foreground.
# Ctrl-C (or SIGTERM) stops cachefront, Valkey and PostgreSQL.
#
#   scripts/demo.sh                  the whole demo
#   scripts/demo.sh --services-only  start (or reuse) Valkey + PostgreSQL, print their
#                                    ports, exit and leave them running
#   scripts/demo.sh --stop           stop the Valkey and PostgreSQL started from .demo/
#   scripts/demo.sh --clean          --stop, then delete .demo/
#
# Ports: VALKEY_PORT (6379), PG_PORT (5432), CACHEFRONT_PORT (6380).
# Re-running is fine: services of an earlier run are reused (or restarted on new ports),
# the database cluster is initialised once and staff.sql is loaded only into a new db.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEMO="$ROOT/.demo"
VALKEY_PORT="${VALKEY_PORT:-6379}"
PG_PORT="${PG_PORT:-5432}"
CACHEFRONT_PORT="${CACHEFRONT_PORT:-6380}"

mode=demo
case "${1:-}" in
"") ;;
--services-only) mode=services ;;
--stop) mode=stop ;;
--clean) mode=clean ;;
-h | --help)
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0 [--services-only | --stop | --clean | --help]" >&2
    exit 2
    ;;
esac

say() { printf 'demo: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# shellcheck source=scripts/deps.sh
source "$ROOT/scripts/deps.sh" # lookup functions only

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Our process? (pid alive and its command line mentions $2)
pid_is() {
    local pid="$1" what="$2"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$what"
}

wait_gone() { # pid seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

# --- running PostgreSQL as an unprivileged user when we are root -----------------------
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

# Where the cluster lives: .demo/pg, unless the unprivileged user cannot reach .demo
# (e.g. a repo under /root); then a directory under /var/tmp, linked from .demo/pg.
pg_data_dir() {
    if [[ -L "$DEMO/pg" ]]; then
        readlink -f "$DEMO/pg"
        return
    fi
    if [[ -z "$PG_USER" ]] || as_pg test -x "$DEMO"; then
        echo "$DEMO/pg"
        return
    fi
    local alt
    alt="/var/tmp/cachefront-demo-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)/pg"
    mkdir -p "$(dirname "$alt")"
    chmod 755 "$(dirname "$alt")"
    chown "$PG_USER" "$(dirname "$alt")"
    ln -sfn "$alt" "$DEMO/pg"
    echo "$alt"
}

# --- Valkey ------------------------------------------------------------------------------
valkey_pid() { cat "$DEMO/valkey.pid" 2>/dev/null || true; }

stop_valkey() {
    local pid
    pid="$(valkey_pid)"
    if pid_is "$pid" valkey-server; then
        say "stopping valkey-server (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 2 || true
    fi
    rm -f "$DEMO/valkey.pid"
}

start_valkey() {
    local bin pid
    pid="$(valkey_pid)"
    if pid_is "$pid" "valkey-server 127.0.0.1:$VALKEY_PORT" && redis_ping "$VALKEY_PORT"; then
        say "reusing valkey-server on 127.0.0.1:$VALKEY_PORT (pid $pid)"
        return
    fi
    stop_valkey
    port_open "$VALKEY_PORT" && die "port $VALKEY_PORT is in use by another program; try VALKEY_PORT=<port> $0"
    bin="$(valkey_server_bin)" || die "valkey-server not found (scripts/deps.sh installs it)"
    mkdir -p "$DEMO/valkey"
    "$bin" --port "$VALKEY_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$DEMO/valkey" --daemonize yes --pidfile "$DEMO/valkey.pid" \
        --logfile "$DEMO/valkey.log"
    local i
    for ((i = 0; i < 100; i++)); do
        redis_ping "$VALKEY_PORT" && break
        sleep 0.1
    done
    redis_ping "$VALKEY_PORT" || die "valkey-server did not start; see $DEMO/valkey.log"
    say "valkey-server on 127.0.0.1:$VALKEY_PORT (pid $(valkey_pid))"
}

redis_ping() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]]
    else
        port_open "$1"
    fi
}

# --- PostgreSQL ----------------------------------------------------------------------------
PGBIN=""
pg_pid() { head -n 1 "$1/postmaster.pid" 2>/dev/null || true; }
pg_port_of() { sed -n 4p "$1/postmaster.pid" 2>/dev/null || true; }

stop_postgres() {
    local data pid
    [[ -e "$DEMO/pg" ]] || return 0
    data="$(readlink -f "$DEMO/pg")"
    pid="$(pg_pid "$data")"
    if pid_is "$pid" postgres; then
        say "stopping postgres (pid $pid)"
        PGBIN="${PGBIN:-$(pg_bin_dir)}"
        as_pg "$PGBIN/pg_ctl" -D "$data" -m fast -w -t 20 stop >/dev/null 2>&1 ||
            { kill -KILL "$pid" 2>/dev/null || true; }
        wait_gone "$pid" 5 || true
    fi
}

start_postgres() {
    local data pid opts=()
    PGBIN="$(pg_bin_dir)" || die "PostgreSQL server binaries not found (scripts/deps.sh installs them)"
    mkdir -p "$DEMO"
    data="$(pg_data_dir)"
    pid="$(pg_pid "$data")"
    if pid_is "$pid" postgres && [[ "$(pg_port_of "$data")" == "$PG_PORT" ]] &&
        "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
        say "reusing postgres on 127.0.0.1:$PG_PORT (pid $pid)"
        return
    fi
    stop_postgres
    port_open "$PG_PORT" && die "port $PG_PORT is in use by another program (a system PostgreSQL?); try PG_PORT=<port> $0"

    if [[ ! -f "$data/PG_VERSION" ]]; then
        say "initdb $data"
        rm -rf "$data"
        mkdir -p "$data"
        chmod 700 "$data"
        [[ -n "$PG_USER" ]] && chown "$PG_USER:$(id -gn "$PG_USER")" "$data"
        as_pg "$PGBIN/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C -N >"$DEMO/initdb.log" 2>&1 ||
            { cat "$DEMO/initdb.log" >&2; rm -rf "$data"; die "initdb failed"; }
    fi
    opts=(-c listen_addresses=127.0.0.1 -p "$PG_PORT" -c "unix_socket_directories=''"
        -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10)
    [[ -f "$("$PGBIN/pg_config" --pkglibdir 2>/dev/null)/pg_stat_statements.so" ]] &&
        opts+=(-c shared_preload_libraries=pg_stat_statements)
    touch "$DEMO/postgres.log"
    [[ -n "$PG_USER" ]] && chown "$PG_USER" "$DEMO/postgres.log"
    # The log must be writable by the server's user; keep it next to the data if .demo is not.
    local logf="$DEMO/postgres.log"
    as_pg test -w "$logf" || logf="$(dirname "$data")/postgres.log"
    as_pg "$PGBIN/pg_ctl" -D "$data" -l "$logf" -o "${opts[*]}" -w -t 60 start >/dev/null ||
        { tail -n 20 "$logf" >&2; die "postgres did not start; see $logf"; }
    say "postgres on 127.0.0.1:$PG_PORT (pid $(pg_pid "$data"), data $data)"
}

psql_admin() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }

load_staff() {
    local exists
    exists="$(psql_admin -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'staff'")"
    if [[ "$exists" == 1 ]]; then
        say "database staff exists; not reloading sql/staff.sql"
        return
    fi
    say "creating database staff from sql/staff.sql"
    psql_admin -d postgres -c "CREATE DATABASE staff"
    if ! psql_admin -d staff -f "$ROOT/sql/staff.sql" >/dev/null; then
        psql_admin -d postgres -c "DROP DATABASE staff" || true
        die "loading sql/staff.sql failed"
    fi
    psql_admin -d staff -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null 2>&1 || true
}

stop_all() {
    stop_valkey
    stop_postgres
}

case "$mode" in
stop)
    stop_all
    exit 0
    ;;
clean)
    stop_all
    if [[ -L "$DEMO/pg" ]]; then rm -rf "$(dirname "$(readlink -f "$DEMO/pg")")"; fi
    rm -rf "$DEMO"
    say "removed $DEMO"
    exit 0
    ;;
esac

bash "$ROOT/scripts/deps.sh"

if [[ "$mode" == demo ]]; then
    say "cargo build --release"
    cargo build --release
fi

mkdir -p "$DEMO"
[[ "$mode" == demo ]] && trap 'stop_all' EXIT
start_valkey
start_postgres
load_staff

VALKEY_URL="redis://127.0.0.1:$VALKEY_PORT"
POSTGRES_URL="postgres://postgres@127.0.0.1:$PG_PORT/staff"

if [[ "$mode" == services ]]; then
    cat <<EOF
VALKEY_PORT=$VALKEY_PORT
PG_PORT=$PG_PORT
CACHEFRONT_VALKEY_URL=$VALKEY_URL
CACHEFRONT_POSTGRES_URL=$POSTGRES_URL
EOF
    say "services left running; stop them with: scripts/demo.sh --stop"
    exit 0
fi

export CACHEFRONT_VALKEY_URL="$VALKEY_URL"
export CACHEFRONT_POSTGRES_URL="$POSTGRES_URL"
export CACHEFRONT_LISTEN="127.0.0.1:$CACHEFRONT_PORT"
export RUST_LOG="${RUST_LOG:-info}"

args=()
if [[ -f "$ROOT/config.toml" ]]; then
    args=(--config "$ROOT/config.toml")
else
    say "no config.toml; running with built-in defaults"
fi

port_open "$CACHEFRONT_PORT" && die "port $CACHEFRONT_PORT is in use; try CACHEFRONT_PORT=<port> $0"

cat <<EOF

  cachefront is starting on 127.0.0.1:$CACHEFRONT_PORT
    upstream Valkey  $VALKEY_URL
    PostgreSQL       $POSTGRES_URL

  Try, in another terminal:
    redis-cli -p $CACHEFRONT_PORT EMP.GET 1
    redis-cli -p $CACHEFRONT_PORT SQL.CACHED "SELECT * FROM employees"
    redis-cli -p $VALKEY_PORT TTL employee:1      # what cachefront stored upstream

  Ctrl-C stops cachefront, Valkey and PostgreSQL (data stays in .demo/).

EOF

# cachefront runs as a child so that Ctrl-C / SIGTERM to this script reach it as SIGTERM
# (a graceful shutdown) before the services are stopped by the EXIT trap.
"$ROOT/target/release/cachefront" "${args[@]}" &
cf_pid=$!
on_signal() {
    trap - INT TERM
    kill -TERM "$cf_pid" 2>/dev/null || true
    wait "$cf_pid" 2>/dev/null || true
    exit 130
}
trap on_signal INT TERM
rc=0
wait "$cf_pid" || rc=$?
exit "$rc"
