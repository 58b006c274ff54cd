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
# OUT may exist already: each step first removes what an earlier run of
# this script left of its own outputs there (so a skipped or failed step
# leaves none, not stale ones). train_lm rewrites its outputs as each run
# ends, so a step stopped by its timeout keeps the runs it finished.
#
# BINARY (default .gpu/train_lm, or .gpu/train_lm.xz unpacked) is
# `target-cuda/release/examples/train_lm` built here with
# `CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda --example train_lm`.
# The CUDA libraries are found by .gpu/device-run.sh (from ../shared/cuda).
#
# DEADLINE_EPOCH (optional, unix seconds): everything ends by then. Each
# step's timeout is min(its own limit, DEADLINE_EPOCH - now - 5), and a step
# that would get less than 20 s is skipped (and logged).
#
# TRAIN_BUDGET_S: seconds for the three --preset gpu runs together. Default
# 180; with DEADLINE_EPOCH, what is left before it less the first-20 check's
# expected time (FIRST20_S, default 45) and 15 s, then, once the first-20
# check and the calibration are done, what is left at that point less 15 s
# (a value given is lowered to that if it is more). The preset has 600 steps
# (about 2 min at 20 TFLOP/s); if the calibration says they would take
# longer, --steps is lowered (a multiple of 50, at least 100) so they fit,
# and the log says so. From the calibration's timing.json: each run costs
# steps x step time (+10 %) + its evaluations (every 50 steps and the last;
# the first, which loads the forward kernels, as measured) + step 1 (CUDA
# set-up, kernel loading); the process's time outside its run (corpus, CUDA
# context, outputs) is counted once.
# STEPS=N skips the calibration and trains N steps.
set -uo pipefail
OUT="${OUT:-/tmp/train_lm_gpu_out}"
mkdir -p "$OUT/first20" || { echo "gpu_run: cannot create $OUT/first20" >&2; exit 2; }
BIN="${1:-.gpu/train_lm}"
DEADLINE_EPOCH="${DEADLINE_EPOCH:-}"
DEADLINE_EPOCH="${DEADLINE_EPOCH%%.*}"
if [[ -n "$DEADLINE_EPOCH" && ! "$DEADLINE_EPOCH" =~ ^[0-9]+$ ]]; then
  echo "gpu_run: DEADLINE_EPOCH=$DEADLINE_EPOCH is not unix seconds" >&2; exit 2
fi
left() { echo $(( DEADLINE_EPOCH - $(date +%s) )); } # seconds before DEADLINE_EPOCH
if [[ -n "$DEADLINE_EPOCH" ]]; then
  echo "gpu_run: $(left) s before DEADLINE_EPOCH"
  (( $(left) > 0 )) || echo "gpu_run: DEADLINE_EPOCH has passed: every step is skipped" >&2
fi
TRAIN_BUDGET_SET="${TRAIN_BUDGET_S:-}"
if [[ -z "$TRAIN_BUDGET_SET" && -n "$DEADLINE_EPOCH" ]]; then
  TRAIN_BUDGET_S=$(( $(left) - ${FIRST20_S:-45} - 15 ))
  echo "gpu_run: TRAIN_BUDGET_S=$TRAIN_BUDGET_S for now (set again after the calibration)"
