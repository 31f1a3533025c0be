#!/usr/bin/env bash
# The one prepared run for a GPU machine lent through the device tool: the CUDA-only tests, then benchmarks/gpu.py.
#
#   bash benchmarks/gpu_device.sh fetch   # here (PyPI reachable): the wheels the device image lacks, into .whl/
#   bash benchmarks/gpu_device.sh run     # there (carry .whl): tests + benchmark, logs and JSON under $OUT (or out/)
#
# The device image has its own torch, transformers and Lightning but no peft, bitsandbytes or jsonargparse and no
# network, so those travel as wheels (about 45 MB) and lightning-peft runs from the working tree (PYTHONPATH).
# Each part has its own time limit, so the whole run ends inside one 10-minute device call.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(bitsandbytes peft jsonargparse docstring-parser typeshed-client)

case "${1:-}" in
fetch)
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    du -sh .whl
    ;;
run)
    out="${OUT:-out}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    # CUDA-only tests: QLoRA on CUDA with paged AdamW, Lightning's BitsandbytesPrecision, FSDP full-state resume.
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/methods/test_qlora.py tests/test_distributed.py \
        2>&1 | tee "$out/cuda_tests.log" || echo "cuda tests: exit $?" | tee -a "$out/cuda_tests.log"
    timeout 330 python3 -m benchmarks.gpu --out "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_device.sh fetch|run" >&2
    exit 2
    ;;
esac
