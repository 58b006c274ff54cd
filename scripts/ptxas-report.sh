#!/usr/bin/env bash
# Registers, spills and static shared memory of every kernel in kernels/*.cu,
# from `ptxas -v` on the PTX that build.rs embeds (same nvcc flags), as a
# Markdown table for BENCHMARKS.md. No GPU needed.
#
#   bash scripts/ptxas-report.sh            # sm_90 (H100/H200)
#   ARCH=sm_80 bash scripts/ptxas-report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  # shellcheck disable=SC1091
  source /opt/cuda-13.0/env.sh
fi
ARCH="${ARCH:-sm_90}"
# build.rs's nvcc flags (the `nvcc --ptx` call in build.rs): keep the two lists the same.
NVCC_FLAGS=(--ptx -arch="$ARCH" -O3 -std=c++17 --fmad=false -ftz=false -prec-div=true -prec-sqrt=true)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "ptxas $(ptxas --version | tail -1 | sed 's/^Cuda compilation tools, //'), -arch=$ARCH, $(date -u +%Y-%m-%d)"
echo
echo "| file | kernel | registers | spill stores (B) | spill loads (B) | stack (B) | static smem (B) |"
echo "|---|---|---:|---:|---:|---:|---:|"
for f in kernels/*.cu; do
  stem="$(basename "$f" .cu)"
  nvcc "${NVCC_FLAGS[@]}" -I kernels -o "$tmp/$stem.ptx" "$f"
  ptxas -arch="$ARCH" -v "$tmp/$stem.ptx" -o "$tmp/$stem.cubin" 2>&1 | awk -v file="$stem.cu" '
    /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); k = substr($0, RSTART + 1, RLENGTH - 2) }
    /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
    /Used [0-9]+ registers/ {
      smem = 0
      for (i = 1; i <= NF; i++) { if ($i == "registers,") regs = $(i - 1); if ($i ~ /^smem/) smem = $(i - 2) }
      printf "| %s | `%s` | %s | %s | %s | %s | %s |\n", file, k, regs, st, ld, stack, smem
    }'
done
