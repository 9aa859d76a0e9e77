// What the SIMT tests of the CUDA kernels share: the configurations (shape, layout, dtypes,
// grid), torch's side of the comparisons, and the kernels' launches as the CUDA launcher makes
// them, each on its own grid and schedule seed.
#pragma once

#include "activation.h"
#include "cuda/kernels/batch_norm.cuh"

#include <ATen/OpMathType.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <optional>
#include <random>

namespace custom_bn::testing {

struct Config {
  std::vector<int64_t> shape;
  bool channels_last;
  torch::Dtype input_dtype, param_dtype;
  int threads;   // per block
  int slices;    // blocks along the reduction
  bool index64;  // 64-bit index math
};

inline std::string name(const ::testing::TestParamInfo<Config>& info) {
  const Config& c = info.param;
  std::string s;
  for (int64_t d : c.shape) s += std::to_string(d) + "x";
  s += c.channels_last ? "_cl_" : "_cf_";
  s += std::string(c.input_dtype == torch::kFloat      ? "f32"
                   : c.input_dtype == torch::kDouble   ? "f64"
                   : c.input_dtype == torch::kBFloat16 ? "bf16"
                                                       : "f16");
  if (c.param_dtype != c.input_dtype) s += "_f32params";
  s += "_t" + std::to_string(c.threads) + "_s" + std::to_string(c.slices);
  s += c.index64 ? "_i64" : "_i32";
  return s;
}

// A fresh seed for torch's generator (each run tests new values), returned for the trace.
inline uint64_t seed_torch() {
  const uint64_t seed = std::random_device{}();
  torch::manual_seed(seed);
  return seed;
}

// A tensor of the config's shape in its layout.
inline torch::Tensor in_layout(const Config& cfg, const torch::Tensor& t) {
  if (!cfg.channels_last) return t;
  return t.contiguous(cfg.shape.size() == 4 ? at::MemoryFormat::ChannelsLast
                                            : at::MemoryFormat::ChannelsLast3d);
}

// The input: mean 1, standard deviation 2, in the config's dtype and layout.
inline torch::Tensor random_input(const Config& cfg) {
  return in_layout(cfg, (torch::randn(cfg.shape) * 2 + 1).to(cfg.input_dtype));
}

// (outer, C, inner) of the config's shape and layout, as the CUDA launcher passes it.
inline ChannelView device_view(const Config& cfg) {
  const int64_t N = cfg.shape[0], C = cfg.shape[1];
  int64_t S = 1;
  for (size_t d = 2; d < cfg.shape.size(); ++d) S *= cfg.shape[d];
  return cfg.channels_last ? ChannelView{Layout::kChannelsLast, N * S, C, 1}
                           : ChannelView{Layout::kChannelsFirst, N, C, S};
}

// Channel groups of the reduction grid: one per channel, or one per block of channels.
inline int channel_groups(const Config& cfg) {
  const int64_t C = cfg.shape[1];
  return cfg.channels_last ? static_cast<int>((C + cfg.threads - 1) / cfg.threads)
                           : static_cast<int>(C);
}

inline double tolerance(torch::Dtype dtype) {
  return dtype == torch::kDouble  ? 1e-9
         : dtype == torch::kFloat ? 1e-4
         : dtype == torch::kHalf  ? 4e-3
                                  : 3e-2;
}

inline void expect_close(const torch::Tensor& a, const torch::Tensor& b, double tol,
                         const char* what) {
  const torch::Tensor a64 = a.to(torch::kDouble), b64 = b.to(torch::kDouble);
  EXPECT_TRUE(torch::allclose(a64, b64, tol, tol))
      << what << ": max abs difference " << (a64 - b64).abs().max().item<double>();
}

// Calls run(scalar_t{}, param_t{}, index_t{}) with the config's types.
template <typename Run>
void dispatch(const Config& cfg, const Run& run) {
  const auto with_scalar = [&](auto scalar) {
    using scalar_t = decltype(scalar);
    const auto with_param = [&](auto param) {
      cfg.index64 ? run(scalar, param, int64_t{}) : run(scalar, param, int32_t{});
    };
    if (cfg.param_dtype == torch::kFloat && !std::is_same_v<scalar_t, float>) {
      with_param(float{});
    } else {
      with_param(scalar);
    }
  };
  switch (cfg.input_dtype) {
    case torch::kFloat:
      return with_scalar(float{});
    case torch::kDouble:
      return with_scalar(double{});
    case torch::kBFloat16:
      return with_scalar(c10::BFloat16{});
    default:
      return with_scalar(c10::Half{});
  }
}

// The launches of the CUDA launcher, each on its own grid and schedule seed.

// The normalize pass on 3 blocks; with an activation, act(normalized + residual).
template <typename scalar_t, typename acc_t, typename param_t, typename index_t>
torch::Tensor normalize(const Config& cfg, const torch::Tensor& x, const ChannelView& view,
                        const torch::Tensor& mean, const torch::Tensor& invstd,
                        const torch::Tensor& weight, const torch::Tensor& bias, uint64_t seed,
                        const std::optional<Activation>& act = std::nullopt,
                        const torch::Tensor& residual = {}) {
  torch::Tensor y = torch::empty_like(x);
  simt::launch(
      {3, 1}, cfg.threads, 0,
      [&] {
        kernels::normalize_elements<scalar_t, acc_t, param_t, index_t>(
            x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), view, mean.data_ptr<acc_t>(),
            invstd.data_ptr<acc_t>(), weight.data_ptr<param_t>(), bias.data_ptr<param_t>(),
            act.has_value(), act ? act->to<acc_t>() : ActivationFunction<acc_t>{},
            residual.defined() ? residual.data_ptr<scalar_t>() : nullptr);
      },
      seed);
  return y;
}

