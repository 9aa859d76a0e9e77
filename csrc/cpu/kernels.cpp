// CPU kernels, compiled once per instruction set: CPU_CAPABILITY names this copy's namespace.
//
// Reductions add float vectors for at most kFlushEvery steps, then flush them into double
// totals (blocked summation): fast like float, accurate like double. Statistics take two
// passes (mean of values shifted by the channel's first one, then the sum of squared
// deviations), never a sum of squares.
#include "cpu/kernels.h"

#include "batch_norm_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace custom_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Elements per parallel work item (channels-first); channels-last items are 4x larger
// because each keeps a partial sum per channel.
constexpr int64_t kItemElements = 32768;
// Vector steps (rows, for channels-last) between flushes of float sums into double totals.
constexpr int64_t kFlushEvery = 64;
constexpr int64_t kFlushEveryRow = 16;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Non-temporal stores of one full vector to an address aligned to its size: the line is
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

// ReLU and its gradient for vectors; for scalars, the shared definitions.
using custom_bn::relu;
using custom_bn::relu_grad;

template <typename T>
inline Vectorized<T> relu(const Vectorized<T>& v) {
  return at::vec::maximum(v, Vectorized<T>(T(0)));  // propagates NaN, as relu(T) does
}

// dy AND the all-ones lanes of output > 0: as a blend, the compiler makes dy's load a masked
// one that waits for output's load and compare; as an AND, both loads issue at once.
template <typename T>
inline Vectorized<T> relu_grad(const Vectorized<T>& dy, const Vectorized<T>& output) {
  return dy & (output > Vectorized<T>(T(0)));
}

// Horizontal sum in a fixed lane order.
template <typename T>
inline double lane_sum(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  double sum = 0;
  for (T lane : lanes) sum += lane;
  return sum;
}

// Per-channel constants for one vector step: broadcast (channels-first) or loaded
// (channels-last, where lanes are channels).
template <int P, typename T>
inline std::array<Vectorized<T>, P> broadcast(const std::array<T, P>& p) {
  std::array<Vectorized<T>, P> v;
  for (int q = 0; q < P; ++q) v[q] = Vectorized<T>(p[q]);
  return v;
}

template <int P, typename T>
inline std::array<Vectorized<T>, P> load_params(const std::array<const T*, P>& params, int64_t c) {
  std::array<Vectorized<T>, P> v;
  for (int q = 0; q < P; ++q) v[q] = Vectorized<T>::loadu(params[q] + c);
  return v;
}

template <int P, typename T>
inline std::array<T, P> scalar_params(const std::array<const T*, P>& params, int64_t c) {
  std::array<T, P> p;
  for (int q = 0; q < P; ++q) p[q] = params[q][c];
  return p;
}

template <int I, typename scalar_t>
inline std::array<Vectorized<opmath_t<scalar_t>>, I> load_inputs(
    const std::array<const scalar_t*, I>& in, int64_t offset,
    int64_t count = Vectorized<opmath_t<scalar_t>>::size()) {
  std::array<Vectorized<opmath_t<scalar_t>>, I> v;
  for (int j = 0; j < I; ++j) v[j] = load_vec(in[j] + offset, count);
  return v;
}

template <int I, typename scalar_t>
inline std::array<opmath_t<scalar_t>, I> scalar_inputs(const std::array<const scalar_t*, I>& in,
                                                       int64_t offset) {
  std::array<opmath_t<scalar_t>, I> v;
  for (int j = 0; j < I; ++j) v[j] = static_cast<opmath_t<scalar_t>>(in[j][offset]);
  return v;
}

// ---- Reductions: per channel, sum K terms of each element -----------------------------------
// `terms(inputs, params)` is generic over Vectorized<opmath> and opmath scalars and returns
// std::array<same type, K + E>: K terms to sum, then E (0 or 1) values to write to `emit` at
// the element's offset, so an elementwise result comes out of the same pass.

