#!/usr/bin/env bash
# Runs a local FastChat network: a private PostgreSQL, the auth server and relays.
#
#   scripts/run.sh [start]        build (release) and start everything; safe to repeat
#   scripts/run.sh stop           stop the relays, the auth server and PostgreSQL
#   scripts/run.sh status         what is running, with PIDs, ports, clients and links
#   scripts/run.sh stats [--json] the cluster's figures (clients, messages, batches, links)
#   scripts/run.sh start-relay N  start relay N alone (no build), e.g. after stop-relay
#   scripts/run.sh stop-relay N   stop relay N alone (SIGTERM: a graceful stop)
#   scripts/run.sh kill-relay N   SIGKILL relay N (a crash), e.g. to demo failover
#   scripts/run.sh stop-auth      stop the auth server alone; start-auth starts it again
#
# Environment (defaults in brackets):
#   FASTCHAT_HOME             state: database, keys, logs, PID files [<repo>/.fastchat]
#   FASTCHAT_PG_PORT          private PostgreSQL on 127.0.0.1 [54329]
#   FASTCHAT_AUTH_PORT        auth server port for clients [7400]
#   FASTCHAT_AUTH_RELAY_PORT  auth server port for the relays' control links [7401]
#   FASTCHAT_AUTH_STATS_PORT  auth server port for `stats` (the stats secret) [7402]
#   FASTCHAT_RELAY_PORT       relay 1's port for clients; relay N uses this + N - 1 [7410]
#   FASTCHAT_RELAY_MESH_PORT  relay 1's port for other relays; relay N uses this + N - 1
#                             [7420] (each relay's stats port is any free one, announced)
#   RELAYS                    how many relays `start` runs [2]
#   FASTCHAT_PROFILE          which build to run, release or debug [release]
#   FASTCHAT_LOG              server log level: error, warn, info, debug [info]
#
# In FASTCHAT_HOME: logs/auth.log, logs/relay-N.log, run/auth.pid, run/relay-N.pid,
# keys/ (server key pairs, created by the servers), cluster.secret (shared by all
# servers), stats.secret (read-only: what `stats` uses), plus PostgreSQL's files (see
# scripts/pg.sh).
set -euo pipefail
shopt -s nullglob
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(repo_root)
FASTCHAT_HOME=${FASTCHAT_HOME:-$ROOT/.fastchat}
mkdir -p "$FASTCHAT_HOME"
FASTCHAT_HOME=$(cd "$FASTCHAT_HOME" && pwd -P)
export FASTCHAT_HOME
export FASTCHAT_LOG=${FASTCHAT_LOG:-info}
AUTH_PORT=${FASTCHAT_AUTH_PORT:-7400}
AUTH_RELAY_PORT=${FASTCHAT_AUTH_RELAY_PORT:-7401}
AUTH_STATS_PORT=${FASTCHAT_AUTH_STATS_PORT:-7402}
RELAY_PORT=${FASTCHAT_RELAY_PORT:-7410}
RELAY_MESH_PORT=${FASTCHAT_RELAY_MESH_PORT:-7420}
RELAYS=${RELAYS:-2}
PG=$ROOT/scripts/pg.sh
PROFILE=${FASTCHAT_PROFILE:-release}
case $PROFILE in
release | debug) ;;
*) die "FASTCHAT_PROFILE must be release or debug, got '$PROFILE'" ;;
esac
BIN=$ROOT/target/$PROFILE
LOGS=$FASTCHAT_HOME/logs
RUN=$FASTCHAT_HOME/run
KEYS=$FASTCHAT_HOME/keys
SECRET=$FASTCHAT_HOME/cluster.secret
STATS_SECRET=$FASTCHAT_HOME/stats.secret
WAIT_SECONDS=30

relay_port() { echo $((RELAY_PORT + $1 - 1)); }
mesh_port() { echo $((RELAY_MESH_PORT + $1 - 1)); }
program_of() { case $1 in auth) echo fastchat-auth ;; *) echo fastchat-relay ;; esac }

# PID in run/NAME.pid if that process is alive and still our program: PIDs get reused,
# and a killed process nobody reaped lingers as a zombie.
live_pid() {
    local pid
    pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(program_of "$1")" ] || return 1
    echo "$pid"
}

# Whether PID is alive (a zombie is not).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat:0:1}" != Z ]
}


# Reports a server that failed to come up, with the end of its log, and exits. The PID
# file goes (a hung server is stopped first) so that the next start tries again.
fail_with_log() {
    local name=$1 pid=$2
    say "error: $3; last lines of $LOGS/$name.log:"
    tail -n 20 "$LOGS/$name.log" >&2
    if alive "$pid"; then stop_process "$name"; fi
    rm -f "$RUN/$name.pid"
    exit 1
}

