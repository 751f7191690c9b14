// Stub for csrc/check_cuda_compiles.sh only: a CPU wheel of torch ships c10/cuda headers without this
// generated one. A CUDA build of torch generates the same content (shared libraries); never used by setup.py.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
