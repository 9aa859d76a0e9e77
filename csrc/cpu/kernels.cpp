// The CPU kernel table of one instruction set: each pass dispatches on the input's dtype and
// runs the engines of reduce.h, map.h, stats.h and channel_at_a_time.h with the per-element
// math of pass_math.h; each op's schedule of passes follows the plan. Compiled once per instruction
// set; CPU_CAPABILITY names this copy's namespace.
#include "cpu/kernels.h"

#include "cpu/channel_at_a_time.h"
#include "cpu/channel_math.h"
#include "cpu/elements.h"
#include "cpu/map.h"
#include "cpu/pass_math.h"
#include "cpu/reduce.h"
#include "cpu/stats.h"
#include "cpu/vec_io.h"

#include <ATen/Dispatch.h>

#include <array>
#include <tuple>
#include <type_traits>

namespace custom_bn::cpu::CPU_CAPABILITY {
namespace {

// The plan reasons in one vector width for every dtype.
constexpr int64_t kVectorBytes = sizeof(Vectorized<float>);
static_assert(sizeof(Vectorized<double>) == kVectorBytes &&
              sizeof(Vectorized<at::BFloat16>) == kVectorBytes &&
              sizeof(Vectorized<at::Half>) == kVectorBytes);

#define CUSTOM_BN_DISPATCH_INPUT_TYPES(input, name, ...)                                 \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (input).scalar_type(), name, \
                                  __VA_ARGS__)

template <typename scalar_t>
const opmath_t<scalar_t>* stat_ptr(const at::Tensor& t) {
  return t.const_data_ptr<opmath_t<scalar_t>>();
}

template <typename scalar_t>
opmath_t<scalar_t>* mutable_stat_ptr(at::Tensor& t) {
  return t.mutable_data_ptr<opmath_t<scalar_t>>();
}

void collect_stats(const at::Tensor& input, const CpuPlan& plan, at::Tensor& mean, at::Tensor& m2) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "collect_stats", [&] {
    CPU_CAPABILITY::collect_stats(input.const_data_ptr<scalar_t>(), plan,
                                  mutable_stat_ptr<scalar_t>(mean), mutable_stat_ptr<scalar_t>(m2));
  });
}

void apply_affine(const at::Tensor& input, const CpuPlan& plan, const at::Tensor& mean,
                  const at::Tensor& alpha, const at::Tensor& bias, at::Tensor& output) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "apply_affine", [&] {
    map_channels<1, 3>(
        std::array<const scalar_t*, 1>{input.const_data_ptr<scalar_t>()},
        {stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(alpha), stat_ptr<scalar_t>(bias)}, plan,
        kNormalize, output.mutable_data_ptr<scalar_t>());
  });
}

// The activation in the compute type of scalar_t.
template <typename scalar_t>
ActivationFunction<opmath_t<scalar_t>> in_opmath(const Activation& act) {
  return act.to<opmath_t<scalar_t>>();
}

void apply_affine_activation(const at::Tensor& input, const at::Tensor& residual,
                             const CpuPlan& plan, const at::Tensor& mean, const at::Tensor& alpha,
                             const at::Tensor& bias, const Activation& act, at::Tensor& output) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "apply_affine_activation", [&] {
    const std::array<const opmath_t<scalar_t>*, 3> params{
        stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(alpha), stat_ptr<scalar_t>(bias)};
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const auto f = in_opmath<scalar_t>(act);
    if (residual.defined()) {
      map_channels<2, 3>(std::array<const scalar_t*, 2>{x, residual.const_data_ptr<scalar_t>()},
                         params, plan, normalize_add_activate(f), out);
    } else {
      map_channels<1, 3>(std::array<const scalar_t*, 1>{x}, params, plan, normalize_activate(f),
                         out);
    }
  });
}

// The channel dim's size and stride of a dense (N, C, *) tensor, as the element walks take them.
std::pair<int64_t, int64_t> channels_and_stride(const at::Tensor& t) {
  return {t.size(1), t.size(1) > 1 ? t.stride(1) : 1};
}

void activate_elements(const at::Tensor& input, const at::Tensor& residual, int64_t begin,
                       int64_t end, const at::Tensor& mean, const at::Tensor& alpha,
                       const at::Tensor& bias, const Activation& act, void* out) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "activate_elements", [&] {
    const std::array<const opmath_t<scalar_t>*, 3> params{
        stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(alpha), stat_ptr<scalar_t>(bias)};
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const auto [C, stride] = channels_and_stride(input);
    const auto f = in_opmath<scalar_t>(act);
    scalar_t* y = static_cast<scalar_t*>(out);
    if (residual.defined()) {
      map_elements<2, 3>(
          std::array<const scalar_t*, 2>{x + begin, residual.const_data_ptr<scalar_t>() + begin},
          params, C, stride, begin, end, normalize_add_activate(f), y);
    } else {
      map_elements<1, 3>(std::array<const scalar_t*, 1>{x + begin}, params, C, stride, begin, end,
                         normalize_activate(f), y);
    }
  });
}

