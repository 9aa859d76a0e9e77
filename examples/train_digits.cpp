// Trains a small CNN on scikit-learn's 8x8 digits twice, from the same initialisation and
// batches: once with torch::nn::BatchNorm2d, once with custom_bn::BatchNorm2d. Prints loss
// and accuracy per epoch side by side with the largest difference, and writes them as CSV.
//
//   train_digits DATA.pt EPOCHS OUT.csv
// DATA.pt is a torch.save'd dict of x_train, y_train, x_test, y_test (scripts/demo makes it).
#include <custom_bn/custom_bn.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

namespace {

struct Digits {
  torch::Tensor x_train, y_train, x_test, y_test;
};

Digits load_digits(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  const c10::Dict<c10::IValue, c10::IValue> dict = torch::pickle_load(bytes).toGenericDict();
  auto get = [&](const char* key) { return dict.at(key).toTensor(); };
  return {get("x_train"), get("y_train"), get("x_test"), get("y_test")};
}

// conv-BN-ReLU twice, pooling, a linear head; BatchNorm is the only thing that differs.
template <typename BatchNorm>
torch::nn::Sequential make_net() {
  using namespace torch::nn;
  return Sequential(Conv2d(Conv2dOptions(1, 16, 3).padding(1)), BatchNorm(16), ReLU(),
                    Conv2d(Conv2dOptions(16, 32, 3).padding(1)), BatchNorm(32), ReLU(),
                    MaxPool2d(2), Flatten(), Linear(32 * 4 * 4, 10));
}

void copy_state(const torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto src = from.named_parameters(), dst = to.named_parameters();
  for (const auto& item : src) dst[item.key()].copy_(item.value());
  auto src_buffers = from.named_buffers(), dst_buffers = to.named_buffers();
  for (const auto& item : src_buffers) dst_buffers[item.key()].copy_(item.value());
}

struct EpochResult {
  double loss, accuracy;
};

EpochResult train_epoch(torch::nn::Sequential& net, torch::optim::Optimizer& optimizer,
                        const Digits& data, const torch::Tensor& order, int64_t batch_size) {
  net->train();
  double total_loss = 0;
  int64_t batches = 0;
  for (int64_t start = 0; start < order.size(0); start += batch_size) {
    const torch::Tensor index = order.slice(0, start, start + batch_size);
    optimizer.zero_grad();
    torch::Tensor loss = torch::nn::functional::cross_entropy(
        net->forward(data.x_train.index_select(0, index)), data.y_train.index_select(0, index));
    loss.backward();
    optimizer.step();
    total_loss += loss.item<double>();
    ++batches;
  }
  net->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor predicted = net->forward(data.x_test).argmax(1);
  const double accuracy = predicted.eq(data.y_test).to(torch::kDouble).mean().item<double>();
  return {total_loss / static_cast<double>(batches), accuracy};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " DATA.pt EPOCHS OUT.csv\n";
    return 2;
  }
  const Digits data = load_digits(argv[1]);
  const int epochs = std::stoi(argv[2]);
  torch::manual_seed(0);
  auto torch_net = make_net<torch::nn::BatchNorm2d>();
  auto ours_net = make_net<custom_bn::BatchNorm2d>();
  copy_state(*torch_net, *ours_net);  // the same initialisation
  torch::optim::SGD torch_opt(torch_net->parameters(),
                              torch::optim::SGDOptions(0.05).momentum(0.9));
  torch::optim::SGD ours_opt(ours_net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));

  std::ofstream csv(argv[3]);
  csv << "epoch,loss_torch,loss_custom_bn,accuracy_torch,accuracy_custom_bn\n";
  std::printf("C++ (LibTorch)  %5s  %12s %12s  %9s %9s\n", "epoch", "loss torch", "loss ours",
              "acc torch", "acc ours");
  double max_loss_diff = 0, max_acc_diff = 0;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    const torch::Tensor order = torch::randperm(data.x_train.size(0));  // same batches for both
    const EpochResult theirs = train_epoch(torch_net, torch_opt, data, order, 64);
    const EpochResult ours = train_epoch(ours_net, ours_opt, data, order, 64);
    max_loss_diff = std::max(max_loss_diff, std::abs(theirs.loss - ours.loss));
    max_acc_diff = std::max(max_acc_diff, std::abs(theirs.accuracy - ours.accuracy));
    std::printf("C++ (LibTorch)  %5d  %12.6f %12.6f  %8.2f%% %8.2f%%\n", epoch, theirs.loss,
                ours.loss, 100 * theirs.accuracy, 100 * ours.accuracy);
    csv << epoch << ',' << theirs.loss << ',' << ours.loss << ',' << theirs.accuracy << ','
        << ours.accuracy << '\n';
  }
  std::printf("C++ (LibTorch)  largest difference: loss %.3g, accuracy %.3g%%\n", max_loss_diff,
              100 * max_acc_diff);
  return 0;
}
