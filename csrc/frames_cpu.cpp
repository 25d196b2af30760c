// CPU implementation of frames_to_tensor: one frame per task (at::parallel_for), every stage on
// 4-byte pixels (R, G, B, 0 as Pillow stores RGB) so the inner loops are fixed-width int32 vector
// code. Only the pixels that survive both crops are computed.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>

#include "frames.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace pllava_fast {
namespace {

// One binary for every x86-64 CPU: the hot loops have AVX2 versions chosen at run time.
#if defined(__GNUC__) && defined(__x86_64__)
#define PF_X86_AVX2 1
#else
#define PF_X86_AVX2 0
#endif

// PLLAVA_FAST_NO_SIMD=1 forces the portable loops (tests compare both against the torch path).
bool use_avx2() {
#if PF_X86_AVX2
  static const bool yes =
      __builtin_cpu_supports("avx2") && std::getenv("PLLAVA_FAST_NO_SIMD") == nullptr;
  return yes;
#else
  return false;
#endif
}

// One row of the horizontal pass. src: padded RGBX row (taps past the image read zeros with zero
// weight); k4: (n, ksize * 4) weights repeated per channel; ksize is even, so a pixel's taps are
// whole 8-lane vectors (lanes l and l + 4 hold the same channel).
void hpass_row_scalar(const uint8_t* src, const int32_t* xmin, const int32_t* k4, int n,
                      int ksize, uint8_t* dst) {
  const int span = ksize * 4;
  for (int x = 0; x < n; ++x) {
    const uint8_t* s = src + (size_t)xmin[x] * 4;
    const int32_t* k = k4 + (size_t)x * span;
    int32_t acc[4] = {0, 0, 0, 0};
    for (int j = 0; j < span; j += 4)
      for (int c = 0; c < 3; ++c) acc[c] += (int32_t)s[j + c] * k[j + c];
    for (int c = 0; c < 3; ++c) dst[x * 4 + c] = clip8(resample_init() + acc[c]);
    dst[x * 4 + 3] = 0;
  }
}

#if PF_X86_AVX2
// [R, G, B, X] sums of one output pixel's taps (lanes l and l + 4 of the 8-lane products).
__attribute__((target("avx2"))) inline __m128i tap_sums(const uint8_t* s, const int32_t* k,
                                                        int span) {
  __m256i acc = _mm256_setzero_si256();
  for (int j = 0; j < span; j += 8) {
    const __m256i px = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(s + j)));
    const __m256i kk = _mm256_loadu_si256((const __m256i*)(k + j));
    acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(px, kk));
  }
  const __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  return _mm_srai_epi32(_mm_add_epi32(sum, _mm_set1_epi32(resample_init())), kPrecisionBits);
}

// 4 output pixels per step; the saturating packs are clip8 (X lanes have zero weights -> 0).
__attribute__((target("avx2"))) void hpass_row_avx2(const uint8_t* src, const int32_t* xmin,
                                                   const int32_t* k4, int n, int ksize,
                                                   uint8_t* dst) {
  const int span = ksize * 4;
  int x = 0;
  for (; x + 4 <= n; x += 4) {
    __m128i q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = tap_sums(src + (size_t)xmin[x + i] * 4, k4 + (size_t)(x + i) * span, span);
    const __m128i lo = _mm_packs_epi32(q[0], q[1]), hi = _mm_packs_epi32(q[2], q[3]);
    _mm_storeu_si128((__m128i*)(dst + (size_t)x * 4), _mm_packus_epi16(lo, hi));
  }
  for (; x < n; ++x) {
    const __m128i q = tap_sums(src + (size_t)xmin[x] * 4, k4 + (size_t)x * span, span);
    const __m128i b = _mm_packus_epi16(_mm_packs_epi32(q, q), _mm_setzero_si128());
    const int32_t px = _mm_cvtsi128_si32(b);
    std::memcpy(dst + (size_t)x * 4, &px, 4);
  }
}
#endif

void hpass_row(const uint8_t* src, const int32_t* xmin, const int32_t* k4, int n, int ksize,
               uint8_t* dst) {
#if PF_X86_AVX2
  if (use_avx2()) return hpass_row_avx2(src, xmin, k4, n, ksize, dst);
#endif
  hpass_row_scalar(src, xmin, k4, n, ksize, dst);
}

