// custom_bn::fuse_batchnorm_relu (include/custom_bn/fusion.h).
#include <custom_bn/fusion.h>
#include <custom_bn/nn.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <unordered_map>

namespace custom_bn {
namespace {

// A BatchNormReLU2d holding the state of `bn` (torch::nn::BatchNorm2dImpl or ours).
template <typename BatchNorm>
BatchNormReLU2d fused_from(const BatchNorm& bn, const FusedActivationOptions& activation) {
  const auto& o = bn.options;
  BatchNormReLU2d fused(BatchNormOptions(o.num_features())
                            .eps(o.eps())
                            .momentum(o.momentum())
                            .affine(o.affine())
                            .track_running_stats(o.track_running_stats()),
                        activation);
  fused->share_state(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked);
  fused->train(bn.is_training());
  return fused;
}

std::optional<BatchNormReLU2d> fuse_if_batchnorm(const std::shared_ptr<torch::nn::Module>& m,
                                                 const FusedActivationOptions& activation) {
  if (const auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) return fused_from(*bn, activation);
  if (const auto* bn = m->as<BatchNorm2dImpl>()) return fused_from(*bn, activation);
  return std::nullopt;
}

// The fused op's arguments for an activation it applies (ReLU, ReLU6, Hardtanh, LeakyReLU
// with a slope >= 0, SiLU, GELU without approximation; torch::nn has no Hardswish module);
// none for any other module.
std::optional<FusedActivationOptions> fused_activation(const torch::nn::Module& m) {
  if (m.as<torch::nn::ReLUImpl>()) return FusedActivationOptions();
  if (m.as<torch::nn::ReLU6Impl>()) return FusedActivationOptions().max_val(6.0);
  if (const auto* hardtanh = m.as<torch::nn::HardtanhImpl>()) {
    return FusedActivationOptions()
        .min_val(hardtanh->options.min_val())
        .max_val(hardtanh->options.max_val());
  }
  if (const auto* leaky = m.as<torch::nn::LeakyReLUImpl>()) {
    if (leaky->options.negative_slope() >= 0.0) {
      return FusedActivationOptions().negative_slope(leaky->options.negative_slope());
    }
  }
  if (m.as<torch::nn::SiLUImpl>()) return FusedActivationOptions().activation("silu");
  if (const auto* gelu = m.as<torch::nn::GELUImpl>()) {
    if (gelu->options.approximate() == "none") return FusedActivationOptions().activation("gelu");
  }
  return std::nullopt;
}

bool is_convolution(const torch::nn::Module& m) {
  return m.as<torch::nn::Conv1dImpl>() || m.as<torch::nn::Conv2dImpl>() ||
         m.as<torch::nn::Conv3dImpl>();
}

}  // namespace

torch::nn::Sequential fuse_batchnorm_relu(const torch::nn::Sequential& sequential, bool inplace) {
  const auto children = sequential->named_children();
  std::vector<torch::nn::AnyModule> modules(sequential->begin(), sequential->end());
  torch::nn::Sequential fused;
  bool changed = false;
  for (size_t i = 0; i < modules.size(); ++i) {
    const std::string& name = children[i].key();
    const std::shared_ptr<torch::nn::Module> child = modules[i].ptr();
    std::optional<FusedActivationOptions> activation =
        i + 1 < modules.size() ? fused_activation(*modules[i + 1].ptr()) : std::nullopt;
    if (activation && inplace && activation->activation() == "piecewise_linear" && i > 0 &&
        is_convolution(*modules[i - 1].ptr())) {
      activation->inplace(true);
    }
    if (std::optional<BatchNormReLU2d> bn_relu =
            activation ? fuse_if_batchnorm(child, *activation) : std::nullopt) {
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
