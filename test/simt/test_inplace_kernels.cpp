// In-place activated batch norm's CUDA kernels (csrc/cuda/kernels/inplace.cuh), executed on the
// CPU by the SIMT emulator: each chunk's kept count, the kept input values gathered in memory
// order while the output is written over the input, and the normalized input recovered from
// the output and those values; against the rule of csrc/inplace.cpp in ATen ops and against
// (x - mean) * invstd.
#include "cuda/kernels/inplace.cuh"
#include "kernel_launches.h"

namespace custom_bn::testing {
namespace {

struct InplaceConfig {
  std::vector<int64_t> shape;
  bool channels_last;
  torch::Dtype dtype;
  int threads;    // per block
  int64_t chunk;  // elements per block
  Activation act;
  bool residual;
};

const double kNoUpper = std::numeric_limits<double>::quiet_NaN();

std::vector<InplaceConfig> inplace_configs() {
  const Activation relu{0.0, kNoUpper, 0.0}, hardtanh{-0.5, 1.0, 0.0}, leaky{0.0, kNoUpper, 0.2},
      identity{0.0, kNoUpper, 1.0};
  return {
      // Chunks not a multiple of the block, threads with nothing to walk.
      {{5, 4, 7, 11}, false, torch::kFloat, 32, 100, relu, true},
      {{6, 70, 3, 5}, true, torch::kFloat, 64, 1000, hardtanh, false},
      {{3, 6, 5, 4}, false, torch::kDouble, 32, 77, leaky, true},
      {{2, 33, 2, 3, 4}, true, torch::kDouble, 32, 512, identity, true},
      {{4, 5, 9}, false, torch::kFloat, 64, 4096, identity, false},
  };
}

// (x, y, kept mask) in memory order as flat tensors: y = act(x_hat * w + b + r), the mask
// where the rule keeps x (clipped, or |b| + |r| >= 4 |w|, as csrc/inplace.cpp's kept_positions).
struct Reference {
  torch::Tensor mean, invstd, output, kept;
};

Reference reference(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                    const torch::Tensor& residual, const Activation& act) {
  std::vector<int64_t> dims{0}, channel_shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  channel_shape[1] = x.size(1);
  const torch::Tensor mean = x.mean(dims), var = x.var(dims, /*unbiased=*/false);
  const torch::Tensor invstd = (var + 1e-5).rsqrt();
  torch::Tensor v =
      (x - mean.view(channel_shape)) * invstd.view(channel_shape) * weight.view(channel_shape) +
      bias.view(channel_shape);
  if (residual.defined()) v = v + residual;
  torch::Tensor y = torch::where(v <= act.lower, act.lower + act.slope * (v - act.lower), v);
  if (!std::isnan(act.upper)) y = y.clamp_max(act.upper);
  const double lower = act.slope == 0.0 ? act.lower : -INFINITY;
  const double upper = std::isnan(act.upper) ? INFINITY : act.upper;
  torch::Tensor offset = bias.abs().view(channel_shape);
  if (residual.defined()) offset = offset + residual.abs();
  const torch::Tensor kept =
      (y <= lower) | (y >= upper) | (weight.abs().view(channel_shape) * 4 > offset).logical_not();
  return {mean, invstd, y.contiguous(x.suggest_memory_format()), kept};
}

// A tensor's elements in memory order.
torch::Tensor in_memory_order(const torch::Tensor& t, bool channels_last) {
  if (!channels_last) return t.contiguous().view(-1);
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < t.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return t.permute(order).contiguous().view(-1);
}

template <typename T>
void run_and_compare(const InplaceConfig& cfg) {
  const uint64_t seed = seed_torch();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto layout = [&](const torch::Tensor& t) {
    if (!cfg.channels_last) return t.contiguous();
    return t.contiguous(cfg.shape.size() == 4 ? at::MemoryFormat::ChannelsLast
                                              : at::MemoryFormat::ChannelsLast3d);
  };
  const int64_t C = cfg.shape[1];
  const torch::Tensor x = layout((torch::randn(cfg.shape) * 2 + 1).to(cfg.dtype));
  // zero_init_residual's 0, a tiny weight, ordinary ones; biases below and beyond the margin.
  const torch::Tensor weight =
      torch::tensor({0.0, 1e-3, 0.7, 1.3, -0.9}, cfg.dtype).repeat((C + 4) / 5).narrow(0, 0, C);
  const torch::Tensor bias = torch::randn({C}, cfg.dtype) * 1.5;
  const torch::Tensor residual =
      cfg.residual ? layout(torch::randn(cfg.shape).to(cfg.dtype)) : torch::Tensor();
  const Reference ref = reference(x, weight, bias, residual, cfg.act);
  int64_t S = 1;
  for (size_t d = 2; d < cfg.shape.size(); ++d) S *= cfg.shape[d];
  const ChannelView view = cfg.channels_last
                               ? ChannelView{Layout::kChannelsLast, cfg.shape[0] * S, C, 1}
                               : ChannelView{Layout::kChannelsFirst, cfg.shape[0], C, S};
  const int64_t numel = x.numel(), chunks = (numel + cfg.chunk - 1) / cfg.chunk;
  const double infinity = std::numeric_limits<double>::infinity();
  const kernels::KeepRule<T> rule{
      static_cast<T>(cfg.act.slope == 0.0 ? cfg.act.lower : -infinity),
      static_cast<T>(std::isnan(cfg.act.upper) ? infinity : cfg.act.upper),
      T(4),
      weight.data_ptr<T>(),
      bias.data_ptr<T>(),
      cfg.residual};
  const T* r = cfg.residual ? residual.data_ptr<T>() : nullptr;
  const size_t shared_bytes = cfg.threads * sizeof(int64_t);

  torch::Tensor counts = torch::empty({chunks}, torch::kLong);
  simt::launch(
      {static_cast<int>(chunks), 1}, cfg.threads, shared_bytes,
      [&] {
        kernels::count_kept(rule, view, numel, cfg.chunk, ref.output.data_ptr<T>(), r,
                            counts.data_ptr<int64_t>());
      },
      seed);
  const torch::Tensor expected_kept =
      in_memory_order(x, cfg.channels_last)
          .masked_select(in_memory_order(ref.kept, cfg.channels_last));
  ASSERT_EQ(counts.sum().item<int64_t>(), expected_kept.numel());
  ASSERT_GT(expected_kept.numel(), 0);
  ASSERT_LT(expected_kept.numel(), numel);

  const torch::Tensor starts = counts.cumsum(0) - counts;
  torch::Tensor input = x.clone();
  torch::Tensor kept = torch::empty({expected_kept.numel()}, cfg.dtype);
  simt::launch(
      {static_cast<int>(chunks), 1}, cfg.threads, shared_bytes,
      [&] {
        kernels::gather_kept(rule, view, numel, cfg.chunk, input.data_ptr<T>(),
                             ref.output.data_ptr<T>(), r, starts.data_ptr<int64_t>(),
                             kept.data_ptr<T>());
      },
      seed + 1);
  EXPECT_TRUE(torch::equal(kept, expected_kept)) << "the kept values, in memory order";
  EXPECT_TRUE(torch::equal(input, ref.output)) << "the output written over the input";

  torch::Tensor x_hat = torch::empty_like(x);
  const kernels::Recovery<T> recovery{static_cast<T>(cfg.act.lower), static_cast<T>(cfg.act.slope),
                                      weight.data_ptr<T>(),          bias.data_ptr<T>(),
                                      ref.mean.data_ptr<T>(),        ref.invstd.data_ptr<T>()};
  simt::launch(
      {static_cast<int>(chunks), 1}, cfg.threads, shared_bytes,
      [&] {
        kernels::recover_normalized(rule, recovery, view, numel, cfg.chunk, input.data_ptr<T>(), r,
                                    starts.data_ptr<int64_t>(), kept.data_ptr<T>(),
                                    x_hat.data_ptr<T>());
      },
      seed + 2);
  std::vector<int64_t> channel_shape(x.dim(), 1);
  channel_shape[1] = C;
  const torch::Tensor expected_x_hat =
      (x - ref.mean.view(channel_shape)) * ref.invstd.view(channel_shape);
  // Recovery carries y's rounding times (|x_hat| + (|b| + |r|) / |w|) < 5 roundings.
  expect_close(x_hat, expected_x_hat, cfg.dtype == torch::kDouble ? 1e-12 : 2e-5, "x_hat");
}

class SimtInplaceKernels : public ::testing::TestWithParam<InplaceConfig> {};

TEST_P(SimtInplaceKernels, GatherAndRecoverAsTheRuleSays) {
  const InplaceConfig& cfg = GetParam();
  cfg.dtype == torch::kDouble ? run_and_compare<double>(cfg) : run_and_compare<float>(cfg);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SimtInplaceKernels, ::testing::ValuesIn(inplace_configs()));

}  // namespace
}  // namespace custom_bn::testing
