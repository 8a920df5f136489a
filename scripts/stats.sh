#!/usr/bin/env bash
# Prints the running cluster's figures: the auth server's, then each relay's (clients,
# auth and mesh link state, messages received / delivered / forwarded, batch size,
# commit latency, queue depth). `--json` prints one JSON object instead.
#
#   scripts/stats.sh [--json]     (same as scripts/run.sh stats)
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" stats "$@"
