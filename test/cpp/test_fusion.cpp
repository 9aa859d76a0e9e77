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
}

}  // namespace
}  // namespace custom_bn::testing
