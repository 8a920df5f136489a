#!/usr/bin/env bash
# Runs FastChat's standard load scenarios against the local cluster and prints a summary.
#
#   scripts/loadtest.sh            the standard scenarios (a few minutes)
#   scripts/loadtest.sh --quick    a ~20-second version
#
# Uses the cluster scripts/run.sh runs (starting it, with release binaries, if it is
# not running). Every scenario prints one JSON line; they are collected in
# $FASTCHAT_HOME/loadtest/<time>.jsonl. The first line is PostgreSQL's own ceiling for
# the message lifecycle on the same cluster, for comparison.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"
export FASTCHAT_HOME=${FASTCHAT_HOME:-$ROOT/.fastchat}

quick=0
case "${1:-}" in
--quick) quick=1 ;;
"") ;;
*) die "usage: scripts/loadtest.sh [--quick]" ;;
esac

# Its simulated people all come from 127.0.0.1 (see raise_per_address_limits).
raise_per_address_limits

say "making sure the cluster runs (release build; a cluster already running keeps its limits)"
scripts/run.sh start >/dev/null
load_tool ""
out=$OUT

run() {
    say "scenario: $*"
    "$LOAD" --home "$FASTCHAT_HOME" --json "$@" | tail -n 1 | tee -a "$out"
}

# Runs an idle scenario with relay-1 alone, freshly started (so its memory is the
# sessions', not what earlier scenarios left in its allocator), then starts the others
# again.
idle_on_one_relay() {
    local name n others=()
    for name in $(relays_in "$FASTCHAT_HOME/run"); do
        [ "$name" = relay-1 ] || others+=("${name#relay-}")
    done
    for n in "${others[@]}"; do scripts/run.sh stop-relay "$n" >/dev/null; done
    scripts/run.sh stop-relay 1 >/dev/null
    scripts/run.sh start-relay 1 >/dev/null
    local rc=0
    run idle "$@" || rc=$?
    for n in "${others[@]}"; do scripts/run.sh start-relay "$n" >/dev/null; done
    return "$rc"
}

if [ "$quick" = 1 ]; then
    run pg-ceiling --seconds 2
    run direct --users 20 --seconds 3
    run direct --users 20 --seconds 2 --rate 2000
    run group --groups 1 --members 50 --seconds 2
    run drain --messages 10000
    run logins --users 20 --sessions 5
    run logins --users 20 --sessions 5 --direct
    idle_on_one_relay --users 20 --sessions 50 --seconds 1
else
    run pg-ceiling --seconds 10
    run direct --users 100 --seconds 15
    run ring --users 100 --seconds 15
    for rate in 1000 5000 10000 15000 25000; do
        run direct --users 100 --seconds 8 --rate "$rate"
    done
    run group --groups 2 --members 100 --seconds 10
    run group --groups 2 --members 100 --seconds 8 --rate 250
    run drain --messages 100000
    run logins --users 100 --sessions 100
    # The reconnect storm's path: credentials straight to the relays, one handshake.
    run logins --users 100 --sessions 100 --direct
    # One relay holding as many clients as its descriptor limit (20,000 here) allows:
    # the other relays stop for this scenario, and the driver's sessions are spread
    # over child processes (each has the same limit).
    idle_on_one_relay --users 100 --sessions 195 --seconds 3
fi

say "results: $out"
python3 - "$out" <<'PY' 2>/dev/null || cat "$out"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'scenario':<14} {'pace / size':<22} {'msgs/s':>9} {'p50':>7} {'p99':>7} {'lost':>5} {'cpu µs/msg':>10}")
for r in rows:
    if r["scenario"] == "pg-ceiling":
        print(f"{'pg-ceiling':<14} {'batch ' + str(r['batch']):<22} {r['rows_per_s']:>9.0f}")
        continue
    d = r.get("details", {})
    what = d.get("pace") or (f"{d.get('connections')} conns" if "connections" in d else "") or (f"{d.get('sessions')} sessions" if "sessions" in d else "") or (f"{d.get('queued')} queued" if "queued" in d else "")
    if r["scenario"].startswith("logins"):
        rate = d.get("logins_per_s", 0)
    else:
        rate = r["msgs_per_s"]
    lat = r["latency_ms"]
    extra = f"  {d['relay_bytes_per_connection']:.0f} B/conn" if "relay_bytes_per_connection" in d else ""
    print(f"{r['scenario']:<14} {what:<22} {rate:>9.0f} {lat['p50']:>7.2f} {lat['p99']:>7.2f} {r['lost']:>5} {r['server_cpu_us_per_msg']:>10.1f}{extra}")
PY
