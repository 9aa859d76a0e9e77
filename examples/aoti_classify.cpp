// Runs an AOTInductor package of a model that uses custom_bn (made in Python by
// torch._inductor.aoti_compile_and_package of a torch.export'ed, converted model) from C++,
// and prints its top class.
//
//   aoti_classify MODEL.pt2 [INPUT.f32 N C H W]
//
// INPUT.f32 holds the input as raw float32 values (numpy's tofile); without it the input is
// torch::ones. Linking custom_bn::custom_bn registers the custom_bn ops a package may call.
// Inductor compiles batch norm into its own code, so most packages call none; one that does
// (SyncBatchNorm's stage ops are not decomposed) fails to load without them, with "Could not
// find schema for custom_bn::...".
#include <custom_bn/custom_bn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <fstream>
#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2 && argc != 7) {
    std::cerr << "usage: aoti_classify MODEL.pt2 [INPUT.f32 N C H W]\n";
    return 2;
  }
  std::vector<int64_t> shape{1, 3, 64, 64};
  torch::Tensor input = torch::ones(shape);
  if (argc == 7) {
    for (int i = 0; i < 4; ++i) shape[i] = std::stoll(argv[3 + i]);
    input = torch::empty(shape);
    std::ifstream file(argv[2], std::ios::binary);
    file.read(reinterpret_cast<char*>(input.data_ptr<float>()),
              static_cast<std::streamsize>(input.numel() * sizeof(float)));
    if (!file) {
      std::cerr << "could not read " << input.numel() << " float32 values from " << argv[2] << "\n";
      return 1;
    }
  }
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  const std::vector<torch::Tensor> outputs = loader.run({input});
  const torch::Tensor logits = outputs.at(0);
  std::cout << "logits:";
  for (int64_t i = 0; i < logits.size(1); ++i) std::cout << ' ' << logits[0][i].item<float>();
  std::cout << "\ntop class: " << logits.argmax(1)[0].item<int64_t>() << "\n";
  return 0;
}
