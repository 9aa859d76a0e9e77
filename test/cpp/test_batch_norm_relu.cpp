// custom_bn::batch_norm_relu and BatchNormReLU2d against torch's batch norm, add and ReLU.
//
// Where the pre-activation is within rounding of 0, ours and torch's ReLU may disagree on
// an element, and its gradient with them: the mask is checked against a float64 reference
// away from 0, and the gradients against torch's backward of the same masked grad_output.
#include "samples.h"

#include <custom_bn/custom_bn.h>

#include <sstream>

namespace custom_bn::testing {
namespace {

struct FusedCase {
  int64_t dim;
  Layout layout;
  DtypePair dtype;
  bool training, residual, affine_and_stats;
};

std::string fused_case_name(const ::testing::TestParamInfo<FusedCase>& info) {
  const FusedCase& c = info.param;
  return std::to_string(c.dim) + "d_" + layout_name(c.layout) + "_" + dtype_name(c.dtype) +
         (c.training ? "_train" : "_eval") + (c.residual ? "_residual" : "_noresidual") +
         (c.affine_and_stats ? "" : "_bare");
}

std::vector<FusedCase> fused_cases() {
  std::vector<FusedCase> cases;
  for (const auto& [dim, layout] : dims_and_layouts()) {
    for (const DtypePair& dtype : all_dtype_pairs()) {
      for (bool training : {true, false}) {
        for (bool residual : {true, false}) {
          cases.push_back({dim, layout, dtype, training, residual, true});
        }
      }
    }
    // Without weight, bias and running stats (training only: eval needs the stats).
    cases.push_back({dim, layout, all_dtype_pairs()[0], true, true, false});
  }
  return cases;
}

torch::Tensor relu_of_sum(const torch::Tensor& normalized, const torch::Tensor& residual) {
  return torch::relu(residual.defined() ? normalized + residual : normalized);
}

class BatchNormReluParity : public ::testing::TestWithParam<FusedCase> {
 protected:
  void SetUp() override { torch::manual_seed(std::random_device{}()); }
};

TEST_P(BatchNormReluParity, MatchesTorchBatchNormAddRelu) {
  const FusedCase& c = GetParam();
  const std::vector<int64_t> shape = shape_for(c.dim);
  const Sample sample = make_sample(shape, c.dtype, c.layout, c.training, c.affine_and_stats,
                                    c.affine_and_stats, std::optional<double>(0.1));
  const torch::Tensor residual =
      c.residual ? make_input(shape, c.dtype.input, c.layout) : torch::Tensor();
  const auto tol = tolerance(c.dtype.input);
  const bool reduced = c.dtype.input == torch::kBFloat16 || c.dtype.input == torch::kHalf;

  Sample ours = sample.clone(/*requires_grad=*/true), ref = sample.clone(/*requires_grad=*/true);
  const torch::Tensor our_residual =
      c.residual ? residual.clone().requires_grad_() : torch::Tensor();
  torch::Tensor out = custom_bn::batch_norm_relu(
      ours.input, Sample::opt(ours.weight), Sample::opt(ours.bias), Sample::opt(ours.running_mean),
      Sample::opt(ours.running_var), ours.training, ours.momentum, ours.eps,
      Sample::opt(ours.num_batches_tracked), Sample::opt(our_residual));
  const torch::Tensor expected = relu_of_sum(reference_batch_norm(ref), residual);
  EXPECT_EQ(out.strides(), expected.strides()) << "the output keeps the input's memory format";
  expect_close(ours.running_mean, ref.running_mean, tol, "running_mean");
  expect_close(ours.running_var, ref.running_var, tol, "running_var");

  // float64 from the same values. In bfloat16/float16, torch rounds the batch norm's output
  // before adding the residual, which can be off by more than an ulp of the sum: the output
  // is compared with float64 there.
  Sample wide = widened(sample);
  const torch::Tensor wide_residual =
      c.residual ? residual.to(torch::kDouble).requires_grad_() : torch::Tensor();
  const torch::Tensor pre_activation =
      reference_batch_norm(wide) + (c.residual ? wide_residual : torch::zeros({}, torch::kDouble));
  expect_close(out, reduced ? torch::relu(pre_activation).to(c.dtype.input) : expected, tol,
               "output");
  // The ReLU mask agrees with float64 wherever the pre-activation is clearly away from 0.
  const torch::Tensor clear = pre_activation.detach().abs() > 8 * tol.second;
  EXPECT_TRUE(
      torch::equal((out > 0).masked_select(clear), (pre_activation > 0).masked_select(clear)))
      << "ReLU mask";

  // Gradients: torch's batch-norm-and-add backward of grad_output masked by our output.
  const torch::Tensor grad = torch::randn_like(out);
  const torch::Tensor masked = grad * (out > 0).to(grad.scalar_type());
  out.backward(grad);
  const auto param_tol = std::make_pair(tol.first * 4, tol.second * 4);
  if (!reduced) {
    Sample again = sample.clone(/*requires_grad=*/true);
    torch::Tensor pre = reference_batch_norm(again);
    if (c.residual) pre = pre + residual;
    pre.backward(masked);
    expect_close(ours.input.grad(), again.input.grad(), tol, "grad input");
    if (c.affine_and_stats) {
      expect_close(ours.weight.grad(), again.weight.grad(), param_tol, "grad weight");
      expect_close(ours.bias.grad(), again.bias.grad(), param_tol, "grad bias");
    }
  } else {
    pre_activation.backward(masked.to(torch::kDouble));
    expect_close(ours.input.grad(), wide.input.grad().to(c.dtype.input), tol, "grad input");
    if (c.affine_and_stats) {
      expect_close(ours.weight.grad(), wide.weight.grad().to(c.dtype.param), param_tol,
                   "grad weight");
      expect_close(ours.bias.grad(), wide.bias.grad().to(c.dtype.param), param_tol, "grad bias");
    }
  }
  if (c.residual) {
    EXPECT_TRUE(torch::equal(our_residual.grad(), masked)) << "grad residual is the masked grad";
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, BatchNormReluParity, ::testing::ValuesIn(fused_cases()),
                         fused_case_name);

class BatchNormRelu : public SeededTest {};

TEST_F(BatchNormRelu, BadResidualRaisesAndMutatesNothing) {
  const torch::Tensor x = torch::randn({4, 3, 5, 5});
  torch::Tensor running_mean = torch::zeros({3}), running_var = torch::ones({3});
  torch::Tensor nbt = torch::zeros({}, torch::kLong);
  const struct {
    torch::Tensor residual;
    const char* message;
  } bad[] = {
      {torch::randn({4, 3, 5, 4}), "expected residual of the input's shape"},
      {torch::randn({4, 3, 5, 5}, torch::kDouble), "expected residual of the input's dtype"},
  };
  for (const auto& b : bad) {
    try {
      custom_bn::batch_norm_relu(x, {}, {}, running_mean, running_var, true, 0.1, 1e-5, nbt,
                                 b.residual);
      ADD_FAILURE() << "no error for " << b.message;
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      EXPECT_NE(what.find(b.message), std::string::npos) << what;
      EXPECT_NE(what.find("custom_bn::batch_norm_relu_forward"), std::string::npos) << what;
    }
  }
  EXPECT_TRUE(torch::equal(running_mean, torch::zeros({3})));
  EXPECT_TRUE(torch::equal(running_var, torch::ones({3})));
  EXPECT_EQ(nbt.item<int64_t>(), 0);
}

TEST_F(BatchNormRelu, BackwardTakesTheOutputNotAnActivation) {
  // The backward op needs grad_output, the output and the input: the ReLU mask is the sign of
  // the output, so nothing else of the forward is kept.
  const torch::Tensor x = torch::randn({6, 4, 3, 3}).contiguous(at::MemoryFormat::ChannelsLast);
  auto [out, mean, invstd] = custom_bn::batch_norm_relu_forward(
      x, {}, {}, {}, {}, {}, {}, true, 0.1, 1e-5, 0.0, std::nullopt, 0.0, "piecewise_linear");
  const torch::Tensor grad = torch::randn_like(out);
  auto [grad_input, grad_weight, grad_bias, grad_residual] = custom_bn::batch_norm_relu_backward(
      grad, out, x, {}, {}, {}, mean, invstd, true, 1e-5, {true, false, false, true}, 0.0,
      std::nullopt, 0.0, "piecewise_linear", std::nullopt);
  EXPECT_FALSE(grad_weight.defined());
  EXPECT_FALSE(grad_bias.defined());
  EXPECT_TRUE(torch::equal(grad_residual, grad * (out > 0)));
  EXPECT_EQ(grad_residual.strides(), x.strides()) << "gradients keep the input's memory format";
  EXPECT_EQ(grad_input.strides(), x.strides());
  auto [expected, unused_w, unused_b] = custom_bn::batch_norm_backward(
      grad_residual, x, {}, {}, {}, mean, invstd, true, 1e-5, {true, false, false});
  expect_close(grad_input, expected, tolerance(torch::kFloat), "grad input");
}

TEST_F(BatchNormRelu, ModuleMatchesBatchNorm2dThenRelu) {
  BatchNormReLU2d fused(BatchNormOptions(5).momentum(std::nullopt));
  torch::nn::BatchNorm2d theirs(torch::nn::BatchNormOptions(5).momentum(std::nullopt));
  {
    torch::NoGradGuard no_grad;
    theirs->weight.uniform_(0.5, 1.5);
    theirs->bias.normal_();
    fused->weight.copy_(theirs->weight);
    fused->bias.copy_(theirs->bias);
  }
  for (int step = 0; step < 3; ++step) {
    const torch::Tensor x = torch::randn({4, 5, 6, 6}) * 2 + 1;
    const torch::Tensor residual = torch::randn({4, 5, 6, 6});
    expect_close(fused(x, residual), torch::relu(theirs(x) + residual), tolerance(torch::kFloat),
                 "training output");
  }
  expect_close(fused->running_var, theirs->running_var, tolerance(torch::kFloat), "running_var");
  EXPECT_EQ(fused->num_batches_tracked.item<int64_t>(), 3);
  fused->eval();
  theirs->eval();
  const torch::Tensor x = torch::randn({2, 5, 3, 3});
  expect_close(fused(x), torch::relu(theirs(x)), tolerance(torch::kFloat), "eval output");
}

TEST_F(BatchNormRelu, ModuleStateLoadsIntoTorchBatchNorm2d) {
  const std::string path = ::testing::TempDir() + "custom_bn_relu_state.pt";
  BatchNormReLU2d fused(3);
  fused(torch::randn({4, 3, 2, 2}));
  torch::save(fused, path);
  torch::nn::BatchNorm2d theirs(3);
  torch::load(theirs, path);
  EXPECT_TRUE(torch::equal(theirs->running_mean, fused->running_mean));
  EXPECT_EQ(theirs->num_batches_tracked.item<int64_t>(), 1);
}

TEST_F(BatchNormRelu, ModulePrintsAndWorksInSequential) {
  std::ostringstream out;
  out << *BatchNormReLU2d(4);
  EXPECT_EQ(out.str(),
            "custom_bn::BatchNormReLU2d(4, eps=1e-05, momentum=0.1, affine=true, "
            "track_running_stats=true)");
  torch::nn::Sequential net(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)),
                            BatchNormReLU2d(4));
  const torch::Tensor y = net->forward(torch::randn({2, 1, 5, 5}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 4, 5, 5}));
  EXPECT_TRUE((y >= 0).all().item<bool>());
  EXPECT_THROW(BatchNormReLU2d(4)(torch::randn({2, 4, 5})), c10::Error);
}

