#!/usr/bin/env bash
# cachefront checks ("command 2"): installs what is missing (scripts/deps.sh), then
#   cargo fmt --all -- --check
#   cargo clippy --all-targets -- -D warnings
#   cargo test --all-targets --no-fail-fast
#   scripts/valkey_suite.sh    Valkey's own test suite through cachefront (needs
#                              ../shared/valkey-suite: CI has it; skipped, saying so, without)
# Every step runs; the exit status is non-zero if any failed. Works as root on a clean
# clone with nothing running: the tests start their own valkey-server and PostgreSQL
# (tests/common/services.rs) on free ports of 127.0.0.1.
# Plain `cargo test` on purpose (not nextest): the tests of one test binary share one
# PostgreSQL server per process.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/deps.sh
# shellcheck source=scripts/deps.sh
source scripts/deps.sh # lookup functions only
CACHEFRONT_VALKEY_SERVER="$(valkey_server_bin)"
CACHEFRONT_PG_BIN="$(pg_bin_dir)"
export CACHEFRONT_VALKEY_SERVER CACHEFRONT_PG_BIN

failed=()
step() {
    printf '\n==> %s\n' "$*"
    if ! "$@"; then
        failed+=("$*")
    fi
}

step cargo fmt --all -- --check
step cargo clippy --all-targets -- -D warnings
step cargo test --all-targets --no-fail-fast
step bash scripts/valkey_suite.sh

echo
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all checks passed"
