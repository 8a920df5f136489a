#!/usr/bin/env bash
# Private PostgreSQL cluster for FastChat: scripts/pg.sh start|stop|status|url
#
#   FASTCHAT_HOME      state directory (default <repo>/.fastchat)
#   FASTCHAT_PG_PORT   TCP port on 127.0.0.1 (default 54329)
#
# Data dir (also the unix socket dir): $FASTCHAT_HOME/pg. As root, PostgreSQL runs as
# the `postgres` user; when that user cannot reach FASTCHAT_HOME (e.g. under /root) the
# cluster lives in /var/tmp/fastchat-pg-<hash> instead, recorded in $FASTCHAT_HOME/pg.location.
# Superuser `fastchat`, password in $FASTCHAT_HOME/pg.password (0600), database `fastchat`.
# Server log: $FASTCHAT_HOME/pg.log. `url` prints a libpq key=value connection string.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOME_DIR=${FASTCHAT_HOME:-$(repo_root)/.fastchat}
PORT=${FASTCHAT_PG_PORT:-54329}
mkdir -p "$HOME_DIR"
HOME_DIR=$(cd "$HOME_DIR" && pwd -P)
PWFILE=$HOME_DIR/pg.password
LOG=$HOME_DIR/pg.log
IS_ROOT=$([ "$(id -u)" -eq 0 ] && echo 1 || echo 0)

# Where the data dir lives: recorded location, else $HOME_DIR/pg when the server's user
# can reach it, else a /var/tmp dir named after a hash of HOME_DIR.
cluster_dir() {
    if [ -s "$HOME_DIR/pg.location" ]; then
        cat "$HOME_DIR/pg.location"
    elif [ "$IS_ROOT" = 0 ] || ! id -u postgres >/dev/null 2>&1 ||
        runuser -u postgres -- test -x "$HOME_DIR" 2>/dev/null; then
        echo "$HOME_DIR/pg"
    else
        echo "/var/tmp/fastchat-pg-$(printf '%s' "$HOME_DIR" | sha256sum | cut -c1-16)"
    fi
}

# Live processes working in DATA: the postmaster and its backends (they chdir there).
# Zombies have no cwd, so a killed server whose parent never reaped it does not count.
cluster_pids() {
    find /proc/[0-9]*/cwd -maxdepth 0 -lname "$(readlink -f "$DATA")" 2>/dev/null |
        cut -d/ -f3 || true
}

