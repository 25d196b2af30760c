// Host-side pieces shared by the CPU op, the CUDA glue and the bindings: argument validation and
// the resampling plans (which input span and which fixed-point taps each output sample uses).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "pixel_math.h"

namespace pllava_fast {

// Taps of one resize axis, restricted to the output samples [out_start, out_start + n) and
// expressed relative to the first input sample they read (in_start).
struct AxisPlan {
  int in_start = 0;  // first input index used
  int in_len = 0;    // number of input indices used
  int n = 0;         // output samples
  int ksize = 0;     // taps stored per output sample (zero-padded)
  std::vector<int32_t> xmin;   // (n,) first tap, relative to in_start
  std::vector<int32_t> count;  // (n,) taps actually used
  std::vector<int32_t> k;      // (n, ksize) fixed-point weights
};

// ksize_multiple pads the tap count (the CPU's vector loops read taps in pairs).
inline AxisPlan make_axis_plan(int in_size, int out_size, int out_start, int n,
                               int ksize_multiple = 1) {
  AxisPlan p;
  const int ks = resample_ksize(in_size, out_size);
  p.ksize = (ks + ksize_multiple - 1) / ksize_multiple * ksize_multiple;
  p.n = n;
  p.xmin.resize(n);
  p.count.resize(n);
  p.k.assign((size_t)n * p.ksize, 0);
  int lo = in_size, hi = 0;
  for (int i = 0; i < n; ++i) {
    int xmin = 0;
    const int cnt = resample_coeffs(in_size, out_size, out_start + i, p.ksize, &xmin,
                                    p.k.data() + (size_t)i * p.ksize);
    p.xmin[i] = xmin;
    p.count[i] = cnt;
    lo = std::min(lo, xmin);
    hi = std::max(hi, xmin + cnt);
  }
  if (n == 0 || hi <= lo) lo = hi = 0;
  // Pillow's ksize bounds the taps; the largest count used is often smaller (8 of 9 for a 2x
  // downscale), so store only that many (rounded up) and save the padded multiply-adds.
  int kmax = 1;
  for (int i = 0; i < n; ++i) kmax = std::max(kmax, (int)p.count[i]);
  kmax = (kmax + ksize_multiple - 1) / ksize_multiple * ksize_multiple;
  if (kmax < p.ksize) {
    std::vector<int32_t> packed((size_t)n * kmax);
    for (int i = 0; i < n; ++i)
      std::copy_n(p.k.begin() + (size_t)i * p.ksize, kmax, packed.begin() + (size_t)i * kmax);
    p.k.swap(packed);
    p.ksize = kmax;
  }
  p.in_start = lo;
  p.in_len = hi - lo;
  for (int i = 0; i < n; ++i) p.xmin[i] -= lo;
  return p;
}

// The four plans of one batch, ordered so that every stage computes only what the next one reads.
struct FramePlans {
  AxisPlan v2, h2, v1, h1;
};

inline FramePlans make_frame_plans(int H, int W, const Geometry& g, int ksize_multiple) {
  FramePlans fp;
  fp.v2 = make_axis_plan(g.hc, g.h2, g.top2, g.out, ksize_multiple);
  fp.h2 = make_axis_plan(g.wc, g.w2, g.left2, g.out, ksize_multiple);
  // rows / columns of the first crop that the second resize reads
  fp.v1 = make_axis_plan(H, g.h1, g.top1 + fp.v2.in_start, fp.v2.in_len, ksize_multiple);
  fp.h1 = make_axis_plan(W, g.w1, g.left1 + fp.h2.in_start, fp.h2.in_len, ksize_multiple);
  return fp;
}

// Validates every argument of frames_to_tensor; returns the geometry and sets yuv.
inline Geometry check_frames_args(const at::Tensor& frames, const c10::optional<at::Tensor>& u,
                                  const c10::optional<at::Tensor>& v, int64_t matrix,
                                  at::IntArrayRef geometry, at::ArrayRef<double> mean,
                                  at::ArrayRef<double> std, at::ScalarType dtype, bool* yuv) {
  TORCH_CHECK(frames.scalar_type() == at::kByte,
              "frames_to_tensor: frames must be uint8, got ", frames.scalar_type());
  TORCH_CHECK(u.has_value() == v.has_value(),
              "frames_to_tensor: u and v must both be given (YUV 4:2:0) or both be None (RGB)");
  *yuv = u.has_value();
  if (*yuv) {
    TORCH_CHECK(frames.dim() == 3, "frames_to_tensor: the Y plane must be (T, H, W), got shape ",
                frames.sizes());
    const int64_t T = frames.size(0), H = frames.size(1), W = frames.size(2);
    const std::vector<int64_t> want = {T, (H + 1) / 2, (W + 1) / 2};
    for (const auto* pl : {&*u, &*v}) {
      const char* name = pl == &*u ? "u" : "v";
      TORCH_CHECK(pl->scalar_type() == at::kByte, "frames_to_tensor: ", name,
                  " plane must be uint8, got ", pl->scalar_type());
      TORCH_CHECK(pl->sizes() == at::IntArrayRef(want), "frames_to_tensor: ", name,
                  " plane must be (T, (H+1)//2, (W+1)//2) = ", at::IntArrayRef(want),
                  " for a Y plane of ", frames.sizes(), ", got ", pl->sizes());
      TORCH_CHECK(pl->device() == frames.device(), "frames_to_tensor: ", name,
                  " plane is on ", pl->device(), " but the Y plane is on ", frames.device());
    }
  } else {
    TORCH_CHECK(frames.dim() == 4 && frames.size(3) == 3,
                "frames_to_tensor: RGB frames must be (T, H, W, 3), got shape ", frames.sizes());
  }
  TORCH_CHECK(frames.size(0) > 0 && frames.size(1) > 0 && frames.size(2) > 0,
              "frames_to_tensor: frames must be non-empty, got shape ", frames.sizes());
  TORCH_CHECK(matrix == kBT601 || matrix == kBT709,
              "frames_to_tensor: matrix must be 0 (BT.601) or 1 (BT.709), got ", matrix);
  TORCH_CHECK(geometry.size() == kGeometryLen,
              "frames_to_tensor: geometry must be 11 ints (h1, w1, top1, left1, hc, wc, h2, w2, "
              "top2, left2, out), got ", geometry.size());
  Geometry g;
  int* gp = &g.h1;
  for (int i = 0; i < kGeometryLen; ++i) gp[i] = (int)geometry[i];
  TORCH_CHECK(g.h1 > 0 && g.w1 > 0 && g.hc > 0 && g.wc > 0 && g.h2 > 0 && g.w2 > 0 && g.out > 0,
              "frames_to_tensor: geometry sizes must be positive, got ", geometry);
  TORCH_CHECK(g.top1 >= 0 && g.left1 >= 0 && g.top1 + g.hc <= g.h1 && g.left1 + g.wc <= g.w1,
              "frames_to_tensor: first crop [", g.top1, ":", g.top1 + g.hc, ", ", g.left1, ":",
              g.left1 + g.wc, "] is outside the resized ", g.h1, "x", g.w1, " frame");
  TORCH_CHECK(g.top2 >= 0 && g.left2 >= 0 && g.top2 + g.out <= g.h2 && g.left2 + g.out <= g.w2,
              "frames_to_tensor: center crop of ", g.out, " at (", g.top2, ", ", g.left2,
              ") is outside the resized ", g.h2, "x", g.w2, " frame");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3,
              "frames_to_tensor: mean and std must have 3 values (RGB), got ", mean.size(), " and ",
              std.size());
  for (double s : std) TORCH_CHECK(s != 0.0, "frames_to_tensor: std must be non-zero, got ", std);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "frames_to_tensor: dtype must be float32, float16 or bfloat16, got ", dtype);
  return g;
}

