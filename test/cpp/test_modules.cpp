// custom_bn::BatchNorm{1,2,3}d against torch::nn::BatchNorm{1,2,3}d.
#include "samples.h"

#include <custom_bn/custom_bn.h>

#include <sstream>

namespace custom_bn::testing {
namespace {

class Modules : public SeededTest {};

TEST_F(Modules, Stateful) {
  BatchNorm2d bn(5);
  EXPECT_TRUE(bn->weight.defined() && bn->weight.requires_grad());
  EXPECT_TRUE(bn->bias.defined());
  EXPECT_TRUE(torch::equal(bn->weight, torch::ones({5})));
  EXPECT_TRUE(torch::equal(bn->bias, torch::zeros({5})));
  EXPECT_TRUE(torch::equal(bn->running_mean, torch::zeros({5})));
  EXPECT_TRUE(torch::equal(bn->running_var, torch::ones({5})));
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 0);
  EXPECT_EQ(bn->parameters().size(), 2u);
  EXPECT_EQ(bn->buffers().size(), 3u);
  const auto names = bn->named_buffers().keys();
  EXPECT_EQ(names,
            (std::vector<std::string>{"running_mean", "running_var", "num_batches_tracked"}));
}

TEST_F(Modules, Stateless) {
  BatchNorm2d bn(BatchNormOptions(5).affine(false).track_running_stats(false));
  EXPECT_FALSE(bn->weight.defined());
  EXPECT_FALSE(bn->running_mean.defined());
  EXPECT_FALSE(bn->num_batches_tracked.defined());
  const torch::Tensor x = torch::randn({4, 5, 3, 3});
  bn->eval();  // without running stats, eval uses batch statistics too
  const torch::Tensor expected = torch::batch_norm(x, {}, {}, {}, {}, true, 0.1, 1e-5, false);
  expect_close(bn(x), expected, tolerance(torch::kFloat), "output");
}

TEST_F(Modules, PrettyPrint) {
  std::ostringstream out;
  out << *BatchNorm2d(BatchNormOptions(4).eps(0.5).momentum(std::nullopt).affine(false));
  EXPECT_EQ(out.str(),
            "custom_bn::BatchNorm2d(4, eps=0.5, momentum=None, affine=false, "
            "track_running_stats=true)");
  std::ostringstream out3;
  out3 << *BatchNorm3d(3);
  EXPECT_EQ(out3.str(),
            "custom_bn::BatchNorm3d(3, eps=1e-05, momentum=0.1, affine=true, "
            "track_running_stats=true)");
}

TEST_F(Modules, ChecksInputDimsLikeTorch) {
  EXPECT_THROW(BatchNorm1d(3)(torch::randn({2, 3, 4, 5})), c10::Error);
  EXPECT_THROW(BatchNorm2d(3)(torch::randn({2, 3, 4})), c10::Error);
  EXPECT_THROW(BatchNorm3d(3)(torch::randn({2, 3, 4, 5})), c10::Error);
  try {
    BatchNorm2d(3)(torch::randn({2, 3}));
  } catch (const c10::Error& e) {
    EXPECT_EQ(std::string(e.what_without_backtrace()).find("expected 4D input (got 2D input)"), 0u);
  }
}

// torch.nn.functional.batch_norm's ValueError for eps <= 0 (torch 2.11), as LibTorch's
// c10::ValueError, before anything is written.
TEST_F(Modules, RefusesEpsThatIsNotPositive) {
  for (const double eps : {0.0, -1.0}) {
    BatchNorm2d bn(BatchNormOptions(3).eps(eps));
    BatchNormReLU2d fused(BatchNormOptions(3).eps(eps));
    try {
      bn(torch::randn({2, 3, 4, 4}));
      ADD_FAILURE() << "no error for eps " << eps;
    } catch (const c10::ValueError& e) {
      EXPECT_NE(std::string(e.what_without_backtrace()).find("batch_norm eps must be positive"),
                std::string::npos);
    }
    EXPECT_THROW(fused(torch::randn({2, 3, 4, 4})), c10::ValueError);
    EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 0);
  }
}

