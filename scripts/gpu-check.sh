#!/usr/bin/env bash
# Builds the GPU test and bench binaries of the kernels and issue #11's
# benchmark example (examples/gpu_bench.rs) here (feature `cuda`, release; no
# GPU needed), stages them compressed in .gpu/ (git-ignored) with
# device-run.sh, the PyTorch reference (bench/torch_reference.py), the table
# script (scripts/gpu_bench_table.py) and a runner, and prints the one device
# command that runs them all and writes the logs and JSON under $OUT.
#
#   bash scripts/gpu-check.sh
#
# On the device, .gpu/run.sh runs: the GPU tests, the kernel bench,
# nvidia-smi, gpu_bench (-> $OUT/gpu_bench_steepest.json), the PyTorch
# reference (-> $OUT/gpu_bench_torch.json) and the table
# (-> $OUT/gpu_bench_table.md); each step's failure is logged and the next
# step still runs. `RUN="bench" bash .gpu/run.sh` runs only the benchmark
# (the steps: tests, kernels, bench).
#
# Uses CARGO_TARGET_DIR (default: target-cuda/, kept apart from the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
if ! command -v nvcc >/dev/null; then
  # shellcheck disable=SC1091
  source /opt/cuda-13.0/env.sh
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
SHARED=""
for d in "$ROOT/../shared/cuda" "$ROOT/../../shared/cuda" /work/shared/cuda; do
  [[ -f "$d/device-run.sh" ]] && { SHARED="$d"; break; }
done
[[ -n "$SHARED" ]] || { echo "device-run.sh not found (../shared/cuda)" >&2; exit 1; }

echo "== building (release, --features cuda) into $CARGO_TARGET_DIR"
exe() { # the executable of `cargo $1 --$1 $2` (test: --release; bench: its own profile)
  local rel=(); [[ "$1" == test ]] && rel=(--release)
  cargo "$1" "${rel[@]}" --features cuda "--$1" "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2" | tail -1
}
cargo test --release --features cuda --test gpu_kernels --no-run
cargo bench --features cuda --bench gpu_kernels --no-run
cargo build --release --features cuda --example gpu_bench
cargo build --release --features cuda --example train_lm
TEST="$(exe test gpu_kernels)"
BENCH="$(exe bench gpu_kernels)"
EXAMPLE="$CARGO_TARGET_DIR/release/examples/gpu_bench"
TRAIN="$CARGO_TARGET_DIR/release/examples/train_lm"
[[ -x "$TEST" && -x "$BENCH" && -x "$EXAMPLE" && -x "$TRAIN" ]] || { echo "binaries not found" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu
cp "$SHARED/device-run.sh" .gpu/
cp bench/torch_reference.py scripts/gpu_bench_table.py .gpu/
for pair in "$TEST:gpu_kernels_test" "$BENCH:gpu_kernels_bench" "$EXAMPLE:gpu_bench" "$TRAIN:train_lm"; do
  src="${pair%%:*}"; dst=".gpu/${pair##*:}"
  cp "$src" "$dst"; strip "$dst"
  xz -T2 -6 -f "$dst"
done
cat > .gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: unpack, test, bench, and issue
# #11's benchmark (steepest and PyTorch, then the table); logs and JSON in $OUT.
# A failing or timed-out step is logged and the next one still runs; the exit
# code is the GPU tests'. RUN picks the steps (default: all three); BENCH_ARGS
# adds flags to both benchmark programs; PY is the Python with PyTorch.
set -uo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-/tmp/steepest-gpu-out}"; mkdir -p "$OUT"
RUN="${RUN:-tests kernels bench}"
BENCH_ARGS="${BENCH_ARGS:-}"   # e.g. "--reps 30", "--only muon_step"; both bench programs take the same flags
PY="${PY:-python3}"            # the Python with PyTorch
has() { [[ " $RUN " == *" $1 "* ]]; }
for f in *.xz; do
  python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" "$f"
  chmod +x "${f%.xz}"
done
rc=0
if has tests; then
  timeout -k 10 150 bash device-run.sh --diag ./gpu_kernels_test -- --test-threads=1 2>&1 | tee "$OUT/gpu_tests.log"
  rc=${PIPESTATUS[0]}
  echo "tests exit code: $rc" | tee -a "$OUT/gpu_tests.log"
fi
if has kernels; then
  timeout -k 10 90 bash device-run.sh ./gpu_kernels_bench 2>&1 | tee "$OUT/gpu_bench.log"
  echo "gpu_kernels bench exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_bench.log"
fi
if has bench; then
  SECONDS=0
  { nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm,power.limit --format=csv
    nvidia-smi; } > "$OUT/nvidia_smi.txt" 2>&1 || echo "nvidia-smi failed (see $OUT/nvidia_smi.txt)"
  head -2 "$OUT/nvidia_smi.txt"
  # shellcheck disable=SC2086 # BENCH_ARGS: extra flags for both, split on spaces
  timeout -k 10 150 bash device-run.sh ./gpu_bench -- --out "$OUT/gpu_bench_steepest.json" $BENCH_ARGS 2>&1 |
    tee "$OUT/gpu_bench_steepest.log"
  echo "gpu_bench exit code: ${PIPESTATUS[0]} (${SECONDS}s so far)" | tee -a "$OUT/gpu_bench_steepest.log"
  # shellcheck disable=SC2086
  timeout -k 10 150 "$PY" torch_reference.py --out "$OUT/gpu_bench_torch.json" $BENCH_ARGS 2>&1 |
    tee "$OUT/gpu_bench_torch.log"
  echo "torch_reference exit code: ${PIPESTATUS[0]} (${SECONDS}s so far)" | tee -a "$OUT/gpu_bench_torch.log"
  python3 gpu_bench_table.py "$OUT/gpu_bench_steepest.json" "$OUT/gpu_bench_torch.json" \
    --out "$OUT/gpu_bench_table.md" 2>&1 | tee "$OUT/gpu_bench_table.log"
  echo "table exit code: ${PIPESTATUS[0]}"
fi
exit "$rc"
RUN
chmod +x .gpu/run.sh
ls -la .gpu
echo
echo "Device command (the device tool's run; .gpu is git-ignored, so carry it):"
echo "  run(command=\"bash .gpu/run.sh\", carry=[\".gpu\"], timeout_s=420)"
echo "Only issue #11's benchmark (steepest + PyTorch + table; each step time-limited to 150 s):"
echo "  run(command=\"RUN=bench bash .gpu/run.sh\", carry=[\".gpu\"], timeout_s=360)"
echo "Training on the GPU (issue #11 part 4: first-20 losses CPU vs GPU, then the gpu preset):"
echo "  run(command=\"OUT=\$OUT bash examples/train_lm/gpu_run.sh .gpu/train_lm\", carry=[\".gpu\"], timeout_s=480)"