# PID of the postmaster serving DATA, if it is running. The PID in postmaster.pid alone
# proves nothing after a crash: it may be a zombie or reused by another process.
server_pid() {
    local pid
    pid=$(head -n1 "$DATA/postmaster.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && grep -qx "$pid" <<<"$(cluster_pids)" || return 1
    echo "$pid"
}

# Port the running server listens on (line 4 of postmaster.pid).
server_port() { sed -n 4p "$DATA/postmaster.pid"; }

password() {
    [ -s "$PWFILE" ] || die "no $PWFILE; run scripts/pg.sh start first"
    cat "$PWFILE"
}

psql_tcp() {
    PGPASSWORD=$(password) "$BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PORT" -U fastchat "$@"
}

# Makes the (empty) data dir, owned by whoever will run the server.
make_data_dir() {
    if [ "$IS_ROOT" = 1 ]; then
        if [ "$DATA" != "$HOME_DIR/pg" ]; then
            # /var/tmp is world-writable: refuse anything someone else planted there.
            if [ -L "$DATA" ] || { [ -e "$DATA" ] && [ "$(stat -c %F:%U "$DATA")" != directory:postgres ]; }; then
                die "$DATA exists but is not a postgres-owned directory"
            fi
            echo "$DATA" >"$HOME_DIR/pg.location"
            say "postgres cannot reach $HOME_DIR; cluster goes in $DATA"
        fi
        install -d -o postgres -g postgres -m 700 "$DATA"
    else
        install -d -m 700 "$DATA"
    fi
}

init_cluster() {
    if [ -f "$DATA/PG_VERSION" ]; then
        [ -s "$PWFILE" ] || die "cluster $DATA exists but $PWFILE is gone; delete $DATA to start afresh"
        return 0
    fi
    if [ ! -s "$PWFILE" ]; then
        say "generating database password in $PWFILE"
        (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$PWFILE.tmp")
        mv "$PWFILE.tmp" "$PWFILE"
    fi
    chmod 600 "$PWFILE"
    make_data_dir
    say "initialising PostgreSQL cluster in $DATA"
    # initdb runs as postgres, which cannot read our 0600 password file: hand it a copy.
    local pw_copy rc=0
    pw_copy=$(mktemp)
    cat "$PWFILE" >"$pw_copy"
    if [ "$IS_ROOT" = 1 ]; then chown postgres "$pw_copy"; fi
    as_pg_user "$BIN/initdb" -D "$DATA" -U fastchat --auth=scram-sha-256 \
        --pwfile="$pw_copy" -E UTF8 --locale=C >>"$LOG" 2>&1 || rc=$?
    rm -f "$pw_copy"
    if [ "$rc" -ne 0 ]; then
        tail -n 20 "$LOG" >&2
        die "initdb failed (log: $LOG)"
    fi
    # A unix socket path is limited to ~107 bytes; without one we still have TCP.
    local sockdir=$DATA
    if [ ${#sockdir} -gt 90 ]; then
        say "socket path too long; unix socket disabled (TCP only)"
        sockdir=
    fi
    as_pg_user tee -a "$DATA/postgresql.conf" >/dev/null <<EOF

# FastChat private cluster (scripts/pg.sh); the port is given at start.
listen_addresses = '127.0.0.1'
unix_socket_directories = '${sockdir//\'/\'\'}'
max_connections = 200
fsync = on
synchronous_commit = on
EOF
}

start() {
    local pid
    init_cluster
    if pid=$(server_pid); then
        [ "$(server_port)" = "$PORT" ] ||
            die "PostgreSQL is running on port $(server_port), not $PORT; stop it first"
        say "PostgreSQL already running (pid $pid, 127.0.0.1:$PORT)"
    else
        # After a kill -9, orphaned backends exit within moments; once none is left the old
        # lock files are stale (postgres itself would trust a zombie or reused PID in them).
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            [ -z "$(cluster_pids)" ] && break
            sleep 0.5
        done
        [ -z "$(cluster_pids)" ] || die "old server processes still use $DATA: $(cluster_pids | xargs)"
        if [ -e "$DATA/postmaster.pid" ]; then
            say "removing stale lock files"
            rm -f "$DATA/postmaster.pid" "$DATA"/.s.PGSQL.*
        fi
        say "starting PostgreSQL on 127.0.0.1:$PORT (log: $LOG)"
        # The server inherits our log fd: postgres may be unable to open a path in HOME_DIR.
        echo "--- pg.sh start $(date -u +%FT%TZ)" >>"$LOG"
        # Tuned for a message queue (durability untouched: fsync and synchronous
        # commits stay on). autovacuum looks at each database every 5 s instead of
        # every minute, since the queue makes dead rows by the tens of thousands per
        # second. Checkpoints come every ~2 GB of WAL (or 15 minutes), not every
        # ~0.5 GB (under a minute of full load): each one is followed by a burst of
        # full-page images in the WAL. The buffer cache holds the hot queue pages.
        # See BENCHMARKS.md.
        local tuning="-c autovacuum_naptime=5s -c max_wal_size=4GB -c checkpoint_timeout=15min"
        tuning+=" -c shared_buffers=512MB"
        # More settings for an experiment, e.g. FASTCHAT_PG_OPTIONS="-c commit_delay=100".
        tuning+=" ${FASTCHAT_PG_OPTIONS:-}"
        if ! as_pg_user "$BIN/pg_ctl" -D "$DATA" -o "-p $PORT $tuning" \
            -w -t 60 start >>"$LOG" 2>&1; then
            tail -n 20 "$LOG" >&2
            die "PostgreSQL did not start (log: $LOG)"
        fi
    fi
    local have_db
    have_db=$(psql_tcp -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'fastchat'")
    if [ -z "$have_db" ]; then
        say "creating database fastchat"
        psql_tcp -d postgres -c 'CREATE DATABASE fastchat OWNER fastchat'
    fi
}

stop() {
    if server_pid >/dev/null; then
        say "stopping PostgreSQL"
        as_pg_user "$BIN/pg_ctl" -D "$DATA" -m fast -w -s stop
    else
        say "PostgreSQL not running"
    fi
}

status() {
    local pid
    if pid=$(server_pid); then
        echo "PostgreSQL: running, pid $pid, 127.0.0.1:$(server_port), data $DATA"
    else
        echo "PostgreSQL: not running (data $DATA)"
        return 3
    fi
}

url() {
    echo "host=127.0.0.1 port=$PORT user=fastchat password=$(password) dbname=fastchat"
}

case "${1:-}" in
start | stop)
    # Find (or install) PostgreSQL first: installing creates the postgres user that
    # cluster_dir checks.
    BIN=$(pg_bin_dir)
    DATA=$(cluster_dir)
    "$1"
    ;;
status)
    DATA=$(cluster_dir)
    status
    ;;
url) url ;;
*) die "usage: scripts/pg.sh start|stop|status|url" ;;
esac