// Calls fn(c) for every channel, in parallel: the per-channel merges of item results, in
// item order within each channel (so still independent of the thread count).
template <typename Fn>
void for_each_channel(int64_t channels, const Fn& fn) {
  at::parallel_for(0, channels, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

// Channels-first. An item is a group of whole runs (n, c) of one channel, or one piece of a
// long run: at most kItemElements values, so a second pass over an item reads the cache.
struct FirstItems {
  int64_t segments, segment_length, runs_per_item, per_channel;

  explicit FirstItems(const ChannelView& view)
      : segments(ceil_div(view.inner, kItemElements)),
        segment_length(ceil_div(view.inner, segments)),
        runs_per_item(segments > 1 ? 1 : std::max<int64_t>(1, kItemElements / view.inner)),
        per_channel(ceil_div(view.outer, runs_per_item) * segments) {}

  struct Span {
    int64_t channel, n_begin, n_end, s0, length;
    int64_t count() const { return (n_end - n_begin) * length; }
  };
  Span span(const ChannelView& view, int64_t item) const {
    const int64_t group = (item % per_channel) / segments;
    const int64_t s0 = (item % segments) * segment_length;
    return {item / per_channel, group * runs_per_item,
            std::min(view.outer, (group + 1) * runs_per_item), s0,
            std::min(segment_length, view.inner - s0)};
  }
};

// Software prefetch for a reduction over a channel's (n, c) runs, which lie C * S values
// apart: the hardware prefetcher starts over on each run, and one thread then draws a
// fraction of the memory bandwidth (docs/perf.md). Runs of 1 KB or more fetch the next run
// along with each step; runs of 256 bytes to 1 KB fetch a whole run about 1 KB of work
// ahead; shorter runs (7x7 layers, which fit in the last-level cache) measured better
// without.
constexpr int64_t kLineBytes = 64;

struct RunPrefetch {
  bool by_step, whole_runs;
  int64_t runs_ahead, ahead;  // ahead: in values

  RunPrefetch(int64_t run_bytes, int64_t run_stride)
      : by_step(run_bytes >= 1024),
        whole_runs(run_bytes >= 256 && run_bytes < 1024),
        runs_ahead(whole_runs ? ceil_div(1024, run_bytes) : 1),
        ahead(runs_ahead * run_stride) {}
};

// The K sums of one channels-first item, with the channel's parameters p.
template <int I, int K, int P, int E, typename scalar_t, typename Terms>
std::array<double, K> reduce_first_item(const std::array<const scalar_t*, I> in,
                                        const std::array<opmath_t<scalar_t>, P> p,
                                        const ChannelView& view, const FirstItems::Span& span,
                                        const Terms& terms, scalar_t* emit) {
  using opmath = opmath_t<scalar_t>;
  using Vec = Vectorized<opmath>;
  const std::array<Vec, P> pv = broadcast<P>(p);
  std::array<double, K> totals{};
  // Vector sums run on across the runs of the item (short runs: 49 values at 7x7). Two sets
  // of them, for the two vectors of a step: one chain of dependent adds would bound the pass
  // by the add latency rather than by memory.
  std::array<Vec, K> partial, partial_high;
  partial.fill(Vec(opmath(0)));
  partial_high.fill(Vec(opmath(0)));
  int64_t steps = 0;
  const RunPrefetch prefetch(span.length * static_cast<int64_t>(sizeof(scalar_t)),
                             view.channels * view.inner);
  for (int64_t n = span.n_begin; n < span.n_end; ++n) {
    const int64_t base = (n * view.channels + span.channel) * view.inner + span.s0;
    const bool prefetching = n + prefetch.runs_ahead < span.n_end;
    if (prefetching && prefetch.whole_runs) {
      for (int j = 0; j < I; ++j) {
        for (int64_t i = 0; i < span.length; i += kLineBytes / int64_t(sizeof(scalar_t))) {
          __builtin_prefetch(in[j] + base + prefetch.ahead + i);
        }
      }
    }
    int64_t i = 0;
    // Two vectors a step, so that an emitted bfloat16/float16 result is one full store.
    for (; i + 2 * Vec::size() <= span.length; i += 2 * Vec::size()) {
      if (prefetching && prefetch.by_step) {
        for (int j = 0; j < I; ++j) {
          __builtin_prefetch(in[j] + base + prefetch.ahead + i);
          __builtin_prefetch(in[j] + base + prefetch.ahead + i + Vec::size());
        }
      }
      const std::array<Vec, K + E> low = terms(load_inputs<I>(in, base + i), pv);
      const std::array<Vec, K + E> high = terms(load_inputs<I>(in, base + i + Vec::size()), pv);
      for (int k = 0; k < K; ++k) partial[k] += low[k];
      for (int k = 0; k < K; ++k) partial_high[k] += high[k];
      if constexpr (E == 1) store_pair(emit + base + i, low[K], high[K]);
      steps += 2;
      if (steps >= kFlushEvery) {
        for (int k = 0; k < K; ++k) totals[k] += lane_sum(partial[k] + partial_high[k]);
        partial.fill(Vec(opmath(0)));
        partial_high.fill(Vec(opmath(0)));
        steps = 0;
      }
    }
    for (; i + Vec::size() <= span.length; i += Vec::size()) {
      const std::array<Vec, K + E> t = terms(load_inputs<I>(in, base + i), pv);
      for (int k = 0; k < K; ++k) partial[k] += t[k];
      if constexpr (E == 1) store_vec(emit + base + i, t[K]);
      if (++steps >= kFlushEvery) {
        for (int k = 0; k < K; ++k) totals[k] += lane_sum(partial[k] + partial_high[k]);
        partial.fill(Vec(opmath(0)));
        partial_high.fill(Vec(opmath(0)));
        steps = 0;
      }
    }
    for (; i < span.length; ++i) {
      const std::array<opmath, K + E> t = terms(scalar_inputs<I>(in, base + i), p);
      for (int k = 0; k < K; ++k) totals[k] += t[k];
      if constexpr (E == 1) emit[base + i] = static_cast<scalar_t>(t[K]);
    }
  }
  for (int k = 0; k < K; ++k) totals[k] += lane_sum(partial[k] + partial_high[k]);
  return totals;
}

// The K sums of a channel's items, added in item order.
template <int K>
std::array<double, K> sum_in_item_order(const std::array<double, K>* item_totals, int64_t items) {
  std::array<double, K> sum{};
  for (int64_t j = 0; j < items; ++j) {
    for (int k = 0; k < K; ++k) sum[k] += item_totals[j][k];
  }
  return sum;
}

template <int I, int K, int P, int E, typename scalar_t, typename Terms>
void reduce_channels_first(const std::array<const scalar_t*, I>& in,
                           const std::array<const opmath_t<scalar_t>*, P>& params,
                           const ChannelView& view, const Terms& terms,
                           const std::array<opmath_t<scalar_t>*, K>& out, scalar_t* emit) {
  const FirstItems items(view);
  const int64_t C = view.channels;
  std::vector<std::array<double, K>> item_totals(C * items.per_channel);
  at::parallel_for(0, C * items.per_channel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const FirstItems::Span span = items.span(view, item);
      item_totals[item] = reduce_first_item<I, K, P, E>(in, scalar_params<P>(params, span.channel),
                                                        view, span, terms, emit);
    }
  });
  for_each_channel(C, [&](int64_t c) {
    const std::array<double, K> sum =
        sum_in_item_order<K>(item_totals.data() + c * items.per_channel, items.per_channel);
    for (int k = 0; k < K; ++k) out[k][c] = static_cast<opmath_t<scalar_t>>(sum[k]);
  });
}

// Channels-last. An item is a block of rows (about 4 * kItemElements values).
int64_t rows_per_last_item(const ChannelView& view) {
  return std::max<int64_t>(kFlushEveryRow, 4 * kItemElements / view.channels);
}

// Adds the K sums of one channels-last item (rows [row_begin, row_end)) to totals[K * C]:
// float sums per channel in `partial` (K * C, scratch), flushed every kFlushEveryRow rows.
// kRowsAtOnce rows share each load and store of the partial sums.
constexpr int64_t kRowsAtOnce = 8;

