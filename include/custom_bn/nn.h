// LibTorch modules over the custom_bn ops, mirroring torch::nn::BatchNorm{1,2,3}d: the same
// options and defaults, input checks, parameter and buffer names (so a torch::save of one
// loads into the other), reset(), reset_parameters(), reset_running_stats() and pretty_print.
#pragma once

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <optional>
#include <ostream>

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

  BatchNormOptions options;
  torch::Tensor weight;               ///< defined if options.affine()
  torch::Tensor bias;                 ///< defined if options.affine()
  torch::Tensor running_mean;         ///< defined if options.track_running_stats()
  torch::Tensor running_var;          ///< defined if options.track_running_stats()
  torch::Tensor num_batches_tracked;  ///< defined if options.track_running_stats()

 protected:
  virtual void check_input_dim(const torch::Tensor& input) const = 0;
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

extern template class BatchNormImplBase<1, BatchNorm1dImpl>;
extern template class BatchNormImplBase<2, BatchNorm2dImpl>;
extern template class BatchNormImplBase<3, BatchNorm3dImpl>;

}  // namespace custom_bn
