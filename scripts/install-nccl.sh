#!/usr/bin/env bash
# Install the NCCL library (headers + libnccl.so) needed to build
# `cargo build --features nccl`, from NVIDIA's PyPI wheel, on a machine
# with or without a GPU. Idempotent: a second run only re-checks the tree.
#
# Result (default prefix /opt/nccl-2.30):
#   $PREFIX/pip/nvidia/nccl/{include/nccl.h, lib/libnccl.so.2}
#   $PREFIX/lib/libnccl.so   -> ../pip/nvidia/nccl/lib/libnccl.so.2  (link-time name)
#   $PREFIX/env.sh           adds $PREFIX/lib to LIBRARY_PATH (link) and LD_LIBRARY_PATH (run)
#
# Usage:
#   bash /work/shared/cuda/install-toolkit.sh && source /opt/cuda-13.0/env.sh   # CUDA 13.0 toolchain
#   bash scripts/install-nccl.sh && source /opt/nccl-2.30/env.sh
#   CARGO_TARGET_DIR=target-cuda cargo build --features nccl --lib
# Override the prefix with NCCL_PREFIX=/some/absolute/dir.
#
# Version: nvidia-nccl-cu13 2.30.x, because candle-core 0.11.1's `nccl`
# feature turns on cudarc 0.19.10's `nccl` = `nccl-02030`, i.e. bindings for the
# NCCL 2.30 API. cudarc links `-lnccl` dynamically (candle enables cudarc's
# `dynamic-linking`), so the library must be findable at link time (LIBRARY_PATH)
# and at run time (LD_LIBRARY_PATH, or a system copy of libnccl.so.2 on the
# GPU host; PyTorch wheels ship one as nvidia/nccl/lib/libnccl.so.2).
set -euo pipefail

PREFIX="${NCCL_PREFIX:-/opt/nccl-2.30}"
PY="${PYTHON:-python3}"
PKG="nvidia-nccl-cu13==2.30.7"

case "$PREFIX" in /*) ;; *) echo "NCCL_PREFIX must be absolute" >&2; exit 2 ;; esac
[[ "$(uname -m)" == x86_64 ]] || { echo "only x86_64 is supported" >&2; exit 2; }

mkdir -p "$PREFIX"
STAMP="$PREFIX/.installed-pkg"
ROOT="$PREFIX/pip/nvidia/nccl"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$PKG" && -f "$ROOT/lib/libnccl.so.2" ]]; then
  echo "[install-nccl] $PKG already installed in $PREFIX/pip" >&2
else
  echo "[install-nccl] installing $PKG into $PREFIX/pip ..." >&2
  rm -rf "$PREFIX/pip.tmp" "$STAMP"
  "$PY" -m pip install --quiet --no-deps --no-compile --disable-pip-version-check \
      --only-binary=:all: --target "$PREFIX/pip.tmp" "$PKG"
  rm -rf "$PREFIX/pip"
  mv "$PREFIX/pip.tmp" "$PREFIX/pip"
  printf '%s\n' "$PKG" >"$STAMP"
fi

[[ -f "$ROOT/lib/libnccl.so.2" ]] || { echo "[install-nccl] no libnccl.so.2 under $ROOT/lib" >&2; exit 1; }
[[ -f "$ROOT/include/nccl.h" ]] || echo "[install-nccl] note: no nccl.h in the wheel (not needed: cudarc has its own bindings)" >&2

# The wheel ships only the versioned soname; the linker wants libnccl.so.
mkdir -p "$PREFIX/lib"
ln -sfn ../pip/nvidia/nccl/lib/libnccl.so.2 "$PREFIX/lib/libnccl.so"
ln -sfn ../pip/nvidia/nccl/lib/libnccl.so.2 "$PREFIX/lib/libnccl.so.2"

cat >"$PREFIX/env.sh" <<ENV
# source me (after /opt/cuda-13.0/env.sh): NCCL for \`cargo build --features nccl\`
export NCCL_HOME="$PREFIX"
export LIBRARY_PATH="$PREFIX/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$PREFIX/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV

echo "[install-nccl] done: source $PREFIX/env.sh" >&2
cat "$PREFIX/env.sh"