TEST_F(BatchNormRelu, InPlaceModuleTrainsAsTheFusedOne) {
  // conv -> in-place BatchNormReLU2d (ReLU6) against the same with the out-of-place module:
  // the same output and running stats, the same gradients to rounding, the conv's output
  // written over.
  torch::manual_seed(0);
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 4, 3).padding(1));
  torch::nn::Conv2d conv_twin(torch::nn::Conv2dOptions(3, 4, 3).padding(1));
  {
    torch::NoGradGuard no_grad;
    conv_twin->weight.copy_(conv->weight);
    conv_twin->bias.copy_(conv->bias);
  }
  BatchNormReLU2d in_place(BatchNormOptions(4),
                           FusedActivationOptions().max_val(6.0).inplace(true));
  BatchNormReLU2d fused(BatchNormOptions(4), FusedActivationOptions().max_val(6.0));
  for (int step = 0; step < 2; ++step) {
    const torch::Tensor x = torch::randn({2, 3, 5, 5});
    const torch::Tensor h = conv(x);
    const torch::Tensor y = in_place(h);
    EXPECT_EQ(y.data_ptr(), h.data_ptr()) << "written over the convolution's output";
    const torch::Tensor expected = fused(conv_twin(x));
    expect_close(y, expected, tolerance(torch::kFloat), "output");
    const torch::Tensor grad = torch::randn_like(y);
    y.backward(grad);
    expected.backward(grad);
  }
  expect_close(in_place->running_var, fused->running_var, tolerance(torch::kFloat), "running_var");
  expect_close(in_place->weight.grad(), fused->weight.grad(), tolerance(torch::kFloat),
               "weight grad");
  expect_close(conv->weight.grad(), conv_twin->weight.grad(), tolerance(torch::kFloat),
               "conv weight grad");
  std::ostringstream out;
  out << *in_place;
  EXPECT_NE(out.str().find("inplace=true"), std::string::npos) << out.str();
  // torch's in-place checks: a leaf that requires grad cannot be written.
  EXPECT_THROW(in_place(torch::randn({2, 4, 5, 5}, torch::requires_grad())), c10::Error);
  EXPECT_THROW(BatchNormReLU2d(BatchNormOptions(4),
                               FusedActivationOptions().activation("silu").inplace(true)),
               c10::ValueError);
}

