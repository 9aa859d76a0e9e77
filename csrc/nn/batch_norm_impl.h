// The members of custom_bn::BatchNormImplBase, for the files that instantiate it.
#pragma once

#include <custom_bn/nn.h>
#include <custom_bn/ops.h>

#include "optional_tensor.h"

#include <torch/nn/init.h>

namespace custom_bn {

// torch.nn.functional.batch_norm's check (torch 2.11), as LibTorch reports a bad value: a
// c10::ValueError (Python's ValueError).
inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(eps > 0.0, "batch_norm eps must be positive, but got ", eps);
}

template <size_t D, typename Derived>
BatchNormImplBase<D, Derived>::BatchNormImplBase(const BatchNormOptions& options)
    : options(options) {
  // Not virtual dispatch: Cloneable::clone() calls reset() on the copy itself.
  BatchNormImplBase::reset();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset() {
  const int64_t channels = options.num_features();
  if (options.affine()) {
    weight = this->register_parameter("weight", torch::empty({channels}));
    bias = this->register_parameter("bias", torch::empty({channels}));
  } else {
    weight = this->register_parameter("weight", torch::Tensor(), /*requires_grad=*/false);
    bias = this->register_parameter("bias", torch::Tensor(), /*requires_grad=*/false);
  }
  if (options.track_running_stats()) {
    running_mean = this->register_buffer("running_mean", torch::zeros({channels}));
    running_var = this->register_buffer("running_var", torch::ones({channels}));
    num_batches_tracked =
        this->register_buffer("num_batches_tracked", torch::tensor(0, torch::kLong));
  } else {
    running_mean = this->register_buffer("running_mean", torch::Tensor());
    running_var = this->register_buffer("running_var", torch::Tensor());
    num_batches_tracked = this->register_buffer("num_batches_tracked", torch::Tensor());
  }
  reset_parameters();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::share_state(const torch::Tensor& weight,
                                                const torch::Tensor& bias,
                                                const torch::Tensor& running_mean,
                                                const torch::Tensor& running_var,
                                                const torch::Tensor& num_batches_tracked) {
  for (auto [name, own, given] :
       {std::tuple{"weight", &this->weight, &weight}, std::tuple{"bias", &this->bias, &bias}}) {
    if (!given->defined() || !own->defined()) continue;
    TORCH_CHECK(given->sizes() == own->sizes(), "share_state: expected ", name, " of shape ",
                own->sizes(), ", but got ", given->sizes());
    this->parameters_[name] = *given;
    *own = *given;
  }
  // The registered buffer tensors stay registered and take the given ones' storage (shared),
  // dtype and device.
  for (auto [own, given] :
       {std::pair{&this->running_mean, &running_mean}, std::pair{&this->running_var, &running_var},
        std::pair{&this->num_batches_tracked, &num_batches_tracked}}) {
    if (given->defined() && own->defined()) own->set_data(*given);
  }
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset_running_stats() {
  if (!options.track_running_stats()) return;
  torch::NoGradGuard no_grad;
  running_mean.zero_();
  running_var.fill_(1);
  num_batches_tracked.zero_();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset_parameters() {
  reset_running_stats();
  if (options.affine()) {
    torch::nn::init::ones_(weight);
    torch::nn::init::zeros_(bias);
  }
}

template <size_t D, typename Derived>
typename BatchNormImplBase<D, Derived>::StateArguments
BatchNormImplBase<D, Derived>::state_arguments() const {
  check_eps(options.eps());
  const bool training = this->is_training();
  const bool updates = training && options.track_running_stats();
  return {if_defined(running_mean), if_defined(running_var), training || !running_mean.defined(),
          updates ? if_defined(num_batches_tracked) : std::nullopt};
}

template <size_t D, typename Derived>
torch::Tensor BatchNormImplBase<D, Derived>::forward(const torch::Tensor& input) {
  check_input_dim(input);
  const StateArguments state = state_arguments();
  return custom_bn::batch_norm(input, if_defined(weight), if_defined(bias), state.running_mean,
                               state.running_var, state.use_batch_stats, options.momentum(),
                               options.eps(), state.num_batches_tracked);
}

// "<num_features>, eps=..., momentum=..., affine=..., track_running_stats=...": the options
// as torch::nn prints them, shared by every module here.
inline void print_options(std::ostream& stream, const BatchNormOptions& options) {
  stream << std::boolalpha << options.num_features() << ", eps=" << options.eps() << ", momentum=";
  if (options.momentum().has_value()) {
    stream << *options.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << options.affine()
         << ", track_running_stats=" << options.track_running_stats();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::pretty_print(std::ostream& stream) const {
  stream << "custom_bn::BatchNorm" << D << "d(";
  print_options(stream, options);
  stream << ')';
}

}  // namespace custom_bn
