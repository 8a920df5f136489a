#!/usr/bin/env bash
# The full check, as CI runs it: formatting, lints, then every test.
#
#   scripts/test.sh [ARGS...]   ARGS go to `cargo test --workspace`,
#                               e.g. scripts/test.sh -- relay_failover
#
# Integration tests start their own private PostgreSQL clusters (this script starts
# none) from FASTCHAT_PG_BIN, and spawn the debug server binaries from target/debug;
# the terminal UI test needs tmux (installed here if missing).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

# A bare Rust install may lack rustfmt and clippy; rustup can add them.
for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null || die "cargo $tool is missing and there is no rustup to add it"
        say "installing the $tool component"
        rustup component add "$([ "$tool" = fmt ] && echo rustfmt || echo clippy)"
    fi
done

say "checking formatting"
cargo fmt --all -- --check
say "running clippy"
cargo clippy --all-targets -- -D warnings

FASTCHAT_PG_BIN=$(pg_bin_dir)
export FASTCHAT_PG_BIN
say "PostgreSQL for tests: $FASTCHAT_PG_BIN"
# The terminal UI's end-to-end test drives two UIs in tmux.
ensure_tmux

say "building debug binaries for the integration tests"
cargo build --bins
say "running tests"
# Property tests draw their cases from a fixed seed here, so a run is repeatable and CI
# cannot fail on a case no one has seen; scripts/fuzz.sh explores fresh seeds. Set
# PROPTEST_RNG_SEED yourself to run another.
PROPTEST_RNG_SEED=${PROPTEST_RNG_SEED:-20261130} cargo test --workspace "$@"
if [ $# -eq 0 ]; then
    say "chaos test (short): servers fail while people chat; nothing may be lost or shown twice"
    scripts/chaos.sh --short
fi
say "all checks passed"
