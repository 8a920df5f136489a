#!/usr/bin/env bash
# Fuzzes everything that parses input from the network, for a bounded time.
#
#   scripts/fuzz.sh [SECONDS]   run for SECONDS in all [300]
#
# Runs the property tests named fuzz_* (common/tests/fuzz_wire.rs: frames, Noise, every
# protocol parser; client/tests/fuzz_e2e.rs: envelopes, tokens, offers, keys, file
# names; client/src/store.rs: the store's header) round after round, each round with
# FUZZ_CASES cases per test [1000] and a fresh random seed, until the time is up; then
# reports the cases run. On a failure it stops and exits 1: proptest prints the shrunk
# input and saves its seed in <crate>/proptest-regressions/, which every later
# `cargo test` replays first. To keep the case as a regression test: fix the bug, commit
# that file, and add a plain #[test] with the shrunk input next to the property test.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

seconds=${1:-300}
cases=${FUZZ_CASES:-1000}
[[ $seconds =~ ^[0-9]+$ && $cases =~ ^[0-9]+$ ]] || die "usage: scripts/fuzz.sh [SECONDS] (FUZZ_CASES a number)"
targets=(-p fastchat-common -p fastchat-client --lib --test fuzz_wire --test fuzz_e2e)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

say "building the fuzz tests"
cargo test -q "${targets[@]}" --no-run
deadline=$((SECONDS + seconds))
rounds=0
total=0
while ((SECONDS < deadline)); do
    seed=$(od -An -tu8 -N8 /dev/urandom | tr -d ' ')
    say "round $((rounds + 1)): PROPTEST_CASES=$cases PROPTEST_RNG_SEED=$seed ($((deadline - SECONDS)) s left)"
    status=0
    PROPTEST_CASES=$cases PROPTEST_RNG_SEED=$seed timeout "$((deadline - SECONDS))" \
        cargo test -q "${targets[@]}" -- fuzz_ >"$log" 2>&1 || status=$?
    if ((status == 124)); then
        say "time is up in the middle of round $((rounds + 1)); its cases are not counted"
        break
    elif ((status != 0)); then
        # The failing tests and their shrunk inputs, without the backtraces.
        awk '/panicked at|^Test failed|^error/ {print} /minimal failing input/ {p = 1}
             p {print} /successes:/ {p = 0}' "$log" >&2
        say "FAILED in round $((rounds + 1)) (seed $seed). Reproduce with:"
        say "  PROPTEST_CASES=$cases PROPTEST_RNG_SEED=$seed cargo test ${targets[*]} -- fuzz_"
        say "The seed of the shrunk case is saved in (commit it with the fix):"
        git status --short --untracked-files=all -- '*proptest-regressions*' >&2 || true
        exit 1
    fi
    rounds=$((rounds + 1))
    tests=$(grep -oE '[0-9]+ passed' "$log" | awk '{n += $1} END {print n + 0}')
    total=$((total + tests * cases))
done
say "fuzzing done: $rounds complete rounds, $total cases in ${seconds} s, no failures"
((rounds > 0)) || say "no round completed: give it more time or lower FUZZ_CASES"
