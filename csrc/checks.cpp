// The argument checks of checks.h: each names the argument, what was expected and what came.
#include "checks.h"

#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

namespace custom_bn {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

bool is_reduced_float(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

bool same_shape(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (!a.sym_size(d).sym_eq(b.sym_size(d)).guard_bool(__FILE__, __LINE__)) return false;
  }
  return true;
}

}  // namespace

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on the input's device ",
              input.device(), ", but got ", name, " on ", t.device());
}

void check_input(const char* op, const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.defined(), op, ": expected a defined ", name,
              " tensor, but got an undefined one");
  TORCH_CHECK(input.dim() >= 2, op, ": expected ", name,
              " with at least 2 dimensions (N, C, *), but got ", name, " of shape ",
              input.sym_sizes());
  // NotImplementedError, as torch's own "not implemented for 'Long'".
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_dtype(input.scalar_type()), op, ": expected ", name,
                              " of dtype float32, float64, bfloat16 or float16, but got ",
                              input.scalar_type());
}

bool params_fit_input_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var) {
  std::optional<at::ScalarType> param_dtype;
  for (const std::optional<at::Tensor>* t : {&weight, &bias, &running_mean, &running_var}) {
    if (!has(*t)) continue;
    const at::ScalarType dtype = (*t)->scalar_type();
    if (param_dtype.has_value() && dtype != *param_dtype) return false;
    param_dtype = dtype;
    if (dtype != input.scalar_type() &&
        !(dtype == at::kFloat && is_reduced_float(input.scalar_type()))) {
      return false;
    }
  }
  return true;
}

void check_channel_params(const char* op, const at::Tensor& input,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK_VALUE(has(running_mean) == has(running_var), op,
                    ": expected running_mean and running_var to be both given or both None, but "
                    "got ",
                    has(running_mean) ? "running_mean only" : "running_var only");
  const c10::SymInt& channels = input.sym_size(1);
  const struct {
    const char* name;
    const std::optional<at::Tensor>& tensor;
  } params[] = {{"weight", weight},
                {"bias", bias},
                {"running_mean", running_mean},
                {"running_var", running_var}};
  const char* first_name = nullptr;
  at::ScalarType param_dtype = at::ScalarType::Undefined;
  for (const auto& p : params) {
    if (!has(p.tensor)) continue;
    const at::Tensor& t = *p.tensor;
    TORCH_SYM_CHECK(t.sym_numel().sym_eq(channels), op, ": expected ", p.name, " to have ",
                    channels, " elements (one per channel of input of shape ", input.sym_sizes(),
                    "), but got ", p.name, " of shape ", t.sym_sizes());
    check_same_device(op, p.name, t, input);
    const at::ScalarType dtype = t.scalar_type();
    const bool allowed = dtype == input.scalar_type() ||
                         (dtype == at::kFloat && is_reduced_float(input.scalar_type()));
    TORCH_CHECK(allowed, op, ": expected ", p.name, " of dtype ", input.scalar_type(),
                " (the input's)", is_reduced_float(input.scalar_type()) ? " or float32" : "",
                ", but got ", dtype);
    if (first_name == nullptr) {
      first_name = p.name;
      param_dtype = dtype;
    } else {
      TORCH_CHECK(dtype == param_dtype, op, ": expected ", p.name, " of dtype ", param_dtype,
                  " (the same as ", first_name, "), but got ", dtype);
    }
  }
}

void check_stat(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& input,
                const c10::SymInt& channels, at::ScalarType dtype) {
  TORCH_CHECK(stat.defined(), op, ": expected ", name, " to be a tensor, but got None");
  TORCH_SYM_CHECK(stat.sym_numel().sym_eq(channels), op, ": expected ", name, " to have ", channels,
                  " elements (one per channel), but got ", name, " of shape ", stat.sym_sizes());
  TORCH_CHECK(stat.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype,
              ", but got ", stat.scalar_type());
  check_same_device(op, name, stat, input);
}

