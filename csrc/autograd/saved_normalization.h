// What batch_norm's autograd nodes (batch_norm.cpp, backward.cpp) keep of the normalization
// they differentiate: the input, the weight and, in eval, the running statistics it
// normalizes with (training's statistics come from the input), with the mode and eps.
#pragma once

#include <torch/csrc/autograd/saved_variable.h>

#include <ATen/core/Tensor.h>

#include <optional>

namespace custom_bn::autograd {

// The optional per-channel arguments as the formulas take them: undefined when absent, and
// the running statistics only in eval.
struct NormalizationTensors {
  at::Tensor weight, running_mean, running_var;

  NormalizationTensors(const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& running_mean,
                       const std::optional<at::Tensor>& running_var, bool training)
      : weight(weight.value_or(at::Tensor())),
        running_mean(training ? at::Tensor() : running_mean.value_or(at::Tensor())),
        running_var(training ? at::Tensor() : running_var.value_or(at::Tensor())) {}
};

struct SavedNormalization {
  torch::autograd::SavedVariable input, weight, running_mean, running_var;
  bool training = false;
  double eps = 0;

  void save(const at::Tensor& x, const NormalizationTensors& t, bool is_training, double epsilon) {
    input = torch::autograd::SavedVariable(x, false);
    weight = torch::autograd::SavedVariable(t.weight, false);
    running_mean = torch::autograd::SavedVariable(t.running_mean, false);
    running_var = torch::autograd::SavedVariable(t.running_var, false);
    training = is_training;
    eps = epsilon;
  }
  void reset_data() {
    for (torch::autograd::SavedVariable* saved : {&input, &weight, &running_mean, &running_var}) {
      saved->reset_data();
    }
  }
};

}  // namespace custom_bn::autograd
