// custom_bn::fuse_batchnorm_relu on torch::nn::Sequential: BN then ReLU becomes BatchNormReLU2d
// over the same state, and the fused model trains as the original.
#include "samples.h"

#include <custom_bn/custom_bn.h>

namespace custom_bn::testing {
namespace {

class Fusion : public SeededTest {};

torch::nn::Sequential conv_bn_relu_model() {
  torch::nn::Sequential model(torch::nn::Conv2d(3, 4, 3), torch::nn::BatchNorm2d(4),
                              torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true)),
                              torch::nn::Conv2d(4, 4, 1), BatchNorm2d(4), torch::nn::ReLU(),
                              torch::nn::BatchNorm2d(4));
  return model;
}

TEST_F(Fusion, FusesBatchNormThenReluAndKeepsState) {
  torch::nn::Sequential model = conv_bn_relu_model();
  torch::nn::Sequential fused = fuse_batchnorm_relu(model);
  ASSERT_NE(fused.ptr(), model.ptr());
  EXPECT_TRUE(fused[1]->as<BatchNormReLU2dImpl>() != nullptr);
  EXPECT_TRUE(fused[2]->as<torch::nn::IdentityImpl>() != nullptr);
  EXPECT_TRUE(fused[4]->as<BatchNormReLU2dImpl>() != nullptr);         // ours fuse too
  EXPECT_TRUE(fused[6]->as<torch::nn::BatchNorm2dImpl>() != nullptr);  // no ReLU after it
  // The same parameters (the very tensors) under the same names.
  const auto original = model->named_parameters();
  const auto parameters = fused->named_parameters();
  ASSERT_EQ(parameters.keys(), original.keys());
  for (const auto& item : original) EXPECT_TRUE(parameters[item.key()].is_same(item.value()));
  EXPECT_EQ(fused->named_buffers().keys(), model->named_buffers().keys());

  // The original still runs as it did (its modules are untouched): train both in lockstep.
  torch::nn::Sequential reference = conv_bn_relu_model();
  for (const auto& item : reference->named_parameters()) {
    torch::NoGradGuard no_grad;
    item.value().copy_(original[item.key()]);
  }
  for (int step = 0; step < 2; ++step) {
    const torch::Tensor x = torch::randn({4, 3, 6, 6}, torch::kFloat);
    const torch::Tensor expected = reference->forward(x);
    const torch::Tensor got = fused->forward(x);
    expect_close(got, expected, tolerance(torch::kFloat), "output");
    // Not the plain sum: through the last batch norm (training) its gradient is zero, and the
    // parameters upstream would compare rounding noise.
    const torch::Tensor upstream = torch::randn_like(expected);
    (got * upstream).sum().backward();
    (expected * upstream).sum().backward();
  }
  // The convolutions' biases feed batch norms in training, which take out any shift: their
  // gradient is zero, in rounding noise around it (up to 3.4e-5 in 300 runs), hence the atol.
  const auto reference_parameters = reference->named_parameters();
  for (const auto& item : parameters) {
    expect_close(item.value().grad(), reference_parameters[item.key()].grad(), {1e-5, 2e-4},
                 item.key());
  }
  const auto reference_buffers = reference->named_buffers();
  for (const auto& item : fused->named_buffers()) {
    expect_close(item.value(), reference_buffers[item.key()], tolerance(torch::kFloat), item.key());
  }
  // The buffers share storage with the original model's.
  EXPECT_EQ(fused[1]->as<BatchNormReLU2dImpl>()->running_var.data_ptr(),
            model[1]->as<torch::nn::BatchNorm2dImpl>()->running_var.data_ptr());
}

TEST_F(Fusion, InPlaceAfterAConvolutionTrainsAsTheFusedModel) {
  // Both conv -> BN -> ReLU chains fuse in place; the last batch norm, without an activation,
  // stays as it is. In lockstep with the model fused out of place.
  torch::nn::Sequential model = conv_bn_relu_model();
  torch::nn::Sequential in_place = fuse_batchnorm_relu(model, /*inplace=*/true);
  torch::nn::Sequential fused = fuse_batchnorm_relu(conv_bn_relu_model());
  for (const auto& item : fused->named_parameters()) {
    torch::NoGradGuard no_grad;
    item.value().copy_(model->named_parameters()[item.key()]);
  }
  EXPECT_TRUE(in_place[1]->as<BatchNormReLU2dImpl>()->activation.inplace());
  EXPECT_TRUE(in_place[4]->as<BatchNormReLU2dImpl>()->activation.inplace());
  EXPECT_FALSE(fused[1]->as<BatchNormReLU2dImpl>()->activation.inplace());
  for (int step = 0; step < 2; ++step) {
    const torch::Tensor x = torch::randn({4, 3, 6, 6}, torch::kFloat);
    const torch::Tensor expected = fused->forward(x);
    const torch::Tensor got = in_place->forward(x);
    expect_close(got, expected, tolerance(torch::kFloat), "output");
    const torch::Tensor upstream = torch::randn_like(expected);
    (got * upstream).sum().backward();
    (expected * upstream).sum().backward();
  }
  const auto reference = fused->named_parameters();
  for (const auto& item : in_place->named_parameters()) {
    expect_close(item.value().grad(), reference[item.key()].grad(), {1e-5, 2e-4}, item.key());
  }
}