// The per-channel reduction grid of `accumulator`. The arrival counters must come back
// zeroed: the next launch reuses them.
template <typename Acc, typename acc_t, typename index_t>
void reduce(const Config& cfg, const Acc& accumulator, const ChannelView& view,
            torch::Tensor& partials, torch::Tensor& arrivals, uint64_t seed) {
  simt::launch(
      {cfg.slices, channel_groups(cfg)}, cfg.threads,
      kernels::reduce_shared_bytes<Acc, acc_t>(cfg.threads),
      [&] {
        kernels::reduce_channels<Acc, acc_t, index_t>(accumulator, view, partials.data_ptr<acc_t>(),
                                                      arrivals.data_ptr<int>());
      },
      seed);
  EXPECT_EQ(arrivals.sum().item<int>(), 0) << "the counters are left zeroed for the next launch";
}

// The input gradient on 2 blocks; in eval (training false) without the batch sums.
template <typename scalar_t, typename acc_t, typename param_t, typename index_t>
torch::Tensor grad_input(const Config& cfg, const torch::Tensor& grad, const torch::Tensor& x,
                         const ChannelView& view, const torch::Tensor& mean,
                         const torch::Tensor& invstd, const torch::Tensor& weight,
                         const torch::Tensor& sum_dy, const torch::Tensor& sum_dy_xmu,
                         bool training, uint64_t seed) {
  torch::Tensor result = torch::empty_like(x);
  const auto values_per_channel = static_cast<acc_t>(view.outer * view.inner);
  simt::launch(
      {2, 1}, cfg.threads, 0,
      [&] {
        kernels::grad_input_elements<scalar_t, acc_t, param_t, index_t>(
            grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), result.data_ptr<scalar_t>(), view,
            mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), weight.data_ptr<param_t>(),
            training ? sum_dy.data_ptr<acc_t>() : nullptr,
            training ? sum_dy_xmu.data_ptr<acc_t>() : nullptr, values_per_channel, training);
      },
      seed);
  return result;
}

// The configurations every parameterized SIMT test runs on.
inline std::vector<Config> configs() {
  std::vector<Config> out;
  const std::pair<torch::Dtype, torch::Dtype> dtypes[] = {{torch::kFloat, torch::kFloat},
                                                          {torch::kDouble, torch::kDouble},
                                                          {torch::kBFloat16, torch::kBFloat16},
                                                          {torch::kHalf, torch::kHalf},
                                                          {torch::kBFloat16, torch::kFloat}};
  for (const auto& [input, param] : dtypes) {
    // Many blocks per channel; partial warps and blocks (values not a multiple of threads).
    out.push_back({{5, 3, 7, 11}, false, input, param, 64, 4, false});
    // The channels-last grid reduction; C = 70 is not a multiple of the block (nor of 8).
    out.push_back({{6, 70, 3, 5}, true, input, param, 64, 5, false});
    // A 5-D channels-last input, one slice; index math forced to 64 bits.
    out.push_back({{2, 33, 2, 3, 4}, true, input, param, 32, 1, true});
  }
  out.push_back({{9, 4, 5, 13}, false, torch::kFloat, torch::kFloat, 128, 7, true});
  return out;
}

}  // namespace custom_bn::testing