template <int I, int K, int P, int E, typename scalar_t, typename Terms>
void reduce_last_item(const std::array<const scalar_t*, I> in,
                      const std::array<const opmath_t<scalar_t>*, P> params,
                      const ChannelView& view, int64_t row_begin, int64_t row_end,
                      const Terms& terms, opmath_t<scalar_t>* partial, double* totals,
                      scalar_t* emit) {
  using opmath = opmath_t<scalar_t>;
  using Vec = Vectorized<opmath>;
  static_assert(kFlushEveryRow % kRowsAtOnce == 0);
  const int64_t C = view.channels;
  const int64_t vec_end = C - C % Vec::size();
  std::fill(partial, partial + K * C, opmath(0));
  int64_t rows_since_flush = 0;
  for (int64_t row = row_begin; row < row_end; row += kRowsAtOnce) {
    const int64_t rows = std::min(kRowsAtOnce, row_end - row);
    int64_t c = 0;
    // Two vectors of channels a step: an emitted bfloat16/float16 result is one full store.
    for (; c + 2 * Vec::size() <= vec_end; c += 2 * Vec::size()) {
      const std::array<Vec, P> pv_low = load_params<P>(params, c);
      const std::array<Vec, P> pv_high = load_params<P>(params, c + Vec::size());
      std::array<Vec, K> low, high;
      for (int k = 0; k < K; ++k) low[k] = Vec::loadu(partial + k * C + c);
      for (int k = 0; k < K; ++k) high[k] = Vec::loadu(partial + k * C + c + Vec::size());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (row + r) * C + c;
        const std::array<Vec, K + E> t_low = terms(load_inputs<I>(in, offset), pv_low);
        const std::array<Vec, K + E> t_high =
            terms(load_inputs<I>(in, offset + Vec::size()), pv_high);
        for (int k = 0; k < K; ++k) low[k] += t_low[k];
        for (int k = 0; k < K; ++k) high[k] += t_high[k];
        if constexpr (E == 1) store_pair(emit + offset, t_low[K], t_high[K]);
      }
      for (int k = 0; k < K; ++k) low[k].store(partial + k * C + c);
      for (int k = 0; k < K; ++k) high[k].store(partial + k * C + c + Vec::size());
    }
    for (; c < vec_end; c += Vec::size()) {
      const std::array<Vec, P> pv = load_params<P>(params, c);
      std::array<Vec, K> acc;
      for (int k = 0; k < K; ++k) acc[k] = Vec::loadu(partial + k * C + c);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (row + r) * C + c;
        const std::array<Vec, K + E> t = terms(load_inputs<I>(in, offset), pv);
        for (int k = 0; k < K; ++k) acc[k] += t[k];
        if constexpr (E == 1) store_vec(emit + offset, t[K]);
      }
      for (int k = 0; k < K; ++k) acc[k].store(partial + k * C + c);
    }
    for (c = vec_end; c < C; ++c) {
      const std::array<opmath, P> p = scalar_params<P>(params, c);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (row + r) * C + c;
        const std::array<opmath, K + E> t = terms(scalar_inputs<I>(in, offset), p);
        for (int k = 0; k < K; ++k) partial[k * C + c] += t[k];
        if constexpr (E == 1) emit[offset] = static_cast<scalar_t>(t[K]);
      }
    }
    rows_since_flush += rows;
    if (rows_since_flush == kFlushEveryRow || row + rows == row_end) {
      for (int64_t j = 0; j < K * C; ++j) totals[j] += partial[j];
      std::fill(partial, partial + K * C, opmath(0));
      rows_since_flush = 0;
    }
  }
}

// Item totals are added per channel in item order.
template <int I, int K, int P, int E, typename scalar_t, typename Terms>
void reduce_channels_last(const std::array<const scalar_t*, I>& in,
                          const std::array<const opmath_t<scalar_t>*, P>& params,
                          const ChannelView& view, const Terms& terms,
                          const std::array<opmath_t<scalar_t>*, K>& out, scalar_t* emit) {
  const int64_t M = view.outer, C = view.channels;
  const int64_t rows_per_item = rows_per_last_item(view);
  const int64_t items = ceil_div(M, rows_per_item);
  std::vector<double> item_totals(items * K * C, 0.0);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t<scalar_t>> partial(K * C);
    for (int64_t item = begin; item < end; ++item) {
      reduce_last_item<I, K, P, E>(in, params, view, item * rows_per_item,
                                   std::min(M, (item + 1) * rows_per_item), terms, partial.data(),
                                   item_totals.data() + item * K * C, emit);
    }
  });
  // Channels in blocks, items outer: the inner loop runs along contiguous channels.
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(K * (end - begin), 0.0);
    for (int64_t item = 0; item < items; ++item) {
      for (int k = 0; k < K; ++k) {
        const double* totals = item_totals.data() + (item * K + k) * C;
        double* acc = sum.data() + k * (end - begin);
        for (int64_t c = begin; c < end; ++c) acc[c - begin] += totals[c];
      }
    }
    for (int k = 0; k < K; ++k) {
      for (int64_t c = begin; c < end; ++c) {
        out[k][c] = static_cast<opmath_t<scalar_t>>(sum[k * (end - begin) + c - begin]);
      }
    }
  });
}

template <int I, int K, int P, int E, typename scalar_t, typename Terms>
void reduce_channels(const std::array<const scalar_t*, I>& in,
                     const std::array<const opmath_t<scalar_t>*, P>& params,
                     const ChannelView& view, const Terms& terms,
                     const std::array<opmath_t<scalar_t>*, K>& out, scalar_t* emit = nullptr) {
  if (view.layout == Layout::kChannelsLast) {
    reduce_channels_last<I, K, P, E>(in, params, view, terms, out, emit);
  } else {
    reduce_channels_first<I, K, P, E>(in, params, view, terms, out, emit);
  }
}

// ---- Elementwise: out = fn(inputs, per-channel params) --------------------------------------

