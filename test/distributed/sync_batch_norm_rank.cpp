// One rank of the C++ SyncBatchNorm test: ranks rendezvous through a c10d::FileStore, talk
// over c10d::ProcessGroupGloo, and each compares its slice with custom_bn::BatchNorm2d run
// on the whole batch in-process.
//   sync_batch_norm_rank RANK WORLD_SIZE STORE_FILE
#include <custom_bn/custom_bn.h>

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <iostream>

namespace {

c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_group(int rank, int world_size,
                                                       const std::string& store_file) {
  auto store = c10::make_intrusive<c10d::FileStore>(store_file, world_size);
  auto options = c10d::ProcessGroupGloo::Options::create();
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world_size);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  return group;
}

void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, const char* what) {
  if (!torch::allclose(actual, expected, 1e-4, 1e-5)) {
    throw std::runtime_error(std::string(what) + " differs: max abs difference " +
                             std::to_string((actual - expected).abs().max().item<double>()));
  }
}

// Several training steps then one in eval, on a batch split across ranks as `split` says.
void check_split(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                 const std::vector<int64_t>& split, std::optional<double> momentum) {
  const int rank = group->getRank();
  torch::manual_seed(0);  // the same batches on every rank
  const auto options = custom_bn::BatchNormOptions(3).momentum(momentum);
  custom_bn::SyncBatchNorm sync(options, group);
  custom_bn::BatchNorm2d whole(options);
  {
    torch::NoGradGuard no_grad;
    sync->weight.uniform_(0.5, 1.5);
    sync->bias.normal_();
    whole->weight.copy_(sync->weight);
    whole->bias.copy_(sync->bias);
  }
  int64_t start = 0;
  for (int r = 0; r < rank; ++r) start += split[r];
  int64_t total = 0;
  for (int64_t n : split) total += n;
  for (int step = 0; step < 4; ++step) {
    if (step == 3) {
      sync->eval();
      whole->eval();
    }
    const torch::Tensor x = torch::randn({total, 3, 4, 5}) * 2 + step;
    const torch::Tensor grad = torch::randn_like(x);
    const torch::Tensor x_mine = x.narrow(0, start, split[rank]).clone().requires_grad_();
    const torch::Tensor x_whole = x.clone().requires_grad_();
    const torch::Tensor y_mine = sync(x_mine), y_whole = whole(x_whole);
    y_mine.backward(grad.narrow(0, start, split[rank]));
    y_whole.backward(grad);
    expect_close(y_mine, y_whole.narrow(0, start, split[rank]), "output");
    expect_close(x_mine.grad(), x_whole.grad().narrow(0, start, split[rank]), "grad input");
    for (auto [ours, reference] :
         {std::pair{sync->weight, whole->weight}, std::pair{sync->bias, whole->bias}}) {
      std::vector<torch::Tensor> summed{ours.grad().clone()};
      group->allreduce(summed)->wait();  // local grads, summed as DDP would (then averaged)
      expect_close(summed[0], reference.grad(), "grad weight/bias summed over ranks");
      ours.mutable_grad().reset();
      reference.mutable_grad().reset();
    }
    expect_close(sync->running_mean, whole->running_mean, "running_mean");
    expect_close(sync->running_var, whole->running_var, "running_var");
    if (sync->num_batches_tracked.item<int64_t>() != whole->num_batches_tracked.item<int64_t>()) {
      throw std::runtime_error("num_batches_tracked differs");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " RANK WORLD_SIZE STORE_FILE\n";
    return 2;
  }
  const int rank = std::stoi(argv[1]), world_size = std::stoi(argv[2]);
  try {
    const auto group = make_gloo_group(rank, world_size, argv[3]);
    std::vector<int64_t> even(world_size, 4), uneven(world_size, 3), empty_first(world_size, 5);
    uneven[0] = 6;
    empty_first[0] = 0;
    check_split(group, even, 0.1);
    check_split(group, uneven, std::nullopt);
    check_split(group, empty_first, 0.1);
    std::cout << "rank " << rank << ": SyncBatchNorm matches the whole batch\n";
  } catch (const std::exception& e) {
    std::cerr << "rank " << rank << ": " << e.what() << "\n";
    return 1;
  }
  return 0;
}
