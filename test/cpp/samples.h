// Sample inputs and the torch reference for the GoogleTest suite.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <random>
#include <string>

namespace custom_bn::testing {

enum class Layout { kContiguous, kChannelsLast, kSliced, kTransposed };

inline const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kChannelsLast:
      return "channels_last";
    case Layout::kSliced:
      return "sliced";
    case Layout::kTransposed:
      return "transposed";
  }
  return "?";
}

// (input dtype, parameter dtype)
struct DtypePair {
  torch::Dtype input;
  torch::Dtype param;
};

inline std::string dtype_name(const DtypePair& d) {
  std::string name = c10::toString(d.input);
  if (d.param != d.input) name += std::string("_") + c10::toString(d.param);
  return name;
}

// The (input, parameter) dtype pairs the parity suites cover.
inline std::vector<DtypePair> all_dtype_pairs() {
  return {{torch::kFloat, torch::kFloat},       {torch::kDouble, torch::kDouble},
          {torch::kBFloat16, torch::kBFloat16}, {torch::kHalf, torch::kHalf},
          {torch::kBFloat16, torch::kFloat},    {torch::kHalf, torch::kFloat}};
}

// The (dim, layout) pairs the parity suites cover: 2-D to 5-D, channels-last from 4-D.
inline std::vector<std::pair<int64_t, Layout>> dims_and_layouts() {
  std::vector<std::pair<int64_t, Layout>> out;
  for (int64_t dim : {2, 3, 4, 5}) {
    for (Layout layout :
         {Layout::kContiguous, Layout::kChannelsLast, Layout::kSliced, Layout::kTransposed}) {
      if (layout == Layout::kChannelsLast && dim < 4) continue;
      out.emplace_back(dim, layout);
    }
  }
  return out;
}

// Reduced precision differs from torch by an ulp of the output.
inline std::pair<double, double> tolerance(torch::Dtype dtype) {
  switch (dtype) {
    case torch::kDouble:
      return {1e-9, 1e-9};
    case torch::kFloat:
      return {1e-5, 1e-5};
    case torch::kHalf:
      return {4e-3, 4e-3};
    default:
      return {3e-2, 3e-2};
  }
}

inline std::vector<int64_t> shape_for(int64_t dim) {
  switch (dim) {
    case 2:
      return {12, 5};
    case 3:
      return {4, 6, 7};
    case 4:
      return {3, 5, 6, 7};
    default:
      return {2, 3, 4, 5, 3};
  }
}

inline torch::Tensor make_input(std::vector<int64_t> shape, torch::Dtype dtype, Layout layout) {
  switch (layout) {
    case Layout::kContiguous:
      return torch::randn(shape).to(dtype);
    case Layout::kChannelsLast:
      return torch::randn(shape).to(dtype).contiguous(
          shape.size() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
    case Layout::kSliced: {
      shape.front() *= 2;
      shape.back() *= 2;
      using torch::indexing::Ellipsis;
      using torch::indexing::Slice;
      return torch::randn(shape).to(dtype).index(
          {Slice(torch::indexing::None, torch::indexing::None, 2), Ellipsis,
           Slice(torch::indexing::None, torch::indexing::None, 2)});
    }
    case Layout::kTransposed:
      std::swap(shape[shape.size() - 1], shape[shape.size() - 2]);
      return torch::randn(shape).to(dtype).transpose(-1, -2);
  }
  return {};
}

struct Sample {
  torch::Tensor input, weight, bias, running_mean, running_var, num_batches_tracked;
  bool training = true;
  std::optional<double> momentum = 0.1;
  double eps = 1e-5;

  static std::optional<torch::Tensor> opt(const torch::Tensor& t) {
    return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
  }

  Sample clone(bool requires_grad = false) const {
    auto copy = [](const torch::Tensor& t, bool grad) {
      return t.defined() ? t.detach().clone().requires_grad_(grad) : torch::Tensor();
    };
    return {copy(input, requires_grad),
            copy(weight, requires_grad),
            copy(bias, requires_grad),
            copy(running_mean, false),
            copy(running_var, false),
            copy(num_batches_tracked, false),
            training,
            momentum,
            eps};
  }
};

inline Sample make_sample(const std::vector<int64_t>& shape, DtypePair dtype, Layout layout,
                          bool training, bool affine, bool running_stats,
                          std::optional<double> momentum) {
  Sample s;
  const int64_t channels = shape[1];
  s.input = make_input(shape, dtype.input, layout).mul_(2).add_(0.5);
  if (affine) {
    s.weight = (torch::rand({channels}) + 0.5).to(dtype.param);
    s.bias = torch::randn({channels}).to(dtype.param);
  }
  if (running_stats) {
    s.running_mean = torch::randn({channels}).to(dtype.param);
    s.running_var = (torch::rand({channels}) + 0.5).to(dtype.param);
    s.num_batches_tracked = torch::randint(0, 5, {}, torch::kLong);
  }
  s.training = training;
  s.momentum = momentum;
  return s;
}

// The same values in float64 (gradients enabled on input, weight and bias): the reference
// for sums that reduced-precision kernels, torch's included, cannot resolve.
inline Sample widened(const Sample& s) {
  auto wide = [](const torch::Tensor& t, bool grad) {
    return t.defined() ? t.detach().to(torch::kDouble).requires_grad_(grad) : torch::Tensor();
  };
  return {wide(s.input, true),
          wide(s.weight, true),
          wide(s.bias, true),
          wide(s.running_mean, false),
          wide(s.running_var, false),
          s.num_batches_tracked.defined() ? s.num_batches_tracked.clone() : torch::Tensor(),
          s.training,
          s.momentum,
          s.eps};
}

// torch::batch_norm with torch::nn::BatchNorm's bookkeeping of num_batches_tracked.
inline torch::Tensor reference_batch_norm(Sample& s) {
  double momentum = s.momentum.value_or(0.0);
  if (s.training && s.running_mean.defined() && s.num_batches_tracked.defined()) {
    s.num_batches_tracked.add_(1);
    if (!s.momentum) momentum = 1.0 / static_cast<double>(s.num_batches_tracked.item<int64_t>());
  }
  return torch::batch_norm(s.input, s.weight, s.bias, s.running_mean, s.running_var, s.training,
                           momentum, s.eps, /*cudnn_enabled=*/false);
}

inline void expect_close(const torch::Tensor& actual, const torch::Tensor& expected,
                         std::pair<double, double> tol, const std::string& what) {
  ASSERT_EQ(actual.defined(), expected.defined()) << what;
  if (!actual.defined()) return;
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type()) << what;
  const auto a = actual.to(torch::kDouble), e = expected.to(torch::kDouble);
  const bool close = torch::allclose(a, e, tol.first, tol.second, /*equal_nan=*/true);
  EXPECT_TRUE(close) << what << ": max abs difference " << (a - e).abs().max().item<double>()
                     << " over tolerance (rtol " << tol.first << ", atol " << tol.second << ")";
}

// A fresh seed per test, printed so a failure can be replayed.
class SeededTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const uint64_t seed = std::random_device{}();
    torch::manual_seed(seed);
    RecordProperty("seed", std::to_string(seed));
    SCOPED_TRACE("torch::manual_seed(" + std::to_string(seed) + ")");
  }
};

}  // namespace custom_bn::testing
