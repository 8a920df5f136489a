# shellcheck shell=bash
# Helpers shared by the FastChat scripts. Source it; it only defines functions.
#   repo_root      print the repository root
#   pg_bin_dir     print the PostgreSQL server bin dir, installing PostgreSQL if needed
#   as_pg_user     run a command as the user PostgreSQL must run as
#   ensure_tmux    install tmux if it is missing
#   port_open      whether something listens on 127.0.0.1:PORT
#   relays_in      the relays (relay-N) with a PID file in RUN_DIR, in numeric order

say() { printf '%s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

repo_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P); }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# relays_in RUN_DIR: relay-N for each run/relay-N.pid, in numeric order.
relays_in() {
    local f
    for f in "$1"/relay-*.pid; do
        [ -e "$f" ] || continue
        f=${f##*/}
        echo "${f%.pid}"
    done | sort -V
}

# Installs Debian packages without prompting; uses sudo when not root.
apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "need root or sudo to install: $*"
        sudo=(sudo)
    fi
    say "installing $* with apt-get"
    ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >&2
    ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" </dev/null >&2
}

# Highest-versioned /usr/lib/postgresql/<ver>/bin that has the server programs.
_find_pg_bin() {
    local dir
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

# Prints the PostgreSQL bin dir. FASTCHAT_PG_BIN wins when it holds initdb; otherwise
# the highest installed version; otherwise installs the distribution's postgresql.
pg_bin_dir() {
    if [ -n "${FASTCHAT_PG_BIN:-}" ] && [ -x "$FASTCHAT_PG_BIN/initdb" ]; then
        echo "$FASTCHAT_PG_BIN"
        return 0
    fi
    _find_pg_bin && return 0
    say "PostgreSQL server not found under /usr/lib/postgresql"
    apt_install postgresql
    _find_pg_bin || die "postgresql installed but no /usr/lib/postgresql/<ver>/bin/initdb"
}

# PostgreSQL refuses to run as root: as root, run the command as the `postgres` system
# user (from / so an unreadable working directory does not matter); otherwise directly.
as_pg_user() {
    if [ "$(id -u)" -eq 0 ]; then
        id -u postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user"
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

ensure_tmux() {
    command -v tmux >/dev/null && return 0
    apt_install tmux
    command -v tmux >/dev/null || die "tmux installed but not on PATH"
}

# The load tester registers and logs in all its simulated users from 127.0.0.1: far
# beyond what the servers let one address (or one user) do by default — auth: 5
# registrations and 60 password attempts a minute, 32 connections, 64 queued jobs per
# worker; relays: 32 sessions per user, 256 connections per address, and (its group
# admins fanning out to 100 members, its closed loops) 2,000 sends and 2 MiB written a
# second per user. Raised, unless already set, for the servers scripts/run.sh starts
# (they read these variables).
PER_ADDRESS_LIMITS=(
    FASTCHAT_REGISTRATIONS_PER_ADDR_PER_MINUTE=1000000
    FASTCHAT_REGISTRATIONS_PER_SECOND=1000000
    FASTCHAT_PASSWORD_ATTEMPTS_PER_ADDR_PER_MINUTE=1000000
    FASTCHAT_AUTH_MAX_CONNECTIONS_PER_ADDR=1000000
    FASTCHAT_AUTH_QUEUE_PER_WORKER=1000000
    FASTCHAT_RELAY_MAX_SESSIONS_PER_USER=1000000
    FASTCHAT_RELAY_MAX_CONNECTIONS_PER_ADDR=1000000
    FASTCHAT_SEND_RATE=1000000000
    FASTCHAT_SEND_BURST=1000000000
    FASTCHAT_SEND_BYTES_PER_SEC=1000000000000
    FASTCHAT_SEND_BYTES_BURST=1000000000000
)
raise_per_address_limits() {
    local v name
    for v in "${PER_ADDRESS_LIMITS[@]}"; do
        name=${v%%=*}
        export "$name=${!name:-${v#*=}}"
    done
}

# The servers' own defaults for those limits (scripts/abuse.sh measures under them).
default_limits() {
    local v
    for v in "${PER_ADDRESS_LIMITS[@]}"; do
        unset "${v%%=*}"
    done
}

# For the load scripts: LOAD (the release load tester), FASTCHAT_DB_URL (exported) and
# OUT, a fresh results file $FASTCHAT_HOME/loadtest/<prefix><time>.jsonl.
load_tool() {
    LOAD=$ROOT/target/release/fastchat-load
    [ -x "$LOAD" ] || die "$LOAD is missing"
    FASTCHAT_DB_URL=$(scripts/pg.sh url)
    export FASTCHAT_DB_URL
    mkdir -p "$FASTCHAT_HOME/loadtest"
    OUT=$FASTCHAT_HOME/loadtest/${1:-}$(date -u +%Y%m%dT%H%M%SZ).jsonl
    : >"$OUT"
}
