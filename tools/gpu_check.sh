#!/usr/bin/env bash
# Issue 6's GPU checks in one command, for a session that is lent a GPU: the benchmark at the issue's
# settings (SD 1.5 size, 512x512, 50 Euler steps, CFG 7.5, batch 1, fp16) with ours compiled (CUDA graphs),
# diffusers eager (SDPA) and ours eager side by side, then the CUDA tests, then ours compiled with NHWC.
#
# The lent machines have PyTorch but not diffusers; carry it, the transformers version of pyproject.toml
# and a regex new enough for that transformers as wheels, fetched here once (.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 transformers==5.23.0 regex==2026.5.9
# then, through the device tool, from the repo root:
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=580)
# `bash tools/gpu_check.sh bench`, `... tests` or `... nhwc` runs one part. `all` runs the three in that
# order (most wanted first) within GPU_CHECK_SECONDS (default 560, for a 580 s call): each part gets what is
# left, so a slow compile cuts the last part short rather than the call. Results land in $OUT (device.txt,
# tests.txt, gpu-512-fp16*.txt and .json); commit them under benchmarks/ with the figures in a note.
set -uo pipefail
what=${1:-all}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'GPU', torch.cuda.get_device_name())"
} 2>&1 | tee "$out/device.txt"

deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-560}))
limit() {  # SECONDS: at most that many, and no more than the time left
    local left=$((deadline - SECONDS))
    echo $((left < $1 ? (left > 1 ? left : 1) : $1))
}
bench() {  # NAME TIMEOUT ROUNDS SIDE... (each compiled side spends a minute or two compiling)
    local name=$1 seconds rounds=$3
    seconds=$(limit "$2")
    shift 3
    timeout "$seconds" python3 tools/bench.py --device cuda --dtype fp16 --size 512 --steps 50 --warmup 2 \
        --repeats "$rounds" --sides "$@" --cache-dir /tmp/latentdiff-bench --json "$out/$name.json" 2>&1 |
        tee "$out/$name.txt"
}
# the first bench call writes the random SD 1.5 weights (4.3 GB) to the cache folder; per-side lines print
# as they come, so a run cut short still shows its figures
if [[ $what == all || $what == bench ]]; then
    # two rounds: the sides rotate, so diffusers runs once right after the compiled side and once not (on
    # 2026-11-30 it was slower right after a compiled side; benchmarks/gpu.md)
    bench gpu-512-fp16 330 2 ours:fp16+compile diffusers:fp16 ours:fp16
fi
if [[ $what == all || $what == tests ]]; then
    # the CUDA tests, the offload test and the benchmark's CUDA smoke run (test_speedups: *cuda*, *offload*)
    timeout "$(limit 170)" python3 -m pytest -q -rs tests/test_cuda.py tests/test_speedups.py -k "cuda or offload" \
        2>&1 | tee "$out/tests.txt"
fi
if [[ $what == all || $what == nhwc ]]; then  # ours compiled with NHWC convolutions
    bench gpu-512-fp16-nhwc 300 1 ours:fp16+compile+channels_last diffusers:fp16
fi
