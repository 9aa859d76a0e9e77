// Vector I/O of the CPU kernels: loads and stores between a tensor's scalar_t and its opmath
// vectors (float for bfloat16/float16), non-temporal stores, and the per-channel parameters of
// a vector step. Compiled once per instruction set, in the namespace CPU_CAPABILITY names.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#ifndef CPU_CAPABILITY
#error "csrc/cpu kernel headers are compiled once per instruction set: define CPU_CAPABILITY"
#endif

namespace custom_bn::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// The first `count` values at p (the rest of the vector is zero; masked where the CPU has masks).
template <typename scalar_t>
inline Vectorized<opmath_t<scalar_t>> load_vec(
    const scalar_t* p, int64_t count = Vectorized<opmath_t<scalar_t>>::size()) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    Vec v;
    if (count == Vec::size()) {
      at::vec::load_to_float(p, v);
    } else {
      v = std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count)));
    }
    return v;
  } else {
    return Vec::loadu(p, count);
  }
}

template <typename scalar_t>
inline void store_vec(scalar_t* p, const Vectorized<opmath_t<scalar_t>>& v,
                      int64_t count = Vectorized<opmath_t<scalar_t>>::size()) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
  } else {
    v.store(p, count);
  }
}

// v rounded to scalar_t and back, for scalars and vectors of opmath_t<scalar_t>: the value a
// result emitted in scalar_t holds, so that a pass that sums what it also emits sums what
// the next pass reads back.
template <typename scalar_t, typename T>
inline T rounded_to(const T& v) {
  if constexpr (!at::vec::is_reduced_floating_point_v<scalar_t>) {
    return v;
  } else if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(static_cast<scalar_t>(v));
  } else {
    return std::get<0>(
        at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(v, v)));
  }
}

// A non-temporal store of one full vector to an address aligned to its size: the line is
// written without being read first and without displacing cached data. Where the instruction
// set has none, stream_vec returns false and the caller stores normally.
template <typename T>
inline bool stream_vec(T* p, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (reinterpret_cast<uintptr_t>(p) % sizeof(Vectorized<T>) != 0) return false;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  }
#else
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  }
#endif
  return true;
#else
  (void)p;
  (void)v;
  return false;
#endif
}

// Orders this thread's non-temporal stores before what follows (they are weakly ordered).
inline void finish_streaming() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Stores two opmath vectors at once: for bfloat16/float16 one full-width store (a store of
// half a reduced vector goes through a temporary buffer and memcpy in ATen's vec types).
// With `stream`, through non-temporal stores where p is aligned.
template <typename scalar_t>
inline void store_pair(scalar_t* p, const Vectorized<opmath_t<scalar_t>>& low,
                       const Vectorized<opmath_t<scalar_t>>& high, bool stream = false) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    const Vectorized<scalar_t> packed = at::vec::convert_from_float<scalar_t>(low, high);
    if (!(stream && stream_vec(p, packed))) packed.store(p);
  } else {
    if (!(stream && stream_vec(p, low))) low.store(p);
    if (!(stream && stream_vec(p + Vec::size(), high))) high.store(p + Vec::size());
  }
}

// Calls f(std::integral_constant<int, k>()) for k = 0 .. N-1. Arrays of vectors indexed only
// through it are indexed by constants, so the compiler keeps them in registers; indexed in a
// loop, GCC kept a reduction's partial sums on the stack, and every add waited on a store.
template <typename F, int... k>
inline void for_each_constant_of(const F& f, std::integer_sequence<int, k...>) {
  (f(std::integral_constant<int, k>()), ...);
}
template <int N, typename F>
inline void for_each_constant(const F& f) {
  for_each_constant_of(f, std::make_integer_sequence<int, N>());
}

// Horizontal sum in double, in a fixed order: float vectors under AVX-512 or AVX2 as a tree
// (the halves converted to double vectors and added, then halved again), the rest lane by
// lane. The lane-by-lane chain's extractions and dependent adds were the larger part of a short
// item's reduction. A sum in double of float lanes has the same bits in any order unless the
// lanes span more than 2^25 in magnitude.
template <typename T>
inline double lane_sum(const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 lanes = v;
    const __m256 high_half = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1));
    return _mm512_reduce_add_pd(
        _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(lanes)), _mm512_cvtps_pd(high_half)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 lanes = v;
    const __m256d quarters = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(lanes)),
                                           _mm256_cvtps_pd(_mm256_extractf128_ps(lanes, 1)));
    const __m128d pairs =
        _mm_add_pd(_mm256_castpd256_pd128(quarters), _mm256_extractf128_pd(quarters, 1));
    return _mm_cvtsd_f64(_mm_add_sd(pairs, _mm_unpackhi_pd(pairs, pairs)));
  }
