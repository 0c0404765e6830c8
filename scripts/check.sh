#!/usr/bin/env bash
# Static checks: ruff (lint + format) and mypy --strict on the dataflare package.
# The top-level folders are the package's subpackages (see DESIGN.md); mypy finds
# them through a tree of symlinks named as the import package.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin
"$py/ruff" check .
"$py/ruff" format --check .
mkdir -p build/mypy/dataflare
for d in cdc sinks daemon tui; do ln -sfn "../../../$d" "build/mypy/dataflare/$d"; done
(cd build/mypy && MYPYPATH=".:../../typings" "../../$py/mypy" --strict \
    --config-file ../../pyproject.toml --cache-dir ../../.mypy_cache -p dataflare)
