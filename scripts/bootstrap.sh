#!/usr/bin/env bash
# Installs what DataFlare needs on a fresh machine: Python venv with the project and
# its dev tools in .venv, and the PostgreSQL/MariaDB binaries the tests start
# private servers from. Idempotent and quiet when everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "DataFlare needs Python >= 3.11 (found $(python3 --version))" >&2; exit 1; }

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.dataflare-installed
# The C speedups (cdc/_speedups.c) are built by the editable install: rebuild on change.
want=$(cat pyproject.toml cdc/_speedups.c | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    # (setuptools' warnings about the experimental ext-modules table go to the log)
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' \
        >.venv/pip-install.log 2>&1 || { cat .venv/pip-install.log >&2; exit 1; }
    .venv/bin/python -c 'import dataflare.daemon.cli, psycopg, lmdb, msgpack, zstandard, textual'
    .venv/bin/python -c 'import dataflare.cdc._speedups' \
        || echo "warning: cdc/_speedups.c did not build; the pure-Python twins run" >&2
    echo "$want" > "$stamp"
fi
# Bytecode, as an install would write it: with PYTHONDONTWRITEBYTECODE set (as on
# this machine) every daemon and worker start would compile our modules again.
.venv/bin/python -m compileall -q -j 0 cdc daemon sinks tui >/dev/null
bash scripts/ensure-servers.sh