// Trains ours and torch's side by side from the same state; compares after every step.
template <typename Ours, typename Theirs>
void expect_lockstep(Ours ours, Theirs theirs, std::vector<int64_t> shape, int steps) {
  {
    torch::NoGradGuard no_grad;
    if (ours->weight.defined()) {
      theirs->weight.copy_(torch::rand_like(theirs->weight) + 0.5);
      theirs->bias.copy_(torch::randn_like(theirs->bias));
      ours->weight.copy_(theirs->weight);
      ours->bias.copy_(theirs->bias);
    }
  }
  const auto tol = tolerance(torch::kFloat);
  for (int step = 0; step < steps + 1; ++step) {
    const bool eval = step == steps;  // the last step in eval mode
    if (eval) {
      ours->eval();
      theirs->eval();
    }
    const torch::Tensor x = torch::randn(shape) * (step + 1) + step;
    const torch::Tensor x_ours = x.clone().requires_grad_(), x_theirs = x.clone().requires_grad_();
    const torch::Tensor y_ours = ours(x_ours), y_theirs = theirs(x_theirs);
    expect_close(y_ours, y_theirs, tol, "output, step " + std::to_string(step));
    const torch::Tensor grad = torch::randn_like(y_theirs);
    y_ours.backward(grad);
    y_theirs.backward(grad);
    expect_close(x_ours.grad(), x_theirs.grad(), tol, "grad input");
    if (ours->weight.defined()) {
      expect_close(ours->weight.grad(), theirs->weight.grad(), {1e-4, 1e-4}, "grad weight");
      expect_close(ours->bias.grad(), theirs->bias.grad(), {1e-4, 1e-4}, "grad bias");
    }
    if (ours->running_mean.defined()) {
      expect_close(ours->running_mean, theirs->running_mean, tol, "running_mean");
      expect_close(ours->running_var, theirs->running_var, tol, "running_var");
      EXPECT_EQ(ours->num_batches_tracked.template item<int64_t>(),
                theirs->num_batches_tracked.template item<int64_t>());
    }
  }
}

struct OptionCase {
  std::optional<double> momentum;
  bool affine, track;
};

class ModulesLockstep : public ::testing::TestWithParam<OptionCase> {
 protected:
  void SetUp() override { torch::manual_seed(std::random_device{}()); }
};

TEST_P(ModulesLockstep, TrainsLikeTorch) {
  const OptionCase c = GetParam();
  auto ours = [&](int64_t n) {
    return BatchNormOptions(n).momentum(c.momentum).affine(c.affine).track_running_stats(c.track);
  };
  auto theirs = [&](int64_t n) {
    return torch::nn::BatchNormOptions(n)
        .momentum(c.momentum)
        .affine(c.affine)
        .track_running_stats(c.track);
  };
  expect_lockstep(BatchNorm1d(ours(6)), torch::nn::BatchNorm1d(theirs(6)), {16, 6}, 3);
  expect_lockstep(BatchNorm1d(ours(6)), torch::nn::BatchNorm1d(theirs(6)), {8, 6, 5}, 3);
  expect_lockstep(BatchNorm2d(ours(4)), torch::nn::BatchNorm2d(theirs(4)), {4, 4, 5, 5}, 3);
  expect_lockstep(BatchNorm3d(ours(3)), torch::nn::BatchNorm3d(theirs(3)), {2, 3, 3, 4, 5}, 3);
}

INSTANTIATE_TEST_SUITE_P(Options, ModulesLockstep,
                         ::testing::Values(OptionCase{0.1, true, true},
                                           OptionCase{std::nullopt, true, true},
                                           OptionCase{0.3, false, true},
                                           OptionCase{0.1, true, false}),
                         [](const ::testing::TestParamInfo<OptionCase>& info) {
                           const OptionCase& c = info.param;
                           return std::string(c.momentum ? "momentum" : "cumulative") +
                                  (c.affine ? "_affine" : "_noaffine") +
                                  (c.track ? "_tracked" : "_untracked");
                         });