// n RGB pixels -> RGBX (X left as is).
void rgb_row_scalar(const uint8_t* s, int n, uint8_t* dst) {
  for (int x = 0; x < n; ++x) {
    dst[x * 4 + 0] = s[x * 3 + 0];
    dst[x * 4 + 1] = s[x * 3 + 1];
    dst[x * 4 + 2] = s[x * 3 + 2];
  }
}

#if PF_X86_AVX2
__attribute__((target("avx2"))) void rgb_row_avx2(const uint8_t* s, int n, uint8_t* dst) {
  // 4 pixels (12 bytes) -> 16 bytes with a zero X byte (index -1 -> 0)
  const __m128i spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  int x = 0;
  for (; x + 6 <= n; x += 4) {  // 3 * (x + 6) >= 3 * x + 16: the 16-byte load stays in the row
    const __m128i px = _mm_loadu_si128((const __m128i*)(s + x * 3));
    _mm_storeu_si128((__m128i*)(dst + x * 4), _mm_shuffle_epi8(px, spread));
  }
  rgb_row_scalar(s + x * 3, n - x, dst + x * 4);
}
#endif

void rgb_row(const uint8_t* s, int n, uint8_t* dst) {
#if PF_X86_AVX2
  if (use_avx2()) return rgb_row_avx2(s, n, dst);
#endif
  rgb_row_scalar(s, n, dst);
}

// Source pixels [q0, q0 + n) of one YUV 4:2:0 row -> RGBX (X left as is).
void yuv_row_scalar(const uint8_t* ys, const uint8_t* us, const uint8_t* vs, int q0, int n,
                    const YuvCoeffs& yc, uint8_t* dst) {
  for (int x = 0; x < n; ++x) {
    const int sx = q0 + x;
    yuv_to_rgb(yc, ys[sx], us[sx / 2], vs[sx / 2], &dst[x * 4], &dst[x * 4 + 1], &dst[x * 4 + 2]);
  }
}

#if PF_X86_AVX2
// 8 int32 -> 8 bytes clamped to 0..255 (saturating packs), as clamp_u8.
__attribute__((target("avx2"))) inline __m128i to_u8(__m256i c) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  return _mm_packus_epi16(w, _mm_setzero_si128());
}

// Same integer arithmetic as yuv_to_rgb, 8 pixels per step.
__attribute__((target("avx2"))) void yuv_row_avx2(const uint8_t* ys, const uint8_t* us,
                                                  const uint8_t* vs, int q0, int n,
                                                  const YuvCoeffs& yc, uint8_t* dst) {
  int x = 0;
  if (q0 & 1) {  // start on a chroma pair
    yuv_row_scalar(ys, us, vs, q0, 1, yc, dst);
    x = 1;
  }
  const __m256i cy = _mm256_set1_epi32(yc.cy), yoff = _mm256_set1_epi32(yc.y_offset);
  const __m256i crv = _mm256_set1_epi32(yc.crv), cgu = _mm256_set1_epi32(yc.cgu);
  const __m256i cgv = _mm256_set1_epi32(yc.cgv), cbu = _mm256_set1_epi32(yc.cbu);
  const __m256i c128 = _mm256_set1_epi32(128);
  const __m128i zero = _mm_setzero_si128();
  for (; x + 16 <= n; x += 16) {
    const int sx = q0 + x;
    const __m128i y16 = _mm_loadu_si128((const __m128i*)(ys + sx));
    const __m128i u8 = _mm_loadl_epi64((const __m128i*)(us + sx / 2));
    const __m128i v8 = _mm_loadl_epi64((const __m128i*)(vs + sx / 2));
    const __m128i u16 = _mm_unpacklo_epi8(u8, u8), v16 = _mm_unpacklo_epi8(v8, v8);
    for (int h = 0; h < 2; ++h) {
      const __m128i yb = h ? _mm_srli_si128(y16, 8) : y16;
      const __m128i ub = h ? _mm_srli_si128(u16, 8) : u16;
      const __m128i vb = h ? _mm_srli_si128(v16, 8) : v16;
      const __m256i Y = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_cvtepu8_epi32(yb), yoff), 3);
      const __m256i U = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_cvtepu8_epi32(ub), c128), 3);
      const __m256i V = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_cvtepu8_epi32(vb), c128), 3);
      const __m256i yp = _mm256_srai_epi32(_mm256_mullo_epi32(Y, cy), 16);
      const __m256i R = _mm256_add_epi32(yp, _mm256_srai_epi32(_mm256_mullo_epi32(V, crv), 16));
      const __m256i G = _mm256_add_epi32(
          _mm256_add_epi32(yp, _mm256_srai_epi32(_mm256_mullo_epi32(U, cgu), 16)),
          _mm256_srai_epi32(_mm256_mullo_epi32(V, cgv), 16));
      const __m256i B = _mm256_add_epi32(yp, _mm256_srai_epi32(_mm256_mullo_epi32(U, cbu), 16));
      const __m128i rg = _mm_unpacklo_epi8(to_u8(R), to_u8(G));
      const __m128i b0 = _mm_unpacklo_epi8(to_u8(B), zero);
      uint8_t* o = dst + (size_t)(x + 8 * h) * 4;
      _mm_storeu_si128((__m128i*)o, _mm_unpacklo_epi16(rg, b0));
      _mm_storeu_si128((__m128i*)(o + 16), _mm_unpackhi_epi16(rg, b0));
    }
  }
  if (x < n) yuv_row_scalar(ys, us, vs, q0 + x, n - x, yc, dst + (size_t)x * 4);
}
#endif