// Rows [begin, end) of a channels-last map. Pointers come by value, so they stay in registers
// (read through references, they are reloaded after every store, which might alias them).
template <int I, int P, typename scalar_t, typename Fn>
void map_last_rows(const std::array<const scalar_t*, I> in,
                   const std::array<const opmath_t<scalar_t>*, P> params, const int64_t C,
                   const int64_t begin, const int64_t end, const Fn& fn, scalar_t* const out,
                   const bool stream) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  const int64_t vec_end = C - C % Vec::size();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * C;
    int64_t c = 0;
    for (; c + 2 * Vec::size() <= vec_end; c += 2 * Vec::size()) {
      store_pair(
          out + base + c, fn(load_inputs<I>(in, base + c), load_params<P>(params, c)),
          fn(load_inputs<I>(in, base + c + Vec::size()), load_params<P>(params, c + Vec::size())),
          stream);
    }
    for (; c < vec_end; c += Vec::size()) {
      store_vec(out + base + c, fn(load_inputs<I>(in, base + c), load_params<P>(params, c)));
    }
    for (; c < C; ++c) {
      out[base + c] =
          static_cast<scalar_t>(fn(scalar_inputs<I>(in, base + c), scalar_params<P>(params, c)));
    }
  }
}

// Values [base, base + length) of one (n, c) run of a channels-first map, with the channel's
// parameters broadcast in pv; the last partial vector is a masked one.
template <int I, int P, typename scalar_t, typename Fn>
inline void map_run(const std::array<const scalar_t*, I>& in,
                    const std::array<Vectorized<opmath_t<scalar_t>>, P>& pv, const int64_t base,
                    const int64_t length, const Fn& fn, scalar_t* const out, const bool stream) {
  using Vec = Vectorized<opmath_t<scalar_t>>;
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= length; i += 2 * Vec::size()) {
    store_pair(out + base + i, fn(load_inputs<I>(in, base + i), pv),
               fn(load_inputs<I>(in, base + i + Vec::size()), pv), stream);
  }
  for (; i < length; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), length - i);
    store_vec(out + base + i, fn(load_inputs<I>(in, base + i, count), pv), count);
  }
}

// Units [begin, end) of a channels-first map: a unit is one segment of one (n, c) run. The
// unit's channel and segment advance by counting (a division per unit costs as much as a 7x7
// run's arithmetic); a run's last partial vector is a masked one.
template <int I, int P, typename scalar_t, typename Fn>
void map_first_units(const std::array<const scalar_t*, I> in,
                     const std::array<const opmath_t<scalar_t>*, P> params, const int64_t C,
                     const int64_t S, const int64_t segments, const int64_t segment_length,
                     const int64_t begin, const int64_t end, const Fn& fn, scalar_t* const out,
                     const bool stream) {
  int64_t run = begin / segments;  // n * C + c
  int64_t segment = begin % segments;
  int64_t c = run % C;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t s0 = segment * segment_length;
    map_run<I, P>(in, broadcast<P>(scalar_params<P>(params, c)), run * S + s0,
                  std::min(segment_length, S - s0), fn, out, stream);
    if (++segment == segments) {
      segment = 0;
      ++run;
      if (++c == C) c = 0;
    }
  }
}

// Whether the inputs and the result of an elementwise pass with `inputs` inputs exceed the
// last-level cache together: the result will not stay in cache for the next op, so it is
// written with non-temporal stores, which skip the read for ownership (a third of the traffic).
template <typename scalar_t>
bool exceeds_cache(const ChannelView& view, int inputs) {
  const int64_t result_bytes =
      view.outer * view.channels * view.inner * static_cast<int64_t>(sizeof(scalar_t));
  return (inputs + 1) * result_bytes > cache_bytes(3);
}

// Whether every contiguous run of the tensor (a channels-first (n, c) run, a channels-last
// row) is whole vectors, so that each run starts aligned where the tensor does.
template <typename scalar_t>
bool runs_are_whole_vectors(const ChannelView& view) {
  const int64_t run = view.layout == Layout::kChannelsLast ? view.channels : view.inner;
  return run * static_cast<int64_t>(sizeof(scalar_t)) % sizeof(Vectorized<scalar_t>) == 0;
}

// Whether a channels-first map walks the tensor flat (map_first_flat) rather than run by run:
// where runs are not whole vectors (7x7 and 14x14 float32, 28x28 bfloat16), a run-by-run
// walk stores every other run's vectors across cache lines and ends each run with a masked
// vector. Needs runs of at least a pair of vectors, so that a pair holds at most one boundary.
template <typename scalar_t>
bool walks_flat(const ChannelView& view) {
  return view.layout == Layout::kChannelsFirst && !runs_are_whole_vectors<scalar_t>(view) &&
         view.inner >= 2 * Vectorized<opmath_t<scalar_t>>::size();
}

// Parameters of a vector whose first `split` lanes (clamped to the vector) take a's and the
// rest b's.
template <int P, typename T>
inline std::array<Vectorized<T>, P> split_params(const std::array<T, P>& a,
                                                 const std::array<T, P>& b, int64_t split) {
  const int64_t lanes = std::clamp<int64_t>(split, 0, Vectorized<T>::size());
  std::array<Vectorized<T>, P> v;
  for (int q = 0; q < P; ++q) {
    v[q] = Vectorized<T>::set(Vectorized<T>(b[q]), Vectorized<T>(a[q]), lanes);
  }
  return v;
}

// A channels-first map walked as one flat array of pairs of vectors, aligned where the tensor
// is (with `stream`, every pair streamed): a pair that straddles the boundary between two
// (n, c) runs takes each lane's parameters from its own run's channel. The per-lane
// arithmetic is map_run's, so the values are bitwise those of the run-by-run walk. Needs runs
// of at least a pair (one boundary per pair at most); the tensor's last values, fewer than a
// pair, are stored regularly.
template <int I, int P, typename scalar_t, typename Fn>
void map_first_flat(const std::array<const scalar_t*, I>& in,
                    const std::array<const opmath_t<scalar_t>*, P>& params, const ChannelView& view,
                    const Fn& fn, scalar_t* out, const bool stream) {
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
    std::array<opmath_t<scalar_t>, P> p = scalar_params<P>(params, run % C);
    std::array<Vec, P> pv = broadcast<P>(p);
    for (; i + kPair <= stop; i += kPair) {
      if (i + kPair < run_end) {
        store_pair(out + i, fn(load_inputs<I>(in, i), pv),
                   fn(load_inputs<I>(in, i + Vec::size()), pv), stream);
        continue;
      }
      // The pair ends the run, or straddles it and the next: the next run's parameters.
      const std::array<opmath_t<scalar_t>, P> next = scalar_params<P>(params, (run + 1) % C);
      const int64_t split = run_end - i;  // lanes of this run, 1 to kPair
      store_pair(
          out + i, fn(load_inputs<I>(in, i), split_params<P>(p, next, split)),
          fn(load_inputs<I>(in, i + Vec::size()), split_params<P>(p, next, split - Vec::size())),
          stream);
      ++run;
      run_end += S;
      p = next;
      pv = broadcast<P>(p);
    }
    for (; i < stop; i += Vec::size()) {  // within the last run
      const int64_t count = std::min<int64_t>(Vec::size(), stop - i);
      store_vec(out + i, fn(load_inputs<I>(in, i, count), pv), count);
    }
    if (stream) finish_streaming();
  });
}

