#!/usr/bin/env bash
# The abuse scenario (BENCHMARKS.md, "Under abuse"): restarts the local cluster with
# the servers' default limits (the load scripts raise some of them), runs normal
# traffic alone, then the same traffic while every flood runs at once, each from its
# own loopback address, and prints both. Stops the cluster at the end (it would keep
# the default limits, which scripts/loadtest.sh's thousands of users from one address
# go past).
#
#   scripts/abuse.sh [--seconds N] [--users N] [--rate MSGS_PER_S]
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"
export FASTCHAT_HOME=${FASTCHAT_HOME:-$ROOT/.fastchat}

default_limits
say "restarting the cluster with the servers' default limits (release build)"
scripts/run.sh stop >/dev/null 2>&1 || true
scripts/run.sh start >/dev/null
load_tool abuse-
out=$OUT

say "normal traffic alone"
"$LOAD" --home "$FASTCHAT_HOME" --json abuse --no-attack "$@" | tail -n 1 | tee -a "$out"
say "the same traffic under every flood at once"
"$LOAD" --home "$FASTCHAT_HOME" --json abuse "$@" | tail -n 1 | tee -a "$out"
scripts/run.sh stop >/dev/null
say "results: $out (the cluster is stopped)"
