// CUDA kernels of frames_to_tensor: one launch per resampling pass, one thread per output pixel
// (3 channels), the pixel math from pixel_math.h (the same functions the CPU source runs).
// No torch headers here: `make check-cuda` compiles this file with bare nvcc.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "frames_kernel.h"

namespace pllava_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// RGB uint8 (T, H, W, 3); (r, c) are relative to (row0, col0).
struct RgbSource {
  const uint8_t* p;
  int H, W, row0, col0;
  __device__ __forceinline__ void load(int t, int r, int c, int* px) const {
    const uint8_t* q = p + (((size_t)t * H + row0 + r) * W + col0 + c) * 3;
    px[0] = q[0];
    px[1] = q[1];
    px[2] = q[2];
  }
};

// YUV 4:2:0 planes, converted on load (the planes are what gets uploaded, not float RGB).
struct YuvSource {
  const uint8_t *y, *u, *v;
  int H, W, row0, col0;
  YuvCoeffs yc;
  __device__ __forceinline__ void load(int t, int r, int c, int* px) const {
    const int sy = row0 + r, sx = col0 + c;
    const int cw = (W + 1) / 2, ch = (H + 1) / 2;
    const size_t ci = ((size_t)t * ch + sy / 2) * cw + sx / 2;
    uint8_t rr, gg, bb;
    yuv_to_rgb(yc, y[((size_t)t * H + sy) * W + sx], u[ci], v[ci], &rr, &gg, &bb);
    px[0] = rr;
    px[1] = gg;
    px[2] = bb;
  }
};

// Horizontal pass: dst (T, rows, p.n, 3) from source rows [0, rows).
template <typename Src>
__global__ void hpass_kernel(Src src, DevicePlan p, int T, int rows, uint8_t* __restrict__ dst) {
  const size_t total = (size_t)T * rows * p.n;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const int x = (int)(i % p.n);
    const int r = (int)((i / p.n) % rows);
    const int t = (int)(i / ((size_t)p.n * rows));
    const int xmin = p.xmin[x], cnt = p.count[x];
    const int32_t* k = p.k + (size_t)x * p.ksize;
    int32_t acc[3] = {resample_init(), resample_init(), resample_init()};
    for (int j = 0; j < cnt; ++j) {
      int px[3];
      src.load(t, r, xmin + j, px);
      const int32_t kj = k[j];
      acc[0] += px[0] * kj;
      acc[1] += px[1] * kj;
      acc[2] += px[2] * kj;
    }
    uint8_t* o = dst + i * 3;
    o[0] = clip8(acc[0]);
    o[1] = clip8(acc[1]);
    o[2] = clip8(acc[2]);
  }
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Vertical pass over src (T, p.in_len, cols, 3). Plain: dst uint8 (T, p.n, cols, 3).
// Normalizing: dst OutT (T, 3, p.n, cols), rescale + CLIP normalize fused.
template <bool kNormalize, typename OutT>
__global__ void vpass_kernel(const uint8_t* __restrict__ src, DevicePlan p, int T, int cols,
                             Normalize norm, OutT* __restrict__ dst) {
  const size_t total = (size_t)T * p.n * cols;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const int x = (int)(i % cols);
    const int r = (int)((i / cols) % p.n);
    const int t = (int)(i / ((size_t)cols * p.n));
    const int ymin = p.xmin[r], cnt = p.count[r];
    const int32_t* k = p.k + (size_t)r * p.ksize;
    int32_t acc[3] = {resample_init(), resample_init(), resample_init()};
    const uint8_t* s = src + (((size_t)t * p.in_len + ymin) * cols + x) * 3;
    for (int j = 0; j < cnt; ++j) {
      const int32_t kj = k[j];
      const uint8_t* q = s + (size_t)j * cols * 3;
      acc[0] += q[0] * kj;
      acc[1] += q[1] * kj;
      acc[2] += q[2] * kj;
    }
    if constexpr (kNormalize) {
      const size_t plane = (size_t)p.n * cols;
      OutT* o = dst + (size_t)t * 3 * plane + (size_t)r * cols + x;
      for (int c = 0; c < 3; ++c) store(o + c * plane, normalize_u8(clip8(acc[c]), norm.mean[c],
                                                                     norm.std[c]));
    } else {
      uint8_t* o = reinterpret_cast<uint8_t*>(dst) + i * 3;
      o[0] = clip8(acc[0]);
      o[1] = clip8(acc[1]);
      o[2] = clip8(acc[2]);
    }
  }
}

