#!/usr/bin/env bash
# The whole test suite: static checks (ruff, mypy --strict), then unit, integration
# (private PostgreSQL and MariaDB started by fixtures) and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/check.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
