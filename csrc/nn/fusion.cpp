// custom_bn::fuse_batchnorm_relu (include/custom_bn/fusion.h).
#include <custom_bn/fusion.h>
#include <custom_bn/nn.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>

#include <unordered_map>

namespace custom_bn {
namespace {

// A BatchNormReLU2d holding the state of `bn` (torch::nn::BatchNorm2dImpl or ours).
template <typename BatchNorm>
BatchNormReLU2d fused_from(const BatchNorm& bn) {
  const auto& o = bn.options;
  BatchNormReLU2d fused(BatchNormOptions(o.num_features())
                            .eps(o.eps())
                            .momentum(o.momentum())
                            .affine(o.affine())
                            .track_running_stats(o.track_running_stats()));
  fused->share_state(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked);
  fused->train(bn.is_training());
  return fused;
}

std::optional<BatchNormReLU2d> fuse_if_batchnorm(const std::shared_ptr<torch::nn::Module>& m) {
  if (const auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) return fused_from(*bn);
  if (const auto* bn = m->as<BatchNorm2dImpl>()) return fused_from(*bn);
  return std::nullopt;
}

}  // namespace

torch::nn::Sequential fuse_batchnorm_relu(const torch::nn::Sequential& sequential) {
  const auto children = sequential->named_children();
  std::vector<torch::nn::AnyModule> modules(sequential->begin(), sequential->end());
  torch::nn::Sequential fused;
  bool changed = false;
  for (size_t i = 0; i < modules.size(); ++i) {
    const std::string& name = children[i].key();
    const std::shared_ptr<torch::nn::Module> child = modules[i].ptr();
    const bool relu_next =
        i + 1 < modules.size() && modules[i + 1].ptr()->as<torch::nn::ReLUImpl>();
    if (std::optional<BatchNormReLU2d> bn_relu =
            relu_next ? fuse_if_batchnorm(child) : std::nullopt) {
      fused->push_back(std::string(name), *bn_relu);
      fused->push_back(std::string(children[i + 1].key()), torch::nn::Identity());
      changed = true;
      ++i;
    } else {
      fused->push_back(std::string(name), modules[i]);
    }
  }
  if (!changed) return sequential;
  // train() recurses: set the container's mode, then give every module (parents before their
  // children) back its own.
  std::unordered_map<const torch::nn::Module*, bool> modes;
  for (const auto& m : fused->modules(/*include_self=*/false)) modes[m.get()] = m->is_training();
  fused->train(sequential->is_training());
  for (const auto& m : fused->modules(/*include_self=*/false)) m->train(modes[m.get()]);
  return fused;
}

}  // namespace custom_bn