void yuv_row(const uint8_t* ys, const uint8_t* us, const uint8_t* vs, int q0, int n,
             const YuvCoeffs& yc, uint8_t* dst) {
#if PF_X86_AVX2
  if (use_avx2()) return yuv_row_avx2(ys, us, vs, q0, n, yc, dst);
#endif
  yuv_row_scalar(ys, us, vs, q0, n, yc, dst);
}

// One output row of the vertical pass over len bytes: dst[i] = sum_j k[j] * rows[j][i].
void vpass_row_scalar(const uint8_t* src, size_t stride, const int32_t* k, int count, int begin,
                      int len, uint8_t* dst) {
  for (int i = begin; i < len; ++i) {
    int32_t acc = resample_init();
    for (int j = 0; j < count; ++j) acc += (int32_t)src[(size_t)j * stride + i] * k[j];
    dst[i] = clip8(acc);
  }
}

#if PF_X86_AVX2
// 8 bytes per step, all taps accumulated in a register.
__attribute__((target("avx2"))) void vpass_row_avx2(const uint8_t* src, size_t stride,
                                                   const int32_t* k, int count, int len,
                                                   uint8_t* dst) {
  int i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256i acc = _mm256_set1_epi32(resample_init());
    const uint8_t* s = src + i;
    for (int j = 0; j < count; ++j) {
      const __m256i px = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(s + j * stride)));
      acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(px, _mm256_set1_epi32(k[j])));
    }
    acc = _mm256_srai_epi32(acc, kPrecisionBits);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    _mm_storel_epi64((__m128i*)(dst + i), _mm_packus_epi16(w, w));
  }
  vpass_row_scalar(src, stride, k, count, i, len, dst);
}
#endif

void vpass_row(const uint8_t* src, size_t stride, const int32_t* k, int count, int len,
               uint8_t* dst) {
#if PF_X86_AVX2
  if (use_avx2()) return vpass_row_avx2(src, stride, k, count, len, dst);
#endif
  vpass_row_scalar(src, stride, k, count, 0, len, dst);
}

std::vector<int32_t> expand_x4(const AxisPlan& p) {
  std::vector<int32_t> k4(p.k.size() * 4);
  for (size_t i = 0; i < p.k.size(); ++i)
    for (int c = 0; c < 4; ++c) k4[i * 4 + c] = c < 3 ? p.k[i] : 0;
  return k4;
}

