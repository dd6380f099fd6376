#!/usr/bin/env bash
# Valkey's own Tcl test suite, run through cachefront: a throwaway valkey-server and a
# cachefront in front of it on free ports of 127.0.0.1, the suite's data units pointed at
# cachefront, everything stopped on exit. Every test must pass except those listed, with
# their reason, in tests/valkey-suite-skips.txt (commands cachefront refuses on purpose).
#
# The suite is not part of this repository: it lives in ../shared/valkey-suite (override
# with CACHEFRONT_VALKEY_SUITE), which CI has and a clone of the repository does not. Without
# it this step says so and is skipped.
#
#   bash scripts/valkey_suite.sh            all data units (about 3 minutes)
#   bash scripts/valkey_suite.sh unit/sort  some units
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE="${CACHEFRONT_VALKEY_SUITE:-$ROOT/../shared/valkey-suite}"
say() { printf 'valkey-suite: %s\n' "$*" >&2; }

if [[ ! -x "$SUITE/run.sh" ]]; then
    say "skipped: Valkey's test suite is not at $SUITE (it lives in ../shared, which CI has; a clone of the repository does not)"
    exit 0
fi
# shellcheck source=scripts/deps.sh
source "$ROOT/scripts/deps.sh" # lookup functions
VALKEY_SERVER="$(valkey_server_bin)" || {
    say "valkey-server not found; run scripts/deps.sh"
    exit 1
}
command -v tclsh >/dev/null 2>&1 || {
    say "tclsh not found; run scripts/deps.sh (Debian package tcl)"
    exit 1
}
CACHEFRONT="${CACHEFRONT_BIN:-$ROOT/target/debug/cachefront}"
if [[ ! -x "$CACHEFRONT" ]]; then
    (cd "$ROOT" && cargo build --bin cachefront)
fi

WORK="$(mktemp -d -t cachefront-suite.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Free ports, chosen by binding port 0. The suite's own helper listens a little below its
# base port, so the base port is a free port with room below it.
read -r VK_PORT CF_PORT BASE_PORT < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
ports = [s.getsockname()[1] for s in socks]
base = None
for p in range(30000, 60000, 97):
    try:
        probe = [socket.socket() for _ in range(2)]
        probe[0].bind(("127.0.0.1", p)); probe[1].bind(("127.0.0.1", p - 32))
        base = p
        break
    except OSError:
        pass
    finally:
        for s in probe:
            s.close()
print(ports[0], ports[1], base)
PY
)

wait_port() { # port seconds what
    for _ in $(seq 1 $(($2 * 20))); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    say "$3 did not start on port $1"
    return 1
}

"$VALKEY_SERVER" --port "$VK_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --enable-debug-command yes --dir "$WORK" --logfile "$WORK/valkey.log" &
pids+=($!)
wait_port "$VK_PORT" 10 valkey-server
# No PostgreSQL: the suite uses none of cachefront's own commands (the invalidation listener
# retries in the background).
CACHEFRONT_LISTEN="127.0.0.1:$CF_PORT" CACHEFRONT_VALKEY_URL="redis://127.0.0.1:$VK_PORT" \
    CACHEFRONT_POSTGRES_URL="postgres://postgres@127.0.0.1:9/none" RUST_LOG=error \
    "$CACHEFRONT" >"$WORK/cachefront.log" 2>&1 &
pids+=($!)
wait_port "$CF_PORT" 20 cachefront
say "cachefront on 127.0.0.1:$CF_PORT in front of valkey-server on 127.0.0.1:$VK_PORT"

PEER_BASEPORT="$BASE_PORT" PEER_LOG_DIR="$ROOT/target/valkey-suite-logs" \
    PEER_EXTRA_ARGS="--skipfile $ROOT/tests/valkey-suite-skips.txt" \
    "$SUITE/run.sh" 127.0.0.1 "$CF_PORT" "$@"
