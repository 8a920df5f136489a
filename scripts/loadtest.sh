#!/usr/bin/env bash
# Runs FastChat's standard load scenarios against the local cluster and prints a summary.
#
#   scripts/loadtest.sh            the standard scenarios (a few minutes)
#   scripts/loadtest.sh --quick    a ~20-second version
#   scripts/loadtest.sh --sweep    direct messages at rising open-loop rates until the
#                                  p99 passes 100 ms (or the driver cannot keep up)
#   scripts/loadtest.sh --plot FILE.jsonl
#                                  only draws FILE.jsonl's chart (FILE.png)
#
# The standard run and the sweep end with a chart: p50 and p99 latency and server CPU
# per message against offered load, from the open-loop direct scenarios, as a PNG
# beside the JSON lines (gnuplot; installed with apt-get if missing).
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

# Draws the chart of JSON lines $1 into $2.
plot() {
    local jsonl=$1 png=$2 data
    command -v gnuplot >/dev/null || apt_install gnuplot-nox
    data=$(mktemp)
    # Offered rate, p50, p99, server CPU µs per message, the driver's p99 lateness.
    python3 - "$jsonl" >"$data" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    if not line.strip():
        continue
    r = json.loads(line)
    pace = r.get("details", {}).get("pace", "")
    if r.get("scenario") != "direct" or not pace.startswith("open "):
        continue
    rate = float(pace.split()[1].rstrip("/s"))
    late = ((r.get("driver") or {}).get("lateness_ms") or {}).get("p99", 0)
    lat = r["latency_ms"]
    rows.append((rate, lat["p50"], lat["p99"], r["server_cpu_us_per_msg"], late))
for row in sorted(rows):
    print(*row)
PY
    if [ ! -s "$data" ]; then
        rm -f "$data"
        say "no open-loop direct scenario in $jsonl: no chart"
        return 0
    fi
    gnuplot <<GP
set terminal pngcairo size 1100,620 font "DejaVu Sans,11"
set output "$png"
set title "FastChat direct messages: latency and server CPU per message against offered load\n($(basename "$jsonl" .jsonl))"
set xlabel "offered load (messages per second)"
set ylabel "latency (ms)"
set y2label "server CPU per delivered message (µs)"
set logscale y
set logscale y2
set ytics nomirror
set y2tics
set grid
set key top left
set format x "%.0s%c"
plot "$data" using 1:2 with linespoints lw 2 pt 7 title "p50", \
     "" using 1:3 with linespoints lw 2 pt 5 title "p99", \
     "" using 1:(\$5 > 0.01 ? \$5 : 1/0) with points pt 2 title "driver lateness p99 (ms)", \
     "" using 1:4 axes x1y2 with linespoints lw 2 dt 2 pt 9 title "server CPU µs/message (right)"
GP
    rm -f "$data"
    say "chart: $png"
}

quick=0
sweep=0
case "${1:-}" in
--quick) quick=1 ;;
--sweep) sweep=1 ;;
--plot)
    [ -f "${2:-}" ] || die "usage: scripts/loadtest.sh --plot FILE.jsonl"
    plot "$2" "${2%.jsonl}.png"
    exit 0
    ;;
"") ;;
*) die "usage: scripts/loadtest.sh [--quick | --sweep | --plot FILE.jsonl]" ;;
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

if [ "$sweep" = 1 ]; then
    # A warm-up (not recorded): the first seconds after a start are slower.
    say "warming up"
    "$LOAD" --home "$FASTCHAT_HOME" --json direct --users 100 --seconds 5 --rate 5000 >/dev/null
    over=0
    for rate in 500 1000 2000 5000 10000 15000 20000 25000 30000 35000 40000 50000; do
        # A pause, so that what the last run left (acknowledgements, autovacuum) is not
        # this one's.
        sleep 3
        line=$(run direct --users 100 --seconds 8 --rate "$rate")
        # Up to saturation: where the p99 passes 100 ms (twice in a row, so that one
        # noisy run on a shared machine does not end the sweep).
        if python3 -c 'import json,sys; sys.exit(json.loads(sys.argv[1])["latency_ms"]["p99"] <= 100)' "$line"; then
            over=$((over + 1))
            [ "$over" -ge 2 ] && break
        else
            over=0
        fi
    done
    # Last: its burst of WAL would be checkpointed during the runs after it.
    run pg-ceiling --seconds 5
elif [ "$quick" = 1 ]; then
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
[ "$quick" = 1 ] || plot "$out" "${out%.jsonl}.png"
python3 - "$out" <<'PY' 2>/dev/null || cat "$out"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'scenario':<14} {'pace / size':<22} {'msgs/s':>9} {'p50':>7} {'p99':>7} {'lost':>5} {'cpu µs/msg':>10} {'driver':>7} {'late p99':>8}")
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
    drv = r.get("driver") or {}
    late = (drv.get("lateness_ms") or {}).get("p99")
    late = f"{late:>8.2f}" if late is not None else f"{'-':>8}"
    share = f"{100 * (drv.get('cpu_share') or 0):>6.0f}%"
    print(f"{r['scenario']:<14} {what:<22} {rate:>9.0f} {lat['p50']:>7.2f} {lat['p99']:>7.2f} {r['lost']:>5} {r['server_cpu_us_per_msg']:>10.1f} {share} {late}{extra}")
PY
