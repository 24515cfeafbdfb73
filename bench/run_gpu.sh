#!/usr/bin/env bash
# The ONE script to run on the GPU machine (device tool), so that our step and the PyTorch anchor are timed in
# the same call on the same card. Prepare here first (needs PyPI):   bash bench/fetch_anchor.sh
# (copies ../shared/bench into bench/anchor/ and runs
#  python3 -m pip download --no-deps --only-binary=:all: -d bench/anchor diffusers==0.42.1).
# Then, with the device tool (bench/anchor is git-ignored, so carry it):
#     run(command="bash bench/run_gpu.sh", carry=["bench/anchor"], timeout_s=560)
# Each command has its own timeout; the whole stays under ~8 minutes (plus the machine's start). Results: one JSON
# line per run in $OUT/results.jsonl (failures too, as {"bench": ..., "failed": rc}); logs in $OUT/*.log.
# Uses the machine's own python3 (PyTorch, JAX with CUDA, flax, optax); diffusers comes from the carried wheel.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
results="$OUT/results.jsonl"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# For a CPU dry run of the plumbing: CONFIG=tiny RES=32 BATCH=2 PYTHON=.venv/bin/python bash bench/run_gpu.sh
CONFIG="${CONFIG:-sd15}" RES="${RES:-512}" BATCH="${BATCH:-8}"

run() {  # run NAME SECONDS CMD...: appends the command's JSON line (or a failure record) to $results
  local name="$1" seconds="$2"; shift 2
  echo "== $name: $*" >&2
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$OUT/$name.log" | tail -n 1 >> "$results" || true
  if [ $rc -ne 0 ]; then
    printf '{"bench": "%s", "failed": %d, "seconds": %d, "log_tail": %s}\n' "$name" "$rc" "$((SECONDS - start))" \
      "$("$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()[-800:]))' < "$OUT/$name.log")" >> "$results"
  fi
  tail -n 3 "$OUT/$name.log" >&2
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)'
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log" >&2

# 1. The PyTorch anchor (diffusers' train_text_to_image step), from the carried wheel.
if [ "${SDXL:-0}" = 1 ]; then :
elif ls bench/anchor/diffusers-*.whl >/dev/null 2>&1; then
  timeout 60 "$PY" -m pip install -q --no-deps --no-compile --target /tmp/site bench/anchor/diffusers-*.whl \
    > "$OUT/pip.log" 2>&1
  run torch_anchor 110 env PYTHONPATH=/tmp/site:bench/anchor "$PY" bench/anchor/torch_anchor.py \
    --config "$CONFIG" --res "$RES" --batch "$BATCH" --steps 10
else
  echo '{"bench": "torch_anchor", "failed": "bench/anchor/ missing: run bash bench/fetch_anchor.sh and carry bench/anchor"}' >> "$results"
fi

# 2. Our step: SD 1.5 shapes, 512 px, batch 8, bf16 compute, XLA then cuDNN attention.
# The JAX runs keep the GPU to themselves (torch has exited); JAX preallocates 75% of it by default.
for attention in xla cudnn; do
  [ "${SDXL:-0}" = 1 ] && break
  run "jax_${CONFIG}_${attention}" 140 "$PY" bench/train_step.py --config "$CONFIG" --res "$RES" --batch "$BATCH" --dtype bf16 \
    --attention "$attention" --steps 10 --warmup 2
done
# 3. The step of --cache_latents (no VAE encoder in the step).
[ "${SDXL:-0}" = 1 ] || run "jax_${CONFIG}_cudnn_cached_latents" 130 "$PY" bench/train_step.py --config "$CONFIG" --res "$RES" --batch "$BATCH" \
  --dtype bf16 --attention cudnn --cache_latents --steps 10 --warmup 2

# 4. SDXL base shapes, 1024 px, batch 1 per device, cuDNN attention (our step; the PyTorch SDXL step is not in the
# anchor yet): a second call, as the first one fills its time,   run(command="SDXL=1 bash bench/run_gpu.sh", ...)
if [ "${SDXL:-0}" = 1 ]; then
  run "jax_sdxl_cudnn" 300 "$PY" bench/train_step.py --config sdxl --res 1024 --batch 1 --dtype bf16 \
    --attention cudnn --steps 5 --warmup 2
fi

echo "== results ($results)" >&2
cat "$results"
