#!/usr/bin/env bash
# The GPU path checked and the GPU goals re-measured in one device call (the steps share a budget
# of CLIPLAB_GPU_CHECKS_BUDGET_S, 540 s by default, so the install and all of it fit one 600 s device
# command; a step that would start with under 20 s left is skipped and says so):
#   0. tests/test_gpu_e2e.py first: `cliplab train` with a val set on one GPU worker, a two-trial
#      sweep with fractional GPUs and `cliplab eval` on the GPU (the fleet issue's device placement);
#   1. bench/objectives.py at N = 32768 and at the 2048 × 32768 per-rank slice (every preset);
#   2. CLOOB without recomputation (hopfield_chunk 0), for its time/memory trade;
#   3. bench/train_throughput.py --compile: cliplab against open_clip_train like for like (eager
#      against eager, compiled against open_clip_train --torchcompile), and MFU;
#   4. the same step under max-autotune (cliplab only), the untried lever for MFU.
#
# The lent machine's Python has torch but neither Ray, open_clip nor MLflow. Build the wheel set
# here first (`bash bench/gpu_wheels.sh`, into .whl/, which .gitignore keeps out of git),
# then run `bash bench/gpu_checks.sh` there with carry [".whl"]. Each step has its own time limit,
# so a slow one cannot take the others' results with it; tables and logs land in $OUT, which the
# device tool brings back. Paste the tables into docs/PERFORMANCE.md with this command.
#
# CLIPLAB_GPU_CHECKS_SMOKE=1 runs the same steps on the CPU at toy sizes: a check of the plumbing,
# not a measurement (the "compiled" rows run with TORCH_COMPILE_DISABLE=1: the flags and the
# tables, without a CPU compile).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="platform:bench${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 MLFLOW_TELEMETRY_DISABLED=1 RAY_USAGE_STATS_ENABLED=0

if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ "${CLIPLAB_GPU_CHECKS_SMOKE:-0}" = 1 ]; then
  objectives=(--device cpu --sizes 256 --slice 64 256 --iters 2)
  throughput=(--device cpu --model cliplab-tiny --batch 8 --precision fp32 --steps 4 --warmup 1 --workers 1)
  compile=(--compile)
  export TORCH_COMPILE_DISABLE=1
  autotune=(--skip-open-clip)
  e2e=(-k train_with_a_val_set)  # the suite's plumbing on the CPU (the whole suite takes minutes there)
else
  e2e=()
  objectives=(--sizes 32768 --iters 10)
  throughput=()
  compile=(--compile)
  autotune=(--compile --compile-mode max-autotune-no-cudagraphs --skip-open-clip)
fi

failed=0
deadline=$((SECONDS + ${CLIPLAB_GPU_CHECKS_BUDGET_S:-540}))
step() {  # step NAME SECONDS COMMAND...: the table to $out/NAME.md, the log to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left} s of the budget left" | tee "$out/$name.md"
    failed=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s): $*"
  timeout "$limit" "$@" >"$out/$name.md" 2>"$out/$name.log"
  local rc=$?
  grep -E '^\||ratio|MFU|samples/s|passed|failed|skipped' "$out/$name.md" | tail -n 30
  if [ "$rc" != 0 ]; then
    failed=1
    echo "   $name exited $rc; last lines of $out/$name.log:"
    tail -n 5 "$out/$name.log" | sed 's/^/   /'
  fi
}

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  "$py" -c 'import torch; print("torch", torch.__version__)'; } | tee "$out/device.txt"
step gpu_e2e 180 env PYTHONUNBUFFERED=1 "$py" -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_e2e.py "${e2e[@]}"
step objectives 120 "$py" bench/objectives.py "${objectives[@]}"
step cloob_no_recompute 45 "$py" bench/objectives.py "${objectives[@]}" --presets cloob --hopfield-chunk 0
step throughput 230 "$py" bench/train_throughput.py "${throughput[@]}" "${compile[@]}"
step throughput_max_autotune 150 "$py" bench/train_throughput.py "${throughput[@]}" "${autotune[@]}"
echo "results in $out"
exit "$failed"
