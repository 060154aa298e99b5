#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, then run every stage of the quickstart.
# Extra arguments go to scripts/quickstart.py (e.g. --preset tiny, run.name=mine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_venv.sh"
cd "$ROOT"
exec python scripts/quickstart.py "$@"
