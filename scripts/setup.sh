#!/usr/bin/env bash
# Create (or reuse) .venv and install moekit with pinned test/bench dependencies.
# torch is pinned first and explicitly: an unpinned `torch` on a machine without torch would pull a
# multi-GB CUDA build. Which build the pin resolves to is up to pip's configured index: on our CPU machines
# it finds a local CPU wheel (elsewhere, point pip at the CPU index or set MOEKIT_TORCH_VERSION).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # MOEKIT_TORCH_INDEX_URL: an index to take torch from (e.g. PyTorch's CPU wheels where pip's default serves CUDA).
  .venv/bin/pip install --quiet ${MOEKIT_TORCH_INDEX_URL:+--index-url "$MOEKIT_TORCH_INDEX_URL"} \
    "torch==${MOEKIT_TORCH_VERSION:-2.13.0}"
fi
stamp=.venv/.moekit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-test.txt -nt "$stamp" ]; then
  .venv/bin/pip install --quiet -r requirements-test.txt
  .venv/bin/pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || .venv/bin/pip install --quiet --no-deps -e .
  touch "$stamp"
fi
