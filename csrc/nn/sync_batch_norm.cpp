// custom_bn::SyncBatchNorm (include/custom_bn/sync_batch_norm.h): batch statistics gathered
// across the ranks of a c10d process group, with the stage ops.
#include <custom_bn/ops.h>
#include <custom_bn/sync_batch_norm.h>

#include <torch/autograd.h>

// The module base is a template; its members for SyncBatchNorm are instantiated here.
#include "nn/batch_norm_impl.h"

namespace custom_bn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input,
                               const std::optional<torch::Tensor>& weight,
                               const std::optional<torch::Tensor>& bias,
                               const std::optional<torch::Tensor>& running_mean,
                               const std::optional<torch::Tensor>& running_var,
                               const std::optional<torch::Tensor>& num_batches_tracked,
                               std::optional<double> momentum, double eps,
                               const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
    const auto [count, mean, m2] = custom_bn::batch_norm_stats(input);
    std::vector<torch::Tensor> local{torch::cat({count, mean, m2})};
    std::vector<std::vector<torch::Tensor>> gathered(1);
    for (int r = 0; r < group->getSize(); ++r) gathered[0].push_back(torch::empty_like(local[0]));
    group->allgather(gathered, local)->wait();
    const torch::Tensor stats = torch::stack(gathered[0]);
    const int64_t channels = mean.numel();
    const torch::Tensor counts = stats.select(1, 0);
    const auto [global_mean, invstd] = custom_bn::batch_norm_gather_stats_with_counts(
        stats.narrow(1, 1, channels), stats.narrow(1, 1 + channels, channels), counts, running_mean,
        running_var, num_batches_tracked, momentum, eps);
    ctx->save_for_backward({input, weight.value_or(torch::Tensor()), global_mean, invstd, counts});
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["group"] = c10::IValue::make_capsule(group);
    return custom_bn::batch_norm_elemt(input, weight, bias, global_mean, invstd);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3],
                        &counts = saved[4];
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Absent optionals have no graph edge: bias is edge 1 or 2.
    const bool input_g = ctx->needs_input_grad(0);
    const bool weight_g = has_weight && ctx->needs_input_grad(1);
    const bool bias_g = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    variable_list grads(9);
    if (!grad_outputs[0].defined()) return grads;
    auto [sum_dy, sum_dy_xmu, grad_weight, grad_bias] = custom_bn::batch_norm_backward_reduce(
        grad_outputs[0], input, mean, invstd,
        weight.defined() ? std::optional<torch::Tensor>(weight) : std::nullopt, input_g, weight_g,
        bias_g);
    if (input_g) {
      std::vector<torch::Tensor> sums{torch::cat({sum_dy, sum_dy_xmu})};
      auto group = c10::static_intrusive_pointer_cast<c10d::ProcessGroup>(
          ctx->saved_data["group"].toCapsule());
      group->allreduce(sums)->wait();
      const int64_t channels = sum_dy.numel();
      grads[0] = custom_bn::batch_norm_backward_elemt(
          grad_outputs[0], input, mean, invstd,
          weight.defined() ? std::optional<torch::Tensor>(weight) : std::nullopt,
          sums[0].narrow(0, 0, channels), sums[0].narrow(0, channels, channels), counts);
    }
    grads[1] = grad_weight;
    grads[2] = grad_bias;
    return grads;
  }
};

}  // namespace

template class BatchNormImplBase<0, SyncBatchNormImpl>;

SyncBatchNormImpl::SyncBatchNormImpl(const BatchNormOptions& options,
                                     c10::intrusive_ptr<c10d::ProcessGroup> process_group)
    : BatchNormImplBase(options), process_group(std::move(process_group)) {}

torch::Tensor SyncBatchNormImpl::forward(const torch::Tensor& input) {
  check_input_dim(input);
  check_eps(options.eps());
  const bool training = is_training();
  if (!training || !process_group || process_group->getSize() == 1) {
    return BatchNormImplBase::forward(input);
  }
  const bool updates = options.track_running_stats();
  return SyncBatchNormFunction::apply(input, if_defined(weight), if_defined(bias),
                                      if_defined(running_mean), if_defined(running_var),
                                      updates ? if_defined(num_batches_tracked) : std::nullopt,
                                      options.momentum(), options.eps(), process_group);
}

void SyncBatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << "custom_bn::SyncBatchNorm(";
  print_options(stream, options);
  stream << ", ranks=" << (process_group ? process_group->getSize() : 1) << ')';
}

void SyncBatchNormImpl::check_input_dim(const torch::Tensor& input) const {
  TORCH_CHECK(input.dim() >= 2, "expected at least 2D input (got ", input.dim(), "D input)");
}

}  // namespace custom_bn