int grid_for(size_t total) {
  size_t blocks = (total + kThreads - 1) / kThreads;
  const size_t cap = 65535u * 8u;  // grid-stride loops cover the rest
  return (int)(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

template <typename OutT>
void launch_last(const uint8_t* c, const DevicePlan& v2, int T, int cols, Normalize norm,
                 void* out, cudaStream_t stream) {
  vpass_kernel<true, OutT><<<grid_for((size_t)T * v2.n * cols), kThreads, 0, stream>>>(
      c, v2, T, cols, norm, static_cast<OutT*>(out));
}

}  // namespace

size_t frames_workspace_bytes(int T, const DevicePlan& h1, const DevicePlan& v1,
                              const DevicePlan& h2, const DevicePlan& v2) {
  const size_t a = (size_t)T * v1.in_len * h1.n * 3;  // first horizontal pass
  const size_t b = (size_t)T * v1.n * h1.n * 3;       // first crop (rows/cols read later)
  const size_t c = (size_t)T * v2.in_len * h2.n * 3;  // second horizontal pass
  return align256(a) + align256(b) + align256(c);
}

cudaError_t launch_frames_to_tensor(const uint8_t* rgb, const uint8_t* y, const uint8_t* u,
                                    const uint8_t* v, int T, int H, int W, YuvCoeffs yc,
                                    DevicePlan h1, DevicePlan v1, DevicePlan h2, DevicePlan v2,
                                    Normalize norm, int out_dtype, void* out, uint8_t* workspace,
                                    cudaStream_t stream) {
  uint8_t* a = workspace;
  uint8_t* b = a + align256((size_t)T * v1.in_len * h1.n * 3);
  uint8_t* c = b + align256((size_t)T * v1.n * h1.n * 3);
  // 1. source (RGB or YUV) -> first horizontal pass, only the source rows the crop needs
  const size_t n1 = (size_t)T * v1.in_len * h1.n;
  if (rgb != nullptr) {
    RgbSource src{rgb, H, W, v1.in_start, h1.in_start};
    hpass_kernel<<<grid_for(n1), kThreads, 0, stream>>>(src, h1, T, v1.in_len, a);
  } else {
    YuvSource src{y, u, v, H, W, v1.in_start, h1.in_start, yc};
    hpass_kernel<<<grid_for(n1), kThreads, 0, stream>>>(src, h1, T, v1.in_len, a);
  }
  // 2. first vertical pass -> the part of the first crop the second resize reads
  vpass_kernel<false, uint8_t><<<grid_for((size_t)T * v1.n * h1.n), kThreads, 0, stream>>>(
      a, v1, T, h1.n, norm, b);
  // 3. second horizontal pass (center-crop columns only)
  RgbSource bsrc{b, v1.n, h1.n, 0, 0};
  hpass_kernel<<<grid_for((size_t)T * v2.in_len * h2.n), kThreads, 0, stream>>>(
      bsrc, h2, T, v2.in_len, c);
  // 4. second vertical pass + rescale/normalize -> (T, 3, out, out)
  switch (out_dtype) {
    case kOutFloat16: launch_last<__half>(c, v2, T, h2.n, norm, out, stream); break;
    case kOutBFloat16: launch_last<__nv_bfloat16>(c, v2, T, h2.n, norm, out, stream); break;
    default: launch_last<float>(c, v2, T, h2.n, norm, out, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pllava_fast
