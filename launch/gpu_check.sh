#!/usr/bin/env bash
# One-GPU acceptance check, offline, no venv (at most 8 minutes on an H200: its own time budget):  make gpu-check
#   PYTHON=python3 GPU_CHECK_DIR=/tmp/gc bash launch/gpu_check.sh
# The steps, the environment variables and the report are described in launch/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" launch/gpu_check.py "$@"
