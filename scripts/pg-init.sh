#!/usr/bin/env bash
# Initialise a PostgreSQL data directory for otelspans once: initdb, listen address,
# password-less local access, and the extension in the default database.  Idempotent: a
# directory that already holds a cluster is left as it is.  Run as the postgres user.
#
#   scripts/pg-init.sh DATADIR
#
# Environment: OTELSPANS_LISTEN (listen_addresses, default localhost), PGPORT (default 5432),
# OTELSPANS_AUTH (auth method for remote hosts, default scram-sha-256; "trust" for demos).
set -euo pipefail
datadir=${1:?usage: pg-init.sh DATADIR}
bindir=${OTELSPANS_PG_BINDIR:-/usr/lib/postgresql/15/bin}
port=${PGPORT:-5432}

if [ -f "$datadir/PG_VERSION" ]; then
    echo "pg-init: $datadir already holds a cluster"
    exit 0
fi

"$bindir/initdb" -D "$datadir" -U postgres -E UTF8 --locale=C.UTF-8 -A trust >/dev/null
cat >>"$datadir/postgresql.conf" <<CONF
listen_addresses = '${OTELSPANS_LISTEN:-localhost}'
port = $port
CONF
echo "host all all all ${OTELSPANS_AUTH:-scram-sha-256}" >>"$datadir/pg_hba.conf"

# One start to create the extension, then stop: the caller runs the server its own way.
"$bindir/pg_ctl" -D "$datadir" -o "-c listen_addresses='' -k $datadir" -w start >/dev/null
"$bindir/psql" -h "$datadir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
    -c "CREATE EXTENSION IF NOT EXISTS otelspans"
"$bindir/pg_ctl" -D "$datadir" -w stop >/dev/null
echo "pg-init: initialised $datadir"
