// The loops of csrc/cpu/inplace_loops.h for float, 16 values at a time with AVX-512: a compare
// gives the kept values' mask, a register compress packs them for the gather and an expand
// spreads them back for the recovery (both with masked, contiguous loads and stores, which stay
// inside the kept array and are fast on the CPUs that slow the memory forms of compress and
// expand: AMD's Zen 4). Compiled for AVX-512 by function attribute, run only where the CPU
// kernels' variant is AVX-512 (csrc/cpu/dispatch.cpp), so the same rule (csrc/inplace.h) in the
// same float operations decides, and the same values are kept, as one at a time.
#pragma once

#include "cpu/kernels.h"

#include <cstdint>
#include <string_view>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CUSTOM_BN_INPLACE_AVX512 1
#define CUSTOM_BN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif

namespace custom_bn::cpu {

// Whether the AVX-512 loops run: the CPU kernels' variant is AVX-512.
inline bool inplace_avx512() {
#if defined(CUSTOM_BN_INPLACE_AVX512)
  static const bool selected = std::string_view(kernel_capability()) == "avx512";
  return selected;
#else
  return false;
#endif
}

#if defined(CUSTOM_BN_INPLACE_AVX512)
namespace avx512 {

// Lanes [0, n) of 16.
CUSTOM_BN_TARGET_AVX512 inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// The per-channel values of 16 lanes k.. of a run (one channel, c0) or a row (channels c0 + k..).
struct Channels {
  bool row;
  int64_t c0;

  CUSTOM_BN_TARGET_AVX512 __m512 of(const std::vector<float>& v, int64_t k, __mmask16 lanes) const {
    return row ? _mm512_maskz_loadu_ps(lanes, v.data() + c0 + k) : _mm512_set1_ps(v[c0]);
  }
  CUSTOM_BN_TARGET_AVX512 __mmask16 flags(const std::vector<uint8_t>& v, int64_t k,
                                          __mmask16 lanes) const {
    if (!row) return v[c0] ? lanes : __mmask16(0);
    const __m128i bytes = _mm_maskz_loadu_epi8(lanes, v.data() + c0 + k);
    return _mm_mask_cmpneq_epi8_mask(lanes, bytes, _mm_setzero_si128());
  }
};

// KeepRule::kept for the lanes of y at memory offset i (offset k in the run or row).
CUSTOM_BN_TARGET_AVX512 inline __mmask16 kept_mask(const KeepRule<float>& rule, const Channels& ch,
                                                   __m512 y, const float* r, int64_t i, int64_t k,
                                                   __mmask16 lanes) {
  const __mmask16 clipped =
      _mm512_mask_cmp_ps_mask(lanes, y, _mm512_set1_ps(rule.lower), _CMP_LE_OQ) |
      _mm512_mask_cmp_ps_mask(lanes, y, _mm512_set1_ps(rule.upper), _CMP_GE_OQ);
  // any_always is uniform over a call: the branch goes the same way every time.
  if (!rule.has_residual) {
    return rule.any_always ? clipped | ch.flags(rule.always, k, lanes) : clipped;
  }
  __m512 offset = _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes, r + i));
  if (rule.has_bias) offset = _mm512_add_ps(ch.of(rule.abs_bias, k, lanes), offset);
  const __mmask16 safe =
      _mm512_mask_cmp_ps_mask(lanes, ch.of(rule.scale, k, lanes), offset, _CMP_GT_OQ);
  return clipped | __mmask16(lanes & ~safe);
}

// y holds the output values of [i0, i1), from y[0] (csrc/cpu/inplace_loops.h).
CUSTOM_BN_TARGET_AVX512 inline int64_t kept_count(const KeepRule<float>& rule, const float* y,
                                                  const float* r, int64_t i0, int64_t i1,
                                                  const Channels& ch) {
  int64_t count = 0;
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 lanes = first_lanes(i1 - i);
    const __m512 yv = _mm512_maskz_loadu_ps(lanes, y + (i - i0));
    count += __builtin_popcount(kept_mask(rule, ch, yv, r, i, i - i0, lanes));
  }
  return count;
}

CUSTOM_BN_TARGET_AVX512 inline int64_t gather_kept(const KeepRule<float>& rule, float* x,
                                                   const float* y, const float* r, float* kept,
                                                   int64_t at, int64_t i0, int64_t i1,
                                                   const Channels& ch) {
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 lanes = first_lanes(i1 - i);
    const __m512 yv = _mm512_maskz_loadu_ps(lanes, y + (i - i0));
    const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + i);
    const __mmask16 keep = kept_mask(rule, ch, yv, r, i, i - i0, lanes);
    const int count = __builtin_popcount(keep);
    _mm512_mask_storeu_ps(kept + at, first_lanes(count), _mm512_maskz_compress_ps(keep, xv));
    at += count;
    _mm512_mask_storeu_ps(x + i, lanes, yv);
  }
  return at;
}

CUSTOM_BN_TARGET_AVX512 inline int64_t recover(const KeepRule<float>& rule, const float* y,
                                               const float* r, const float* kept, int64_t at,
                                               int64_t i0, int64_t i1, const Channels& ch,
                                               const RecoveryParams<float>& p, float* out) {
  const __m512 lower = _mm512_set1_ps(p.lower), inverse_slope = _mm512_set1_ps(p.inverse_slope);
  for (int64_t i = i0; i < i1; i += 16) {
    const int64_t k = i - i0;
    const __mmask16 lanes = first_lanes(i1 - i);
    const __m512 yv = _mm512_maskz_loadu_ps(lanes, y + i);
    const __mmask16 keep = kept_mask(rule, ch, yv, r, i, k, lanes);
    const int count = __builtin_popcount(keep);
    const __m512 xv =
        _mm512_maskz_expand_ps(keep, _mm512_maskz_loadu_ps(first_lanes(count), kept + at));
    at += count;
    const __m512 from_input =
        _mm512_mul_ps(_mm512_sub_ps(xv, ch.of(p.mean, k, lanes)), ch.of(p.invstd, k, lanes));
    __m512 z = yv;
    if (p.inverts_below) {  // else every value below lower is kept
      const __mmask16 below = _mm512_cmp_ps_mask(yv, lower, _CMP_LE_OQ);
      z = _mm512_mask_mov_ps(
          yv, below, _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(yv, lower), inverse_slope), lower));
    }
    z = _mm512_sub_ps(z, ch.of(p.bias, k, lanes));
    if (r) z = _mm512_sub_ps(z, _mm512_maskz_loadu_ps(lanes, r + i));
    const __m512 recovered = _mm512_mul_ps(z, ch.of(p.inverse_weight, k, lanes));
    _mm512_mask_storeu_ps(out + k, lanes, _mm512_mask_mov_ps(recovered, keep, from_input));
  }
  return at;
}

}  // namespace avx512
#endif

}  // namespace custom_bn::cpu