void reduce_grad_activation_elements(const at::Tensor& grad_output, const at::Tensor& output,
                                     const void* x, int64_t begin, int64_t end,
                                     const at::Tensor& mean, const Activation& act, double* totals,
                                     void* dz) {
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "reduce_grad_activation_elements", [&] {
    const std::array<const scalar_t*, 3> in{grad_output.const_data_ptr<scalar_t>() + begin,
                                            output.const_data_ptr<scalar_t>() + begin,
                                            static_cast<const scalar_t*>(x)};
    const std::array<const opmath_t<scalar_t>*, 1> params{stat_ptr<scalar_t>(mean)};
    const auto [C, stride] = channels_and_stride(output);
    const auto f = in_opmath<scalar_t>(act);
    if (dz != nullptr) {
      reduce_elements<3, 2, 1, 1>(in, params, C, stride, begin, end,
                                  activation_grad_sums_and_dz<scalar_t>(f), totals,
                                  static_cast<scalar_t*>(dz));
    } else {
      reduce_elements<3, 2, 1, 0>(in, params, C, stride, begin, end, activation_grad_sums(f),
                                  totals, static_cast<scalar_t*>(nullptr));
    }
  });
}

void apply_grad_input_elements(const at::Tensor& grad_output, const at::Tensor& output,
                               const void* dz, const void* x, int64_t begin, int64_t end,
                               const at::Tensor& mean, const at::Tensor& dy_mean,
                               const at::Tensor& a, const at::Tensor& b, const Activation& act,
                               void* grad_input) {
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "apply_grad_input_elements", [&] {
    const std::array<const opmath_t<scalar_t>*, 4> k{stat_ptr<scalar_t>(mean),
                                                     stat_ptr<scalar_t>(dy_mean),
                                                     stat_ptr<scalar_t>(a), stat_ptr<scalar_t>(b)};
    const auto [C, stride] = channels_and_stride(output);
    const auto* xs = static_cast<const scalar_t*>(x);
    auto* out = static_cast<scalar_t*>(grad_input);
    if (dz != nullptr) {
      map_elements<2, 4>(std::array{static_cast<const scalar_t*>(dz), xs}, k, C, stride, begin, end,
                         kGradInput, out);
    } else {
      map_elements<3, 4>(std::array{grad_output.const_data_ptr<scalar_t>() + begin,
                                    output.const_data_ptr<scalar_t>() + begin, xs},
                         k, C, stride, begin, end, activation_grad_input(in_opmath<scalar_t>(act)),
                         out);
    }
  });
}

void reduce_grad(const at::Tensor& grad_output, const at::Tensor& input, const CpuPlan& plan,
                 const at::Tensor& mean, at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "reduce_grad", [&] {
    reduce_channels<2, 2, 1, 0>(
        std::array<const scalar_t*, 2>{grad_output.const_data_ptr<scalar_t>(),
                                       input.const_data_ptr<scalar_t>()},
        {stat_ptr<scalar_t>(mean)}, plan, kGradSums,
        std::array{mutable_stat_ptr<scalar_t>(sum_dy), mutable_stat_ptr<scalar_t>(sum_dy_xmu)});
  });
}

