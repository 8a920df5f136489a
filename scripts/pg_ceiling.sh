#!/usr/bin/env bash
# PostgreSQL's own ceiling for the message lifecycle on the cluster scripts/pg.sh runs,
# measured with pgbench (it ships with PostgreSQL) and scripts/pg_ceiling.sql.
#
#   scripts/pg_ceiling.sh [--seconds S] [--connections C] [--batch B]
#
# Prints one JSON line: {"scenario":"pg-ceiling","connections":C,"batch":B,
# "rows_per_s":R}, R being pgbench's transactions per second × B (one transaction of
# the script = one batch stored and deleted). The table load_ceiling is made afresh
# and dropped after.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(repo_root)

seconds=10 connections=4 batch=100
while [ $# -gt 0 ]; do
    case "$1" in
    --seconds) seconds=${2:?}; shift 2 ;;
    --connections) connections=${2:?}; shift 2 ;;
    --batch) batch=${2:?}; shift 2 ;;
    *) die "usage: scripts/pg_ceiling.sh [--seconds S] [--connections C] [--batch B]" ;;
    esac
done
for v in "$seconds" "$connections" "$batch"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "--seconds, --connections and --batch take whole numbers above 0"
done

url=$("$ROOT/scripts/pg.sh" url)
bin=$(pg_bin_dir)
"$bin/psql" -q -X -v ON_ERROR_STOP=1 "$url" -c "
    DROP TABLE IF EXISTS load_ceiling;
    CREATE TABLE load_ceiling (
        recipient_id bigint NOT NULL, id bigserial NOT NULL, sender_id bigint NOT NULL,
        body text NOT NULL, sent_at_ms bigint NOT NULL, PRIMARY KEY (recipient_id, id))"
report=$("$bin/pgbench" -n -f "$ROOT/scripts/pg_ceiling.sql" -D "batch=$batch" \
    -c "$connections" -j "$(( connections < 2 ? 1 : 2 ))" -T "$seconds" "$url" 2>&1) ||
    die "pgbench failed: $report"
"$bin/psql" -q -X "$url" -c "DROP TABLE IF EXISTS load_ceiling" || true
tps=$(printf '%s\n' "$report" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p')
[ -n "$tps" ] || die "no tps in pgbench's report: $report"
python3 -c 'import json, sys
c, b, tps = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
print(json.dumps({"scenario": "pg-ceiling", "connections": c, "batch": b, "rows_per_s": round(tps * b)}))' \
    "$connections" "$batch" "$tps"