#endif
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  double sum = 0;
  for (T lane : lanes) sum += lane;
  return sum;
}

// Per-channel parameters of one vector step: broadcast (channels-first, one channel per run)
// or loaded (channels-last, where lanes are channels).
template <int kParams, typename T>
inline std::array<Vectorized<T>, kParams> broadcast(const std::array<T, kParams>& p) {
  std::array<Vectorized<T>, kParams> v;
  for (int q = 0; q < kParams; ++q) v[q] = Vectorized<T>(p[q]);
  return v;
}

template <int kParams, typename T>
inline std::array<Vectorized<T>, kParams> load_params(const std::array<const T*, kParams>& params,
                                                      int64_t c) {
  std::array<Vectorized<T>, kParams> v;
  for (int q = 0; q < kParams; ++q) v[q] = Vectorized<T>::loadu(params[q] + c);
  return v;
}

template <int kParams, typename T>
inline std::array<T, kParams> scalar_params(const std::array<const T*, kParams>& params,
                                            int64_t c) {
  std::array<T, kParams> p;
  for (int q = 0; q < kParams; ++q) p[q] = params[q][c];
  return p;
}

// Parameters of a vector whose first `split` lanes (clamped to the vector) take a's and the
// rest b's: a vector that straddles the runs of two channels.
template <int kParams, typename T>
inline std::array<Vectorized<T>, kParams> split_params(const std::array<T, kParams>& a,
                                                       const std::array<T, kParams>& b,
                                                       int64_t split) {
  using Vec = Vectorized<T>;
  const int64_t lanes = std::clamp<int64_t>(split, 0, Vec::size());
  std::array<Vec, kParams> v;
#if defined(CPU_CAPABILITY_AVX512)
  // Vectorized::set switches on the lane count. On 7x7 runs most 32-value pairs straddle, each
  // at another of 16 counts, and the jump mispredicts; a blend under a mask read from a
  // sliding window of all-ones lanes then zero lanes has no branch. Under AVX2 (8 counts) the
  // switch measured faster than the variable blends (docs/perf.md row 43).
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(Bits) == sizeof(T));
  alignas(64) static constexpr auto kWindow = [] {
    std::array<Bits, 2 * Vec::size()> window{};
    for (int64_t i = 0; i < Vec::size(); ++i) window[i] = ~Bits(0);
    return window;
  }();
  const Vec take_a = Vec::loadu(reinterpret_cast<const T*>(kWindow.data() + Vec::size() - lanes));
  for (int q = 0; q < kParams; ++q) v[q] = Vec::blendv(Vec(b[q]), Vec(a[q]), take_a);
#else
  for (int q = 0; q < kParams; ++q) v[q] = Vec::set(Vec(b[q]), Vec(a[q]), lanes);
#endif
  return v;
}

// The kInputs tensors' values at one offset, as opmath vectors or scalars.
template <int kInputs, typename scalar_t>
inline std::array<Vectorized<opmath_t<scalar_t>>, kInputs> load_inputs(
    const std::array<const scalar_t*, kInputs>& in, int64_t offset,
    int64_t count = Vectorized<opmath_t<scalar_t>>::size()) {
  std::array<Vectorized<opmath_t<scalar_t>>, kInputs> v;
  for (int j = 0; j < kInputs; ++j) v[j] = load_vec(in[j] + offset, count);
  return v;
}

template <int kInputs, typename scalar_t>
inline std::array<opmath_t<scalar_t>, kInputs> scalar_inputs(
    const std::array<const scalar_t*, kInputs>& in, int64_t offset) {
  std::array<opmath_t<scalar_t>, kInputs> v;
  for (int j = 0; j < kInputs; ++j) v[j] = static_cast<opmath_t<scalar_t>>(in[j][offset]);
  return v;
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
