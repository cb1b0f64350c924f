#!/usr/bin/env bash
# One lent GPU host's checks, run from the repository root there in one `device` call
# (docs/benchmarks.md, "One H100: the one-process stack's stalls, and `torch.compile` on CUDA"):
#   1. where the CPU goes while the one-process stack indexes (bench.cpu_profile --timeline);
#   2. the harness's keys on CUDA (python -m bench --images 1024, Lite0 bf16);
#   3. with COMPILE=1 only: ResNet-50 bf16 with EMBED_COMPILE=on against eager (bench/embed.py).
# The host has its own PyTorch; lookalike's wheel and the small wheels it lacks travel in .whl/
# (build lookalike's with `pip wheel --no-deps -w .whl .`). Writes its logs under $OUT.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
REPO=$PWD
export PYTHONPATH=/tmp/site:$REPO PYTHONUNBUFFERED=1
cd /tmp || exit 1  # the repository's own lookalike/ folder is not the installed package
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cores', __import__('os').cpu_count())"
timeout 180 python3 -m bench.cpu_profile --timeline 2>&1 | tee "$OUT/cpu_profile.txt" | grep -v "^  t="
timeout 420 python3 -m bench --images 1024 2>&1 | tee "$OUT/harness.txt" | tail -n 25
[ "${COMPILE:-0}" = 1 ] || exit 0
for compile in on off; do
  # TORCH_LOGS=recompiles: any batch that compiles again after start-up shows here
  TORCH_LOGS=recompiles timeout "$([ "$compile" = on ] && echo 220 || echo 110)" python3 "$REPO/bench/embed.py" \
    --model resnet50 --images "${IMAGES:-512}" --compile "$compile" --json 2>&1 \
    | tee -a "$OUT/embed_compile.txt" | grep -E '^\{|ecompil'
done