// An elementwise pass. Its result is streamed (non-temporal stores) where the pass exceeds the
// cache and no line would mix streamed and regular stores: the run-by-run walk of runs that
// are not whole vectors streamed only their aligned middles, and measured 1.4-1.7x slower than
// not streaming at all (docs/perf.md); the flat walk streams every pair.
template <int I, int P, typename scalar_t, typename Fn>
void map_channels(const std::array<const scalar_t*, I>& in,
                  const std::array<const opmath_t<scalar_t>*, P>& params, const ChannelView& view,
                  const Fn& fn, scalar_t* out) {
  const int64_t C = view.channels;
  const bool flat = walks_flat<scalar_t>(view);
  const bool stream =
      exceeds_cache<scalar_t>(view, I) && (flat || runs_are_whole_vectors<scalar_t>(view));
  if (view.layout == Layout::kChannelsLast) {
    const int64_t grain = std::max<int64_t>(1, kItemElements / C);
    at::parallel_for(0, view.outer, grain, [&](int64_t begin, int64_t end) {
      map_last_rows<I, P>(in, params, C, begin, end, fn, out, stream);
      if (stream) finish_streaming();
    });
    return;
  }
  if (flat) {
    map_first_flat<I, P>(in, params, view, fn, out, stream);
    return;
  }
  const int64_t S = view.inner;
  const int64_t segments = ceil_div(S, kItemElements);
  const int64_t segment_length = ceil_div(S, segments);
  const int64_t grain = std::max<int64_t>(1, kItemElements / segment_length);
  at::parallel_for(0, view.outer * C * segments, grain, [&](int64_t begin, int64_t end) {
    map_first_units<I, P>(in, params, C, S, segments, segment_length, begin, end, fn, out, stream);
    if (stream) finish_streaming();
  });
}

// ---- The per-element math of each pass ------------------------------------------------------
// One definition for the two-kernel and the channel-at-a-time paths, for vectors and scalars:
// v holds the inputs at one position, p the channel's parameters.

// Normalize: v = (x) or (x, residual), p = (mean, alpha, bias).
constexpr auto kNormalize = [](const auto& v, const auto& p) {
  return normalize(v[0], p[0], p[1], p[2]);
};
constexpr auto kNormalizeRelu = [](const auto& v, const auto& p) {
  return relu(normalize(v[0], p[0], p[1], p[2]));
};
constexpr auto kNormalizeAddRelu = [](const auto& v, const auto& p) {
  return relu(normalize(v[0], p[0], p[1], p[2]) + v[1]);
};

// Gradient sums (dz, dz * (x - mean)), p = (mean): v = (dy, x), or (dy, output, x) with
// dz = relu_grad(dy, output); the last also yields dz to emit.
constexpr auto kGradSums = [](const auto& v, const auto& p) {
  return std::array{v[0], v[0] * (v[1] - p[0])};
};
constexpr auto kReluGradSums = [](const auto& v, const auto& p) {
  const auto dz = relu_grad(v[0], v[1]);
  return std::array{dz, dz * (v[2] - p[0])};
};
constexpr auto kReluGradSumsAndMasked = [](const auto& v, const auto& p) {
  const auto dz = relu_grad(v[0], v[1]);
  return std::array{dz, dz * (v[2] - p[0]), dz};
};

// Input gradient, p = (mean, dy_mean, a, b): v = (dy, x), or (dy, output, x).
constexpr auto kGradInput = [](const auto& v, const auto& p) {
  return custom_bn::grad_input(v[0], v[1], p[0], p[1], p[2], p[3]);
};
constexpr auto kReluGradInput = [](const auto& v, const auto& p) {
  return custom_bn::grad_input(relu_grad(v[0], v[1]), v[2], p[0], p[1], p[2], p[3]);
};

// ---- The kernels -----------------------------------------------------------------------------

template <typename scalar_t>
const opmath_t<scalar_t>* stat_ptr(const at::Tensor& t) {
  return t.const_data_ptr<opmath_t<scalar_t>>();
}

// Per item, two passes while the item is in cache: the mean of x - shift (shift: the
// channel's first value, so no cancellation when the mean is large against the spread, and
// exact zeros for constant channels), then the squared deviations from the item's mean. Items
// merge by parallel Welford in double, in item order. Memory is read once, accuracy is that
// of two passes.
template <typename scalar_t>
struct StatsPasses {
  using opmath = opmath_t<scalar_t>;
  static constexpr auto shifted = [](const auto& v, const auto& p) {
    return std::array{v[0] - p[0]};
  };
  static constexpr auto squared_deviation = [](const auto& v, const auto& p) {
    const auto deviation = v[0] - p[0];
    return std::array{deviation * deviation};
  };
  // (mean, M2) of count values from their shifted sum and their squared deviations from
  // the rounded mean used in the second pass (corrected to the exact mean).
  static WelfordStats<double> item(double count, double shift, double shifted_sum,
                                   opmath rounded_mean, double squared_sum) {
    const double mean = shift + shifted_sum / count;
    const double offset = mean - static_cast<double>(rounded_mean);
    return {count, mean, std::max(0.0, squared_sum - count * offset * offset)};
  }
};

