// The map engine of the CPU kernels: out = fn(inputs, per-channel params) over every element,
// walked as the plan says (CpuPlan::walk), streamed where it says (CpuPlan::stream_result).
// fn is generic over opmath vectors and scalars: the per-lane arithmetic is the same in
// every walk, so every walk gives bitwise the same values.
#pragma once

#include "cpu/parallel.h"
#include "cpu/plan.h"
#include "cpu/vec_io.h"

#include <algorithm>
#include <array>

namespace custom_bn::cpu::CPU_CAPABILITY {

// Rows [begin, end) of a channels-last map. Pointers come by value, so they stay in registers
// (read through references, they are reloaded after every store, which might alias them).
template <int kInputs, int kParams, typename scalar_t, typename Fn>
void map_channels_last_rows(const std::array<const scalar_t*, kInputs> in,
                            const std::array<const opmath_t<scalar_t>*, kParams> params,
                            const int64_t C, const int64_t begin, const int64_t end, const Fn& fn,
                            scalar_t* const out, const bool stream) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  const int64_t vec_end = C - C % Vec::size();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * C;
    int64_t c = 0;
    for (; c + 2 * Vec::size() <= vec_end; c += 2 * Vec::size()) {
      store_pair(out + base + c,
                 fn(load_inputs<kInputs>(in, base + c), load_params<kParams>(params, c)),
                 fn(load_inputs<kInputs>(in, base + c + Vec::size()),
                    load_params<kParams>(params, c + Vec::size())),
                 stream);
    }
    for (; c < vec_end; c += Vec::size()) {
      store_vec(out + base + c,
                fn(load_inputs<kInputs>(in, base + c), load_params<kParams>(params, c)));
    }
    for (; c < C; ++c) {
      out[base + c] = static_cast<scalar_t>(
          fn(scalar_inputs<kInputs>(in, base + c), scalar_params<kParams>(params, c)));
    }
  }
}

// Values [base, base + length) of one (n, c) run of a channels-first map, with the channel's
// parameters broadcast in pv; the last partial vector is a masked one.
template <int kInputs, int kParams, typename scalar_t, typename Fn>
inline void map_run(const std::array<const scalar_t*, kInputs>& in,
                    const std::array<Vectorized<opmath_t<scalar_t>>, kParams>& pv,
                    const int64_t base, const int64_t length, const Fn& fn, scalar_t* const out,
                    const bool stream) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  if (length == Vec::size()) {  // a 4x4 float run under AVX-512: one full vector
    store_vec(out + base, fn(load_inputs<kInputs>(in, base), pv));
    return;
  }
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= length; i += 2 * Vec::size()) {
    store_pair(out + base + i, fn(load_inputs<kInputs>(in, base + i), pv),
               fn(load_inputs<kInputs>(in, base + i + Vec::size()), pv), stream);
  }
  for (; i < length; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), length - i);
    store_vec(out + base + i, fn(load_inputs<kInputs>(in, base + i, count), pv), count);
  }
}

// Units [begin, end) of a channels-first map walked run by run: a unit is one segment of one
// (n, c) run. The unit's channel and segment advance by counting (a division per unit costs
// as much as a 7x7 run's arithmetic).
template <int kInputs, int kParams, typename scalar_t, typename Fn>
void map_channels_first_units(const std::array<const scalar_t*, kInputs> in,
                              const std::array<const opmath_t<scalar_t>*, kParams> params,
                              const int64_t C, const int64_t S, const int64_t segments,
                              const int64_t segment_length, const int64_t begin, const int64_t end,
                              const Fn& fn, scalar_t* const out, const bool stream) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  if (S == Vec::size()) {
    // Runs of one vector (4x4 float under AVX-512): one full load and store per run, without
    // map_run's pair loop and partial-vector bookkeeping, which cost more than the arithmetic.
    int64_t c = begin % C;
    for (int64_t run = begin; run < end; ++run) {
      store_vec(out + run * S, fn(load_inputs<kInputs>(in, run * S),
                                  broadcast<kParams>(scalar_params<kParams>(params, c))));
      if (++c == C) c = 0;
    }
    return;
  }
  int64_t run = begin / segments;  // n * C + c
  int64_t segment = begin % segments;
  int64_t c = run % C;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t s0 = segment * segment_length;
    map_run<kInputs, kParams>(in, broadcast<kParams>(scalar_params<kParams>(params, c)),
                              run * S + s0, std::min(segment_length, S - s0), fn, out, stream);
    if (++segment == segments) {
      segment = 0;
      ++run;
      if (++c == C) c = 0;
    }
  }
}

