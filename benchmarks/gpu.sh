#!/usr/bin/env bash
# The GPU path measured in one command: exactness on CUDA, the sweep in float16/bfloat16 against the plain and
# the study's way, the batch-size scan, matmul and bandwidth fractions, and a short run (benchmarks/gpu.py).
#   bash benchmarks/gpu.sh [--out DIR]   # on a GPU machine: about 5 minutes on one H200
#   bash benchmarks/gpu.sh --cpu         # tiny sizes on the CPU, under 3 minutes (tests/test_gpu_script.py)
#   bash benchmarks/gpu.sh --profile --baseline DIR   # + one decode step profiled, against the previous engine
# Needs DYNORACLE_DATA_DIR (the Alpaca slice) and the embedded tokenizer (DYNORACLE_CACHE or the package).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