void reduce_grad_activation(const at::Tensor& grad_output, const at::Tensor& output,
                            const at::Tensor& input, const CpuPlan& plan, const at::Tensor& mean,
                            const at::Tensor& alpha, const at::Tensor& bias, const Activation& act,
                            at::Tensor& sum_dy, at::Tensor& sum_dy_xmu, at::Tensor& grad_masked) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "reduce_grad_activation", [&] {
    const std::array<const scalar_t*, 3> in{grad_output.const_data_ptr<scalar_t>(),
                                            output.const_data_ptr<scalar_t>(),
                                            input.const_data_ptr<scalar_t>()};
    const std::array sums{mutable_stat_ptr<scalar_t>(sum_dy),
                          mutable_stat_ptr<scalar_t>(sum_dy_xmu)};
    const auto f = in_opmath<scalar_t>(act);
    if (act.smooth()) {
      // The pre-activation is recomputed from x: v = (dy, x), p = (mean, alpha, bias).
      const std::array<const scalar_t*, 2> dy_x{in[0], in[2]};
      const std::array<const opmath_t<scalar_t>*, 3> p{
          stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(alpha), stat_ptr<scalar_t>(bias)};
      if (grad_masked.defined()) {
        reduce_channels<2, 2, 3, 1>(dy_x, p, plan, smooth_activation_grad_sums_and_dz<scalar_t>(f),
                                    sums, grad_masked.mutable_data_ptr<scalar_t>());
      } else {
        reduce_channels<2, 2, 3, 0>(dy_x, p, plan, smooth_activation_grad_sums(f), sums);
      }
    } else if (grad_masked.defined()) {
      // dz is rounded to scalar_t as torch's activation backward rounds its result.
      reduce_channels<3, 2, 1, 1>(in, {stat_ptr<scalar_t>(mean)}, plan,
                                  activation_grad_sums_and_dz<scalar_t>(f), sums,
                                  grad_masked.mutable_data_ptr<scalar_t>());
    } else {
      reduce_channels<3, 2, 1, 0>(in, {stat_ptr<scalar_t>(mean)}, plan, activation_grad_sums(f),
                                  sums);
    }
  });
}

void apply_grad_input(const at::Tensor& grad_output, const at::Tensor& input, const CpuPlan& plan,
                      const at::Tensor& mean, const at::Tensor& dy_mean, const at::Tensor& a,
                      const at::Tensor& b, at::Tensor& grad_input) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "apply_grad_input", [&] {
    map_channels<2, 4>(std::array<const scalar_t*, 2>{grad_output.const_data_ptr<scalar_t>(),
                                                      input.const_data_ptr<scalar_t>()},
                       {stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(dy_mean),
                        stat_ptr<scalar_t>(a), stat_ptr<scalar_t>(b)},
                       plan, kGradInput, grad_input.mutable_data_ptr<scalar_t>());
  });
}

void apply_grad_input_activation(const at::Tensor& grad_output, const at::Tensor& output,
                                 const at::Tensor& input, const CpuPlan& plan,
                                 const at::Tensor& mean, const at::Tensor& dy_mean,
                                 const at::Tensor& a, const at::Tensor& b, const at::Tensor& alpha,
                                 const at::Tensor& bias, const Activation& act,
                                 at::Tensor& grad_input) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "apply_grad_input_activation", [&] {
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const std::array<const opmath_t<scalar_t>*, 4> k{stat_ptr<scalar_t>(mean),
                                                     stat_ptr<scalar_t>(dy_mean),
                                                     stat_ptr<scalar_t>(a), stat_ptr<scalar_t>(b)};
    const auto f = in_opmath<scalar_t>(act);
    scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
    if (act.smooth()) {
      map_channels<2, 6>(
          std::array{dy, x},
          {k[0], k[1], k[2], k[3], stat_ptr<scalar_t>(alpha), stat_ptr<scalar_t>(bias)}, plan,
          smooth_activation_grad_input(f), out);
    } else {
      map_channels<3, 4>(std::array{dy, output.const_data_ptr<scalar_t>(), x}, k, plan,
                         activation_grad_input(f), out);
    }
  });
}

double values_in_channel(const CpuPlan& plan) {
  return static_cast<double>(plan.view.outer * plan.view.inner);
}

void normalize_training(const at::Tensor& input, const at::Tensor& residual, const CpuPlan& plan,
                        const at::Tensor& weight, const at::Tensor& bias, double eps,
                        const std::optional<Activation>& act, at::Tensor& mean, at::Tensor& m2,
                        at::Tensor& invstd, at::Tensor& output) {
  if (plan.channel_at_a_time) {  // never with a residual (work_of)
    CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "normalize_channel_at_a_time", [&] {
      CPU_CAPABILITY::normalize_channel_at_a_time(
          input.const_data_ptr<scalar_t>(), plan, stat_ptr<scalar_t>(weight),
          stat_ptr<scalar_t>(bias), eps,
          act ? std::optional(in_opmath<scalar_t>(*act)) : std::nullopt,
          mutable_stat_ptr<scalar_t>(mean), mutable_stat_ptr<scalar_t>(m2),
          mutable_stat_ptr<scalar_t>(invstd), output.mutable_data_ptr<scalar_t>());
    });
    return;
  }
  collect_stats(input, plan, mean, m2);
  fill_invstd_from_m2(m2, values_in_channel(plan), eps, invstd);
  const auto [alpha, shift] = affine_coefficients(invstd, weight, bias);
  if (act) {
    apply_affine_activation(input, residual, plan, mean, alpha, shift, *act, output);
  } else {
    apply_affine(input, plan, mean, alpha, shift, output);
  }
}

