// The element-range engines of the CPU kernels: a map and a reduction over elements
// [begin, end) of a dense (N, C, *) tensor in memory order, for the chunks of the in-place op
// (csrc/cpu/inplace.cpp, csrc/cpu/inplace_backward.cpp), which work on a piece that stays in
// cache. They walk runs of one channel (channels-first) or rows of consecutive channels
// (channels_last) with the same per-lane math as the plan's walks (map.h, reduce.h).
#pragma once

#include "cpu/map.h"
#include "cpu/reduce.h"
#include "cpu/vec_io.h"

#include <algorithm>
#include <array>
#include <vector>

namespace custom_bn::cpu::CPU_CAPABILITY {

// Elements [begin, end) of a dense (N, C, *) map in memory order, with in and out indexed from
// begin: the chunks of the in-place op (csrc/cpu/inplace.cpp), whose forward needs each chunk's
// values before they overwrite its input and whose backward reads x_hat from a chunk's scratch.
// `stride` is the channel dim's: runs of one channel when it is > 1, rows of consecutive
// channels (channels_last) when it is 1. The same per-lane math as the plan's walks, so the
// same values bitwise.
template <int kInputs, int kParams, typename scalar_t, typename Fn>
void map_elements(const std::array<const scalar_t*, kInputs>& in,
                  const std::array<const opmath_t<scalar_t>*, kParams>& params, const int64_t C,
                  const int64_t stride, const int64_t begin, const int64_t end, const Fn& fn,
                  scalar_t* const out) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  if (stride > 1 || C == 1) {
    const int64_t run = C == 1 ? end : stride;
    int64_t c = C == 1 ? 0 : (begin / stride) % C;
    for (int64_t i = begin; i < end;) {
      const int64_t run_end = std::min(end, i + run - i % run);
      map_run<kInputs, kParams>(in, broadcast<kParams>(scalar_params<kParams>(params, c)),
                                i - begin, run_end - i, fn, out, /*stream=*/false);
      i = run_end;
      if (++c == C) c = 0;
    }
    return;
  }
  for (int64_t i = begin; i < end;) {
    const int64_t c0 = i % C, length = std::min(end - i, C - c0), base = i - begin;
    int64_t k = 0;
    for (; k + Vec::size() <= length; k += Vec::size()) {
      store_vec(out + base + k,
                fn(load_inputs<kInputs>(in, base + k), load_params<kParams>(params, c0 + k)));
    }
    for (; k < length; ++k) {
      out[base + k] = static_cast<scalar_t>(
          fn(scalar_inputs<kInputs>(in, base + k), scalar_params<kParams>(params, c0 + k)));
    }
    i += length;
  }
}

// The kSums sums of one run of one channel, values [0, length) of in, added to totals[k * C]
// (the channel's own totals), with the channel's parameters p; terms as reduce_channels'.
template <int kInputs, int kSums, int kParams, int kEmits, typename scalar_t, typename Terms>
void reduce_run(const std::array<const scalar_t*, kInputs>& in,
                const std::array<opmath_t<scalar_t>, kParams>& p, const int64_t length,
                const Terms& terms, const int64_t C, double* totals, scalar_t* emit) {
  using opmath = opmath_t<scalar_t>;
  using Vec = Vectorized<opmath>;
  const std::array<Vec, kParams> pv = broadcast<kParams>(p);
  std::array<Vec, kSums> partial, partial_high;
  const auto flush = [&] {
    for_each_constant<kSums>([&](auto k) {
      totals[k * C] += lane_sum(partial[k] + partial_high[k]);
      partial[k] = Vec(opmath(0));
      partial_high[k] = Vec(opmath(0));
    });
  };
  for_each_constant<kSums>([&](auto k) {
    partial[k] = Vec(opmath(0));
    partial_high[k] = Vec(opmath(0));
  });
  int64_t i = 0, steps = 0;
  for (; i + 2 * Vec::size() <= length; i += 2 * Vec::size()) {
    const auto low = terms(load_inputs<kInputs>(in, i), pv);
    const auto high = terms(load_inputs<kInputs>(in, i + Vec::size()), pv);
    for_each_constant<kSums>([&](auto k) {
      partial[k] += low[k];
      partial_high[k] += high[k];
    });
    if constexpr (kEmits == 1) store_pair(emit + i, low[kSums], high[kSums]);
    if ((steps += 2) >= kFlushEvery) {
      flush();
      steps = 0;
    }
  }
  flush();
  for (; i < length; ++i) {
    const auto t = terms(scalar_inputs<kInputs>(in, i), p);
    for (int k = 0; k < kSums; ++k) totals[k * C] += t[k];
    if constexpr (kEmits == 1) emit[i] = static_cast<scalar_t>(t[kSums]);
  }
}

