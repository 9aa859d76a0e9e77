// The CUDA kernels of csrc/cuda/kernels/, executed on the CPU by the SIMT emulator (under
// AddressSanitizer and UBSan) and compared with torch::batch_norm and its autograd.
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
namespace {

struct Config {
  std::vector<int64_t> shape;
  bool channels_last;
  torch::Dtype input_dtype, param_dtype;
  int threads;   // per block
  int slices;    // blocks along the reduction
  bool index64;  // 64-bit index math
};

std::string name(const ::testing::TestParamInfo<Config>& info) {
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
uint64_t seed_torch() {
  const uint64_t seed = std::random_device{}();
  torch::manual_seed(seed);
  return seed;
}

// A tensor of the config's shape in its layout.
torch::Tensor in_layout(const Config& cfg, const torch::Tensor& t) {
  if (!cfg.channels_last) return t;
  return t.contiguous(cfg.shape.size() == 4 ? at::MemoryFormat::ChannelsLast
                                            : at::MemoryFormat::ChannelsLast3d);
}

// The input: mean 1, standard deviation 2, in the config's dtype and layout.
torch::Tensor random_input(const Config& cfg) {
  return in_layout(cfg, (torch::randn(cfg.shape) * 2 + 1).to(cfg.input_dtype));
}

// (outer, C, inner) of the config's shape and layout, as the CUDA launcher passes it.
ChannelView device_view(const Config& cfg) {
  const int64_t N = cfg.shape[0], C = cfg.shape[1];
  int64_t S = 1;
  for (size_t d = 2; d < cfg.shape.size(); ++d) S *= cfg.shape[d];
  return cfg.channels_last ? ChannelView{Layout::kChannelsLast, N * S, C, 1}
                           : ChannelView{Layout::kChannelsFirst, N, C, S};
}

// Channel groups of the reduction grid: one per channel, or one per block of channels.
int channel_groups(const Config& cfg) {
  const int64_t C = cfg.shape[1];
  return cfg.channels_last ? static_cast<int>((C + cfg.threads - 1) / cfg.threads)
                           : static_cast<int>(C);
}

double tolerance(torch::Dtype dtype) {
  return dtype == torch::kDouble  ? 1e-9
         : dtype == torch::kFloat ? 1e-4
         : dtype == torch::kHalf  ? 4e-3
                                  : 3e-2;
}

void expect_close(const torch::Tensor& a, const torch::Tensor& b, double tol, const char* what) {
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
            act.has_value(), act ? act->to<acc_t>() : PiecewiseLinear<acc_t>{},
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

// Runs the kernels like the CUDA launcher: statistics with the fused running update, the
// normalize pass, then the backward sums and the input gradient.
template <typename scalar_t, typename param_t, typename index_t>
void run_and_compare(const Config& cfg) {
  using acc_t = at::opmath_type<scalar_t>;
  const torch::Dtype acc_dtype = std::is_same_v<acc_t, double> ? torch::kDouble : torch::kFloat;
  const uint64_t seed = seed_torch();
  SCOPED_TRACE("seed " + std::to_string(seed));

  const torch::Tensor x = random_input(cfg);
  const ChannelView view = device_view(cfg);
  const int64_t C = view.channels;
  torch::Tensor weight = (torch::rand({C}) + 0.5).to(cfg.param_dtype);
  torch::Tensor bias = torch::randn({C}).to(cfg.param_dtype);
  torch::Tensor running_mean = torch::randn({C}).to(cfg.param_dtype);
  torch::Tensor running_var = (torch::rand({C}) + 0.5).to(cfg.param_dtype);
  torch::Tensor ref_mean = running_mean.clone(), ref_var = running_var.clone();
  torch::Tensor nbt = torch::tensor(4, torch::kLong);  // already incremented for this step

  // Statistics, with momentum = None read from num_batches_tracked on the "device".
  auto opts = torch::TensorOptions().dtype(acc_dtype);
  torch::Tensor mean = torch::empty({C}, opts), m2 = torch::empty({C}, opts),
                invstd = torch::empty({C}, opts);
  torch::Tensor partials = torch::empty({C * cfg.slices * 3}, opts);
  torch::Tensor arrivals = torch::zeros({channel_groups(cfg)}, torch::kInt);
  kernels::StatsAccumulator<scalar_t, acc_t, param_t> stats{
      x.data_ptr<scalar_t>(),
      mean.data_ptr<acc_t>(),
      m2.data_ptr<acc_t>(),
      invstd.data_ptr<acc_t>(),
      1e-5,
      {running_mean.data_ptr<param_t>(), running_var.data_ptr<param_t>(), nbt.data_ptr<int64_t>(),
       -1.0}};
  reduce<decltype(stats), acc_t, index_t>(cfg, stats, view, partials, arrivals, seed);
  const torch::Tensor y = normalize<scalar_t, acc_t, param_t, index_t>(cfg, x, view, mean, invstd,
                                                                       weight, bias, seed + 1);

  // The reference: torch's batch norm and autograd, with the same momentum (1 / 4).
  torch::Tensor x_ref = x.detach().clone().requires_grad_();
  torch::Tensor w_ref = weight.detach().clone().requires_grad_();
  torch::Tensor y_ref =
      torch::batch_norm(x_ref, w_ref, bias, ref_mean, ref_var, true, 0.25, 1e-5, false);
  const double tol = tolerance(cfg.input_dtype);
  auto close = [&](const torch::Tensor& a, const torch::Tensor& b, const char* what,
                   double scale = 1.0) { expect_close(a, b, tol * scale, what); };
  close(y, y_ref, "output");
  close(running_mean, ref_mean, "running_mean");
  close(running_var, ref_var, "running_var");

  // Backward: sums by the same reduction, then the elementwise gradient.
  torch::Tensor grad = torch::randn_like(y);
  y_ref.backward(grad);
  torch::Tensor sum_dy = torch::empty({C}, opts), sum_dy_xmu = torch::empty({C}, opts);
  kernels::GradAccumulator<scalar_t, acc_t> sums{grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                 mean.data_ptr<acc_t>(), sum_dy.data_ptr<acc_t>(),
                                                 sum_dy_xmu.data_ptr<acc_t>()};
  reduce<decltype(sums), acc_t, index_t>(cfg, sums, view, partials, arrivals, seed + 2);
  const auto input_gradient = [&](bool training, uint64_t launch_seed) {
    return grad_input<scalar_t, acc_t, param_t, index_t>(cfg, grad, x, view, mean, invstd, weight,
                                                         sum_dy, sum_dy_xmu, training, launch_seed);
  };
  close(input_gradient(true, seed + 3), x_ref.grad(), "grad input");

  // Eval: the statistics are constants, grad_input = dy * invstd * weight.
  std::vector<int64_t> channel_shape(cfg.shape.size(), 1);
  channel_shape[1] = C;
  const torch::Tensor scale = (invstd * weight.to(acc_dtype)).view(channel_shape);
  close(input_gradient(false, seed + 4), grad.to(acc_dtype) * scale, "grad input (eval)");
  // A per-channel sum of many products: torch's own bfloat16/float16 sums are off by more
  // than an ulp when the terms cancel, so the reference is torch in float64.
  torch::Tensor x_wide = x.detach().to(torch::kDouble).requires_grad_();
  torch::Tensor w_wide = weight.detach().to(torch::kDouble).requires_grad_();
  torch::batch_norm(x_wide, w_wide, bias.to(torch::kDouble), {}, {}, true, 0.25, 1e-5, false)
      .backward(grad.to(torch::kDouble));
  close((sum_dy_xmu * invstd).to(cfg.param_dtype), w_wide.grad().to(cfg.param_dtype), "grad weight",
        4.0);
}

class SimtKernels : public ::testing::TestWithParam<Config> {};

TEST_P(SimtKernels, MatchTorch) {
  dispatch(GetParam(), [](auto scalar, auto param, auto index) {
    run_and_compare<decltype(scalar), decltype(param), decltype(index)>(GetParam());
  });
}

// The real reductions under many schedules: each run draws fresh seeds, so every CI run
// tries new block orders and interleavings under the weak memory model.
TEST(SimtKernelsUnderManySeeds, MatchTorchWithoutAMemoryModelReport) {
  const Config channels_first{{5, 3, 7, 11}, false, torch::kFloat, torch::kFloat, 64, 6, false};
  const Config channels_last{{6, 70, 3, 5}, true, torch::kFloat, torch::kFloat, 64, 5, false};
  for (int run = 0; run < 12; ++run) {
    run_and_compare<float, float, int32_t>(channels_first);
    run_and_compare<float, float, int32_t>(channels_last);
  }
}

std::vector<Config> configs() {
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

// The fused activations, with torch's own function of each.
struct FusedActivation {
  const char* name;
  Activation act;
  torch::Tensor (*reference)(const torch::Tensor&);
};
const double kNoUpper = std::numeric_limits<double>::quiet_NaN();
const FusedActivation kActivations[] = {
    {"relu", {0.0, kNoUpper, 0.0}, [](const torch::Tensor& v) { return torch::relu(v); }},
    {"hardtanh(-0.5, 1)",
     {-0.5, 1.0, 0.0},
     [](const torch::Tensor& v) { return torch::hardtanh(v, -0.5, 1.0); }},
    {"leaky_relu(0.2)",
     {0.0, kNoUpper, 0.2},
     [](const torch::Tensor& v) { return torch::leaky_relu(v, 0.2); }},
    {"identity", {0.0, kNoUpper, 1.0}, [](const torch::Tensor& v) { return v; }},
};

// The fused batch_norm_relu path: the normalize pass with residual and an activation, the
// backward reduction that multiplies grad_output by the activation's gradient read from the
// output (and writes that dz), then the input gradient of dz; against torch's batch norm, add
// and the activation.
template <typename scalar_t, typename param_t, typename index_t>
void run_fused_and_compare(const Config& cfg, const FusedActivation& fused) {
  SCOPED_TRACE(fused.name);
  const Activation& act = fused.act;
  using acc_t = at::opmath_type<scalar_t>;
  const torch::Dtype acc_dtype = std::is_same_v<acc_t, double> ? torch::kDouble : torch::kFloat;
  const uint64_t seed = seed_torch();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const torch::Tensor x = random_input(cfg);
  const torch::Tensor residual = in_layout(cfg, torch::randn(cfg.shape).to(cfg.input_dtype));
  const ChannelView view = device_view(cfg);
  const int64_t C = view.channels;
  const torch::Tensor weight = (torch::rand({C}) + 0.5).to(cfg.param_dtype);
  const torch::Tensor bias = torch::randn({C}).to(cfg.param_dtype);
  std::vector<int64_t> reduce_dims{0};
  for (int64_t d = 2; d < static_cast<int64_t>(cfg.shape.size()); ++d) reduce_dims.push_back(d);
  const torch::Tensor x_acc = x.to(acc_dtype);
  torch::Tensor mean = x_acc.mean(reduce_dims).contiguous();
  torch::Tensor invstd = (x_acc.var(reduce_dims, /*unbiased=*/false) + 1e-5).rsqrt().contiguous();

  const torch::Tensor y = normalize<scalar_t, acc_t, param_t, index_t>(
      cfg, x, view, mean, invstd, weight, bias, seed, act, residual);

  const double tol = tolerance(cfg.input_dtype);
  auto close = [&](const torch::Tensor& a, const torch::Tensor& b, const char* what) {
    expect_close(a, b, tol, what);
  };
  // float64 reference from the same values: act(batch_norm(x) + residual).
  const torch::Tensor x_ref = x.to(torch::kDouble).requires_grad_();
  const torch::Tensor w_ref = weight.to(torch::kDouble).requires_grad_();
  const torch::Tensor r_ref = residual.to(torch::kDouble).requires_grad_();
  const torch::Tensor pre_activation =
      torch::batch_norm(x_ref, w_ref, bias.to(torch::kDouble), {}, {}, true, 0.1, 1e-5, false) +
      r_ref;
  close(y, fused.reference(pre_activation), "output");

  const torch::Tensor grad = torch::randn_like(y);
  // torch's activation backward, from our output (rounded as torch rounds grad * slope).
  torch::Tensor masked_expected = torch::where(y > act.lower, grad, grad * act.slope);
  if (!std::isnan(act.upper)) {
    masked_expected = torch::where(y >= act.upper, torch::zeros_like(grad), masked_expected);
  }
  auto opts = torch::TensorOptions().dtype(acc_dtype);
  torch::Tensor partials = torch::empty({C * cfg.slices * 2}, opts);
  torch::Tensor arrivals = torch::zeros({channel_groups(cfg)}, torch::kInt);
  torch::Tensor sum_dy = torch::empty({C}, opts), sum_dy_xmu = torch::empty({C}, opts);
  torch::Tensor grad_masked = torch::full_like(x, 7.0);  // every element must be written
  kernels::GradAccumulator<scalar_t, acc_t> sums{
      grad.data_ptr<scalar_t>(),        x.data_ptr<scalar_t>(),
      mean.data_ptr<acc_t>(),           sum_dy.data_ptr<acc_t>(),
      sum_dy_xmu.data_ptr<acc_t>(),     y.data_ptr<scalar_t>(),
      grad_masked.data_ptr<scalar_t>(), act.to<acc_t>()};
  reduce<decltype(sums), acc_t, index_t>(cfg, sums, view, partials, arrivals, seed + 1);
  EXPECT_TRUE(torch::equal(grad_masked, masked_expected)) << "grad residual: dz";

  const torch::Tensor input_gradient = grad_input<scalar_t, acc_t, param_t, index_t>(
      cfg, grad_masked, x, view, mean, invstd, weight, sum_dy, sum_dy_xmu, true, seed + 2);
  // The reference's backward of the same dz (ours): elements within rounding of a kink may
  // fall on either side of it, and that choice is checked above, not here.
  pre_activation.backward(masked_expected.to(torch::kDouble));
  close(input_gradient, x_ref.grad(), "grad input");
  close(sum_dy, r_ref.grad().sum(reduce_dims), "sum of dz");
}

// ReLU on every configuration, and one other activation each, in turn by the shape and the
// dtype (all four on every configuration would add a third to the suite's time).
TEST_P(SimtKernels, FusedActivationsMatchTorch) {
  const Config& cfg = GetParam();
  int64_t turn = static_cast<int64_t>(cfg.input_dtype);
  for (int64_t d : cfg.shape) turn += d;
  const size_t other = 1 + static_cast<size_t>(turn) % (std::size(kActivations) - 1);
  for (const FusedActivation* fused : {&kActivations[0], &kActivations[other]}) {
    dispatch(cfg, [&](auto scalar, auto param, auto index) {
      run_fused_and_compare<decltype(scalar), decltype(param), decltype(index)>(cfg, *fused);
    });
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, SimtKernels, ::testing::ValuesIn(configs()), name);

}  // namespace
}  // namespace custom_bn::testing
