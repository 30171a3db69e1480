#!/usr/bin/env bash
# The GPU check of the 7B scale work, in one run (under 10 minutes on one H100/H200): builds the CUDA
# extension, runs the CUDA tests, measures on a randomly initialised Llama of Llama-2-7B's shape in bf16 a
# training step (AdamW, as many layers as fit), evaluation throughput and peak memory
# (bench/bench_scale.py --device cuda, LoRA's modes too), then the curvature HVP and a solve
# (bench/bench_curvature_scale.py, when it exists), a LoRA stage on a bf16 base and QLoRA (when bitsandbytes is
# installed); prints a summary block and exits non-zero if a check failed.
#
#   bash bench/gpu_check.sh                       # from the repo root; prepares .venv (scripts/setup_env.sh)
#   SKIP_SETUP=1 PY=python bash bench/gpu_check.sh    # an already-prepared environment (offline nodes)
#   TRAIN_LAYERS=8 EVAL_LAYERS=32 bash bench/gpu_check.sh
#   DEVICE=cpu SKIP_TESTS=1 bash bench/gpu_check.sh   # the same steps on a CPU box, small (a dry run of this file)
#   DATA_DIR=/data bash bench/gpu_check.sh            # the datasets folder for the curvature lengths (../shared/data)
#
# Output: bench/results/gpu_check/ (logs, scale_cuda.json) and the summary on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
# (not `source ... || handler`: that would switch off set -e inside setup_env.sh; offline: SKIP_SETUP=1 PY=python)
source scripts/setup_env.sh
set +e  # every check runs; failures are counted and reported at the end
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
DEVICE="${DEVICE:-cuda}"
OUTDIR="${OUTDIR:-bench/results/gpu_check}"
mkdir -p "$OUTDIR"
FAILED=()
SUMMARY=()
T0=$(date +%s)
say() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# check NAME TIMEOUT CMD...: run CMD (its output into $OUTDIR/NAME.log and the terminal), record a failure
check() {
  local name="$1" limit="$2" t rc; shift 2
  say "$name: $*"
  t=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"; rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-22s %s (%ss)' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAILED rc=$rc")" $(( $(date +%s) - t )))")
  [ "$rc" = 0 ] || FAILED+=("$name")
  return "$rc"
}

if [ "$DEVICE" = cuda ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')); on a CPU box use DEVICE=cpu" >&2
    exit 1
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  GPU_GIB=$("$PY" -c 'import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))')
  # AdamW training with fp32 weights + bf16 autocast: 16 B/param + ~1 GiB of bf16 copies and activations
  # per layer (2 x 1024 tokens); the embedding and head take ~4.5 GiB. 70% of the GPU for it.
  TRAIN_LAYERS="${TRAIN_LAYERS:-$(( (GPU_GIB * 70 / 100 - 5) / 4 ))}"
  [ "$TRAIN_LAYERS" -gt 32 ] && TRAIN_LAYERS=32
  [ "$TRAIN_LAYERS" -lt 1 ] && TRAIN_LAYERS=1
  EVAL_LAYERS="${EVAL_LAYERS:-32}"   # bf16 weights of all 32 layers: 13.5 GB
  BENCH_ARGS=(--device cuda --layers 1,2 --batch 4 --seq 512 --repeats 3 --big_train_layers "$TRAIN_LAYERS"
              --big_eval_layers "$EVAL_LAYERS" --eval_batch 16)
else
  GPU_GIB=0; TRAIN_LAYERS="${TRAIN_LAYERS:-0}"; EVAL_LAYERS="${EVAL_LAYERS:-0}"
  BENCH_ARGS=(--device cpu --quick --no_data --big_train_layers "$TRAIN_LAYERS" --big_eval_layers "$EVAL_LAYERS")
fi
say "device $DEVICE, python $PY, training layers $TRAIN_LAYERS, evaluation layers $EVAL_LAYERS -> $OUTDIR"

# 1. The extension: setup.py builds the CUDA kernels when torch has CUDA and nvcc is found; then curvature.py
#    must load it (installed, else its own JIT build).
if [ "$DEVICE" = cuda ] && ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ]; then
  say "warning: no nvcc on PATH and CUDA_HOME unset: setup.py builds the CPU kernels only"
fi
check build_extension 300 "$PY" setup.py build_ext --inplace
check load_extension 300 "$PY" -c '
import sys, torch, curvature
s = curvature.load_extension()
print("extension:", s)
cuda = torch.cuda.is_available()
ok = s["ok"] and (not cuda or torch._C._dispatch_has_kernel_for_dispatch_key("hessian::lanczos_step", "CUDA"))
print("CUDA kernels registered:", ok if cuda else "n/a (no GPU)")
sys.exit(0 if ok else 1)'

