#!/usr/bin/env bash
# Container entry point.  `postgres`: initialise the cluster on first start (scripts/pg-init.sh,
# also run by the test suite), then run the server in the foreground.  Anything else runs as
# given, e.g. `otelspans serve --host 0.0.0.0`.
set -euo pipefail
if [ "${1:-}" = "postgres" ]; then
    /src/scripts/pg-init.sh "$PGDATA"
    exec postgres -D "$PGDATA"
fi
exec "$@"
