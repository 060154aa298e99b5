#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_venv.sh"
cd "$ROOT"
export WANDB_MODE="${WANDB_MODE:-disabled}"
export WANDB_DIR="${WANDB_DIR:-$(mktemp -d)}"
export MPLBACKEND=Agg
exec python -m pytest -q "$@"
