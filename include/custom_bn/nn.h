// LibTorch modules over the custom_bn ops, mirroring torch::nn::BatchNorm{1,2,3}d: the same
// options and defaults, input checks, parameter and buffer names (so a torch::save of one
// loads into the other), reset(), reset_parameters(), reset_running_stats() and pretty_print.
#pragma once

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <optional>
#include <ostream>
#include <string>

namespace custom_bn {

struct BatchNormOptions {
  /* implicit */ BatchNormOptions(int64_t num_features) : num_features_(num_features) {}

  /// The number of channels C of the (N, C, *) input.
  TORCH_ARG(int64_t, num_features);
  /// Added to the variance for numerical stability.
  TORCH_ARG(double, eps) = 1e-5;
  /// The weight of the new batch in the running stats; std::nullopt means the cumulative
  /// average, 1 / num_batches_tracked.
  TORCH_ARG(std::optional<double>, momentum) = 0.1;
  /// Whether the module has a learnable weight and bias.
  TORCH_ARG(bool, affine) = true;
  /// Whether the module keeps running stats (used in eval) and num_batches_tracked.
  TORCH_ARG(bool, track_running_stats) = true;
};

template <size_t D, typename Derived>
class BatchNormImplBase : public torch::nn::Cloneable<Derived> {
 public:
  explicit BatchNormImplBase(const BatchNormOptions& options);

  void reset() override;
  void reset_parameters();
  void reset_running_stats();

  /// One call of the custom_bn::batch_norm op, num_batches_tracked included.
  torch::Tensor forward(const torch::Tensor& input);

  void pretty_print(std::ostream& stream) const override;

  /// Takes over another batch norm's state, as fuse_batchnorm_relu does: the given parameters
  /// become this module's (the very tensors, so optimizers over them keep working) and its
  /// buffers share storage with the given ones. Undefined tensors are skipped; shapes must be
  /// this module's.
  void share_state(const torch::Tensor& weight, const torch::Tensor& bias,
                   const torch::Tensor& running_mean, const torch::Tensor& running_var,
                   const torch::Tensor& num_batches_tracked);

  BatchNormOptions options;
  torch::Tensor weight;               ///< defined if options.affine()
  torch::Tensor bias;                 ///< defined if options.affine()
  torch::Tensor running_mean;         ///< defined if options.track_running_stats()
  torch::Tensor running_var;          ///< defined if options.track_running_stats()
  torch::Tensor num_batches_tracked;  ///< defined if options.track_running_stats()

 protected:
  virtual void check_input_dim(const torch::Tensor& input) const = 0;

  /// The op's statistics arguments for this module's state and mode, as torch::nn::BatchNorm
  /// decides them: batch statistics when training or without running stats, which are
  /// updated (with num_batches_tracked) when training with them.
  struct StateArguments {
    std::optional<torch::Tensor> running_mean;
    std::optional<torch::Tensor> running_var;
    bool use_batch_stats;
    std::optional<torch::Tensor> num_batches_tracked;
  };
  StateArguments state_arguments() const;
};

class BatchNorm1dImpl : public BatchNormImplBase<1, BatchNorm1dImpl> {
 public:
  using BatchNormImplBase::BatchNormImplBase;

 protected:
  void check_input_dim(const torch::Tensor& input) const override;
};
TORCH_MODULE(BatchNorm1d);

class BatchNorm2dImpl : public BatchNormImplBase<2, BatchNorm2dImpl> {
 public:
  using BatchNormImplBase::BatchNormImplBase;

 protected:
  void check_input_dim(const torch::Tensor& input) const override;
};
TORCH_MODULE(BatchNorm2d);

class BatchNorm3dImpl : public BatchNormImplBase<3, BatchNorm3dImpl> {
 public:
  using BatchNormImplBase::BatchNormImplBase;

 protected:
  void check_input_dim(const torch::Tensor& input) const override;
};
TORCH_MODULE(BatchNorm3d);

/// The activation of BatchNormReLU2d, as custom_bn::batch_norm_relu takes it: the identity
/// inside (min_val, max_val), negative_slope * v at or below min_val (min_val itself with slope
/// 0), max_val at or above it. The defaults are ReLU; ReLU6 is max_val(6), hardtanh(a, b)
/// min_val(a).max_val(b), LeakyReLU(s) negative_slope(s) (s >= 0), identity negative_slope(1).
/// Or a smooth one: activation("silu"), activation("hardswish"), activation("gelu"), with the
/// other options at their defaults and no residual.
/// inplace(true) (piecewise-linear activations): the output is written over the input, which
/// must be a tensor nothing else needs (a convolution's output), and the backward keeps only
/// the output, the residual and the input values the output cannot give back
/// (custom_bn::batch_norm_relu_, in-place activated batch norm).
struct FusedActivationOptions {
  TORCH_ARG(double, min_val) = 0.0;
  TORCH_ARG(std::optional<double>, max_val) = std::nullopt;
  TORCH_ARG(double, negative_slope) = 0.0;
  TORCH_ARG(std::string, activation) = "piecewise_linear";
  TORCH_ARG(bool, inplace) = false;
};

/// act(BatchNorm2d(input) + residual) as one fused op, custom_bn::batch_norm_relu: one pass
/// forward, one backward, no activation saved beyond the output. act is a ReLU unless
/// `activation` says otherwise. Options, parameters and buffers are BatchNorm2d's (a
/// torch::save of either loads into the other).
class BatchNormReLU2dImpl : public BatchNormImplBase<2, BatchNormReLU2dImpl> {
 public:
  explicit BatchNormReLU2dImpl(const BatchNormOptions& options,
                               const FusedActivationOptions& activation = {});

  /// residual (optional, the input's shape and dtype) is added before the activation.
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& residual = {});

  FusedActivationOptions activation;

  void pretty_print(std::ostream& stream) const override;

 protected:
  void check_input_dim(const torch::Tensor& input) const override;
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(BatchNormReLU2d);

/// Batch norm whose statistics and affine parameters never change, as torchvision's
/// FrozenBatchNorm2d: the running statistics always, through the eval kernel, also after a
/// parent's train(). weight, bias, running_mean and running_var are buffers (nothing
/// requires grad), named as BatchNorm2d's.
class FrozenBatchNorm2dImpl : public torch::nn::Cloneable<FrozenBatchNorm2dImpl> {
 public:
  explicit FrozenBatchNorm2dImpl(int64_t num_features, double eps = 1e-5);

  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;

  int64_t num_features;
  double eps;
  torch::Tensor weight, bias, running_mean, running_var;
};
TORCH_MODULE(FrozenBatchNorm2d);

extern template class BatchNormImplBase<1, BatchNorm1dImpl>;
extern template class BatchNormImplBase<2, BatchNorm2dImpl>;
extern template class BatchNormImplBase<3, BatchNorm3dImpl>;
extern template class BatchNormImplBase<2, BatchNormReLU2dImpl>;

}  // namespace custom_bn