# Polls CHECK... until it succeeds; fails with NAME's log if NAME (process PID) dies or
# time runs out. (Not live_pid: just after launch the process may still be nohup.)
wait_until() {
    local name=$1 pid=$2 what=$3 deadline=$((SECONDS + WAIT_SECONDS))
    shift 3
    until "$@"; do
        alive "$pid" || fail_with_log "$name" "$pid" "$name exited before $what"
        ((SECONDS < deadline)) || fail_with_log "$name" "$pid" "$name: no $what after ${WAIT_SECONDS}s"
        sleep 0.2
    done
}

# Starts NAME (PROGRAM with ENV...) in the background, logging to logs/NAME.log.
# Sets LAUNCHED_PID, and LOG_OFFSET to the log's size beforehand: later checks read only
# the lines this run writes.
launch() {
    local name=$1 program=$2 log=$LOGS/$1.log
    shift 2
    [ -x "$BIN/$program" ] || die "$BIN/$program missing; run scripts/run.sh start (it builds)"
    echo "--- run.sh start $(date -u +%FT%TZ)" >>"$log"
    LOG_OFFSET=$(stat -c %s "$log")
    env "$@" nohup "$BIN/$program" >>"$log" 2>&1 </dev/null &
    LAUNCHED_PID=$!
    disown "$LAUNCHED_PID" # no "Killed" job notices from this shell
    echo "$LAUNCHED_PID" >"$RUN/$name.pid"
}

refuse_taken_port() {
    if port_open "$1"; then die "port $1 is taken by another process"; fi
}