template <typename out_t>
void run_frames(const uint8_t* rgb, const uint8_t* y, const uint8_t* u, const uint8_t* v, int T,
                int H, int W, const YuvCoeffs& yc, const Geometry& g, const float (*lut)[256],
                out_t* out) {
  const FramePlans fp = make_frame_plans(H, W, g, /*ksize_multiple=*/2);
  const std::vector<int32_t> k4_h1 = expand_x4(fp.h1), k4_h2 = expand_x4(fp.h2);
  const int cw = (W + 1) / 2, ch = (H + 1) / 2;
  // source columns read by the first horizontal pass, and the zero padding its taps may run into
  const int q0 = fp.h1.in_start, qn = fp.h1.in_len;
  const int arows = fp.v1.in_len, acols = fp.h1.n;   // first horizontal pass output
  const int brows = fp.v1.n, bcols = fp.h2.in_len;   // first crop, as read by the second resize
  const int crows = fp.v2.in_len, ccols = fp.h2.n;   // second horizontal pass output
  const int S = g.out;

  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> src_row((size_t)(qn + fp.h1.ksize) * 4, 0);
    std::vector<uint8_t> a((size_t)arows * acols * 4);
    std::vector<uint8_t> b((size_t)brows * (bcols + fp.h2.ksize) * 4, 0);
    std::vector<uint8_t> c((size_t)crows * ccols * 4);
    std::vector<uint8_t> d((size_t)S * 4);
    const size_t bstride = (size_t)(bcols + fp.h2.ksize) * 4;
    for (int64_t t = t0; t < t1; ++t) {
      // 1. source rows -> RGBX -> first horizontal pass
      for (int r = 0; r < arows; ++r) {
        const int sy = fp.v1.in_start + r;
        uint8_t* dst = src_row.data();
        if (rgb != nullptr) {
          rgb_row(rgb + (((size_t)t * H + sy) * W + q0) * 3, qn, dst);
        } else {
          const uint8_t* ys = y + ((size_t)t * H + sy) * W;
          const uint8_t* us = u + ((size_t)t * ch + sy / 2) * cw;
          const uint8_t* vs = v + ((size_t)t * ch + sy / 2) * cw;
          yuv_row(ys, us, vs, q0, qn, yc, dst);
        }
        hpass_row(src_row.data(), fp.h1.xmin.data(), k4_h1.data(), acols, fp.h1.ksize,
                  a.data() + (size_t)r * acols * 4);
      }
      // 2. first vertical pass -> the rows/columns of the first crop that the second resize reads
      for (int r = 0; r < brows; ++r) {
        vpass_row(a.data() + (size_t)fp.v1.xmin[r] * acols * 4, (size_t)acols * 4,
                  fp.v1.k.data() + (size_t)r * fp.v1.ksize, fp.v1.count[r], acols * 4,
                  b.data() + r * bstride);
      }
      // 3. second horizontal pass (center-crop columns only)
      for (int r = 0; r < crows; ++r) {
        hpass_row(b.data() + (size_t)r * bstride, fp.h2.xmin.data(),
                  k4_h2.data(), ccols, fp.h2.ksize, c.data() + (size_t)r * ccols * 4);
      }
      // 4. second vertical pass, rescale + normalize, HWC -> CHW
      out_t* o = out + (size_t)t * 3 * S * S;
      for (int r = 0; r < S; ++r) {
        vpass_row(c.data() + (size_t)fp.v2.xmin[r] * ccols * 4, (size_t)ccols * 4,
                  fp.v2.k.data() + (size_t)r * fp.v2.ksize, fp.v2.count[r], S * 4, d.data());
        for (int ch3 = 0; ch3 < 3; ++ch3) {
          out_t* orow = o + ((size_t)ch3 * S + r) * S;
          const float* l = lut[ch3];
          for (int x = 0; x < S; ++x) orow[x] = static_cast<out_t>(l[d[x * 4 + ch3]]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor frames_to_tensor_cpu(const FramesCall& call) {
  const at::Tensor& fr = call.planes.y;
  TORCH_CHECK(fr.device().is_cpu(), "frames_to_tensor_cpu: frames must be on the CPU, got ",
              fr.device());
  const Geometry& g = call.g;
  const bool yuv = call.yuv;
  const int T = call.T, H = call.H, W = call.W;
  float lut[3][256];
  for (int c = 0; c < 3; ++c)
    for (int p = 0; p < 256; ++p) lut[c][p] = normalize_u8((uint8_t)p, call.mean[c], call.std[c]);
  const YuvCoeffs& yc = call.yc;
  const at::ScalarType dtype = call.dtype;
  auto out = at::empty({T, 3, g.out, g.out}, fr.options().dtype(dtype));
  const uint8_t* rgb = yuv ? nullptr : fr.data_ptr<uint8_t>();
  const uint8_t* yp = yuv ? fr.data_ptr<uint8_t>() : nullptr;
  const uint8_t* up = yuv ? call.planes.u.data_ptr<uint8_t>() : nullptr;
  const uint8_t* vp = yuv ? call.planes.v.data_ptr<uint8_t>() : nullptr;
  if (dtype == at::kFloat) {
    run_frames<float>(rgb, yp, up, vp, T, H, W, yc, g, lut, out.data_ptr<float>());
  } else if (dtype == at::kHalf) {
    run_frames<c10::Half>(rgb, yp, up, vp, T, H, W, yc, g, lut, out.data_ptr<c10::Half>());
  } else {
    run_frames<c10::BFloat16>(rgb, yp, up, vp, T, H, W, yc, g, lut,
                              out.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace pllava_fast
