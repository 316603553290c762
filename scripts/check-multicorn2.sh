#!/usr/bin/env bash
# Check the otel_spans wrapper under a real multicorn2 against our host, side by side.
#
#   scripts/check-multicorn2.sh SRC [pytest args...]
#
# SRC is a multicorn2 source tree (it is published only as source; e.g. a checkout of tag v3.2
# of github.com/pgsql-io/multicorn2).  The script copies the PostgreSQL installation that
# PG_CONFIG names (default /usr/lib/postgresql/15/bin/pg_config) into a throwaway directory,
# builds and installs multicorn2 and this repository's extension there (never into the real
# installation), and runs the compatibility tests in compat/ on a throwaway cluster of that
# copy, then multicorn2's own regression files through both hosts (compat/regress.py).
# Needs `make install` done first (the venv with otelspans_fdw and its test tools).
# Environment: VENV (default /opt/otelspans/venv), KEEP=1 keeps the throwaway directory.
set -euo pipefail
src=$(realpath "${1:?usage: check-multicorn2.sh MULTICORN2_SOURCE_TREE [pytest args...]}")
shift
here=$(cd "$(dirname "$0")/.." && pwd)
pg_config=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
venv=${VENV:-/opt/otelspans/venv}
[ -f "$src/src/multicorn.c" ] && [ -d "$src/python/multicorn" ] || {
    echo "check-multicorn2: $src is not a multicorn2 source tree (no src/multicorn.c)" >&2
    exit 2
}
[ -x "$venv/bin/python" ] || { echo "check-multicorn2: no venv at $venv; run make install" >&2; exit 2; }

work=$(mktemp -d /tmp/otelspans-mc2.XXXXXX)
chmod 755 "$work"
cleanup() { [ "${KEEP:-0}" = 1 ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT

# A relocatable copy of the PostgreSQL installation: its binaries find share/ and lib/
# relative to themselves, so installing into the copy leaves the real one untouched.
bindir=$("$pg_config" --bindir)
sharedir=$("$pg_config" --sharedir)
incdir=$(dirname "$(dirname "$("$pg_config" --includedir-server)")")
base=${bindir%/lib/postgresql/*}                 # /usr for Debian's /usr/lib/postgresql/15/bin
root="$work/pg"
for d in "$(dirname "$bindir")" "$sharedir" "$incdir"; do
    rel=${d#"$base"}
    [ "$rel" != "$d" ] || { echo "check-multicorn2: $d is not under $base" >&2; exit 2; }
    mkdir -p "$root$(dirname "$rel")"
    cp -a "$d" "$root$(dirname "$rel")/"
done
copy_config="$root${bindir#"$base"}/pg_config"
echo "== PostgreSQL copy: $("$copy_config" --version) in $root"

echo "== building multicorn2 from $src"
build="$work/multicorn2"
cp -a "$src" "$build"
# Only the C extension: multicorn2's own install target would pip-install its Python package
# system-wide; the tests put that package on the backend's PYTHONPATH instead.
make -s -C "$build" PG_CONFIG="$copy_config" PYTHON=/usr/bin/python3 PIP=true install >"$work/multicorn2-build.log" 2>&1 \
    || { tail -30 "$work/multicorn2-build.log"; exit 1; }
mkdir -p "$work/py"
cp -a "$build/python/multicorn" "$work/py/"
# Its Python package's C helper (log_to_postgres below ERROR goes through it), as its
# setup.py would build it.
gcc -shared -fPIC -O2 $(/usr/bin/python3-config --includes) \
    -I"$("$copy_config" --includedir)" -I"$("$copy_config" --pkgincludedir)" \
    -I"$("$copy_config" --includedir-server)" "$build/src/utils.c" \
    -o "$work/py/multicorn/_utils$(/usr/bin/python3-config --extension-suffix)"
grep -o "default_version = '[^']*'" "$build/multicorn.control"

echo "== building the otelspans extension into the copy"
make -s -C "$here/ext" PG_CONFIG="$copy_config" OTELSPANS_VENV="$venv" install >"$work/otelspans-build.log" 2>&1 \
    || { tail -30 "$work/otelspans-build.log"; exit 1; }
make -s -C "$here/ext" clean >/dev/null 2>&1 || true
chmod -R a+rX "$work"

echo "== compatibility tests (compat/) against both hosts"
cd "$here"
status=0
MULTICORN2_PYTHONPATH="$work/py" OTELSPANS_PG_BINDIR="$(dirname "$copy_config")" \
    "$venv/bin/python" -m pytest -p no:cacheprovider -q "$here/compat" "$@" || status=$?

echo "== multicorn2's regression files (test-3.11) under multicorn2 and, names mapped, our host"
MULTICORN2_PYTHONPATH="$work/py" OTELSPANS_PG_BINDIR="$(dirname "$copy_config")" \
    "$venv/bin/python" compat/regress.py "$src" ${REGRESS_ARGS:-}
exit $status
