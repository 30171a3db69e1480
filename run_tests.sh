#!/usr/bin/env bash
# The test suite: sets up .venv (once), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
exec "$PY" -m pytest -q tests "$@"
