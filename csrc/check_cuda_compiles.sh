#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc -c: proves the CUDA kernels build on machines with nvcc
# but no GPU and no CUDA build of torch (the .cu files include no torch headers).
# Flags mirror what setup.py's CUDAExtension passes (-O3 -std=c++17 and torch's __CUDA_NO_* macros).
#
#   csrc/check_cuda_compiles.sh                      # sm_80 and sm_90
#   MODALMOE_CUDA_ARCHS="75 80 90" NVCC=/path/nvcc csrc/check_cuda_compiles.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
archs="${MODALMOE_CUDA_ARCHS:-80 90}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

gencode=()
for arch in $archs; do
  gencode+=("-gencode=arch=compute_${arch},code=sm_${arch}")
done

"$nvcc" --version | tail -n 1
status=0
for src in "$here"/cuda/*.cu; do
  if "$nvcc" -c "$src" -o "$out/$(basename "$src").o" -O3 -std=c++17 -Xcompiler=-fPIC,-Wall \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ "${gencode[@]}"; then
    echo "ok    ${src#"$here"/} (sm: $archs)"
  else
    echo "FAIL  ${src#"$here"/}"
    status=1
  fi
done
exit "$status"
