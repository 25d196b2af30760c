// Launcher interface of the CUDA kernels (frames_kernel.cu). Plain C++ + CUDA runtime, no torch:
// the .cu compiles with bare nvcc, the torch glue (frames_cuda.cpp) owns tensors and streams.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "pixel_math.h"

namespace pllava_fast {
namespace cuda {

// One resize axis restricted to the outputs a later stage reads; arrays live on the device.
struct DevicePlan {
  int in_start;          // first input index read
  int in_len;            // input indices read
  int n;                 // output samples
  int ksize;             // weights stored per output sample
  const int32_t* xmin;   // (n,) first tap relative to in_start
  const int32_t* count;  // (n,) taps used
  const int32_t* k;      // (n, ksize) fixed-point weights
};

enum OutDtype : int { kOutFloat32 = 0, kOutFloat16 = 1, kOutBFloat16 = 2 };

struct Normalize {
  float mean[3];
  float std[3];
};

// Bytes of scratch (uint8 intermediates) the launcher needs for T frames.
size_t frames_workspace_bytes(int T, const DevicePlan& h1, const DevicePlan& v1,
                              const DevicePlan& h2, const DevicePlan& v2);

// Runs the four resampling stages on `stream`. Either rgb (T, H, W, 3) or y/u/v planes are set;
// out is (T, 3, v2.n, h2.n) of out_dtype; workspace holds frames_workspace_bytes(...) bytes.
cudaError_t launch_frames_to_tensor(const uint8_t* rgb, const uint8_t* y, const uint8_t* u,
                                    const uint8_t* v, int T, int H, int W, YuvCoeffs yc,
                                    DevicePlan h1, DevicePlan v1, DevicePlan h2, DevicePlan v2,
                                    Normalize norm, int out_dtype, void* out, uint8_t* workspace,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace pllava_fast