TEST_F(Fusion, KeepsEachModulesTrainingMode) {
  torch::nn::Sequential model = conv_bn_relu_model();
  model->eval();
  model[0]->train();
  torch::nn::Sequential fused = fuse_batchnorm_relu(model);
  EXPECT_FALSE(fused->is_training());
  EXPECT_TRUE(fused[0]->is_training() && model[0]->is_training());
  EXPECT_FALSE(fused[1]->is_training());
}

TEST_F(Fusion, NothingToFuseReturnsTheSameSequential) {
  torch::nn::Sequential model(torch::nn::Conv2d(3, 4, 1), BatchNorm2d(4), torch::nn::Sigmoid(),
                              torch::nn::ReLU());
  EXPECT_EQ(fuse_batchnorm_relu(model).ptr(), model.ptr());
  torch::nn::Sequential negative_slope(
      torch::nn::BatchNorm2d(4),
      torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(-0.1)));
  EXPECT_EQ(fuse_batchnorm_relu(negative_slope).ptr(), negative_slope.ptr());
  torch::nn::Sequential tanh_gelu(torch::nn::BatchNorm2d(4),
                                  torch::nn::GELU(torch::nn::GELUOptions().approximate("tanh")));
  EXPECT_EQ(fuse_batchnorm_relu(tanh_gelu).ptr(), tanh_gelu.ptr());
}

TEST_F(Fusion, FusesEachActivationTheOpApplies) {
  const std::vector<torch::nn::AnyModule> activations{
      torch::nn::AnyModule(torch::nn::ReLU6()),
      torch::nn::AnyModule(
          torch::nn::Hardtanh(torch::nn::HardtanhOptions().min_val(-0.5).max_val(0.5))),
      torch::nn::AnyModule(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.2))),
      torch::nn::AnyModule(torch::nn::SiLU()), torch::nn::AnyModule(torch::nn::GELU())};
  for (const torch::nn::AnyModule& activation : activations) {
    torch::nn::Sequential model;
    model->push_back("conv", torch::nn::Conv2d(3, 4, 3));
    model->push_back("bn", torch::nn::BatchNorm2d(4));
    model->push_back("act", activation);
    torch::nn::Sequential fused = fuse_batchnorm_relu(model);
    ASSERT_TRUE(fused[1]->as<BatchNormReLU2dImpl>() != nullptr) << activation.ptr()->name();
    const torch::Tensor x = torch::randn({4, 3, 6, 6}, torch::requires_grad());
    const torch::Tensor expected = model->forward(x);  // updates the shared running stats once
    const torch::Tensor got = fused->forward(x);       // and again: compare in eval below
    expect_close(got, expected, tolerance(torch::kFloat), "training output");
    const torch::Tensor upstream = torch::randn_like(got);
    const auto [grad_fused] = std::make_tuple(torch::autograd::grad({got}, {x}, {upstream})[0]);
    const torch::Tensor grad_model = torch::autograd::grad({expected}, {x}, {upstream})[0];
    expect_close(grad_fused, grad_model, {1e-5, 1e-4}, "input gradient");
    model->eval();
    fused->eval();
    expect_close(fused->forward(x), model->forward(x), tolerance(torch::kFloat), "eval output");
  }
}

TEST_F(Fusion, ModuleAppliesItsActivationAndRefusesANegativeSlope) {
  BatchNormReLU2d relu6(BatchNormOptions(3), FusedActivationOptions().max_val(6.0));
  const torch::Tensor x = torch::randn({4, 3, 5, 5}) * 10;
  torch::nn::BatchNorm2d reference(3);
  expect_close(relu6->forward(x), torch::relu6(reference->forward(x)), tolerance(torch::kFloat),
               "relu6");
  std::ostringstream printed;
  relu6->pretty_print(printed);
  EXPECT_NE(printed.str().find("max_val=6"), std::string::npos) << printed.str();
  EXPECT_THROW(BatchNormReLU2d(BatchNormOptions(3), FusedActivationOptions().negative_slope(-1.0)),
               c10::ValueError);
}

}  // namespace
}  // namespace custom_bn::testing