fi
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
limit() { # limit SECONDS: SECONDS, or less to end 5 s before DEADLINE_EPOCH; fails under 20 s
  local secs="$1"
  if [[ -n "$DEADLINE_EPOCH" ]]; then
    local room=$(( $(left) - 5 ))
    (( room < secs )) && secs=$room
  fi
  (( secs >= 20 )) || return 1
  echo "$secs"
}
tl() { # tl LOG SECONDS ARGS...: the binary with ARGS, under a timeout, output to LOG and here
  local log="$1" secs st; shift
  if ! secs="$(limit "$1")"; then
    echo "gpu_run: skipped (only $(left) s before DEADLINE_EPOCH): $BIN ${*:2}" | tee "$log" >&2
    return 3
  fi
  shift
  if [[ ${#RUNNER[@]} -gt 0 ]]; then
    timeout -k 4 "$secs" "${RUNNER[@]}" "$BIN" -- "$@" 2>&1 | tee "$log"; st=${PIPESTATUS[0]}
  else
    timeout -k 4 "$secs" "$BIN" "$@" 2>&1 | tee "$log"; st=${PIPESTATUS[0]}
  fi
  [[ $st == 0 ]] || echo "gpu_run: exit status $st (124: timed out after $secs s) of $BIN $*" >&2
  return "$st"
}
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
rc=0

echo "== first 20 losses of the small default configuration: CPU vs GPU"
rm -rf "$OUT/first20/cpu" "$OUT/first20/gpu" "$OUT"/first20/losses_{cpu,gpu}.csv \
  "$OUT"/first20/compare{,_cpu_hosts}.txt
tl "$OUT/first20/cpu.log" 120 --device cpu --stop-after 20 \
  --loss-log "$OUT/first20/losses_cpu.csv" --out "$OUT/first20/cpu" || rc=1
tl "$OUT/first20/gpu.log" 120 --device cuda --stop-after 20 \
  --loss-log "$OUT/first20/losses_gpu.csv" --out "$OUT/first20/gpu" || rc=1
if [[ -f "$OUT/first20/losses_cpu.csv" && -f "$OUT/first20/losses_gpu.csv" ]]; then
  python3 scripts/compare_losses.py "$OUT/first20/losses_cpu.csv" "$OUT/first20/losses_gpu.csv" \
    --steps 20 | tee "$OUT/first20/compare.txt"
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
else
  echo "gpu_run: no comparison: a loss log is missing" | tee "$OUT/first20/compare.txt" >&2
  rc=1
fi
if [[ -f runs/first20/losses_cpu_build_host.csv && -f "$OUT/first20/losses_cpu.csv" ]]; then
  echo "== this CPU vs the build host's CPU (identical if both take the same gemm kernels, else rounding-level)"
  python3 scripts/compare_losses.py runs/first20/losses_cpu_build_host.csv \
    "$OUT/first20/losses_cpu.csv" --steps 20 --quiet | tee "$OUT/first20/compare_cpu_hosts.txt"
fi

STEPS="${STEPS:-}"
if [[ -z "$STEPS" ]]; then
  echo "== calibration: 10 steps of --preset gpu (muon-spectral)"
  rm -rf "$OUT/calib"
  t0=$(date +%s.%N)
  if tl "$OUT/calib.log" 150 --device cuda --preset gpu --optimizer muon-spectral \
      --stop-after 10 --out "$OUT/calib"; then
    t1=$(date +%s.%N)
    if [[ -n "$DEADLINE_EPOCH" ]]; then
      # what is left now (the checks above are done), less the last step's
      # 5 s margin and 10 s for the end of the process
      room=$(( $(left) - 15 ))
      if [[ -z "$TRAIN_BUDGET_SET" ]] || (( room < TRAIN_BUDGET_S )); then TRAIN_BUDGET_S=$room; fi
      echo "gpu_run: TRAIN_BUDGET_S=$TRAIN_BUDGET_S ($(left) s before DEADLINE_EPOCH)"
    fi
    STEPS="$(python3 - "$OUT/calib/timing.json" "$TRAIN_BUDGET_S" "$t0" "$t1" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))[0]
budget = float(sys.argv[2])
wall = float(sys.argv[4]) - float(sys.argv[3])  # the calibration process, start to end
step = t["step_ms"] / 1e3
every = t.get("eval_every", 50)
if "eval_s" in t and t.get("evals", 0) > 0:
    # step 1 (CUDA set-up, kernel loading) and the evaluations, timed apart;
    # the first evaluation (before step 1: loads the forward kernels) costs
    # more than the others: counted once
    first_step = t["first_step_s"]
    first_eval = t.get("first_eval_s", t["eval_s"] / t["evals"])
    if t["evals"] > 1:
        per_eval = (t["eval_s"] - first_eval) / (t["evals"] - 1)
    else:
        per_eval = first_eval
    # the process outside its run (start, corpus, CUDA context, outputs), once
    fixed = max(wall - t["run_s"], 0.0)
else:
    # an older binary: all of the run outside the timed steps as evaluations
    # (13 in a 600-step run, every 50), pessimistic
    other = max(t["run_s"] - t["steps_timed"] * step, 0.0)
    first_step, first_eval, per_eval, fixed = 0.0, other / 2, other / 2, 0.0
def evals(steps):  # steps 0, every, 2 every, ..., and the last
    return 1 + -(-steps // every)
def run_s(steps):
    return 1.1 * steps * step + evals(steps) * per_eval + (first_eval - per_eval) + first_step
per_run = (budget - fixed) / 3
steps = 100
for s in range(600, 99, -50):
    if run_s(s) <= per_run:
        steps = s
        break
print(steps)
print(f"calibration: {1e3*step:.1f} ms/step, step 1 {first_step:.1f} s, an evaluation "
      f"{per_eval:.2f} s (the first {first_eval:.1f} s), {fixed:.1f} s outside the run; "
      f"{steps} steps ({evals(steps)} evaluations) -> about {fixed + 3*run_s(steps):.0f} s "
      f"for 3 runs (budget {budget:.0f} s)", file=sys.stderr)
PY
)" || STEPS=""
  fi
  if [[ -z "$STEPS" ]]; then
    echo "gpu_run: calibration failed or skipped; training 300 steps" >&2
    STEPS=300
  fi
fi
echo "== --preset gpu: adamw, muon, muon-spectral, $STEPS steps"
rm -rf "$OUT/gpu"
tl "$OUT/gpu.log" $((TRAIN_BUDGET_S * 3 / 2 + 60)) --device cuda --preset gpu --steps "$STEPS" \
  --loss-log "$OUT/gpu/losses.csv" --out "$OUT/gpu" || rc=1
cat "$OUT/gpu/summary.md" 2>/dev/null
exit $rc
