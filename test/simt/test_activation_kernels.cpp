// The fused op's activations in the CUDA kernels, executed on the CPU by the SIMT emulator:
// the piecewise-linear ones read their gradient from the output, the smooth ones take it at
// the pre-activation recomputed from the input; each against torch's batch norm and the
// activation.
#include "kernel_launches.h"

namespace custom_bn::testing {
namespace {

class SimtActivationKernels : public ::testing::TestWithParam<Config> {};

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
TEST_P(SimtActivationKernels, FusedActivationsMatchTorch) {
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

// The smooth activations, with torch's backward of each.
struct SmoothActivation {
  const char* name;
  ActivationKind kind;
  torch::Tensor (*reference)(const torch::Tensor&);
  torch::Tensor (*backward)(const torch::Tensor& grad, const torch::Tensor& v);
};
const SmoothActivation kSmoothActivations[] = {
    {"silu", ActivationKind::kSilu, [](const torch::Tensor& v) { return torch::silu(v); },
     [](const torch::Tensor& g, const torch::Tensor& v) { return at::silu_backward(g, v); }},
    {"hardswish", ActivationKind::kHardswish,
     [](const torch::Tensor& v) { return torch::hardswish(v); },
     [](const torch::Tensor& g, const torch::Tensor& v) { return at::hardswish_backward(g, v); }},
    {"gelu", ActivationKind::kGelu, [](const torch::Tensor& v) { return torch::gelu(v); },
     [](const torch::Tensor& g, const torch::Tensor& v) { return at::gelu_backward(g, v); }},
};

// A smooth activation's path: the normalize pass with it, the backward reduction that takes
// its gradient at the pre-activation recomputed from x (alpha, beta) and writes that dz, then
// the input gradient of dz; against torch's batch norm and the activation in float64.
template <typename scalar_t, typename param_t, typename index_t>
void run_smooth_and_compare(const Config& cfg, const SmoothActivation& smooth) {
  SCOPED_TRACE(smooth.name);
  const Activation act{0.0, kNoUpper, 0.0, smooth.kind};
  using acc_t = at::opmath_type<scalar_t>;
  const torch::Dtype acc_dtype = std::is_same_v<acc_t, double> ? torch::kDouble : torch::kFloat;
  const uint64_t seed = seed_torch();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const torch::Tensor x = random_input(cfg);
  const ChannelView view = device_view(cfg);
  const int64_t C = view.channels;
  // Weights up to 3.5: pre-activations on both sides of hardswish's -3 and 3.
  const torch::Tensor weight = (torch::rand({C}) * 3 + 0.5).to(cfg.param_dtype);
  const torch::Tensor bias = torch::randn({C}).to(cfg.param_dtype);
  std::vector<int64_t> reduce_dims{0};
  for (int64_t d = 2; d < static_cast<int64_t>(cfg.shape.size()); ++d) reduce_dims.push_back(d);
  const torch::Tensor x_acc = x.to(acc_dtype);
  torch::Tensor mean = x_acc.mean(reduce_dims).contiguous();
  torch::Tensor invstd = (x_acc.var(reduce_dims, /*unbiased=*/false) + 1e-5).rsqrt().contiguous();
  const torch::Tensor y = normalize<scalar_t, acc_t, param_t, index_t>(cfg, x, view, mean, invstd,
                                                                       weight, bias, seed, act);

  const double tol = tolerance(cfg.input_dtype);
  auto close = [&](const torch::Tensor& a, const torch::Tensor& b, const char* what) {
    expect_close(a, b, tol, what);
  };
  const torch::Tensor x_ref = x.to(torch::kDouble).requires_grad_();
  const torch::Tensor pre_activation = torch::batch_norm(
      x_ref, weight.to(torch::kDouble), bias.to(torch::kDouble), {}, {}, true, 0.1, 1e-5, false);
  close(y, smooth.reference(pre_activation), "output");

  const torch::Tensor grad = torch::randn_like(y);
  const torch::Tensor alpha = (invstd * weight.to(acc_dtype)).contiguous();
  const torch::Tensor beta = bias.to(acc_dtype).contiguous();
  auto opts = torch::TensorOptions().dtype(acc_dtype);
  torch::Tensor partials = torch::empty({C * cfg.slices * 2}, opts);
  torch::Tensor arrivals = torch::zeros({channel_groups(cfg)}, torch::kInt);
  torch::Tensor sum_dy = torch::empty({C}, opts), sum_dy_xmu = torch::empty({C}, opts);
  torch::Tensor grad_masked = torch::full_like(x, 7.0);  // every element must be written
  kernels::GradAccumulator<scalar_t, acc_t> sums{
      grad.data_ptr<scalar_t>(),        x.data_ptr<scalar_t>(),
      mean.data_ptr<acc_t>(),           sum_dy.data_ptr<acc_t>(),
      sum_dy_xmu.data_ptr<acc_t>(),     nullptr,
      grad_masked.data_ptr<scalar_t>(), act.to<acc_t>(),
      alpha.data_ptr<acc_t>(),          beta.data_ptr<acc_t>()};
  reduce<decltype(sums), acc_t, index_t>(cfg, sums, view, partials, arrivals, seed + 1);
  const torch::Tensor dz_expected =
      smooth.backward(grad.to(torch::kDouble), pre_activation.detach());
  close(grad_masked, dz_expected, "dz");

  const torch::Tensor input_gradient = grad_input<scalar_t, acc_t, param_t, index_t>(
      cfg, grad_masked, x, view, mean, invstd, weight, sum_dy, sum_dy_xmu, true, seed + 2);
  pre_activation.backward(grad_masked.to(torch::kDouble));
  close(input_gradient, x_ref.grad(), "grad input");
  close(sum_dy, dz_expected.sum(reduce_dims), "sum of dz");
}

// One smooth activation per configuration, in turn by the shape and the dtype.
TEST_P(SimtActivationKernels, SmoothActivationsMatchTorch) {
  const Config& cfg = GetParam();
  int64_t turn = static_cast<int64_t>(cfg.input_dtype);
  for (int64_t d : cfg.shape) turn += d;
  const SmoothActivation& smooth =
      kSmoothActivations[static_cast<size_t>(turn) % std::size(kSmoothActivations)];
  dispatch(cfg, [&](auto scalar, auto param, auto index) {
    run_smooth_and_compare<decltype(scalar), decltype(param), decltype(index)>(cfg, smooth);
  });
}
INSTANTIATE_TEST_SUITE_P(Shapes, SimtActivationKernels, ::testing::ValuesIn(configs()), name);

}  // namespace
}  // namespace custom_bn::testing