TEST_F(Modules, SaveLoadBothWaysWithTorch) {
  const std::string path = ::testing::TempDir() + "custom_bn_state.pt";
  torch::nn::BatchNorm2d theirs(3);
  {
    torch::NoGradGuard no_grad;
    theirs->weight.uniform_();
    theirs->bias.normal_();
  }
  theirs(torch::randn({4, 3, 2, 2}));  // moves running stats and the counter
  torch::save(theirs, path);
  BatchNorm2d ours(3);
  torch::load(ours, path);
  EXPECT_TRUE(torch::equal(ours->weight, theirs->weight));
  EXPECT_TRUE(torch::equal(ours->running_var, theirs->running_var));
  EXPECT_EQ(ours->num_batches_tracked.item<int64_t>(), 1);

  ours(torch::randn({4, 3, 2, 2}));
  torch::save(ours, path);
  torch::nn::BatchNorm2d back(3);
  torch::load(back, path);
  EXPECT_TRUE(torch::equal(back->running_mean, ours->running_mean));
  EXPECT_TRUE(torch::equal(back->bias, ours->bias));
  EXPECT_EQ(back->num_batches_tracked.item<int64_t>(), 2);
}

// FrozenBatchNorm2d: torch's BatchNorm2d in eval, whatever the mode, and no state changes.
TEST_F(Modules, FrozenBatchNormUsesTheRunningStatsAlways) {
  torch::nn::BatchNorm2d source(3);
  {
    torch::NoGradGuard no_grad;
    source->weight.uniform_(0.5, 1.5);
    source->bias.normal_();
  }
  source(torch::randn({6, 3, 4, 4}) * 2 + 1);  // moves the running stats
  source->eval();
  FrozenBatchNorm2d frozen(3);
  {
    torch::NoGradGuard no_grad;
    frozen->weight.copy_(source->weight);
    frozen->bias.copy_(source->bias);
    frozen->running_mean.copy_(source->running_mean);
    frozen->running_var.copy_(source->running_var);
  }
  frozen->train();
  const torch::Tensor x = torch::randn({2, 3, 5, 5});
  expect_close(frozen(x), source(x), tolerance(torch::kFloat), "frozen output");
  EXPECT_TRUE(frozen->parameters().empty());
  EXPECT_TRUE(torch::equal(frozen->running_mean, source->running_mean));
  std::ostringstream printed;
  frozen->pretty_print(printed);
  EXPECT_EQ(printed.str(), "custom_bn::FrozenBatchNorm2d(3, eps=1e-05)");
}

TEST_F(Modules, CloneIsDeep) {
  BatchNorm2d bn(3);
  bn(torch::randn({4, 3, 2, 2}));
  auto copy = std::dynamic_pointer_cast<BatchNorm2dImpl>(bn->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->running_mean, bn->running_mean));
  EXPECT_NE(copy->running_mean.data_ptr(), bn->running_mean.data_ptr());
  EXPECT_EQ(copy->num_batches_tracked.item<int64_t>(), 1);
}

TEST_F(Modules, WorksInSequential) {
  torch::nn::Sequential net(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)),
                            BatchNorm2d(4), torch::nn::ReLU(), torch::nn::Flatten(),
                            torch::nn::Linear(4 * 6 * 6, 2));
  torch::optim::SGD opt(net->parameters(), 0.1);
  const torch::Tensor x = torch::randn({8, 1, 6, 6});
  const torch::Tensor target = torch::randint(0, 2, {8});
  float first = 0, last = 0;
  for (int i = 0; i < 20; ++i) {
    opt.zero_grad();
    torch::Tensor loss = torch::nn::functional::cross_entropy(net->forward(x), target);
    loss.backward();
    opt.step();
    (i == 0 ? first : last) = loss.item<float>();
  }
  EXPECT_LT(last, first);
}

}  // namespace
}  // namespace custom_bn::testing

