// The CUDA kernels of csrc/cuda/kernels/, executed on the CPU by the SIMT emulator (under
// AddressSanitizer and UBSan) and compared with torch::batch_norm and its autograd.
#include "kernel_launches.h"

namespace custom_bn::testing {
namespace {

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

INSTANTIATE_TEST_SUITE_P(Shapes, SimtKernels, ::testing::ValuesIn(configs()), name);

}  // namespace
}  // namespace custom_bn::testing
