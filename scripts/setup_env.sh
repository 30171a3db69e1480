#!/usr/bin/env bash
# Creates the virtual environment .venv (once) and installs the pinned requirements into it; does
# nothing when requirements.txt has not changed since the last install. Sourced by run_all.sh and
# run_tests.sh; SKIP_SETUP=1 uses $PY (default: the python3 on PATH) as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ "${SKIP_SETUP:-0}" = "1" ]; then
  PY="${PY:-$(command -v python3 || command -v python)}"
else
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
  if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)" != "$want" ]; then
    echo "setup: installing torch==2.13.0 and requirements.txt into $VENV (once)"
    "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q -r "$ROOT/requirements.txt"
    echo "$want" > "$VENV/.requirements.sha256"
  fi
fi
export PY
