#!/usr/bin/env bash
# Issue #11, part 4, ON THE GPU MACHINE, from the repository root (no Rust
# there: the binary is built elsewhere, see below). Writes everything under
# $OUT:
#
#   first20/   the small default configuration (all 5 optimizers, the 300-step
#              schedule) stopped after 20 steps, on this machine's CPU and on
#              the GPU, with the same binary; losses_cpu.csv, losses_gpu.csv and
#              compare.txt (scripts/compare_losses.py: PASS/FAIL, max rel diff)
#   calib/     10 steps of --preset gpu (muon-spectral) to measure the step time
#   gpu/       --preset gpu: adamw, muon, muon-spectral; train_lm.csv (loss
#              curves), train_lm.svg/png, summary.md (tokens/s, optimizer
#              share), timing.csv/json, losses.csv (every step's loss)
#   *.log      each program's output
#
#   OUT=/path bash examples/train_lm/gpu_run.sh [BINARY]
#
# BINARY (default .gpu/train_lm, or .gpu/train_lm.xz unpacked) is
# `target-cuda/release/examples/train_lm` built here with
# `CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda --example train_lm`.
# The CUDA libraries are found by .gpu/device-run.sh (from ../shared/cuda).
#
# TRAIN_BUDGET_S (default 180): seconds for the three --preset gpu runs
# together. The preset has 600 steps (about 2 min at 20 TFLOP/s); if the
# calibration's step time says they would take longer, --steps is lowered (a
# multiple of 50, at least 100) so they fit, and the log says so.
# STEPS=N skips the calibration and trains N steps.
set -uo pipefail
OUT="${OUT:-/tmp/train_lm_gpu_out}"
mkdir -p "$OUT/first20"
BIN="${1:-.gpu/train_lm}"
TRAIN_BUDGET_S="${TRAIN_BUDGET_S:-180}"
if [[ ! -x "$BIN" && -f "$BIN.xz" ]]; then
  python3 -c "import lzma,sys; open(sys.argv[1],'wb').write(lzma.open(sys.argv[1]+'.xz').read())" "$BIN"
  chmod +x "$BIN"
fi
[[ -x "$BIN" ]] || { echo "gpu_run: no binary at $BIN" >&2; exit 2; }
RUNNER=()
for r in .gpu/device-run.sh ../shared/cuda/device-run.sh; do
  [[ -f "$r" ]] && { RUNNER=(bash "$r"); break; }
done
[[ ${#RUNNER[@]} -gt 0 ]] || echo "gpu_run: no device-run.sh; running $BIN directly" >&2
tl() { # tl LOG SECONDS ARGS...: the binary with ARGS, under a timeout, output to LOG and here
  local log="$1" secs="$2" st; shift 2
  if [[ ${#RUNNER[@]} -gt 0 ]]; then
    timeout -k 10 "$secs" "${RUNNER[@]}" "$BIN" -- "$@" 2>&1 | tee "$log"; st=${PIPESTATUS[0]}
  else
    timeout -k 10 "$secs" "$BIN" "$@" 2>&1 | tee "$log"; st=${PIPESTATUS[0]}
  fi
  [[ $st == 0 ]] || echo "gpu_run: exit status $st (124: timed out) of $BIN $*" >&2
  return "$st"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
rc=0

echo "== first 20 losses of the small default configuration: CPU vs GPU"
tl "$OUT/first20/cpu.log" 120 --device cpu --stop-after 20 \
  --loss-log "$OUT/first20/losses_cpu.csv" --out "$OUT/first20/cpu" || rc=1
tl "$OUT/first20/gpu.log" 120 --device cuda --stop-after 20 \
  --loss-log "$OUT/first20/losses_gpu.csv" --out "$OUT/first20/gpu" || rc=1
python3 scripts/compare_losses.py "$OUT/first20/losses_cpu.csv" "$OUT/first20/losses_gpu.csv" \
  --steps 20 | tee "$OUT/first20/compare.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || rc=1
if [[ -f runs/first20/losses_cpu_build_host.csv ]]; then
  echo "== this CPU vs the build host's CPU (identical if both take the same gemm kernels, else rounding-level)"
  python3 scripts/compare_losses.py runs/first20/losses_cpu_build_host.csv \
    "$OUT/first20/losses_cpu.csv" --steps 20 --quiet | tee "$OUT/first20/compare_cpu_hosts.txt"
fi

STEPS="${STEPS:-}"
if [[ -z "$STEPS" ]]; then
  echo "== calibration: 10 steps of --preset gpu (muon-spectral)"
  if tl "$OUT/calib.log" 150 --device cuda --preset gpu --optimizer muon-spectral \
      --stop-after 10 --out "$OUT/calib"; then
    STEPS="$(python3 - "$OUT/calib/timing.json" "$TRAIN_BUDGET_S" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))[0]
budget = float(sys.argv[2])
step = t["step_ms"] / 1e3
# the run's time outside the 9 timed steps: step 1, 2 evaluations (steps 0, 10)
other = max(t["run_s"] - t["steps_timed"] * step, 0.0)
evals = 13 * other / 2  # 13 evaluations in a 600-step run (every 50), pessimistic
per_run = budget / 3
steps = int((per_run - evals) / (1.1 * step)) // 50 * 50
steps = max(100, min(600, steps))
print(steps)
print(f"calibration: {1e3*step:.1f} ms/step, {other:.1f} s outside the timed steps; "
      f"{steps} steps -> about {3*(steps*step + evals):.0f} s for 3 runs (budget {budget:.0f} s)",
      file=sys.stderr)
PY
)" || STEPS=""
  fi
  if [[ -z "$STEPS" ]]; then
    echo "gpu_run: calibration failed; training 300 steps" >&2
    STEPS=300
  fi
fi
echo "== --preset gpu: adamw, muon, muon-spectral, $STEPS steps"
tl "$OUT/gpu.log" $((TRAIN_BUDGET_S * 3 / 2 + 60)) --device cuda --preset gpu --steps "$STEPS" \
  --loss-log "$OUT/gpu/losses.csv" --out "$OUT/gpu" || rc=1
cat "$OUT/gpu/summary.md" 2>/dev/null
exit $rc
