// The per-channel CUDA kernels of csrc/cuda/kernels/ (SyncBatchNorm's rank merge, eval's
// invstd), executed on the CPU by the SIMT emulator and compared with torch and with the
// definitions the CPU backend shares.
#include "cuda/kernels/batch_norm.cuh"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <random>

namespace custom_bn::testing {
namespace {

uint64_t fresh_seed() { return std::random_device{}(); }

// The rank merge of SyncBatchNorm: per-rank statistics of slices of a batch (one rank
// empty) merge to the whole batch's, and update the running stats with momentum 0.1.
TEST(SimtMergeRanks, MatchesTheWholeBatch) {
  const uint64_t seed = fresh_seed();
  torch::manual_seed(seed);
  const int64_t C = 37;
  const torch::Tensor x = torch::randn({20, C, 3}) * 3 + 2;
  const std::vector<int64_t> split{6, 0, 9, 5};
  std::vector<torch::Tensor> means, m2s, counts;
  for (const torch::Tensor& part : x.split_with_sizes(split)) {
    const torch::Tensor values = part.transpose(0, 1).reshape({C, -1}).to(torch::kDouble);
    const torch::Tensor mean = part.numel() ? values.mean(1) : torch::zeros({C}, torch::kDouble);
    means.push_back(mean.to(torch::kFloat));
    m2s.push_back(part.numel() ? (values - mean.unsqueeze(1)).square().sum(1).to(torch::kFloat)
                               : torch::zeros({C}));
    counts.push_back(torch::full({1}, static_cast<double>(part.size(0) * 3)));
  }
  const torch::Tensor all_means = torch::stack(means), all_m2s = torch::stack(m2s);
  const torch::Tensor all_counts = torch::cat(counts);
  torch::Tensor mean = torch::empty({C}), invstd = torch::empty({C});
  torch::Tensor running_mean = torch::zeros({C}), running_var = torch::ones({C});
  torch::Tensor ref_mean = running_mean.clone(), ref_var = running_var.clone();
  simt::launch(
      {2, 1}, 32, 0,
      [&] {
        kernels::merge_rank_stats<float, float>(
            all_means.data_ptr<float>(), all_m2s.data_ptr<float>(), all_counts.data_ptr<float>(), 4,
            C, mean.data_ptr<float>(), invstd.data_ptr<float>(), 1e-5,
            kernels::RunningUpdate<float>{running_mean.data_ptr<float>(),
                                          running_var.data_ptr<float>(), nullptr, 0.1});
      },
      seed);
  const torch::Tensor y_ref =
      torch::batch_norm(x, {}, {}, ref_mean, ref_var, true, 0.1, 1e-5, false);
  const torch::Tensor y = (x - mean.view({1, C, 1})) * invstd.view({1, C, 1});
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-4, 1e-4)) << "seed " << seed;
  EXPECT_TRUE(torch::allclose(running_mean, ref_mean, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(running_var, ref_var, 1e-4, 1e-4));
}

// Eval's invstd, as the CUDA backend computes it, is batch_norm_math.h's invstd_from_var: bit
// for bit what the CPU backend computes per channel.
TEST(SimtEvalInvstd, IsTheSharedDefinition) {
  const uint64_t seed = fresh_seed();
  torch::manual_seed(seed);
  for (const torch::Dtype dtype : {torch::kFloat, torch::kDouble}) {
    const int64_t C = 77;
    const torch::Tensor var = (torch::rand({C}) * 4).to(dtype);
    torch::Tensor invstd = torch::empty({C}, dtype);
    AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "eval_invstd", [&] {
      simt::launch(
          {2, 1}, 32, 0,
          [&] {
            kernels::eval_invstd<scalar_t>(var.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), C,
                                           1e-5);
          },
          seed);
      for (int64_t c = 0; c < C; ++c) {
        EXPECT_EQ(invstd.data_ptr<scalar_t>()[c],
                  invstd_from_var(var.data_ptr<scalar_t>()[c], 1e-5))
            << "channel " << c;
      }
    });
    // And within an ulp of torch's 1 / sqrt.
    EXPECT_TRUE(torch::allclose(invstd, 1 / (var + 1e-5).sqrt(), 1e-6, 0)) << "seed " << seed;
  }
}

}  // namespace
}  // namespace custom_bn::testing