// The planes of a validated call as contiguous tensors; u and v stay undefined for RGB input.
// Shared by the CPU and CUDA paths, which read the planes with plain row strides.
struct ContiguousPlanes {
  at::Tensor y, u, v;
};

inline ContiguousPlanes contiguous_planes(const at::Tensor& frames,
                                          const c10::optional<at::Tensor>& u,
                                          const c10::optional<at::Tensor>& v) {
  ContiguousPlanes p;
  p.y = frames.contiguous();
  if (u.has_value()) {
    p.u = u->contiguous();
    p.v = v->contiguous();
  }
  return p;
}

// One validated frames_to_tensor call: everything the CPU and CUDA entry points share, built
// once by the bindings so that each device's code starts at its own work.
struct FramesCall {
  ContiguousPlanes planes;  // planes.y: the RGB frames (T,H,W,3) or the Y plane (T,H,W)
  Geometry g;
  bool yuv = false;
  YuvCoeffs yc;
  float mean[3], std[3];
  at::ScalarType dtype;
  int T, H, W;
};

inline FramesCall check_frames_call(const at::Tensor& frames, const c10::optional<at::Tensor>& u,
                                    const c10::optional<at::Tensor>& v, int64_t matrix,
                                    bool full_range, at::IntArrayRef geometry,
                                    at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                    at::ScalarType dtype) {
  FramesCall call;
  call.g = check_frames_args(frames, u, v, matrix, geometry, mean, std, dtype, &call.yuv);
  call.planes = contiguous_planes(frames, u, v);
  call.yc = yuv_coeffs((int)matrix, full_range);
  for (int c = 0; c < 3; ++c) {
    call.mean[c] = (float)mean[c];
    call.std[c] = (float)std[c];
  }
  call.dtype = dtype;
  call.T = (int)frames.size(0);
  call.H = (int)frames.size(1);
  call.W = (int)frames.size(2);
  return call;
}

at::Tensor frames_to_tensor_cpu(const FramesCall& call);

#ifdef PLLAVA_FAST_WITH_CUDA
at::Tensor frames_to_tensor_cuda(const FramesCall& call);
#endif

}  // namespace pllava_fast