TEST_F(BatchNormRelu, NormalizedInputIsRecoveredFromTheInPlaceOutput) {
  // The C++ API of the stage ops SyncBatchNorm's in-place backward runs: the forward writes
  // over x and keeps what the output cannot give back; the normalized input comes back.
  torch::manual_seed(0);
  const torch::Tensor x = torch::randn({4, 3, 5, 6});
  const torch::Tensor weight = torch::tensor({1.0F, 0.0F, 0.5F});
  const torch::Tensor bias = torch::tensor({0.1F, 0.2F, 1.5F});
  const torch::Tensor residual = torch::randn_like(x);
  torch::Tensor output = x.clone();
  const auto [mean, invstd, kept] =
      batch_norm_relu_forward_(output, weight, bias, std::nullopt, std::nullopt, std::nullopt,
                               residual, /*training=*/true, 0.1, 1e-5, 0.0, std::nullopt, 0.0,
                               /*keep_input=*/true);
  EXPECT_LT(kept.numel(), x.numel());
  const torch::Tensor x_hat = batch_norm_relu_normalized_input(
      output, kept, weight, bias, residual, mean, invstd, 0.0, std::nullopt, 0.0);
  expect_close(x_hat, (x - mean.view({1, 3, 1, 1})) * invstd.view({1, 3, 1, 1}),
               tolerance(torch::kFloat), "x_hat");
  EXPECT_THROW(
      batch_norm_relu_normalized_input(output, kept.narrow(0, 1, kept.numel() - 1), weight, bias,
                                       residual, mean, invstd, 0.0, std::nullopt, 0.0),
      c10::Error);
}

}  // namespace
}  // namespace custom_bn::testing