# 2. The CUDA cases of the extension's tests (the [cuda] variants, the nvcc build, CUDA vs CPU double backward;
#    they skip without a GPU); FULL_TESTS=1: the whole file (its CPU cases take ~5 min on 2 cores).
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  TEST_SEL=(-k cuda); [ "${FULL_TESTS:-0}" = 1 ] && TEST_SEL=()
  check cuda_tests 300 "$PY" -m pytest -q -x -rs tests/test_hessian_ops.py "${TEST_SEL[@]}"
fi

# 3. Llama-2-7B width on the device: per-layer constants (1 -> 2 layers), a training step with AdamW on
#    TRAIN_LAYERS layers, evaluation throughput on EVAL_LAYERS layers, peak memory of each.
check bench_scale 420 "$PY" bench/bench_scale.py "${BENCH_ARGS[@]}" --out "$OUTDIR/scale_$DEVICE.json"

# 4. Curvature at 7B (bench/bench_curvature_scale.py, another engineer's script), when it exists.
if [ -f bench/bench_curvature_scale.py ]; then
  CURV_ARGS=(--device "$DEVICE" --quick)
  [ -d "${DATA_DIR:-../shared/data}" ] && CURV_ARGS+=(--data_dir "${DATA_DIR:-../shared/data}")  # task lengths
  check curvature_scale 240 "$PY" bench/bench_curvature_scale.py "${CURV_ARGS[@]}"
else
  say "skipped: bench/bench_curvature_scale.py does not exist (curvature HVP and solve not measured)"
  SUMMARY+=("$(printf '%-22s %s' curvature_scale 'skipped (no bench/bench_curvature_scale.py)')")
fi

# 5. LoRA on the device (bench_scale above measured its activations at 7B width: the train_bf16_lora modes): a
#    LoRA stage of the tiny base on a bf16 base, then QLoRA (a 4-bit NF4 base) where bitsandbytes is installed.
if [ "$DEVICE" = cuda ]; then
  check lora_bf16 300 "$PY" finetune.py --model tiny --task toxigen --out "$OUTDIR/lora_bf16" --overwrite \
    --lora_r 8 --bf16 --steps 20 --eval_tasks toxigen --eval_limit 100
  if "$PY" -c 'import bitsandbytes' 2>/dev/null; then
    check qlora 300 "$PY" finetune.py --model tiny --task toxigen --out "$OUTDIR/qlora" --overwrite \
      --lora_r 8 --lora_base_4bit --steps 20 --eval_tasks toxigen --eval_limit 100
  else
    say "skipped: QLoRA (bitsandbytes is not installed: python -m pip install bitsandbytes)"
    SUMMARY+=("$(printf '%-22s %s' qlora 'skipped (no bitsandbytes)')")
  fi
fi

# Summary: the checks, then the figures of bench_scale's JSON.
echo
echo "================ gpu_check summary ($DEVICE, ${GPU_GIB} GiB, $(( $(date +%s) - T0 )) s) ================"
printf '%s\n' "${SUMMARY[@]}"
if [ -f "$OUTDIR/scale_$DEVICE.json" ]; then
  "$PY" - "$OUTDIR/scale_$DEVICE.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
G = 2 ** 30
for m in r["measurements"]:
    if m.get("mode") == "save":
        print(f"safetensors save: {m['bytes'] / G:.2f} GiB at {m['bytes_per_s'] / 1e6:,.0f} MB/s")
        continue
    tag = "big " if m.get("big") else ""
    print(f"{tag}{m['mode']:16s} layers {m['layers']:2d} ({m['n_params'] / 1e9:.2f} B params, {m['tokens']} tokens"
          f"{', AdamW' if m['optimizer'] else ''}): {m['tokens'] / m['seconds']:10,.0f} tokens/s, "
          f"peak +{m['peak_bytes_above_model'] / G:6.2f} GiB above the model")
for mode, c in sorted(r["per_token_layer"].items()):
    print(f"per token per layer {mode:16s}: saved activations {c['saved_bytes_per_token_layer']:9,.0f} B, "
          f"peak less the layer's gradient {c['peak_minus_grad_bytes_per_token_layer']:9,.0f} B, "
          f"{c['s_per_token_layer'] * 1e6:8.2f} us")
EOF
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]} (logs in $OUTDIR)"
  exit 1
fi
echo "all checks passed (logs in $OUTDIR)"