void check_like_input(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& input) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, but got None");
  TORCH_CHECK(same_shape(t, input), op, ": expected ", name, " of the input's shape ",
              input.sym_sizes(), ", but got shape ", t.sym_sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name,
              " of the input's dtype ", input.scalar_type(), ", but got ", t.scalar_type());
  check_same_device(op, name, t, input);
}

void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input) {
  check_like_input(op, "grad_output", grad_output, input);
}

void check_running_update(const char* op, const at::Tensor& like,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          std::optional<double> momentum, bool updates_running_stats) {
  if (has(num_batches_tracked)) {
    const at::Tensor& nbt = *num_batches_tracked;
    TORCH_CHECK(nbt.scalar_type() == at::kLong, op,
                ": expected num_batches_tracked of dtype int64, but got ", nbt.scalar_type());
    TORCH_SYM_CHECK(nbt.sym_numel().sym_eq(1), op,
                    ": expected num_batches_tracked with one element, but got shape ",
                    nbt.sym_sizes());
    check_same_device(op, "num_batches_tracked", nbt, like);
  }
  TORCH_CHECK(!updates_running_stats || momentum.has_value() || has(num_batches_tracked), op,
              ": momentum=None (cumulative moving average) needs num_batches_tracked, but got "
              "num_batches_tracked=None");
}

void check_batch_norm_forward(const char* op, const at::Tensor& input,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& num_batches_tracked, bool training,
                              std::optional<double> momentum,
                              const std::optional<at::Tensor>& residual) {
  check_input(op, input);
  check_channel_params(op, input, weight, bias, running_mean, running_var);
  TORCH_CHECK(training || has(running_mean), op,
              ": running_mean must be defined in evaluation mode (training=False), but got "
              "running_mean=None and running_var=None");
  if (training) {
    // As torch.nn.functional.batch_norm: one value per channel has no variance.
    c10::SymInt values_per_channel = input.sym_size(0);
    for (int64_t d = 2; d < input.dim(); ++d) values_per_channel *= input.sym_size(d);
    TORCH_CHECK_VALUE(values_per_channel.sym_ne(1).guard_bool(__FILE__, __LINE__), op,
                      ": Expected more than 1 value per channel when training, got input size ",
                      input.sym_sizes());
  }
  check_running_update(op, input, num_batches_tracked, momentum, training && has(running_mean));
  if (has(residual)) check_like_input(op, "residual", *residual, input);
}

void check_batch_norm_eval(const char* op, const at::Tensor& input,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, bool relu,
                           const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(relu || !has(residual), op,
                    ": residual is added before the ReLU, so it needs relu=True, but got "
                    "relu=False and a residual tensor");
  check_batch_norm_forward(op, input, weight, bias, running_mean, running_var, std::nullopt,
                           /*training=*/false, std::nullopt, residual);
}

void check_batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, const char* op,
    const std::optional<at::Tensor>& relu_output, const std::optional<at::Tensor>& bias) {
  check_input(op, input);
  check_grad_output(op, grad_output, input);
  if (relu_output.has_value()) check_like_input(op, "output", *relu_output, input);
  check_channel_params(op, input, weight, bias, running_mean, running_var);
  if (training) {
    const at::ScalarType dtype = stat_dtype(input.scalar_type());
    check_stat(op, "save_mean", save_mean, input, input.sym_size(1), dtype);
    check_stat(op, "save_invstd", save_invstd, input, input.sym_size(1), dtype);
  } else {
    TORCH_CHECK(has(running_mean), op,
                ": running_mean must be defined in evaluation mode (training=False), but got "
                "running_mean=None and running_var=None");
  }
}