// Training's sums and input gradient a channel at a time; alpha and bias are read for a
// smooth activation only.
void grad_input_channel_at_a_time(const at::Tensor& grad_output, const at::Tensor& act_output,
                                  const Activation& act, const at::Tensor& input,
                                  const CpuPlan& plan, const at::Tensor& mean,
                                  const at::Tensor& invstd, const at::Tensor& weight,
                                  const at::Tensor& alpha, const at::Tensor& bias,
                                  at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                                  at::Tensor& grad_input) {
  CUSTOM_BN_DISPATCH_INPUT_TYPES(input, "grad_input_channel_at_a_time", [&] {
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const auto run = [&](auto smooth, const auto& in, const auto& reduce_terms,
                         const auto& grad_input_of) {
      constexpr int kInputs = std::tuple_size_v<std::decay_t<decltype(in)>>;
      CPU_CAPABILITY::grad_input_channel_at_a_time<kInputs, decltype(smooth)::value>(
          in, plan, stat_ptr<scalar_t>(mean), stat_ptr<scalar_t>(invstd),
          stat_ptr<scalar_t>(weight), mutable_stat_ptr<scalar_t>(sum_dy),
          mutable_stat_ptr<scalar_t>(sum_dy_xmu), reduce_terms, grad_input_of,
          grad_input.mutable_data_ptr<scalar_t>(),
          decltype(smooth)::value ? stat_ptr<scalar_t>(alpha) : nullptr,
          decltype(smooth)::value ? stat_ptr<scalar_t>(bias) : nullptr);
    };
    const auto f = in_opmath<scalar_t>(act);
    if (act.smooth()) {
      run(std::true_type{}, std::array{dy, x}, smooth_activation_grad_sums(f),
          smooth_activation_grad_input(f));
    } else if (act_output.defined()) {
      run(std::false_type{}, std::array{dy, act_output.const_data_ptr<scalar_t>(), x},
          activation_grad_sums(f), activation_grad_input(f));
    } else {
      run(std::false_type{}, std::array{dy, x}, kGradSums, kGradInput);
    }
  });
}

void backward(const at::Tensor& grad_output, const at::Tensor& act_output, const Activation& act,
              const at::Tensor& input, const CpuPlan& plan, bool training, const at::Tensor& mean,
              const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
              at::Tensor& sum_dy, at::Tensor& sum_dy_xmu, at::Tensor& grad_masked,
              at::Tensor& grad_input) {
  // A smooth activation's pre-activation, with the forward's coefficients.
  const auto [alpha, shift] = act.smooth() ? affine_coefficients(invstd, weight, bias)
                                           : std::pair<at::Tensor, at::Tensor>();
  // The plan goes a channel at a time only in training with no residual (work_of).
  if (plan.channel_at_a_time && grad_input.defined()) {
    grad_input_channel_at_a_time(grad_output, act_output, act, input, plan, mean, invstd, weight,
                                 alpha, shift, sum_dy, sum_dy_xmu, grad_input);
    return;
  }
  if (sum_dy.defined()) {
    if (act_output.defined()) {
      reduce_grad_activation(grad_output, act_output, input, plan, mean, alpha, shift, act, sum_dy,
                             sum_dy_xmu, grad_masked);
    } else {
      reduce_grad(grad_output, input, plan, mean, sum_dy, sum_dy_xmu);
    }
  }
  if (!grad_input.defined()) return;
  const GradInputCoefficientTensors k = grad_input_coefficients(
      training, invstd, weight, sum_dy, sum_dy_xmu, values_in_channel(plan));
  if (act_output.defined() && !grad_masked.defined()) {
    apply_grad_input_activation(grad_output, act_output, input, plan, mean, k.dy_mean, k.a, k.b,
                                alpha, shift, act, grad_input);
  } else {
    // With dz at hand (the residual's gradient), the pass reads (dz, x).
    apply_grad_input(grad_masked.defined() ? grad_masked : grad_output, input, plan, mean,
                     k.dy_mean, k.a, k.b, grad_input);
  }
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table{kVectorBytes,
                                 collect_stats,
                                 apply_affine,
                                 apply_affine_activation,
                                 activate_elements,
                                 reduce_grad_activation_elements,
                                 apply_grad_input_elements,
                                 reduce_grad,
                                 reduce_grad_activation,
                                 apply_grad_input,
                                 apply_grad_input_activation,
                                 normalize_training,
                                 backward};
  return table;
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
