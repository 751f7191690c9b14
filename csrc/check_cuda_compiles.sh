#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc -c, and syntax-check every csrc/cuda/*.cpp (the bindings,
# which include torch's c10/cuda headers) against the installed torch's headers with nvcc's host
# compiler: proves the CUDA extension builds on machines with nvcc but no GPU and no CUDA build of
# torch. The .cu flags mirror what setup.py's CUDAExtension passes (-O3 -std=c++17 -lineinfo and
# torch's __CUDA_NO_* macros); the .cpp ones its cxx flags (-std=c++20 -DMODALMOE_WITH_CUDA).
# csrc/stubs/ supplies the few generated headers a CPU wheel of torch lacks; a binding that needs
# more than that (e.g. ATen/cuda/CUDAContext.h, which wants cusparse.h) fails here on purpose.
#
#   csrc/check_cuda_compiles.sh                      # sm_80 and sm_90
#   MODALMOE_CUDA_ARCHS="75 80 90" NVCC=/path/nvcc PYTHON=python3 csrc/check_cuda_compiles.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
python="${PYTHON:-python3}"
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
      -D__CUDA_NO_HALF2_OPERATORS__ -lineinfo "${gencode[@]}"; then
    echo "ok    ${src#"$here"/} (sm: $archs)"
  else
    echo "FAIL  ${src#"$here"/}"
    status=1
  fi
done

torch_includes=()
while IFS= read -r dir; do torch_includes+=("-I$dir"); done < <(
  "$python" -c 'from torch.utils import cpp_extension; print("\n".join(cpp_extension.include_paths()))')
for src in "$here"/cuda/*.cpp; do
  if "$nvcc" -x c++ -c "$src" -o "$out/$(basename "$src").o" -std=c++20 -Xcompiler=-fsyntax-only,-Wall \
      -DMODALMOE_WITH_CUDA "${torch_includes[@]}" -I"$here/stubs"; then
    echo "ok    ${src#"$here"/} (syntax, torch headers + csrc/stubs)"
  else
    echo "FAIL  ${src#"$here"/}"
    status=1
  fi
done
exit "$status"
