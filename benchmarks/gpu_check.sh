#!/usr/bin/env bash
# The GPU check, on the GPU machine (no network): install the carried wheels, then run it. See gpu_check.py.
#   bash benchmarks/gpu_check.sh             # there, after `python benchmarks/gpu_check.py pack` here
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere, CPU, seconds: checks the steps (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu_carry/wheels ] && ! python3 -c 'import faiss, pytorch_metric_learning' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .gpu_carry/wheels/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py run "$@"
