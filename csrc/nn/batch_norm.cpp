// The LibTorch batch-norm modules of include/custom_bn/nn.h: input checks, the fused and the
// frozen variants, and the explicit instantiations of the shared base.
#include "activation.h"
#include "nn/batch_norm_impl.h"

#include <string>

namespace custom_bn {

void BatchNorm1dImpl::check_input_dim(const torch::Tensor& input) const {
  TORCH_CHECK(input.dim() == 2 || input.dim() == 3, "expected 2D or 3D input (got ", input.dim(),
              "D input)");
}

void BatchNorm2dImpl::check_input_dim(const torch::Tensor& input) const {
  TORCH_CHECK(input.dim() == 4, "expected 4D input (got ", input.dim(), "D input)");
}

void BatchNorm3dImpl::check_input_dim(const torch::Tensor& input) const {
  TORCH_CHECK(input.dim() == 5, "expected 5D input (got ", input.dim(), "D input)");
}

BatchNormReLU2dImpl::BatchNormReLU2dImpl(const BatchNormOptions& options,
                                         const FusedActivationOptions& activation)
    : BatchNormImplBase(options), activation(activation) {
  const Activation act =
      checked_activation("custom_bn::BatchNormReLU2d", activation.min_val(), activation.max_val(),
                         activation.negative_slope(), activation.activation());
  TORCH_CHECK_VALUE(!activation.inplace() || !act.smooth(),
                    "custom_bn::BatchNormReLU2d: inplace needs a piecewise-linear activation (one "
                    "its output inverts), but got activation=",
                    activation.activation());
}

torch::Tensor BatchNormReLU2dImpl::forward(const torch::Tensor& input,
                                           const torch::Tensor& residual) {
  check_input_dim(input);
  const StateArguments state = state_arguments();
  if (activation.inplace()) {
    torch::Tensor output = input;  // the same tensor: its values are written
    return custom_bn::batch_norm_relu_(output, if_defined(weight), if_defined(bias),
                                       state.running_mean, state.running_var, state.use_batch_stats,
                                       options.momentum(), options.eps(), state.num_batches_tracked,
                                       if_defined(residual), activation.min_val(),
                                       activation.max_val(), activation.negative_slope());
  }
  return custom_bn::batch_norm_relu(input, if_defined(weight), if_defined(bias), state.running_mean,
                                    state.running_var, state.use_batch_stats, options.momentum(),
                                    options.eps(), state.num_batches_tracked, if_defined(residual),
                                    activation.min_val(), activation.max_val(),
                                    activation.negative_slope(), activation.activation());
}

void BatchNormReLU2dImpl::check_input_dim(const torch::Tensor& input) const {
  TORCH_CHECK(input.dim() == 4, "expected 4D input (got ", input.dim(), "D input)");
}

void BatchNormReLU2dImpl::pretty_print(std::ostream& stream) const {
  stream << "custom_bn::BatchNormReLU2d(";
  print_options(stream, options);
  const FusedActivationOptions relu;
  if (activation.activation() != relu.activation()) {
    stream << ", activation=" << activation.activation();
  } else if (activation.min_val() != relu.min_val() || activation.max_val() != relu.max_val() ||
             activation.negative_slope() != relu.negative_slope()) {
    stream << ", min_val=" << activation.min_val() << ", max_val="
           << (activation.max_val() ? std::to_string(*activation.max_val()) : "None")
           << ", negative_slope=" << activation.negative_slope();
  }
  if (activation.inplace()) stream << ", inplace=true";
  stream << ')';
}

FrozenBatchNorm2dImpl::FrozenBatchNorm2dImpl(int64_t num_features, double eps)
    : num_features(num_features), eps(eps) {
  reset();
}

void FrozenBatchNorm2dImpl::reset() {
  weight = register_buffer("weight", torch::ones({num_features}));
  bias = register_buffer("bias", torch::zeros({num_features}));
  running_mean = register_buffer("running_mean", torch::zeros({num_features}));
  running_var = register_buffer("running_var", torch::ones({num_features}));
}

torch::Tensor FrozenBatchNorm2dImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(input.dim() == 4, "expected 4D input (got ", input.dim(), "D input)");
  return custom_bn::batch_norm(input, weight, bias, running_mean, running_var,
                               /*training=*/false, 0.0, eps);
}

void FrozenBatchNorm2dImpl::pretty_print(std::ostream& stream) const {
  stream << "custom_bn::FrozenBatchNorm2d(" << num_features << ", eps=" << eps << ')';
}

template class BatchNormImplBase<1, BatchNorm1dImpl>;
template class BatchNormImplBase<2, BatchNorm2dImpl>;
template class BatchNormImplBase<3, BatchNorm3dImpl>;
template class BatchNormImplBase<2, BatchNormReLU2dImpl>;

}  // namespace custom_bn
