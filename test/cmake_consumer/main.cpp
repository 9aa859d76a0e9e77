// Uses the installed package: the module, the functional API, and an op found by name,
// which proves the library registered its ops at load time.
#include <custom_bn/custom_bn.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  if (!c10::Dispatcher::singleton().findSchema({"custom_bn::batch_norm", ""})) {
    std::cerr << "custom_bn::batch_norm is not registered\n";
    return 1;
  }
  custom_bn::BatchNorm2d bn(3);
  const torch::Tensor x = torch::randn({4, 3, 5, 5});
  const torch::Tensor y = bn(x);
  const torch::Tensor expected =
      torch::batch_norm(x, torch::ones({3}), torch::zeros({3}), {}, {}, true, 0.1, 1e-5, false);
  if (!torch::allclose(y, expected, 1e-5, 1e-5)) {
    std::cerr << "output differs from torch::batch_norm\n";
    return 1;
  }
  std::cout << "consumer: ok, " << *bn << "\n";
  return 0;
}
