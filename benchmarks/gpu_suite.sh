#!/usr/bin/env bash
# The prepared GPU benchmark: one device call, well inside its 10-minute limit, every stage under
# its own timeout so that what finished comes back even if a later stage runs long.
#
# Here, once per session (the device machine cannot reach the package index):
#   bash benchmarks/gpu_wheels.sh                 # wheels the device image lacks, into .whl/
# Then, through the device tool (run), with carry [".whl"]:
#   bash benchmarks/gpu_suite.sh "$OUT"                  # the stages lora, lora_cudnn, full
#   bash benchmarks/gpu_suite.sh "$OUT" quantized        # a quantized base against PEFT + bnb
# and copy the figures from OUT/*.txt, with OUT/versions.txt, into benchmarks/RESULTS.md. The
# second argument names the stages to run (comma-separated): each call fits the device tool's
# 10 minutes, so the quantized stage is a call of its own.
#
# GPU_SUITE_SMOKE=1 runs the same stages CPU-sized (fp32, tiny batches), to check the plumbing
# on this machine; its figures mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_suite}}
STAGES=,${2:-lora,lora_cudnn,full},
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${GPU_SUITE_SMOKE:-0}" = 1 ]; then
  SIZE=(--dtype fp32 --batch 2 --seq 32 --steps 2 --warmup 1)
  QUANTIZED=(--dtype fp32 --batch 1 --seq 32 --steps 1 --warmup 1)
  SETTINGS=roberta-base
  CUDNN=0
else
  SIZE=()  # the benchmark's GPU defaults: bf16, the paper's batch and length, 20 timed steps
  QUANTIZED=(--dtype bf16 --batch 8 --seq 512 --steps 10 --warmup 2)
  SETTINGS=gpt2-medium,roberta-base
  CUDNN=1
fi

stage() {  # stage NAME SECONDS CMD...: run CMD under a timeout, its output to OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  [[ $STAGES == *,$name,* ]] || return 0
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$OUT/$name.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" - <<'PY'
import importlib.metadata as md, platform
names = ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "torch", "transformers", "peft")
found = []
for n in names:
    try:
        found.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
print("python", platform.python_version() + ";", ", ".join(found))
import jax
print("jax devices:", jax.devices())
PY
} 2>&1 | tee "$OUT/versions.txt"

# LoRA step: lora_jax against PEFT eager and compiled, the paper's GPT-2 and RoBERTa settings.
stage lora 300 "$PY" benchmarks/train_throughput.py --settings "$SETTINGS" \
  --frameworks jax,peft,peft-compile --modes lora "${SIZE[@]}"
# The same lora_jax step with cuDNN's fused attention.
if [ "$CUDNN" = 1 ]; then
  stage lora_cudnn 120 "$PY" benchmarks/train_throughput.py --settings "$SETTINGS" \
    --frameworks jax --modes lora --attention cudnn "${SIZE[@]}"
fi
# Full fine-tuning, for LoRA's speed-up over it in both frameworks (eager PEFT only: time).
stage full 120 "$PY" benchmarks/train_throughput.py --settings "$SETTINGS" \
  --frameworks jax,peft --modes full "${SIZE[@]}"
# SmolLM2-135M's shapes (random weights: the GGUF file is not on the device machine), LoRA over
# an nf4 base, unrolled and scanned, against PEFT over bitsandbytes' nf4 (needs the bitsandbytes
# wheel gpu_wheels.sh downloads).
stage quantized 420 "$PY" benchmarks/quantized_base.py --weights random \
  --cases nf4,nf4+scan,peft-bnb "${QUANTIZED[@]}"
echo "gpu_suite: done in ${SECONDS}s; figures in $OUT"
