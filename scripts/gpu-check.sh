#!/usr/bin/env bash
# Builds the GPU test and bench binaries of the kernels here (feature `cuda`,
# release; no GPU needed), stages them compressed in .gpu/ (git-ignored) with
# device-run.sh and a runner, and prints the one device command that runs
# them all and writes the logs under $OUT.
#
#   bash scripts/gpu-check.sh
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
TEST="$(exe test gpu_kernels)"
BENCH="$(exe bench gpu_kernels)"
[[ -x "$TEST" && -x "$BENCH" ]] || { echo "binaries not found" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu
cp "$SHARED/device-run.sh" .gpu/
for pair in "$TEST:gpu_kernels_test" "$BENCH:gpu_kernels_bench"; do
  src="${pair%%:*}"; dst=".gpu/${pair##*:}"
  cp "$src" "$dst"; strip "$dst"
  xz -T2 -6 -f "$dst"
done
cat > .gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: unpack, test, bench; logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-/tmp/steepest-gpu-out}"; mkdir -p "$OUT"
for f in *.xz; do
  python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" "$f"
  chmod +x "${f%.xz}"
done
bash device-run.sh --diag ./gpu_kernels_test -- --test-threads=1 2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
bash device-run.sh ./gpu_kernels_bench 2>&1 | tee "$OUT/gpu_bench.log"
echo "tests exit code: $rc" | tee -a "$OUT/gpu_tests.log"
exit "$rc"
RUN
chmod +x .gpu/run.sh
ls -la .gpu
echo
echo "Device command (the device tool's run; .gpu is git-ignored, so carry it):"
echo "  run(command=\"bash .gpu/run.sh\", carry=[\".gpu\"], timeout_s=420)"
