// The CPU kernels behind the ops, as a table of functions. csrc/cpu/kernels.cpp is compiled
// once per instruction set (baseline, AVX2+FMA, AVX-512); kernels() returns the table of the
// widest the running CPU supports (csrc/cpu/dispatch.cpp).
//
// Every tensor a kernel reads or writes, but the per-channel ones, is laid out as plan.view
// says; per-channel tensors (mean, alpha, ...) are contiguous, in the statistics dtype. Each
// kernel follows the plan (csrc/cpu/plan.h) and decides nothing itself.
#pragma once

#include "activation.h"
#include "cpu/plan.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace custom_bn::cpu {

struct KernelTable {
  // Bytes of this variant's vectors (at::vec::Vectorized of every dtype): what plan_call
  // needs to know of the instruction set.
  int64_t vector_bytes;
  // mean = sum(x) / n, m2 = sum((x - mean)^2) (csrc/cpu/stats.h).
  void (*collect_stats)(const at::Tensor& input, const CpuPlan& plan, at::Tensor& mean,
                        at::Tensor& m2);
  // output = (input - mean) * alpha + bias.
  void (*apply_affine)(const at::Tensor& input, const CpuPlan& plan, const at::Tensor& mean,
                       const at::Tensor& alpha, const at::Tensor& bias, at::Tensor& output);
  // output = act((input - mean) * alpha + bias + residual); residual may be undefined.
  void (*apply_affine_activation)(const at::Tensor& input, const at::Tensor& residual,
                                  const CpuPlan& plan, const at::Tensor& mean,
                                  const at::Tensor& alpha, const at::Tensor& bias,
                                  const Activation& act, at::Tensor& output);
  // apply_affine_activation's values at the elements [begin, end) of a dense input in memory
  // order, into out[0, end - begin) (of the input's dtype): the chunks of the in-place forward
  // (csrc/cpu/inplace.cpp), bitwise the values the fused op writes.
  void (*activate_elements)(const at::Tensor& input, const at::Tensor& residual, int64_t begin,
                            int64_t end, const at::Tensor& mean, const at::Tensor& alpha,
                            const at::Tensor& bias, const Activation& act, void* out);
  // The in-place backward's chunks (csrc/cpu/inplace_backward.cpp): elements [begin, end) of a
  // dense output in memory order, with x (the input, recovered) at x[0, end - begin) in the
  // output's dtype. Adds sum(dz) and sum(dz * (x - mean)), dz = activation_grad(grad_output,
  // output), to totals[c] and totals[C + c] (float sums flushed into double, as
  // reduce_grad_activation's); also writes dz, rounded to the dtype, to dz[0, end - begin) unless
  // dz is null. Piecewise-linear activations only.
  void (*reduce_grad_activation_elements)(const at::Tensor& grad_output, const at::Tensor& output,
                                          const void* x, int64_t begin, int64_t end,
                                          const at::Tensor& mean, const Activation& act,
                                          double* totals, void* dz);
  // apply_grad_input_activation over the same chunk, into grad_input[0, end - begin); with dz
  // given (non-null, as the sums wrote it), apply_grad_input's a * (dz - dy_mean) + b * (x - mean).
  void (*apply_grad_input_elements)(const at::Tensor& grad_output, const at::Tensor& output,
                                    const void* dz, const void* x, int64_t begin, int64_t end,
                                    const at::Tensor& mean, const at::Tensor& dy_mean,
                                    const at::Tensor& a, const at::Tensor& b, const Activation& act,
                                    void* grad_input);
  // sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)).
  void (*reduce_grad)(const at::Tensor& grad_output, const at::Tensor& input, const CpuPlan& plan,
                      const at::Tensor& mean, at::Tensor& sum_dy, at::Tensor& sum_dy_xmu);
  // The same sums of dz = activation_grad(dy, output) (the activation's backward fused into
  // the reduction pass); dz is also written to grad_masked unless it is undefined. A smooth
  // activation's dz is activation_grad_at(dy, (x - mean) * alpha + bias) instead, always
  // written when grad_masked is defined; alpha and bias are read only then.
  void (*reduce_grad_activation)(const at::Tensor& grad_output, const at::Tensor& output,
                                 const at::Tensor& input, const CpuPlan& plan,
                                 const at::Tensor& mean, const at::Tensor& alpha,
                                 const at::Tensor& bias, const Activation& act, at::Tensor& sum_dy,
                                 at::Tensor& sum_dy_xmu, at::Tensor& grad_masked);
  // grad_input = a * (dy - dy_mean) + b * (x - mean).
  void (*apply_grad_input)(const at::Tensor& grad_output, const at::Tensor& input,
                           const CpuPlan& plan, const at::Tensor& mean, const at::Tensor& dy_mean,
                           const at::Tensor& a, const at::Tensor& b, at::Tensor& grad_input);
  // The same with dy = activation_grad(grad_output, output), or for a smooth activation
  // activation_grad_at(grad_output, (input - mean) * alpha + bias) (output then unread).
  void (*apply_grad_input_activation)(const at::Tensor& grad_output, const at::Tensor& output,
                                      const at::Tensor& input, const CpuPlan& plan,
                                      const at::Tensor& mean, const at::Tensor& dy_mean,
                                      const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& alpha, const at::Tensor& bias,
                                      const Activation& act, at::Tensor& grad_input);

  // The passes of an op, scheduled as the plan says: with plan.channel_at_a_time, a channel
  // at a time (csrc/cpu/channel_at_a_time.h), else each pass over the whole tensor, through
  // the entries above. Same results either way, bitwise. For a non-empty input; weight and
  // bias are given; mean, m2, invstd and the sums are (C,) tensors they fill.
  //
  // Training's forward: mean and m2, then invstd = 1 / sqrt(m2 / n + eps) and
  // alpha = invstd * weight, then apply_affine (with an activation: apply_affine_activation)
  // into output.
  void (*normalize_training)(const at::Tensor& input, const at::Tensor& residual,
                             const CpuPlan& plan, const at::Tensor& weight, const at::Tensor& bias,
                             double eps, const std::optional<Activation>& act, at::Tensor& mean,
                             at::Tensor& m2, at::Tensor& invstd, at::Tensor& output);
  // A backward, of dz = grad_output or, with act_output defined, activation_grad(grad_output,
  // act_output): the sums of dz (when sum_dy is defined; then dz also into grad_masked, when
  // defined), then the input gradient (when grad_input is defined): training's from the sums
  // (or from grad_masked when defined), eval's from invstd alone. A smooth activation's dz
  // is recomputed in each pass from (dy, x) and bias (bias unread otherwise).
  void (*backward)(const at::Tensor& grad_output, const at::Tensor& act_output,
                   const Activation& act, const at::Tensor& input, const CpuPlan& plan,
                   bool training, const at::Tensor& mean, const at::Tensor& invstd,
                   const at::Tensor& weight, const at::Tensor& bias, at::Tensor& sum_dy,
                   at::Tensor& sum_dy_xmu, at::Tensor& grad_masked, at::Tensor& grad_input);
};

const KernelTable& kernels();

// "avx512", "avx2" or "default": the variant kernels() returns (CUSTOM_BN_CPU_CAPABILITY may
// ask for a narrower one than the CPU supports).
const char* kernel_capability();

namespace DEFAULT {
const KernelTable& kernel_table();
}
#if defined(CUSTOM_BN_HAVE_X86_KERNELS)
namespace AVX2 {
const KernelTable& kernel_table();
}
namespace AVX512 {
const KernelTable& kernel_table();
}
#endif

}  // namespace custom_bn::cpu