void check_elemt(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                 const at::Tensor& invstd) {
  check_input(op, input);
  check_channel_params(op, input, weight, bias, std::nullopt, std::nullopt);
  const at::ScalarType dtype = stat_dtype(input.scalar_type());
  check_stat(op, "mean", mean, input, input.sym_size(1), dtype);
  check_stat(op, "invstd", invstd, input, input.sym_size(1), dtype);
}

void check_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                          const at::Tensor& mean, const at::Tensor& invstd,
                          const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, const at::Tensor& count) {
  const char* op = "custom_bn::batch_norm_backward_elemt";
  check_elemt(op, input, weight, std::nullopt, mean, invstd);
  check_grad_output(op, grad_output, input);
  const at::ScalarType dtype = stat_dtype(input.scalar_type());
  check_stat(op, "sum_dy", sum_dy, input, input.sym_size(1), dtype);
  check_stat(op, "sum_dy_xmu", sum_dy_xmu, input, input.sym_size(1), dtype);
  TORCH_CHECK(count.defined(), op, ": expected count to be a tensor, but got None");
  TORCH_CHECK(
      at::isFloatingType(count.scalar_type()) || at::isIntegralType(count.scalar_type(), false), op,
      ": expected count of a real dtype, but got ", count.scalar_type());
  check_same_device(op, "count", count, input);
}

void check_gather_stats(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts,
                        const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var,
                        const std::optional<at::Tensor>& num_batches_tracked,
                        std::optional<double> momentum) {
  const char* op = "custom_bn::batch_norm_gather_stats_with_counts";
  TORCH_CHECK(mean.defined() && mean.dim() == 2, op,
              ": expected mean of shape (ranks, channels), but got ",
              mean.defined() ? "shape " : "None",
              mean.defined() ? mean.sym_sizes() : c10::SymIntArrayRef{});
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
              ": expected mean of dtype float32 or float64, but got ", mean.scalar_type());
  TORCH_CHECK(m2.defined(), op, ": expected m2 to be a tensor, but got None");
  TORCH_CHECK(same_shape(m2, mean), op, ": expected m2 of the shape of mean ", mean.sym_sizes(),
              ", but got shape ", m2.sym_sizes());
  TORCH_CHECK(m2.scalar_type() == mean.scalar_type(), op, ": expected m2 of dtype ",
              mean.scalar_type(), " (the same as mean), but got ", m2.scalar_type());
  check_same_device(op, "m2", m2, mean);
  TORCH_CHECK(counts.defined(), op, ": expected counts to be a tensor, but got None");
  TORCH_SYM_CHECK(counts.sym_numel().sym_eq(mean.sym_size(0)), op, ": expected counts with ",
                  mean.sym_size(0), " elements (one per rank), but got shape ", counts.sym_sizes());
  TORCH_CHECK(
      at::isFloatingType(counts.scalar_type()) || at::isIntegralType(counts.scalar_type(), false),
      op, ": expected counts of a real dtype, but got ", counts.scalar_type());
  check_same_device(op, "counts", counts, mean);
  TORCH_CHECK_VALUE(has(running_mean) == has(running_var), op,
                    ": expected running_mean and running_var to be both given or both None, but "
                    "got ",
                    has(running_mean) ? "running_mean only" : "running_var only");
  for (const auto& [name, stat] :
       {std::pair<const char*, const std::optional<at::Tensor>&>{"running_mean", running_mean},
        {"running_var", running_var}}) {
    if (!has(stat)) continue;
    TORCH_SYM_CHECK(stat->sym_numel().sym_eq(mean.sym_size(1)), op, ": expected ", name,
                    " to have ", mean.sym_size(1), " elements (one per channel), but got shape ",
                    stat->sym_sizes());
    TORCH_CHECK(is_supported_dtype(stat->scalar_type()), op, ": expected ", name,
                " of a floating dtype, but got ", stat->scalar_type());
    check_same_device(op, name, *stat, mean);
  }
  check_running_update(op, mean, num_batches_tracked, momentum, has(running_mean));
}

}  // namespace custom_bn