// A channels-first map walked as one flat array of vector pairs, aligned where the tensor is:
// a pair that straddles the boundary between two (n, c) runs takes each lane's parameters
// from its own run's channel. Needs runs of at least a pair (one boundary per pair at most);
// the tensor's last values, fewer than a pair, are stored regularly.
template <int kInputs, int kParams, typename scalar_t, typename Fn>
void map_channels_first_flat(const std::array<const scalar_t*, kInputs>& in,
                             const std::array<const opmath_t<scalar_t>*, kParams>& params,
                             const ChannelView& view, const Fn& fn, scalar_t* out,
                             const bool stream) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  constexpr int64_t kPair = 2 * Vec::size();
  static_assert(kItemElements % kPair == 0);
  const int64_t C = view.channels, S = view.inner;
  const int64_t total = view.outer * C * S;
  at::parallel_for(0, ceil_div(total, kItemElements), 1, [&](int64_t begin, int64_t end) {
    const int64_t stop = std::min(total, end * kItemElements);
    int64_t i = begin * kItemElements;
    int64_t run = i / S;  // n * C + c
    int64_t run_end = (run + 1) * S;
    std::array<opmath_t<scalar_t>, kParams> p = scalar_params<kParams>(params, run % C);
    std::array<Vec, kParams> pv = broadcast<kParams>(p);
    for (; i + kPair <= stop; i += kPair) {
      if (i + kPair < run_end) {
        store_pair(out + i, fn(load_inputs<kInputs>(in, i), pv),
                   fn(load_inputs<kInputs>(in, i + Vec::size()), pv), stream);
        continue;
      }
      // The pair ends the run, or straddles it and the next: the next run's parameters.
      const std::array<opmath_t<scalar_t>, kParams> next =
          scalar_params<kParams>(params, (run + 1) % C);
      const int64_t split = run_end - i;  // lanes of this run, 1 to kPair
      store_pair(out + i, fn(load_inputs<kInputs>(in, i), split_params<kParams>(p, next, split)),
                 fn(load_inputs<kInputs>(in, i + Vec::size()),
                    split_params<kParams>(p, next, split - Vec::size())),
                 stream);
      ++run;
      run_end += S;
      p = next;
      pv = broadcast<kParams>(p);
    }
    for (; i < stop; i += Vec::size()) {  // within the last run
      const int64_t count = std::min<int64_t>(Vec::size(), stop - i);
      store_vec(out + i, fn(load_inputs<kInputs>(in, i, count), pv), count);
    }
    if (stream) finish_streaming();
  });
}

// An elementwise pass over the whole tensor, as the plan walks it.
template <int kInputs, int kParams, typename scalar_t, typename Fn>
void map_channels(const std::array<const scalar_t*, kInputs>& in,
                  const std::array<const opmath_t<scalar_t>*, kParams>& params, const CpuPlan& plan,
                  const Fn& fn, scalar_t* out) {
  const ChannelView& view = plan.view;
  const int64_t C = view.channels;
  const bool stream = plan.stream_result;
  switch (plan.walk) {
    case Walk::kChannelsLastRows: {
      const int64_t grain = std::max<int64_t>(1, kItemElements / C);
      at::parallel_for(0, view.outer, grain, [&](int64_t begin, int64_t end) {
        map_channels_last_rows<kInputs, kParams>(in, params, C, begin, end, fn, out, stream);
        if (stream) finish_streaming();
      });
      return;
    }
    case Walk::kChannelsFirstFlat:
      map_channels_first_flat<kInputs, kParams>(in, params, view, fn, out, stream);
      return;
    case Walk::kChannelsFirstRuns: {
      const int64_t S = view.inner;
      const int64_t segments = ceil_div(S, kItemElements);
      const int64_t segment_length = ceil_div(S, segments);
      const int64_t grain = std::max<int64_t>(1, kItemElements / segment_length);
      at::parallel_for(0, view.outer * C * segments, grain, [&](int64_t begin, int64_t end) {
        map_channels_first_units<kInputs, kParams>(in, params, C, S, segments, segment_length,
                                                   begin, end, fn, out, stream);
        if (stream) finish_streaming();
      });
      return;
    }
  }
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
