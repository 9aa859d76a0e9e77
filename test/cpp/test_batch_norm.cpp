// custom_bn::batch_norm (through the dispatcher) against torch::batch_norm and its autograd.
#include "samples.h"

#include <custom_bn/custom_bn.h>

#include <tuple>

namespace custom_bn::testing {
namespace {

struct Case {
  int64_t dim;
  Layout layout;
  DtypePair dtype;
  bool training, affine, running_stats;
  std::optional<double> momentum;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  std::string name =
      std::to_string(c.dim) + "d_" + layout_name(c.layout) + "_" + dtype_name(c.dtype) +
      (c.training ? "_train" : "_eval") + (c.affine ? "_affine" : "_noaffine") +
      (c.running_stats ? "_stats" : "_nostats") + (c.momentum ? "_momentum" : "_cumulative");
  return name;
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (const auto& [dim, layout] : dims_and_layouts()) {
    for (const DtypePair& dtype : all_dtype_pairs()) {
      for (bool training : {true, false}) {
        for (bool affine : {true, false}) {
          for (bool stats : {true, false}) {
            for (std::optional<double> momentum :
                 {std::optional<double>(0.1), std::optional<double>()}) {
              if (!training && !stats) continue;                // an error: tested below
              if (!momentum && !(training && stats)) continue;  // no update: momentum unused
              cases.push_back({dim, layout, dtype, training, affine, stats, momentum});
            }
          }
        }
      }
    }
  }
  return cases;
}

class BatchNormParity : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { torch::manual_seed(std::random_device{}()); }
};

TEST_P(BatchNormParity, MatchesTorch) {
  const Case& c = GetParam();
  const Sample sample = make_sample(shape_for(c.dim), c.dtype, c.layout, c.training, c.affine,
                                    c.running_stats, c.momentum);
  Sample ours = sample.clone(/*requires_grad=*/true), ref = sample.clone(/*requires_grad=*/true);
  const auto tol = tolerance(c.dtype.input);

  torch::Tensor out = custom_bn::batch_norm(
      ours.input, Sample::opt(ours.weight), Sample::opt(ours.bias), Sample::opt(ours.running_mean),
      Sample::opt(ours.running_var), ours.training, ours.momentum, ours.eps,
      Sample::opt(ours.num_batches_tracked));
  torch::Tensor expected = reference_batch_norm(ref);
  expect_close(out, expected, tol, "output");
  EXPECT_EQ(out.strides(), expected.strides()) << "the output keeps the input's memory format";
  expect_close(ours.running_mean, ref.running_mean, tol, "running_mean");
  expect_close(ours.running_var, ref.running_var, tol, "running_var");
  if (ours.num_batches_tracked.defined()) {
    EXPECT_EQ(ours.num_batches_tracked.item<int64_t>(), ref.num_batches_tracked.item<int64_t>());
  }

  const torch::Tensor grad = torch::randn_like(expected);
  out.backward(grad);
  expected.backward(grad);
  expect_close(ours.input.grad(), ref.input.grad(), tol, "grad input");
  const std::pair<double, double> param_tol{tol.first * 4, tol.second * 4};
  if (c.affine) {
    // Per-channel sums of many products: in bfloat16/float16, torch's own sums are off by
    // more than an ulp when the terms cancel, so those compare with float64 torch.
    const bool reduced = c.dtype.input == torch::kBFloat16 || c.dtype.input == torch::kHalf;
    Sample wide = widened(sample);
    if (reduced) reference_batch_norm(wide).backward(grad.to(torch::kDouble));
    const torch::Tensor weight_ref =
        reduced ? wide.weight.grad().to(c.dtype.param) : ref.weight.grad();
    const torch::Tensor bias_ref = reduced ? wide.bias.grad().to(c.dtype.param) : ref.bias.grad();
    expect_close(ours.weight.grad(), weight_ref, param_tol, "grad weight");
    expect_close(ours.bias.grad(), bias_ref, param_tol, "grad bias");
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, BatchNormParity, ::testing::ValuesIn(all_cases()), case_name);

class BatchNorm : public SeededTest {};

TEST_F(BatchNorm, EmptyBatchCountsTheCallAndGivesZeroParamGrads) {
  Sample s = make_sample({0, 4, 3, 3}, {torch::kFloat, torch::kFloat}, Layout::kContiguous, true,
                         true, true, 0.1);
  const Sample before = s.clone();
  s.weight.requires_grad_();
  s.bias.requires_grad_();
  torch::Tensor out = custom_bn::batch_norm(s.input, s.weight, s.bias, s.running_mean,
                                            s.running_var, true, 0.1, 1e-5, s.num_batches_tracked);
  EXPECT_EQ(out.sizes(), s.input.sizes());
  EXPECT_TRUE(torch::equal(s.running_mean, before.running_mean));
  EXPECT_TRUE(torch::equal(s.running_var, before.running_var));
  EXPECT_EQ(s.num_batches_tracked.item<int64_t>(), before.num_batches_tracked.item<int64_t>() + 1);
  out.sum().backward();
  EXPECT_TRUE(torch::equal(s.weight.grad(), torch::zeros({4})));
  EXPECT_TRUE(torch::equal(s.bias.grad(), torch::zeros({4})));
}

TEST_F(BatchNorm, LargeOffsetChannelKeepsItsVariance) {
  const torch::Tensor x = torch::randn({1, 1, 3'000'000}) * 0.5 + 1000.0;
  const auto [out, mean, invstd] =
      custom_bn::batch_norm_forward(x, {}, {}, {}, {}, {}, true, 0.1, 0.0);
  const double var = x.to(torch::kDouble).var(/*unbiased=*/false).item<double>();
  const double ours = 1.0 / std::pow(invstd.item<double>(), 2);
  EXPECT_LT(std::abs(ours / var - 1.0), 1e-4);
}

TEST_F(BatchNorm, StageOpsComposeToTheWholeBatch) {
  const torch::Tensor x = torch::randn({8, 3, 4, 4}) * 2 + 1;
  const torch::Tensor w = torch::rand({3}) + 0.5, b = torch::randn({3});
  torch::Tensor rm = torch::zeros({3}), rv = torch::ones({3}), nbt = torch::zeros({}, torch::kLong);
  torch::Tensor ref_rm = rm.clone(), ref_rv = rv.clone();
  const auto parts = x.split_with_sizes({3, 0, 5});
  std::vector<torch::Tensor> counts, means, m2s;
  for (const auto& part : parts) {
    auto [count, mean, m2] = custom_bn::batch_norm_stats(part);
    counts.push_back(count);
    means.push_back(mean);
    m2s.push_back(m2);
  }
  const auto [mean, invstd] = custom_bn::batch_norm_gather_stats_with_counts(
      torch::stack(means), torch::stack(m2s), torch::cat(counts), rm, rv, nbt, 0.1, 1e-5);
  std::vector<torch::Tensor> outs;
  for (const auto& part : parts)
    outs.push_back(custom_bn::batch_norm_elemt(part, w, b, mean, invstd));
  const torch::Tensor expected = torch::batch_norm(x, w, b, ref_rm, ref_rv, true, 0.1, 1e-5, false);
  expect_close(torch::cat(outs), expected, tolerance(torch::kFloat), "output");
  expect_close(rm, ref_rm, tolerance(torch::kFloat), "running_mean");
  expect_close(rv, ref_rv, tolerance(torch::kFloat), "running_var");
  EXPECT_EQ(nbt.item<int64_t>(), 1);
}

// ---- Errors: each names the argument and leaves running stats untouched --------------------

struct ErrorCase {
  const char* name;
  std::function<void(Sample&)> mutate;
  std::vector<std::string> words;
};

class BatchNormErrors : public SeededTest {};

TEST_F(BatchNormErrors, EachBadCallRaisesAndMutatesNothing) {
  const std::vector<ErrorCase> cases = {
      {"1-D input",
       [](Sample& s) { s.input = torch::randn({5}); },
       {"input", "at least 2 dimensions"}},
      {"integer input",
       [](Sample& s) {
         s.input = torch::ones({4, 3}, torch::kLong);
       },
       {"input", "Long"}},
      {"weight size", [](Sample& s) { s.weight = torch::ones({4}); }, {"weight", "3 elements"}},
      {"bias size", [](Sample& s) { s.bias = torch::ones({2}); }, {"bias", "3 elements"}},
      {"running_mean size",
       [](Sample& s) { s.running_mean = torch::zeros({5}); },
       {"running_mean", "3 elements"}},
      {"only running_mean",
       [](Sample& s) { s.running_var = torch::Tensor(); },
       {"running_mean", "running_var"}},
      {"weight dtype",
       [](Sample& s) { s.weight = torch::ones({3}, torch::kDouble); },
       {"weight", "Double"}},
      {"weight device",
       [](Sample& s) { s.weight = torch::ones({3}, torch::Device("meta")); },
       {"weight", "device"}},
      {"one value per channel",
       [](Sample& s) {
         s.input = torch::randn({1, 3});
       },
       {"Expected more than 1 value per channel when training"}},
      {"eval without stats",
       [](Sample& s) {
         s.training = false;
         s.running_mean = torch::Tensor();
         s.running_var = torch::Tensor();
       },
       {"running_mean must be defined in evaluation mode"}},
      {"momentum None without counter",
       [](Sample& s) {
         s.momentum = std::nullopt;
         s.num_batches_tracked = torch::Tensor();
       },
       {"momentum=None", "num_batches_tracked"}},
      {"counter dtype",
       [](Sample& s) { s.num_batches_tracked = torch::zeros({}); },
       {"num_batches_tracked", "int64"}},
  };
  for (const ErrorCase& c : cases) {
    SCOPED_TRACE(c.name);
    Sample s = make_sample({4, 3, 5}, {torch::kFloat, torch::kFloat}, Layout::kContiguous, true,
                           true, true, 0.1);
    c.mutate(s);
    const Sample before = s.clone();
    try {
      custom_bn::batch_norm(s.input, Sample::opt(s.weight), Sample::opt(s.bias),
                            Sample::opt(s.running_mean), Sample::opt(s.running_var), s.training,
                            s.momentum, s.eps, Sample::opt(s.num_batches_tracked));
      ADD_FAILURE() << "no error raised";
    } catch (const c10::Error& e) {
      for (const std::string& word : c.words) {
        EXPECT_NE(std::string(e.what_without_backtrace()).find(word), std::string::npos)
            << "'" << word << "' not in: " << e.what_without_backtrace();
      }
    }
    for (auto [now, then] : {std::pair{s.running_mean, before.running_mean},
                             std::pair{s.running_var, before.running_var},
                             std::pair{s.num_batches_tracked, before.num_batches_tracked}}) {
      if (now.defined()) {
        EXPECT_TRUE(torch::equal(now, then));
      }
    }
  }
}

TEST_F(BatchNormErrors, ErrorTypesMatchTorch) {
  EXPECT_THROW(
      custom_bn::batch_norm(torch::ones({4, 3}, torch::kLong), {}, {}, {}, {}, true, 0.1, 1e-5),
      c10::NotImplementedError);
  EXPECT_THROW(
      custom_bn::batch_norm(torch::randn({4, 3}), {}, {}, torch::zeros({3}), {}, true, 0.1, 1e-5),
      c10::ValueError);
}

TEST_F(BatchNormErrors, OneValuePerChannelIsAValueError) {
  EXPECT_THROW(custom_bn::batch_norm(torch::randn({1, 3, 1}), {}, {}, {}, {}, true, 0.1, 1e-5),
               c10::ValueError);
}

}  // namespace
}  // namespace custom_bn::testing

