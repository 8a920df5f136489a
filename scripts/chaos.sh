#!/usr/bin/env bash
# Chaos test: people chat through a 3-relay network while servers fail around them,
# then an audit checks that every message a sender saw `sent` for was shown exactly
# once to each of its recipients.
#
#   scripts/chaos.sh           100 people, ~3 minutes of traffic (release build)
#   scripts/chaos.sh --short   30 people, ~40 s (debug build; scripts/test.sh runs it)
#
# It runs a private network of its own (a fresh PostgreSQL cluster, the auth server and
# three relays, in a temporary FASTCHAT_HOME on free ports), so it never touches the
# cluster scripts/run.sh runs. While `fastchat-load chaos` sends, it kills relays
# (SIGKILL) and stops them (SIGTERM) and starts them again, restarts PostgreSQL once and
# stops the auth server for a while. Exits non-zero if anything was lost or shown twice.
# The network is stopped at the end; its home is removed unless the run failed.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"

short=0
case "${1:-}" in
--short) short=1 ;;
"") ;;
*) die "usage: scripts/chaos.sh [--short]" ;;
esac

if [ "$short" = 1 ]; then
    export FASTCHAT_PROFILE=debug
    users=30 seconds=40 rate=1
else
    export FASTCHAT_PROFILE=${FASTCHAT_PROFILE:-release}
    users=100 seconds=180 rate=1
fi

# A base port with the 23 above it free (PostgreSQL, auth, relays, mesh).
pick_base() {
    local base p try
    for try in $(seq 1 50); do
        base=$((20000 + (RANDOM % 400) * 25))
        for p in $(seq "$base" $((base + 22))); do
            if port_open "$p"; then continue 2; fi
        done
        echo "$base"
        return 0
    done
    die "no free block of ports found"
}
base=$(pick_base)
FASTCHAT_HOME=$(mktemp -d /tmp/fastchat-chaos.XXXXXX)
export FASTCHAT_HOME RELAYS=3 FASTCHAT_LOG=${FASTCHAT_LOG:-info}
export FASTCHAT_PG_PORT=$base FASTCHAT_AUTH_PORT=$((base + 1)) FASTCHAT_AUTH_RELAY_PORT=$((base + 2))
export FASTCHAT_AUTH_STATS_PORT=$((base + 3))
export FASTCHAT_RELAY_PORT=$((base + 10)) FASTCHAT_RELAY_MESH_PORT=$((base + 20))
# Its simulated people all come from 127.0.0.1 (see raise_per_address_limits).
raise_per_address_limits
RUN=scripts/run.sh
PG=scripts/pg.sh
LOAD=$ROOT/target/$FASTCHAT_PROFILE/fastchat-load

finish() {
    local rc=$?
    say "chaos: stopping the network"
    "$RUN" stop >/dev/null 2>&1 || true
    if [ "$rc" = 0 ]; then
        # As root the cluster may live outside the home (see scripts/pg.sh).
        if [ -s "$FASTCHAT_HOME/pg.location" ]; then rm -rf "$(cat "$FASTCHAT_HOME/pg.location")"; fi
        rm -rf "$FASTCHAT_HOME"
    else
        say "chaos: failed (exit $rc); logs kept in $FASTCHAT_HOME/logs"
    fi
}
trap finish EXIT

say "chaos: network in $FASTCHAT_HOME (ports $base-$((base + 22)))"
"$RUN" start >/dev/null
[ -x "$LOAD" ] || die "$LOAD is missing"

# The driver's progress goes to a log the schedule below watches, and to our stderr.
exec 3>&2
exec 2> >(tee "$FASTCHAT_HOME/chaos.log" >&3)
"$LOAD" --server "127.0.0.1:$FASTCHAT_AUTH_PORT" --home "$FASTCHAT_HOME" \
    chaos --users "$users" --seconds "$seconds" --rate "$rate" --drain 90 &
driver=$!

# Waits until the driver has been sending for about S seconds (it needs a while to
# register and log everyone in first); gives up early if the driver ended.
started=
at() {
    local s=$1
    while [ -z "$started" ]; do
        kill -0 "$driver" 2>/dev/null || return 1
        if grep -q 'people sending for' "$FASTCHAT_HOME/chaos.log" 2>/dev/null; then
            started=$SECONDS
        else
            sleep 0.5
        fi
    done
    while ((SECONDS - started < s)); do
        kill -0 "$driver" 2>/dev/null || return 1
        sleep 0.5
    done
}
fault() { say "chaos: t+$((SECONDS - started))s: $*"; }

schedule() {
    local step=$1 # seconds between faults
    at $((step * 1)) && fault "SIGKILL relay-2" && "$RUN" kill-relay 2 >/dev/null
    at $((step * 2)) && fault "start relay-2" && "$RUN" start-relay 2 >/dev/null
    at $((step * 3)) && fault "SIGTERM relay-3" && "$RUN" stop-relay 3 >/dev/null
    at $((step * 4)) && fault "start relay-3" && "$RUN" start-relay 3 >/dev/null
    at $((step * 5)) && fault "restart PostgreSQL" && "$PG" stop >/dev/null &&
        sleep 3 && "$PG" start >/dev/null
    at $((step * 6)) && fault "stop the auth server" && "$RUN" stop-auth >/dev/null
    at $((step * 7)) && fault "start the auth server" && "$RUN" start-auth >/dev/null
    at $((step * 8)) && fault "SIGKILL relay-1" && "$RUN" kill-relay 1 >/dev/null
    at $((step * 9)) && fault "start relay-1" && "$RUN" start-relay 1 >/dev/null
}
if [ "$short" = 1 ]; then
    schedule 4 || true
else
    schedule 12 || true
    # The long run goes round again.
    at 130 && fault "SIGKILL relay-3" && "$RUN" kill-relay 3 >/dev/null || true
    at 140 && fault "start relay-3" && "$RUN" start-relay 3 >/dev/null || true
fi

rc=0
wait "$driver" || rc=$?
if [ "$rc" = 0 ]; then
    say "chaos: passed: nothing lost, nothing shown twice"
else
    say "chaos: FAILED (the audit above says what)"
fi
exit "$rc"