// The (mean, M2) of one channels-first item, by its two passes; shift is the channel's.
template <typename scalar_t>
WelfordStats<double> first_item_stats(const scalar_t* x, const ChannelView& view,
                                      const FirstItems::Span& span, opmath_t<scalar_t> shift) {
  using Passes = StatsPasses<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  const std::array<const scalar_t*, 1> in{x};
  const double count = static_cast<double>(span.count());
  const double shifted_sum = reduce_first_item<1, 1, 1, 0>(
      in, std::array<opmath, 1>{shift}, view, span, Passes::shifted, (scalar_t*)nullptr)[0];
  const opmath rounded_mean = static_cast<opmath>(shift + shifted_sum / count);
  const double squared_sum =
      reduce_first_item<1, 1, 1, 0>(in, std::array<opmath, 1>{rounded_mean}, view, span,
                                    Passes::squared_deviation, (scalar_t*)nullptr)[0];
  return Passes::item(count, shift, shifted_sum, rounded_mean, squared_sum);
}

// A channel's (mean, M2) from its items', in item order: the mean from the items' sums, then
// each item's M2 about it (no division per item, as a chain of welford_merge calls would take).
inline WelfordStats<double> merge_items(const WelfordStats<double>* parts, int64_t count) {
  double values = 0, sum = 0, total_m2 = 0;
  for (int64_t j = 0; j < count; ++j) {
    values += parts[j].count;
    sum += parts[j].count * parts[j].mean;
  }
  const double total_mean = sum / values;
  for (int64_t j = 0; j < count; ++j) {
    total_m2 += m2_about(parts[j].m2, parts[j].count, parts[j].mean, total_mean);
  }
  return {values, total_mean, total_m2};
}

template <typename scalar_t>
void collect_stats_first(const scalar_t* x, const ChannelView& view,
                         const std::vector<opmath_t<scalar_t>>& shift, opmath_t<scalar_t>* mean,
                         opmath_t<scalar_t>* m2) {
  using opmath = opmath_t<scalar_t>;
  const FirstItems items(view);
  std::vector<WelfordStats<double>> item_stats(view.channels * items.per_channel);
  at::parallel_for(0, view.channels * items.per_channel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const FirstItems::Span span = items.span(view, item);
      item_stats[item] = first_item_stats(x, view, span, shift[span.channel]);
    }
  });
  for_each_channel(view.channels, [&](int64_t c) {
    const WelfordStats<double> stats =
        merge_items(item_stats.data() + c * items.per_channel, items.per_channel);
    mean[c] = static_cast<opmath>(stats.mean);
    m2[c] = static_cast<opmath>(stats.m2);
  });
}

template <typename scalar_t>
void collect_stats_last(const scalar_t* x, const ChannelView& view,
                        const std::vector<opmath_t<scalar_t>>& shift, opmath_t<scalar_t>* mean,
                        opmath_t<scalar_t>* m2) {
  using Passes = StatsPasses<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  const int64_t M = view.outer, C = view.channels;
  const int64_t rows_per_item = rows_per_last_item(view);
  const int64_t items = ceil_div(M, rows_per_item);
  const std::array<const scalar_t*, 1> in{x};
  // Per item and channel: mean and M2, as rows [item][C] so that the combination below runs
  // along channels in vectors.
  // Every element is written below: no zero-filling.
  const std::unique_ptr<double[]> item_mean(new double[items * C]);
  const std::unique_ptr<double[]> item_m2(new double[items * C]);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath> partial(C), rounded_mean(C);
    std::vector<double> shifted_sum(C), squared_sum(C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row_begin = item * rows_per_item;
      const int64_t row_end = std::min(M, row_begin + rows_per_item);
      const double count = static_cast<double>(row_end - row_begin);
      std::fill(shifted_sum.begin(), shifted_sum.end(), 0.0);
      reduce_last_item<1, 1, 1, 0>(in, std::array<const opmath*, 1>{shift.data()}, view, row_begin,
                                   row_end, Passes::shifted, partial.data(), shifted_sum.data(),
                                   (scalar_t*)nullptr);
      for (int64_t c = 0; c < C; ++c) {
        rounded_mean[c] = static_cast<opmath>(shift[c] + shifted_sum[c] / count);
      }
      std::fill(squared_sum.begin(), squared_sum.end(), 0.0);
      reduce_last_item<1, 1, 1, 0>(in, std::array<const opmath*, 1>{rounded_mean.data()}, view,
                                   row_begin, row_end, Passes::squared_deviation, partial.data(),
                                   squared_sum.data(), (scalar_t*)nullptr);
      for (int64_t c = 0; c < C; ++c) {
        const WelfordStats<double> stats =
            Passes::item(count, shift[c], shifted_sum[c], rounded_mean[c], squared_sum[c]);
        item_mean[item * C + c] = stats.mean;
        item_m2[item * C + c] = stats.m2;
      }
    }
  });
  // Each channel's mean from its items' sums, then each item's M2 about it (no division per
  // item), in item order; channels in blocks, items outer so the inner loop is a vector one.
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(end - begin, 0.0), total_m2(end - begin, 0.0);
    for (int64_t item = 0; item < items; ++item) {
      const double count =
          static_cast<double>(std::min(M, (item + 1) * rows_per_item) - item * rows_per_item);
      const double* means = item_mean.get() + item * C;
      for (int64_t c = begin; c < end; ++c) sum[c - begin] += count * means[c];
    }
    for (int64_t c = begin; c < end; ++c) sum[c - begin] /= static_cast<double>(M);
    for (int64_t item = 0; item < items; ++item) {
      const double count =
          static_cast<double>(std::min(M, (item + 1) * rows_per_item) - item * rows_per_item);
      const double* means = item_mean.get() + item * C;
      const double* m2s = item_m2.get() + item * C;
      for (int64_t c = begin; c < end; ++c) {
        total_m2[c - begin] += m2_about(m2s[c], count, means[c], sum[c - begin]);
      }
    }
    for (int64_t c = begin; c < end; ++c) {
      mean[c] = static_cast<opmath>(sum[c - begin]);
      m2[c] = static_cast<opmath>(total_m2[c - begin]);
    }
  });
}

