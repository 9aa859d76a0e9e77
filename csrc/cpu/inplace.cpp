// The CPU steps of in-place activated batch norm (csrc/inplace.h): each walks memory in chunks,
// in parallel, once to count the kept positions of each chunk and once to write, over an input
// that is dense and shares its strides with the output and the residual (the layouts models
// train in: contiguous, channels_last). Any other layout takes the generic steps, which keep
// the same values in the same order.
//
// Memory is walked in runs of one channel (contiguous: a plane) or in rows of every channel
// (channels_last), so that the per-channel values are constants or arrays of the loops
// (csrc/cpu/inplace_loops.h). Training's forward has no output tensor: it computes each chunk's
// output as it goes (training_forward). The backward, with no x_hat tensor, is
// csrc/cpu/inplace_backward.cpp; normalized_input here is the stage op's x_hat.
#include "inplace.h"
#include "channel_stats.h"
#include "cpu/channel_math.h"
#include "cpu/inplace_chunks.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "op_params.h"
#include "optional_tensor.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <custom_bn/ops.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace custom_bn::cpu {
namespace {

// Writes each chunk's output values over x, gathering the kept input values into kept_input.
template <typename scalar_t, typename OutputOf>
at::Tensor gather_over_input(const KeepRule<scalar_t>& rule, const ChunkWalk& walk,
                             const OutputOf& output_of, at::Tensor& input, const scalar_t* r) {
  const std::vector<int64_t> offsets = kept_offsets(rule, walk, output_of, r);
  at::Tensor kept_input = at::empty({offsets.back()}, input.options());
  scalar_t* kept = kept_input.data_ptr<scalar_t>();
  scalar_t* x = input.data_ptr<scalar_t>();
  at::parallel_for(0, walk.chunks(), 1, [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      const scalar_t* y = output_of(index);
      const int64_t begin = walk.begin(index);
      int64_t next = offsets[index];
      walk.chunk(index, [&](int64_t i0, int64_t i1, int64_t c) {
        next = gather_kept(rule, x, y + (i0 - begin), r, kept, next, offsets[index + 1], i0, i1, c,
                           walk.channels);
      });
    }
  });
  return kept_input;
}

at::Tensor write_output_keeping_input(at::Tensor& input, const at::Tensor& output,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual,
                                      const Activation& act) {
  if (!walks_memory(input, output, residual) || keeps_every_value(input.scalar_type())) {
    return kGenericInplaceSteps.write_output_keeping_input(input, output, weight, bias, residual,
                                                           act);
  }
  at::Tensor kept_input;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_forward_", [&] {
    const ChunkWalk walk(input);
    const KeepRule<scalar_t> rule(act, weight, bias, has(residual), walk.channels);
    const scalar_t* r = has(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
    kept_input = gather_over_input(
        rule, walk, output_tensor_values(walk, output.const_data_ptr<scalar_t>()), input, r);
  });
  return kept_input;
}

// Training's forward with no output tensor: the statistics by batch_norm_stats' kernels and
// the fused op's per-channel math, then each chunk's output computed by the fused op's own
// kernel into a scratch that stays in cache, once to count the kept values and once to write
// them and the output: three reads of the input and one write. The two steps instead write an
// output-sized tensor, read it to count and read it again with the input to write.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> training_forward(
    at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& residual,
    std::optional<double> momentum, double eps, const Activation& act) {
  if (input.numel() == 0 || !walks_memory(input, input, residual)) return std::nullopt;
  const auto [count, mean, m2] = custom_bn::batch_norm_stats(input);
  const int64_t channels = input.size(1);
  const double values = static_cast<double>(values_per_channel(input));
  const at::TensorOptions options = stat_options(input);
  const at::Tensor invstd = invstd_from_m2(m2, values, eps);
  const auto [alpha, shift] =
      affine_coefficients(invstd, channel_param(weight, channels, options, 1.0),
                          channel_param(bias, channels, options, 0.0));
  const at::Tensor r = has(residual) ? *residual : at::Tensor();
  at::Tensor kept_input;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_forward_", [&] {
    const ChunkWalk walk(input);
    const KeepRule<scalar_t> rule(act, weight, bias, has(residual), walk.channels);
    const auto computed = [&](int64_t index) {
      scalar_t* chunk = thread_scratch<scalar_t>(kChunk);
      kernels().activate_elements(input, r, walk.begin(index), walk.end(index), mean, alpha, shift,
                                  act, chunk);
      return static_cast<const scalar_t*>(chunk);
    };
    kept_input = gather_over_input(rule, walk, computed, input,
                                   r.defined() ? r.const_data_ptr<scalar_t>() : nullptr);
  });
  update_running_stats(mean, m2, values, running_mean, running_var, num_batches_tracked, momentum);
  return std::tuple{mean, invstd, kept_input};
}

at::Tensor normalized_input(const char* op, const at::Tensor& output, const at::Tensor& kept_input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                            const at::Tensor& invstd, const Activation& act) {
  // Low precision keeps every input value and does not come here (keeps_every_value).
  if (!walks_memory(output, output, residual) || keeps_every_value(output.scalar_type())) {
    return kGenericInplaceSteps.normalized_input(op, output, kept_input, weight, bias, residual,
                                                 mean, invstd, act);
  }
  const at::Tensor x_hat = at::empty_like(output);
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "normalized_input", [&] {
    const ChunkWalk walk(output);
    const ChunkRecovery<scalar_t> recovery(op, walk, output, kept_input, weight, bias, residual,
                                           mean, invstd, act);
    scalar_t* out = x_hat.data_ptr<scalar_t>();
    at::parallel_for(0, walk.chunks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t index = first; index < last; ++index) {
        recovery.chunk(index, out + walk.begin(index));
      }
    });
  });
  return x_hat;
}

}  // namespace

// Outside the anonymous namespace: a template argument must have linkage.
extern const InplaceSteps kCpuInplaceSteps;
const InplaceSteps kCpuInplaceSteps{write_output_keeping_input, normalized_input, training_forward,
                                    inplace_backward};

TORCH_LIBRARY_IMPL(custom_bn, CPU, m) { CUSTOM_BN_REGISTER_INPLACE_OPS(m, kCpuInplaceSteps); }

}  // namespace custom_bn::cpu