namespace custom_bn::testing {
namespace {

// The C++ snippet of the README, as written there.
TEST(Readme, CppSnippetRuns) {
  torch::Tensor x = torch::randn({4, 1, 8, 8});
  torch::Tensor weight = torch::ones({1}), bias = torch::zeros({1});
  torch::Tensor running_mean = torch::zeros({1}), running_var = torch::ones({1});

  // A drop-in for torch::nn::BatchNorm2d: same options, parameter and buffer names (a
  // torch::save of one loads into the other), reset(), pretty_print, clone().
  torch::nn::Sequential net(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 3).padding(1)),
      custom_bn::BatchNorm2d(custom_bn::BatchNormOptions(16).momentum(std::nullopt)),
      torch::nn::ReLU());

  // The functional API calls through the dispatcher: autograd and every backend apply.
  torch::Tensor y = custom_bn::batch_norm(x, weight, bias, running_mean, running_var,
                                          /*training=*/true, /*momentum=*/0.1, /*eps=*/1e-5);

  // Fused relu(batch_norm(x) + residual), with BatchNorm2d's options and state; another
  // activation the op applies through FusedActivationOptions (here ReLU6, and SiLU by name).
  custom_bn::BatchNormReLU2d bn_relu(16);
  torch::Tensor z = bn_relu(net->forward(x), /*residual=*/torch::randn({4, 16, 8, 8}));
  custom_bn::BatchNormReLU2d bn_relu6(16, custom_bn::FusedActivationOptions().max_val(6.0));
  custom_bn::BatchNormReLU2d bn_silu(16, custom_bn::FusedActivationOptions().activation("silu"));
  // In place (piecewise-linear activations): the output written over the input, a tensor
  // nothing else needs; the backward keeps only the output and the values it cannot give back.
  custom_bn::BatchNormReLU2d bn_relu_inplace(16, custom_bn::FusedActivationOptions().inplace(true));

  // BatchNorm2d (torch::nn's or ours) then ReLU (or ReLU6, Hardtanh, LeakyReLU, SiLU, GELU) in a
  // Sequential becomes one BatchNormReLU2d over the same parameters; the activation's slot
  // holds an Identity, so the state_dict keys stay.
  torch::nn::Sequential fused = custom_bn::fuse_batchnorm_relu(net);
  // With inplace, those right after a convolution are in place (piecewise-linear activations).
  torch::nn::Sequential fused_inplace = custom_bn::fuse_batchnorm_relu(net, /*inplace=*/true);

  // Frozen statistics and affine parameters, whatever the mode (torchvision's FrozenBatchNorm2d).
  custom_bn::FrozenBatchNorm2d frozen(16);
  torch::Tensor f = frozen(z);

  // The cache of freed large CPU results: how much it holds, and release it.
  size_t held = custom_bn::result_cache::cached_bytes();
  custom_bn::result_cache::empty_cache();

  EXPECT_EQ(custom_bn::result_cache::cached_bytes(), 0u);
  EXPECT_LE(custom_bn::result_cache::cached_bytes(), held);
  expect_close(f, z / std::sqrt(1 + 1e-5), tolerance(torch::kFloat), "frozen");
  EXPECT_EQ(net->forward(x).sizes(), (std::vector<int64_t>{4, 16, 8, 8}));
  EXPECT_TRUE((z >= 0).all().item<bool>());
  EXPECT_TRUE((bn_relu6(x.expand({4, 16, 8, 8}) * 100) <= 6).all().item<bool>());
  expect_close(bn_silu(z),
               torch::silu(torch::batch_norm(z, {}, {}, {}, {}, true, 0.1, 1e-5, false)),
               tolerance(torch::kFloat), "silu");
  EXPECT_TRUE(fused[1]->as<custom_bn::BatchNormReLU2dImpl>() != nullptr);
  EXPECT_TRUE(fused_inplace[1]->as<custom_bn::BatchNormReLU2dImpl>()->activation.inplace());
  const torch::Tensor h = net[0]->as<torch::nn::Conv2dImpl>()->forward(x);
  EXPECT_EQ(bn_relu_inplace(h).data_ptr(), h.data_ptr());
  expect_close(y, torch::batch_norm(x, {}, {}, {}, {}, true, 0.1, 1e-5, false),
               tolerance(torch::kFloat), "output");
}

}  // namespace
}  // namespace custom_bn::testing