prepare_home() {
    mkdir -p "$LOGS" "$RUN"
    install -d -m 700 "$KEYS"
    local file
    for file in "$SECRET" "$STATS_SECRET"; do
        if [ ! -s "$file" ]; then
            say "generating $file"
            (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file.tmp")
            mv "$file.tmp" "$file"
        fi
        chmod 600 "$file"
    done
}

start_auth() {
    local pid db_url
    if pid=$(live_pid auth); then
        say "auth server already running (pid $pid)"
    else
        refuse_taken_port "$AUTH_PORT"
        refuse_taken_port "$AUTH_RELAY_PORT"
        refuse_taken_port "$AUTH_STATS_PORT"
        db_url=$("$PG" url)
        say "starting auth server on 127.0.0.1:$AUTH_PORT (relays: $AUTH_RELAY_PORT)"
        launch auth fastchat-auth \
            FASTCHAT_AUTH_LISTEN="127.0.0.1:$AUTH_PORT" \
            FASTCHAT_AUTH_RELAY_LISTEN="127.0.0.1:$AUTH_RELAY_PORT" \
            FASTCHAT_DB_URL="$db_url" \
            FASTCHAT_AUTH_KEY="$KEYS/auth.key" \
            FASTCHAT_SECRET_FILE="$SECRET" \
            FASTCHAT_STATS_SECRET_FILE="$STATS_SECRET" \
            FASTCHAT_STATS_LISTEN="127.0.0.1:$AUTH_STATS_PORT"
        pid=$LAUNCHED_PID
    fi
    wait_until auth "$pid" "listening port $AUTH_PORT" port_open "$AUTH_PORT"
}

relay_registered() { grep -q 'registered with auth server' <(tail -c "+$(($2 + 1))" "$LOGS/$1.log"); }

start_relay() {
    local n=$1 name=relay-$1 port mport pid db_url
    port=$(relay_port "$n")
    mport=$(mesh_port "$n")
    if pid=$(live_pid "$name"); then
        say "$name already running (pid $pid, 127.0.0.1:$port)"
        return 0
    fi
    refuse_taken_port "$port"
    refuse_taken_port "$mport"
    db_url=$("$PG" url)
    say "starting $name on 127.0.0.1:$port (mesh: $mport)"
    launch "$name" fastchat-relay \
        FASTCHAT_RELAY_ID="$name" \
        FASTCHAT_RELAY_LISTEN="127.0.0.1:$port" \
        FASTCHAT_RELAY_MESH_LISTEN="127.0.0.1:$mport" \
        FASTCHAT_AUTH_RELAY_ADDR="127.0.0.1:$AUTH_RELAY_PORT" \
        FASTCHAT_DB_URL="$db_url" \
        FASTCHAT_RELAY_KEY="$KEYS/$name.key" \
        FASTCHAT_SECRET_FILE="$SECRET" \
        FASTCHAT_STATS_SECRET_FILE="$STATS_SECRET" \
        FASTCHAT_STATS_LISTEN=127.0.0.1:0
    wait_until "$name" "$LAUNCHED_PID" "'registered with auth server' in its log" \
        relay_registered "$name" "$LOG_OFFSET"
    say "$name registered with the auth server"
}

# Stops NAME: SIGTERM, up to 10 s grace, then SIGKILL.
stop_process() {
    local name=$1 pid i
    if pid=$(live_pid "$name"); then
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            live_pid "$name" >/dev/null || break
            sleep 0.2
        done
        if live_pid "$name" >/dev/null; then
            say "$name still running after 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    else
        say "$name not running"
    fi
    rm -f "$RUN/$name.pid"
}

# Relay names with a PID file, in numeric order.
known_relays() { relays_in "$RUN"; }

relay_number() {
    [[ ${1:-} =~ ^[1-9][0-9]*$ ]] || die "usage: scripts/run.sh ${2:-start-relay} N (N = 1, 2, ...)"
    echo "$1"
}

print_usage_hint() {
    local client=target/release/fastchat run=scripts/run.sh relays=() name
    if [ "$PWD" != "$ROOT" ]; then
        client=$BIN/fastchat
        run=$ROOT/scripts/run.sh
    fi
    for name in $(known_relays); do
        live_pid "$name" >/dev/null && relays+=("127.0.0.1:$(relay_port "${name#relay-}")")
    done
    # The client's default server is 127.0.0.1:7400; anything else goes in the hint.
    if [ "$AUTH_PORT" != 7400 ]; then
        client="$client --server 127.0.0.1:$AUTH_PORT"
    fi
    cat <<EOF
FastChat is running: auth 127.0.0.1:$AUTH_PORT, relays ${relays[*]:-none}
Chat in the terminal UI (in two terminals; it offers to register a new name):
  $client --user alice
  $client --user bob          then type: /msg alice hello
Or with the scriptable commands:
  $client --user alice register
  $client --user bob register
  $client --user alice send --to bob 'hello'
  $client --user bob read --wait 30
Logs: $LOGS
Stop everything: $run stop
EOF
}

cmd_start() {
    [[ $RELAYS =~ ^[0-9]+$ ]] || die "RELAYS must be a number, got '$RELAYS'"
    "$PG" start
    say "building $PROFILE binaries"
    if [ "$PROFILE" = release ]; then
        (cd "$ROOT" && cargo build --release --bins)
    else
        (cd "$ROOT" && cargo build --bins)
    fi
    prepare_home
    start_auth
    for ((n = 1; n <= RELAYS; n++)); do
        start_relay "$n"
    done
    print_usage_hint
}

cmd_status() {
    local pid name
    "$PG" status || true
    if pid=$(live_pid auth); then
        echo "auth: running, pid $pid, 127.0.0.1:$AUTH_PORT (clients), 127.0.0.1:$AUTH_RELAY_PORT (relays)"
    else
        echo "auth: not running"
    fi
    for name in $(known_relays); do
        if pid=$(live_pid "$name"); then
            echo "$name: running, pid $pid, 127.0.0.1:$(relay_port "${name#relay-}") (mesh: $(mesh_port "${name#relay-}"))"
        else
            echo "$name: not running (stale PID file)"
        fi
    done
    if live_pid auth >/dev/null; then
        echo
        cluster_stats || true
    fi
}

# The cluster's figures, from the running auth server and relays.
cluster_stats() {
    [ -x "$BIN/fastchat-auth" ] || die "$BIN/fastchat-auth is missing: run scripts/run.sh first"
    FASTCHAT_STATS_LISTEN="127.0.0.1:$AUTH_STATS_PORT" FASTCHAT_STATS_SECRET_FILE="$STATS_SECRET" \
        "$BIN/fastchat-auth" stats "$@"
}

cmd_stop() {
    local name
    for name in $(known_relays); do
        stop_process "$name"
    done
    stop_process auth
    "$PG" stop
}

case "${1:-start}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
stats)
    shift
    cluster_stats "$@"
    ;;
start-relay)
    n=$(relay_number "${2:-}" start-relay)
    live_pid auth >/dev/null || die "the auth server is not running; start everything with scripts/run.sh"
    prepare_home
    start_relay "$n"
    ;;
stop-relay)
    n=$(relay_number "${2:-}" stop-relay)
    stop_process "relay-$n"
    ;;
kill-relay)
    n=$(relay_number "${2:-}" kill-relay)
    if pid=$(live_pid "relay-$n"); then
        say "killing relay-$n (pid $pid)"
        kill -KILL "$pid"
    else
        say "relay-$n not running"
    fi
    rm -f "$RUN/relay-$n.pid"
    ;;
start-auth)
    prepare_home
    start_auth
    ;;
stop-auth) stop_process auth ;;
*) die "usage: scripts/run.sh [start|stop|status|stats [--json]|start-relay N|stop-relay N|kill-relay N|start-auth|stop-auth]" ;;
esac