void collect_stats(const at::Tensor& input, const ChannelView& view, at::Tensor& mean,
                   at::Tensor& m2) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "collect_stats",
                                  [&] {
                                    using opmath = opmath_t<scalar_t>;
                                    const scalar_t* x = input.const_data_ptr<scalar_t>();
                                    std::vector<opmath> shift(view.channels);
                                    const bool last = view.layout == Layout::kChannelsLast;
                                    for (int64_t c = 0; c < view.channels; ++c) {
                                      shift[c] = static_cast<opmath>(x[last ? c : c * view.inner]);
                                    }
                                    opmath* mean_ptr = mean.mutable_data_ptr<opmath>();
                                    opmath* m2_ptr = m2.mutable_data_ptr<opmath>();
                                    if (last) {
                                      collect_stats_last(x, view, shift, mean_ptr, m2_ptr);
                                    } else {
                                      collect_stats_first(x, view, shift, mean_ptr, m2_ptr);
                                    }
                                  });
}

void apply_affine(const at::Tensor& input, const ChannelView& view, const at::Tensor& mean,
                  const at::Tensor& alpha, const at::Tensor& bias, at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "apply_affine", [&] {
        map_channels<1, 3>(
            std::array<const scalar_t*, 1>{input.const_data_ptr<scalar_t>()},
            {stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(alpha), stat_ptr<scalar_t>(bias)}, view,
            kNormalize, output.mutable_data_ptr<scalar_t>());
      });
}

void apply_affine_relu(const at::Tensor& input, const at::Tensor& residual, const ChannelView& view,
                       const at::Tensor& mean, const at::Tensor& alpha, const at::Tensor& bias,
                       at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "apply_affine_relu", [&] {
        const std::array<const opmath_t<scalar_t>*, 3> params{
            stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(alpha), stat_ptr<scalar_t>(bias)};
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        if (residual.defined()) {
          map_channels<2, 3>(std::array<const scalar_t*, 2>{x, residual.const_data_ptr<scalar_t>()},
                             params, view, kNormalizeAddRelu, out);
        } else {
          map_channels<1, 3>(std::array<const scalar_t*, 1>{x}, params, view, kNormalizeRelu, out);
        }
      });
}

void reduce_grad(const at::Tensor& grad_output, const at::Tensor& input, const ChannelView& view,
                 const at::Tensor& mean, at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "reduce_grad", [&] {
        using opmath = opmath_t<scalar_t>;
        reduce_channels<2, 2, 1, 0>(
            std::array<const scalar_t*, 2>{grad_output.const_data_ptr<scalar_t>(),
                                           input.const_data_ptr<scalar_t>()},
            {stat_ptr<scalar_t>(mean)}, view, kGradSums,
            std::array<opmath*, 2>{sum_dy.mutable_data_ptr<opmath>(),
                                   sum_dy_xmu.mutable_data_ptr<opmath>()});
      });
}

void reduce_grad_relu(const at::Tensor& grad_output, const at::Tensor& output,
                      const at::Tensor& input, const ChannelView& view, const at::Tensor& mean,
                      at::Tensor& sum_dy, at::Tensor& sum_dy_xmu, at::Tensor& grad_masked) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "reduce_grad_relu", [&] {
        using opmath = opmath_t<scalar_t>;
        const std::array<const scalar_t*, 3> in{grad_output.const_data_ptr<scalar_t>(),
                                                output.const_data_ptr<scalar_t>(),
                                                input.const_data_ptr<scalar_t>()};
        const std::array<opmath*, 2> sums{sum_dy.mutable_data_ptr<opmath>(),
                                          sum_dy_xmu.mutable_data_ptr<opmath>()};
        if (grad_masked.defined()) {
          // dz is dy or 0: written back to scalar_t exactly.
          reduce_channels<3, 2, 1, 1>(in, {stat_ptr<scalar_t>(mean)}, view, kReluGradSumsAndMasked,
                                      sums, grad_masked.mutable_data_ptr<scalar_t>());
        } else {
          reduce_channels<3, 2, 1, 0>(in, {stat_ptr<scalar_t>(mean)}, view, kReluGradSums, sums);
        }
      });
}

void apply_grad_input(const at::Tensor& grad_output, const at::Tensor& input,
                      const ChannelView& view, const at::Tensor& mean, const at::Tensor& dy_mean,
                      const at::Tensor& a, const at::Tensor& b, at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "apply_grad_input", [&] {
        map_channels<2, 4>(std::array<const scalar_t*, 2>{grad_output.const_data_ptr<scalar_t>(),
                                                          input.const_data_ptr<scalar_t>()},
                           {stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(dy_mean),
                            stat_ptr<scalar_t>(a), stat_ptr<scalar_t>(b)},
                           view, kGradInput, grad_input.mutable_data_ptr<scalar_t>());
      });
}

void apply_grad_input_relu(const at::Tensor& grad_output, const at::Tensor& output,
                           const at::Tensor& input, const ChannelView& view, const at::Tensor& mean,
                           const at::Tensor& dy_mean, const at::Tensor& a, const at::Tensor& b,
                           at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "apply_grad_input_relu", [&] {
        map_channels<3, 4>(std::array<const scalar_t*, 3>{grad_output.const_data_ptr<scalar_t>(),
                                                          output.const_data_ptr<scalar_t>(),
                                                          input.const_data_ptr<scalar_t>()},
                           {stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(dy_mean),
                            stat_ptr<scalar_t>(a), stat_ptr<scalar_t>(b)},
                           view, kReluGradInput, grad_input.mutable_data_ptr<scalar_t>());
      });
}

// ---- Channels-first training passes, one channel at a time ----------------------------------
// When a channel's values fit in cache (fits_by_channel), the reduction over a channel and the
// elementwise pass that needs its result run back to back: the second read of the channel
// comes from cache, not memory. The item sums, their merge and the per-channel math are those
// of the two-kernel path, so the results are bitwise the same.

// Calls fn(c, scratch) for every channel, in parallel, about kItemElements values per task;
// scratch holds a channel's item results. A pass whose tensors (`inputs` and the result)
// exceed the last-level cache writes its result with non-temporal stores, as map_channels.
template <typename scalar_t, typename Result, typename Fn>
void for_each_channel_slab(const ChannelView& view, int64_t items_per_channel, int inputs,
                           const Fn& fn) {
  const int64_t values = view.outer * view.inner;
  const int64_t grain = std::max<int64_t>(1, kItemElements / std::max<int64_t>(1, values));
  // A channel's runs are not adjacent, so only whole-vector runs can be streamed.
  const bool stream =
      exceeds_cache<scalar_t>(view, inputs) && runs_are_whole_vectors<scalar_t>(view);
  at::parallel_for(0, view.channels, grain, [&](int64_t begin, int64_t end) {
    std::vector<Result> scratch(items_per_channel);
    for (int64_t c = begin; c < end; ++c) fn(c, scratch.data(), stream);
    if (stream) finish_streaming();
  });
}

