#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (sourced by quickstart.sh and test.sh).
# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SANDBOX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.sandbox-install-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies (torch CPU build first, pinned by constraints.txt)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" torch
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev,minari]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export SDL_VIDEODRIVER="${SDL_VIDEODRIVER:-dummy}"
