// Pixel math shared by the CPU (frames_cpu.cpp) and CUDA (frames_kernel.cu) sources.
//
// Everything here is integer or IEEE double arithmetic with a fixed evaluation order, so the CPU
// and the GPU produce bit-identical uint8 intermediates and the CPU tests cover the GPU numerics.
// No torch headers: frames_kernel.cu includes this and must compile with plain nvcc.
//
// Resampling reproduces Pillow's ImagingResample for 8-bit images (BICUBIC, a = -0.5): the filter
// support grows with the downscale factor (antialiasing), coefficients are normalised in double,
// then quantised to PRECISION_BITS fixed point; each pass accumulates in int32 starting from half
// an LSB and rounds back to uint8 (so the horizontal pass result is rounded to uint8 before the
// vertical pass, as in Pillow).
#pragma once

#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define PF_HD __host__ __device__ __forceinline__
#else
#define PF_HD inline
#endif

namespace pllava_fast {

// 32 bits minus 8 for the pixel minus 2 for the filter's overshoot (as Pillow).
constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr double kBicubicSupport = 2.0;

enum ColorMatrix : int { kBT601 = 0, kBT709 = 1 };

// ------------------------------------------------------------------------------------------------
// YUV -> RGB
// ------------------------------------------------------------------------------------------------
// swscale's fixed point (its SIMD yuv2rgb path, which PyAV's rgb24 uses for 4:2:0 frames):
// samples scaled by 8, coefficients by 2^13, each product floored by >> 16 (pmulhw), the terms
// summed, then saturated to 0..255. Reproducing it makes the op's RGB equal FFmpeg's rgb24.
struct YuvCoeffs {
  int y_offset;            // 16 for limited range, 0 for full
  int cy;                  // luma gain * 2^13
  int crv, cgu, cgv, cbu;  // chroma gains * 2^13 (cgu, cgv negative)
};

PF_HD int round_fixed13(double x) { return (int)floor(x * 8192.0 + 0.5); }

// Coefficients for Y'CbCr -> R'G'B' (ITU-R BT.601 / BT.709), limited (16-235/240) or full range.
PF_HD YuvCoeffs yuv_coeffs(int matrix, bool full_range) {
  const double kr = matrix == kBT709 ? 0.2126 : 0.299;
  const double kb = matrix == kBT709 ? 0.0722 : 0.114;
  const double kg = 1.0 - kr - kb;
  const double ys = full_range ? 1.0 : 255.0 / 219.0;
  const double cs = full_range ? 1.0 : 255.0 / 224.0;
  YuvCoeffs c;
  c.y_offset = full_range ? 0 : 16;
  c.cy = round_fixed13(ys);
  c.crv = round_fixed13(2.0 * (1.0 - kr) * cs);
  c.cbu = round_fixed13(2.0 * (1.0 - kb) * cs);
  c.cgu = round_fixed13(-2.0 * kb * (1.0 - kb) / kg * cs);
  c.cgv = round_fixed13(-2.0 * kr * (1.0 - kr) / kg * cs);
  return c;
}

PF_HD uint8_t clamp_u8(int v) { return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v)); }

PF_HD int mulhi16(int a, int b) { return (a * b) >> 16; }

// One pixel; u/v are the co-sited 4:2:0 chroma samples (nearest, as swscale's unscaled path).
PF_HD void yuv_to_rgb(const YuvCoeffs& c, int y, int u, int v, uint8_t* r, uint8_t* g,
                      uint8_t* b) {
  const int yp = mulhi16((y - c.y_offset) * 8, c.cy);
  const int u8 = (u - 128) * 8, v8 = (v - 128) * 8;
  *r = clamp_u8(yp + mulhi16(v8, c.crv));
  *g = clamp_u8(yp + mulhi16(u8, c.cgu) + mulhi16(v8, c.cgv));
  *b = clamp_u8(yp + mulhi16(u8, c.cbu));
}

// ------------------------------------------------------------------------------------------------
// Pillow-style antialiased bicubic resampling
// ------------------------------------------------------------------------------------------------
PF_HD double bicubic_filter(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Maximum taps per output sample for resizing in_size -> out_size.
PF_HD int resample_ksize(int in_size, int out_size) {
  double filterscale = (double)in_size / out_size;
  if (filterscale < 1.0) filterscale = 1.0;
  return (int)ceil(kBicubicSupport * filterscale) * 2 + 1;
}

// Taps of output sample `xx` (0 <= xx < out_size): writes up to ksize int32 fixed-point weights
// to k (zero-filled past the count), sets *xmin to the first input index, returns the tap count.
PF_HD int resample_coeffs(int in_size, int out_size, int xx, int ksize, int* xmin_out,
                          int32_t* k) {
  const double scale = (double)in_size / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = kBicubicSupport * filterscale;
  const double center = (xx + 0.5) * scale;
  const double ss = 1.0 / filterscale;
  int xmin = (int)(center - support + 0.5);
  if (xmin < 0) xmin = 0;
  int xmax = (int)(center + support + 0.5);
  if (xmax > in_size) xmax = in_size;
  xmax -= xmin;
  if (xmax > ksize) xmax = ksize;  // cannot happen for a ksize from resample_ksize
  // Weights are evaluated twice (sum, then normalise) instead of buffered: same values, no limit
  // on the tap count.
  double ww = 0.0;
  for (int x = 0; x < xmax; ++x) ww += bicubic_filter((x + xmin - center + 0.5) * ss);
  for (int x = 0; x < ksize; ++x) {
    if (x < xmax) {
      double v = bicubic_filter((x + xmin - center + 0.5) * ss);
      if (ww != 0.0) v /= ww;
      k[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << kPrecisionBits))
                   : (int32_t)(0.5 + v * (1 << kPrecisionBits));
    } else {
      k[x] = 0;
    }
  }
  *xmin_out = xmin;
  return xmax;
}

// Fixed-point accumulator -> uint8, as Pillow's clip8.
PF_HD uint8_t clip8(int32_t acc) { return clamp_u8(acc >> kPrecisionBits); }

PF_HD int32_t resample_init() { return 1 << (kPrecisionBits - 1); }

// ------------------------------------------------------------------------------------------------
// Rescale + normalize (CLIPImageProcessor: float64 rescale by 1/255 cast to float32, then
// (x - mean) / std in float32)
// ------------------------------------------------------------------------------------------------
PF_HD float normalize_u8(uint8_t p, float mean, float std) {
  const float x = (float)((double)p * (1.0 / 255.0));
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(__fsub_rn(x, mean), std);  // exact IEEE even under --use_fast_math
#else
  return (x - mean) / std;
#endif
}

// Output geometry of one batch (all frames share it), in the order the stages use it:
// resize (H, W) -> (h1, w1), crop [top1, top1 + hc) x [left1, left1 + wc), resize (hc, wc) ->
// (h2, w2), crop [top2, top2 + out) x [left2, left2 + out).
struct Geometry {
  int h1, w1, top1, left1, hc, wc, h2, w2, top2, left2, out;
};
constexpr int kGeometryLen = 11;

}  // namespace pllava_fast