// Maps every (n, c) run of channel c with the channel's parameters p.
template <int I, int P, typename scalar_t, typename Fn>
void map_channel(const std::array<const scalar_t*, I>& in,
                 const std::array<opmath_t<scalar_t>, P>& p, const ChannelView& view, int64_t c,
                 const Fn& fn, scalar_t* out, bool stream) {
  const auto pv = broadcast<P>(p);
  for (int64_t n = 0; n < view.outer; ++n) {
    map_run<I, P>(in, pv, (n * view.channels + c) * view.inner, view.inner, fn, out, stream);
  }
}

void normalize_by_channel(const at::Tensor& input, const ChannelView& view,
                          const at::Tensor& weight, const at::Tensor& bias, double eps,
                          bool with_relu, at::Tensor& mean, at::Tensor& m2, at::Tensor& invstd,
                          at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "normalize_by_channel", [&] {
        using opmath = opmath_t<scalar_t>;
        const FirstItems items(view);
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        const opmath* w = stat_ptr<scalar_t>(weight);
        const opmath* b = stat_ptr<scalar_t>(bias);
        opmath* mean_out = mean.mutable_data_ptr<opmath>();
        opmath* m2_out = m2.mutable_data_ptr<opmath>();
        opmath* invstd_out = invstd.mutable_data_ptr<opmath>();
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        const opmath count = static_cast<opmath>(view.outer * view.inner);
        for_each_channel_slab<scalar_t, WelfordStats<double>>(
            view, items.per_channel, 1, [&](int64_t c, WelfordStats<double>* parts, bool stream) {
              const opmath shift = static_cast<opmath>(x[c * view.inner]);
              for (int64_t j = 0; j < items.per_channel; ++j) {
                parts[j] =
                    first_item_stats(x, view, items.span(view, c * items.per_channel + j), shift);
              }
              const WelfordStats<double> stats = merge_items(parts, items.per_channel);
              mean_out[c] = static_cast<opmath>(stats.mean);
              m2_out[c] = static_cast<opmath>(stats.m2);
              invstd_out[c] = custom_bn::invstd_from_var(m2_out[c] / count, eps);
              const std::array<opmath, 3> p{mean_out[c], invstd_out[c] * w[c], b[c]};
              const std::array<const scalar_t*, 1> in{x};
              if (with_relu) {
                map_channel<1, 3>(in, p, view, c, kNormalizeRelu, out, stream);
              } else {
                map_channel<1, 3>(in, p, view, c, kNormalize, out, stream);
              }
            });
      });
}

// The sums of channel c's items in item order, then the training coefficients and the input
// gradient: reduce_terms gives (dz, dz * (x - mean)), grad_input_of(v, q) the gradient, both
// from the same inputs.
template <int I, typename scalar_t, typename ReduceTerms, typename GradFn>
void grad_input_by_channel_impl(const std::array<const scalar_t*, I>& in, const ChannelView& view,
                                const at::Tensor& mean, const at::Tensor& invstd,
                                const at::Tensor& weight, at::Tensor& sum_dy,
                                at::Tensor& sum_dy_xmu, const ReduceTerms& reduce_terms,
                                const GradFn& grad_input_of, at::Tensor& grad_input) {
  using opmath = opmath_t<scalar_t>;
  const FirstItems items(view);
  const opmath* mean_in = stat_ptr<scalar_t>(mean);
  const opmath* invstd_in = stat_ptr<scalar_t>(invstd);
  const opmath* w = stat_ptr<scalar_t>(weight);
  opmath* sum_dy_out = sum_dy.mutable_data_ptr<opmath>();
  opmath* sum_dy_xmu_out = sum_dy_xmu.mutable_data_ptr<opmath>();
  scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
  const opmath count = static_cast<opmath>(view.outer * view.inner);
  for_each_channel_slab<scalar_t, std::array<double, 2>>(
      view, items.per_channel, I, [&](int64_t c, std::array<double, 2>* parts, bool stream) {
        for (int64_t j = 0; j < items.per_channel; ++j) {
          parts[j] = reduce_first_item<I, 2, 1, 0>(in, std::array<opmath, 1>{mean_in[c]}, view,
                                                   items.span(view, c * items.per_channel + j),
                                                   reduce_terms, (scalar_t*)nullptr);
        }
        const std::array<double, 2> sum = sum_in_item_order<2>(parts, items.per_channel);
        sum_dy_out[c] = static_cast<opmath>(sum[0]);
        sum_dy_xmu_out[c] = static_cast<opmath>(sum[1]);
        const GradInputCoefficients<opmath> k = grad_input_coefficients_training(
            invstd_in[c], w[c], sum_dy_out[c], sum_dy_xmu_out[c], count);
        map_channel<I, 4>(in, std::array<opmath, 4>{mean_in[c], k.dy_mean, k.a, k.b}, view, c,
                          grad_input_of, out, stream);
      });
}

void grad_input_by_channel(const at::Tensor& grad_output, const at::Tensor& output,
                           const at::Tensor& input, const ChannelView& view, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& weight, at::Tensor& sum_dy,
                           at::Tensor& sum_dy_xmu, at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "grad_input_by_channel", [&] {
        const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        if (!output.defined()) {
          grad_input_by_channel_impl<2>(std::array{dy, x}, view, mean, invstd, weight, sum_dy,
                                        sum_dy_xmu, kGradSums, kGradInput, grad_input);
          return;
        }
        grad_input_by_channel_impl<3>(std::array{dy, output.const_data_ptr<scalar_t>(), x}, view,
                                      mean, invstd, weight, sum_dy, sum_dy_xmu, kReluGradSums,
                                      kReluGradInput, grad_input);
      });
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table{
      collect_stats,         apply_affine,         apply_affine_relu,
      reduce_grad,           reduce_grad_relu,     apply_grad_input,
      apply_grad_input_relu, normalize_by_channel, grad_input_by_channel};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace custom_bn::cpu
