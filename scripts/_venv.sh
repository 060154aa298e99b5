#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (sourced by quickstart.sh and test.sh).
# Re-installs only when pyproject.toml, constraints.txt or SANDBOX_TORCH changed since the last install.
#
# SANDBOX_TORCH chooses the torch build (the version is pinned by constraints.txt):
#   unset      whatever pip's configured index serves (where a CPU wheel is cached, the CPU build;
#              on a plain Linux machine PyPI's default wheel, which is the CUDA build: several GB)
#   cpu        the CPU-only build from PyTorch's own index (about 200 MB)
#   cu126 ...  a CUDA build from PyTorch's own index (several GB)
#   http...    any package index URL
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SANDBOX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_BUILD="${SANDBOX_TORCH:-}"
case "$TORCH_BUILD" in
  "") torch_index=() ;;
  http*) torch_index=(--index-url "$TORCH_BUILD") ;;
  cpu|cu[0-9]*|rocm[0-9]*) torch_index=(--index-url "https://download.pytorch.org/whl/$TORCH_BUILD") ;;
  *) echo "[setup] SANDBOX_TORCH='$TORCH_BUILD' is not cpu, a CUDA tag such as cu126, or an index URL" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.sandbox-install-stamp"
want="$( (cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt"; echo "torch=$TORCH_BUILD") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies (torch first, from ${TORCH_BUILD:-the index pip is configured with}, version pinned by constraints.txt)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # torch first and pinned, from the chosen index; the rest then finds it installed.
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" ${torch_index[@]+"${torch_index[@]}"} torch
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev,minari,sb3]"
  "$VENV/bin/python" -c "import torch; print(f'[setup] torch {torch.__version__}:', f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU-only build')"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export SDL_VIDEODRIVER="${SDL_VIDEODRIVER:-dummy}"