// The kSums sums of elements [begin, end) of a dense (N, C, *) tensor in memory order (the
// chunks of the in-place backward, csrc/cpu/inplace_backward.cpp), added to
// totals[k * C + c]; in and emit are indexed from begin. `stride` is the channel dim's: runs of
// one channel where it is > 1, rows of consecutive channels (channels_last) where it is 1. The
// same terms and the same float sums flushed into double as the plan's reductions.
template <int kInputs, int kSums, int kParams, int kEmits, typename scalar_t, typename Terms>
void reduce_elements(const std::array<const scalar_t*, kInputs>& in,
                     const std::array<const opmath_t<scalar_t>*, kParams>& params, const int64_t C,
                     const int64_t stride, const int64_t begin, const int64_t end,
                     const Terms& terms, double* totals, scalar_t* emit) {
  using opmath = opmath_t<scalar_t>;
  using Vec = Vectorized<opmath>;
  const auto at = [&](int64_t base) {
    std::array<const scalar_t*, kInputs> moved;
    for (int j = 0; j < kInputs; ++j) moved[j] = in[j] + base;
    return moved;
  };
  if (stride > 1 || C == 1) {
    const int64_t run = C == 1 ? end : stride;
    int64_t c = C == 1 ? 0 : (begin / stride) % C;
    for (int64_t i = begin; i < end;) {
      const int64_t run_end = std::min(end, i + run - i % run);
      reduce_run<kInputs, kSums, kParams, kEmits>(at(i - begin), scalar_params<kParams>(params, c),
                                                  run_end - i, terms, C, totals + c,
                                                  kEmits == 1 ? emit + (i - begin) : nullptr);
      i = run_end;
      if (++c == C) c = 0;
    }
    return;
  }
  // Rows: a part of a row at either end on its own, the whole rows between as the plan's
  // channels-last reduction walks them (several rows per load and store of the float sums).
  std::vector<opmath> partial(kSums * C, opmath(0));
  const auto part_of_row = [&](int64_t i, int64_t length) {
    const int64_t c0 = i % C, base = i - begin;
    int64_t k = 0;
    for (; k + Vec::size() <= length; k += Vec::size()) {
      const auto t =
          terms(load_inputs<kInputs>(in, base + k), load_params<kParams>(params, c0 + k));
      for (int s = 0; s < kSums; ++s) {
        opmath* sum = partial.data() + s * C + c0 + k;
        (Vec::loadu(sum) + t[s]).store(sum);
      }
      if constexpr (kEmits == 1) store_vec(emit + base + k, t[kSums]);
    }
    for (; k < length; ++k) {
      const auto t =
          terms(scalar_inputs<kInputs>(in, base + k), scalar_params<kParams>(params, c0 + k));
      for (int s = 0; s < kSums; ++s) partial[s * C + c0 + k] += t[s];
      if constexpr (kEmits == 1) emit[base + k] = static_cast<scalar_t>(t[kSums]);
    }
    for (int64_t j = 0; j < kSums * C; ++j) totals[j] += partial[j];
    std::fill(partial.begin(), partial.end(), opmath(0));
  };
  int64_t i = begin;
  if (i % C != 0) {
    const int64_t length = std::min(end - i, C - i % C);
    part_of_row(i, length);
    i += length;
  }
  if (const int64_t rows = (end - i) / C; rows > 0) {
    reduce_channels_last_unit<kInputs, kSums, kParams, kEmits>(
        at(i - begin), params, C, ChannelsLastUnit{0, 0, rows, 0, C}, terms, partial.data(), totals,
        kEmits == 1 ? emit + (i - begin) : nullptr);
    i += rows * C;
  }
  if (i < end) part_of_row(i, end - i);
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
