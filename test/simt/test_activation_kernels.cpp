// The fused op's activations in the CUDA kernels, executed on the CPU by the SIMT emulator:
// the normalize pass with the activation (and, for the piecewise-linear ones, a residual), the
// backward reduction that multiplies grad_output by the activation's gradient and writes that
// dz, then the input gradient of dz; against torch's batch norm (add) and the activation.
// The piecewise-linear activations read their gradient from the output, the smooth ones take
// it at the pre-activation recomputed from x (alpha, beta).
#include "kernel_launches.h"

namespace custom_bn::testing {
namespace {

class SimtActivationKernels : public ::testing::TestWithParam<Config> {};

// An activation, with torch's own function of it and, for a smooth one, torch's backward of it
// at the pre-activation (a piecewise-linear one's is read from our output instead).
struct FusedActivation {
  const char* name;
  Activation act;
  torch::Tensor (*reference)(const torch::Tensor&);
  torch::Tensor (*backward)(const torch::Tensor& grad, const torch::Tensor& v) = nullptr;
};
const double kNoUpper = std::numeric_limits<double>::quiet_NaN();
const FusedActivation kPiecewiseLinear[] = {
    {"relu", {0.0, kNoUpper, 0.0}, [](const torch::Tensor& v) { return torch::relu(v); }},
    {"hardtanh(-0.5, 1)",
     {-0.5, 1.0, 0.0},
     [](const torch::Tensor& v) { return torch::hardtanh(v, -0.5, 1.0); }},
    {"leaky_relu(0.2)",
     {0.0, kNoUpper, 0.2},
     [](const torch::Tensor& v) { return torch::leaky_relu(v, 0.2); }},
    {"identity", {0.0, kNoUpper, 1.0}, [](const torch::Tensor& v) { return v; }},
};
const FusedActivation kSmooth[] = {
    {"silu",
     {0.0, kNoUpper, 0.0, ActivationKind::kSilu},
     [](const torch::Tensor& v) { return torch::silu(v); },
     [](const torch::Tensor& g, const torch::Tensor& v) { return at::silu_backward(g, v); }},
    {"hardswish",
     {0.0, kNoUpper, 0.0, ActivationKind::kHardswish},
     [](const torch::Tensor& v) { return torch::hardswish(v); },
     [](const torch::Tensor& g, const torch::Tensor& v) { return at::hardswish_backward(g, v); }},
    {"gelu",
     {0.0, kNoUpper, 0.0, ActivationKind::kGelu},
     [](const torch::Tensor& v) { return torch::gelu(v); },
     [](const torch::Tensor& g, const torch::Tensor& v) { return at::gelu_backward(g, v); }},
};

template <typename scalar_t, typename param_t, typename index_t>
void run_fused_and_compare(const Config& cfg, const FusedActivation& fused) {
  SCOPED_TRACE(fused.name);
  const Activation& act = fused.act;
  using acc_t = at::opmath_type<scalar_t>;
  const torch::Dtype acc_dtype = std::is_same_v<acc_t, double> ? torch::kDouble : torch::kFloat;
  const uint64_t seed = seed_torch();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const torch::Tensor x = random_input(cfg);
  // The op takes no residual with a smooth activation.
  const torch::Tensor residual =
      act.smooth() ? torch::Tensor() : in_layout(cfg, torch::randn(cfg.shape).to(cfg.input_dtype));
  const ChannelView view = device_view(cfg);
  const int64_t C = view.channels;
  // Smooth: weights up to 3.5, pre-activations on both sides of hardswish's -3 and 3.
  const torch::Tensor weight =
      (torch::rand({C}) * (act.smooth() ? 3 : 1) + 0.5).to(cfg.param_dtype);
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
  torch::Tensor pre_activation = torch::batch_norm(
      x_ref, weight.to(torch::kDouble), bias.to(torch::kDouble), {}, {}, true, 0.1, 1e-5, false);
  if (residual.defined()) pre_activation = pre_activation + residual.to(torch::kDouble);
  close(y, fused.reference(pre_activation), "output");

  const torch::Tensor grad = torch::randn_like(y);
  torch::Tensor dz_expected;
  if (act.smooth()) {
    dz_expected = fused.backward(grad.to(torch::kDouble), pre_activation.detach());
  } else {
    // torch's activation backward, from our output (rounded as torch rounds grad * slope).
    dz_expected = torch::where(y > act.lower, grad, grad * act.slope);
    if (!std::isnan(act.upper)) {
      dz_expected = torch::where(y >= act.upper, torch::zeros_like(grad), dz_expected);
    }
  }
  const torch::Tensor alpha = (invstd * weight.to(acc_dtype)).contiguous();
  const torch::Tensor beta = bias.to(acc_dtype).contiguous();
  auto opts = torch::TensorOptions().dtype(acc_dtype);
  torch::Tensor partials = torch::empty({C * cfg.slices * 2}, opts);
  torch::Tensor arrivals = torch::zeros({channel_groups(cfg)}, torch::kInt);
  torch::Tensor sum_dy = torch::empty({C}, opts), sum_dy_xmu = torch::empty({C}, opts);
  torch::Tensor grad_masked = torch::full_like(x, 7.0);  // every element must be written
  kernels::GradAccumulator<scalar_t, acc_t> sums{grad.data_ptr<scalar_t>(),
                                                 x.data_ptr<scalar_t>(),
                                                 mean.data_ptr<acc_t>(),
                                                 sum_dy.data_ptr<acc_t>(),
                                                 sum_dy_xmu.data_ptr<acc_t>(),
                                                 act.smooth() ? nullptr : y.data_ptr<scalar_t>(),
                                                 grad_masked.data_ptr<scalar_t>(),
                                                 act.to<acc_t>(),
                                                 act.smooth() ? alpha.data_ptr<acc_t>() : nullptr,
                                                 act.smooth() ? beta.data_ptr<acc_t>() : nullptr};
  reduce<decltype(sums), acc_t, index_t>(cfg, sums, view, partials, arrivals, seed + 1);
  if (act.smooth()) {
    close(grad_masked, dz_expected, "dz");
  } else {
    EXPECT_TRUE(torch::equal(grad_masked, dz_expected)) << "grad residual: dz";
  }

  const torch::Tensor input_gradient = grad_input<scalar_t, acc_t, param_t, index_t>(
      cfg, grad_masked, x, view, mean, invstd, weight, sum_dy, sum_dy_xmu, true, seed + 2);
  // The reference's backward of the same dz (ours): elements within rounding of a kink may
  // fall on either side of it, and that choice is checked above, not here.
  pre_activation.backward(grad_masked.to(torch::kDouble));
  close(input_gradient, x_ref.grad(), "grad input");
  // The reduction sums dz as it writes it (rounded to scalar_t): the values the input-gradient
  // pass reads back.
  close(sum_dy, grad_masked.to(torch::kDouble).sum(reduce_dims), "sum of dz");
}

// Which of `count` activations a configuration runs, in turn by its shape and dtype.
size_t turn_of(const Config& cfg, size_t count) {
  int64_t turn = static_cast<int64_t>(cfg.input_dtype);
  for (int64_t d : cfg.shape) turn += d;
  return static_cast<size_t>(turn) % count;
}

// ReLU on every configuration, and one other piecewise-linear activation each, in turn (all
// four on every configuration would add a third to the suite's time).
TEST_P(SimtActivationKernels, PiecewiseLinearActivationsMatchTorch) {
  const Config& cfg = GetParam();
  const size_t other = 1 + turn_of(cfg, std::size(kPiecewiseLinear) - 1);
  for (const FusedActivation* fused : {&kPiecewiseLinear[0], &kPiecewiseLinear[other]}) {
    dispatch(cfg, [&](auto scalar, auto param, auto index) {
      run_fused_and_compare<decltype(scalar), decltype(param), decltype(index)>(cfg, *fused);
    });
  }
}

// One smooth activation per configuration, in turn.
TEST_P(SimtActivationKernels, SmoothActivationsMatchTorch) {
  const Config& cfg = GetParam();
  const FusedActivation& fused = kSmooth[turn_of(cfg, std::size(kSmooth))];
  dispatch(cfg, [&](auto scalar, auto param, auto index) {
    run_fused_and_compare<decltype(scalar), decltype(param), decltype(index)>(cfg, fused);
  });
}

INSTANTIATE_TEST_SUITE_P(Shapes, SimtActivationKernels, ::testing::ValuesIn(configs()), name);

}  // namespace
}  // namespace custom_bn::testing
