#!/usr/bin/env bash
# Syntax-check the torch side of the CUDA build (csrc/frames_cuda.cpp and csrc/bindings.cpp with
# PLLAVA_FAST_WITH_CUDA) on a machine without a GPU, against this torch's headers and the CUDA
# toolkit's. A CPU torch wheel ships the c10/cuda headers but not the one CMake generates, which
# only sets export macros, so an empty stand-in takes its place. Usage: check-cuda-glue.sh PYTHON
set -euo pipefail
py=${1:-python3}
cuda_home=${CUDA_HOME:-/usr/local/cuda}
if [ ! -f "$cuda_home/include/cuda_runtime.h" ]; then
  echo "check-cuda-glue: no $cuda_home/include/cuda_runtime.h; skipped"
  exit 0
fi
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo "#pragma once" > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
read -r -a torch_inc <<< "$("$py" -c "import torch.utils.cpp_extension as c
print(' '.join('-I' + p for p in c.include_paths()))")"
py_inc=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in csrc/frames_cuda.cpp csrc/bindings.cpp; do
  g++ -std=c++17 -w -fsyntax-only -DPLLAVA_FAST_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -Icsrc \
    -I"$stub" "${torch_inc[@]}" -I"$cuda_home/include" -I"$py_inc" "$f"
  echo "g++ syntax ok (CUDA build): $f"
done
