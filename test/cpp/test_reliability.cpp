// Determinism and thread safety of the ops.
#include "samples.h"

#include <custom_bn/custom_bn.h>

#include <thread>

namespace custom_bn::testing {
namespace {

class Reliability : public SeededTest {};

struct StepResult {
  torch::Tensor output, running_mean, running_var, grad_input, grad_weight;
};

StepResult training_step(const Sample& sample) {
  Sample s = sample.clone(/*requires_grad=*/true);
  torch::Tensor out = custom_bn::batch_norm(s.input, s.weight, s.bias, s.running_mean,
                                            s.running_var, true, 0.1, 1e-5, s.num_batches_tracked);
  out.backward(torch::cos(out.detach() * 3));
  return {out, s.running_mean, s.running_var, s.input.grad(), s.weight.grad()};
}

void expect_identical(const StepResult& a, const StepResult& b) {
  EXPECT_TRUE(torch::equal(a.output, b.output));
  EXPECT_TRUE(torch::equal(a.running_mean, b.running_mean));
  EXPECT_TRUE(torch::equal(a.running_var, b.running_var));
  EXPECT_TRUE(torch::equal(a.grad_input, b.grad_input));
  EXPECT_TRUE(torch::equal(a.grad_weight, b.grad_weight));
}

TEST_F(Reliability, BitwiseIdenticalForAnyThreadCount) {
  const int threads = at::get_num_threads();
  for (Layout layout : {Layout::kContiguous, Layout::kChannelsLast}) {
    const Sample sample =
        make_sample({16, 8, 24, 24}, {torch::kFloat, torch::kFloat}, layout, true, true, true, 0.1);
    std::vector<StepResult> results;
    for (int n : {1, 2, 3, 4}) {
      at::set_num_threads(n);
      results.push_back(training_step(sample));
      results.push_back(training_step(sample));  // and again with the same count
    }
    at::set_num_threads(threads);
    for (const StepResult& r : results) expect_identical(results.front(), r);
  }
}

TEST_F(Reliability, ConcurrentCallsMatchSequentialOnes) {
  constexpr int kThreads = 6;
  std::vector<Sample> samples;
  for (int i = 0; i < kThreads; ++i) {
    const Layout layout = i % 2 ? Layout::kChannelsLast : Layout::kContiguous;
    const DtypePair dtype = i % 3 == 0 ? DtypePair{torch::kBFloat16, torch::kFloat}
                                       : DtypePair{torch::kFloat, torch::kFloat};
    samples.push_back(make_sample({8, 4 + i, 10, 10}, dtype, layout, true, true, true, 0.1));
  }
  std::vector<StepResult> sequential;
  for (const Sample& s : samples) sequential.push_back(training_step(s));

  std::vector<std::vector<StepResult>> concurrent(kThreads);
  std::vector<std::thread> workers;
  for (int i = 0; i < kThreads; ++i) {
    workers.emplace_back([&, i] {
      for (int repeat = 0; repeat < 5; ++repeat) concurrent[i].push_back(training_step(samples[i]));
    });
  }
  for (std::thread& t : workers) t.join();
  for (int i = 0; i < kThreads; ++i) {
    for (const StepResult& r : concurrent[i]) expect_identical(sequential[i], r);
  }
}

}  // namespace
}  // namespace custom_bn::testing