namespace custom_bn::testing {
namespace {

// On a real device: every layout and dtype of the parity matrix, on CUDA tensors.
TEST(BatchNormDevice, MatchesTorch_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (const Case& c : all_cases()) {
    SCOPED_TRACE(case_name(::testing::TestParamInfo<Case>(c, 0)));
    Sample sample = make_sample(shape_for(c.dim), c.dtype, c.layout, c.training, c.affine,
                                c.running_stats, c.momentum);
    auto to_cuda = [](torch::Tensor& t) {
      if (t.defined()) t = t.cuda();
    };
    for (torch::Tensor* t : {&sample.input, &sample.weight, &sample.bias, &sample.running_mean,
                             &sample.running_var, &sample.num_batches_tracked}) {
      to_cuda(*t);
    }
    Sample ours = sample.clone(true), ref = sample.clone(true);
    const torch::Tensor out = custom_bn::batch_norm(
        ours.input, Sample::opt(ours.weight), Sample::opt(ours.bias),
        Sample::opt(ours.running_mean), Sample::opt(ours.running_var), ours.training, ours.momentum,
        ours.eps, Sample::opt(ours.num_batches_tracked));
    const torch::Tensor expected = reference_batch_norm(ref);
    expect_close(out.cpu(), expected.cpu(), tolerance(c.dtype.input), "output");
    out.backward(torch::ones_like(out));
    expected.backward(torch::ones_like(expected));
    expect_close(ours.input.grad().cpu(), ref.input.grad().cpu(), tolerance(c.dtype.input),
                 "grad input");
  }
}

}  // namespace
}  // namespace custom_bn::testing
