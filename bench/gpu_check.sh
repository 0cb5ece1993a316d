#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it runs). Run from anywhere:
#   bash bench/gpu_check.sh [--out gpu-check] [--root DATA] [--wheels wheels]   # on a GPU machine
#   bash bench/gpu_check.sh --dry-run --out /tmp/gpu-dry                          # on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
fi
exec "$PY" bench/gpu_check.py "$@"
