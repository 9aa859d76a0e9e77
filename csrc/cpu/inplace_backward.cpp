// The CPU backward of in-place activated batch norm (csrc/inplace.h's InplaceSteps::backward),
// with no x_hat tensor: x_hat is recovered from the output and the kept input values a piece
// at a time, into a scratch that stays in cache, and used there. The two steps it replaces
// (normalized_input, then the fused backward) write x_hat, an output-sized tensor in memory the
// allocator may have to fault in, and read it twice; they still run where this returns nullopt
// (layouts it does not walk, channels-first runs shorter than kMinRun).
//
// Both ways first count the kept values before each piece (a read of the output):
// - A channel at a time (channels-first, where a channel's output, gradient and x_hat fit in
//   L2, as the fused backward goes): a channel's x_hat recovered once, its sums, then its input
//   gradient from cache. One more read of memory than the fused backward's: the kept values.
// - In chunks of memory otherwise: the sums of dz and dz * x_hat, then the input gradient, each
//   recovering the chunk's x_hat.
// The sums of each channel are added in an order fixed by the shape, so that the gradients are
// bitwise the same for any number of threads.
#include "batch_norm_math.h"
#include "channel_stats.h"
#include "cpu/cache_sizes.h"
#include "cpu/channel_math.h"
#include "cpu/inplace_chunks.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/result_cache.h"
#include "inplace.h"
#include "optional_tensor.h"

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/CPUAllocator.h>

#include <vector>

namespace custom_bn::cpu {
namespace {

// Per-chunk totals (chunks x [sum(dz) for each channel, sum(dz * x_hat) for each channel])
// added in chunk order into the two (C,) sums, in the statistics dtype.
std::pair<at::Tensor, at::Tensor> sums_in_chunk_order(const std::vector<double>& totals,
                                                      int64_t chunks, int64_t channels,
                                                      const at::TensorOptions& options) {
  at::Tensor sums = at::zeros({2, channels}, options.dtype(at::kDouble));
  double* sum = sums.data_ptr<double>();
  for (int64_t index = 0; index < chunks; ++index) {
    const double* chunk = totals.data() + index * 2 * channels;
    for (int64_t j = 0; j < 2 * channels; ++j) sum[j] += chunk[j];
  }
  // Two tensors that share no memory: both may be outputs of the op.
  return {sums[0].to(options.dtype(), /*non_blocking=*/false, /*copy=*/true),
          sums[1].to(options.dtype(), /*non_blocking=*/false, /*copy=*/true)};
}

// A fresh gradient with the output's strides, from the result cache where the fused backward's
// gradient of that size comes from it (csrc/cpu/result_cache.h).
at::Tensor empty_gradient(const at::Tensor& output) {
  c10::Allocator* allocator = result_cache().serves(output.nbytes())
                                  ? static_cast<c10::Allocator*>(&result_cache())
                                  : c10::GetCPUAllocator();
  return at::detail::empty_strided_generic(output.sizes(), output.strides(), allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           output.scalar_type());
}

// x_hat is the input normalized by mean 0 and invstd 1, with the weight scaled by invstd: the
// fused backward's coefficients with those.
GradInputCoefficientTensors coefficients(bool training, const std::optional<at::Tensor>& weight,
                                         const at::Tensor& invstd, const at::Tensor& sum_dz,
                                         const at::Tensor& sum_dz_x_hat, double count) {
  const at::Tensor scale = has(weight) ? weight->to(invstd.scalar_type()).mul(invstd) : invstd;
  return grad_input_coefficients(training, at::ones_like(invstd), scale, sum_dz, sum_dz_x_hat,
                                 count);
}

// What a way of going writes: the input gradient and dz (each when defined), the two sums
// (when wanted: the way allocates them).
struct Gradients {
  at::Tensor grad_input, grad_residual, sum_dz, sum_dz_x_hat;
};

// The backward in chunks of memory.
template <typename scalar_t>
void backward_in_chunks(const char* op, const at::Tensor& grad_output, const at::Tensor& output,
                        const at::Tensor& kept_input, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                        const at::Tensor& invstd, bool training, bool wants_sums,
                        const Activation& act, Gradients& out) {
  const int64_t channels = output.size(1);
  // x_hat's mean: every pass reads x_hat where the fused kernels read x and subtract the mean.
  const at::Tensor zeros = at::zeros({channels}, invstd.options());
  const ChunkWalk walk(output);
  const ChunkRecovery<scalar_t> recovery(op, walk, output, kept_input, weight, bias, residual, mean,
                                         invstd, act);
  const auto x_hat_of = [&](int64_t index) {
    scalar_t* x_hat = thread_scratch<scalar_t>(kChunk);
    recovery.chunk(index, x_hat);
    return static_cast<const scalar_t*>(x_hat);
  };
  const auto at_begin = [&](at::Tensor& t, int64_t index) {
    return t.defined() ? t.data_ptr<scalar_t>() + walk.begin(index) : nullptr;
  };
  // dz (the residual's gradient) comes out of the sums' pass, and the input gradient's pass
  // reads it back.
  if (wants_sums || out.grad_residual.defined()) {
    std::vector<double> totals(walk.chunks() * 2 * channels, 0.0);
    at::parallel_for(0, walk.chunks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t index = first; index < last; ++index) {
        kernels().reduce_grad_activation_elements(
            grad_output, output, x_hat_of(index), walk.begin(index), walk.end(index), zeros, act,
            totals.data() + index * 2 * channels, at_begin(out.grad_residual, index));
      }
    });
    std::tie(out.sum_dz, out.sum_dz_x_hat) =
        sums_in_chunk_order(totals, walk.chunks(), channels, invstd.options());
  }
  if (!out.grad_input.defined()) return;
  const GradInputCoefficientTensors k =
      coefficients(training, weight, invstd, out.sum_dz, out.sum_dz_x_hat,
                   static_cast<double>(values_per_channel(output)));
  at::parallel_for(0, walk.chunks(), 1, [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      kernels().apply_grad_input_elements(grad_output, output, at_begin(out.grad_residual, index),
                                          x_hat_of(index), walk.begin(index), walk.end(index),
                                          zeros, k.dy_mean, k.a, k.b, act,
                                          at_begin(out.grad_input, index));
    }
  });
}

// Channels-first runs shorter than this take the two steps instead (x_hat recovered into a
// tensor, then the fused backward), measured faster there (docs/perf.md row 58): the recovery
// goes one call per run, which each pass here would repeat, and the fused backward's items
// take many short runs at once.
constexpr int64_t kMinRun = 64;

// The values of a channel's runs in a dense output: the channel dim's stride, 0 for one channel.
int64_t channel_run(const at::Tensor& output) { return output.size(1) > 1 ? output.stride(1) : 0; }

bool has_short_runs(const at::Tensor& output) {
  const int64_t run = channel_run(output);
  return run > 1 && run < kMinRun;
}

// Whether training's backward goes a channel at a time: channels-first runs, no residual, and a
// channel's output, gradient and x_hat within L2.
bool goes_channel_at_a_time(const at::Tensor& output, const std::optional<at::Tensor>& residual,
                            bool training, std::array<bool, 4> output_mask) {
  const int64_t values = output.size(0) * output.stride(0) / std::max<int64_t>(1, output.size(1));
  const int64_t run = channel_run(output);
  return training && output_mask[0] && !output_mask[3] && !has(residual) && run >= kMinRun &&
         output.stride(0) == output.size(1) * run &&
         3 * values * output.element_size() <= cache_bytes(2);
}

// The backward a channel at a time: the runs' kept counts, then for each channel its x_hat
// recovered into a scratch, its sums, and its input gradient reading the channel again from
// cache.
template <typename scalar_t>
void backward_a_channel_at_a_time(const char* op, const at::Tensor& grad_output,
                                  const at::Tensor& output, const at::Tensor& kept_input,
                                  const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                  const at::Tensor& invstd, const Activation& act, Gradients& out) {
  const int64_t channels = output.size(1), run = output.stride(1);
  const int64_t runs = output.numel() / run, per_channel = runs / channels * run;
  const at::TensorOptions options = invstd.options();
  const at::Tensor zeros = at::zeros({channels}, options);
  const KeepRule<scalar_t> rule(act, weight, bias, false, channels);
  const RecoveryParams<scalar_t> params(weight, bias, mean, invstd, act, channels);
  const scalar_t* y = output.const_data_ptr<scalar_t>();
  const scalar_t* no_residual = nullptr;
  // The kept values before each (n, c) run: memory order is run order.
  std::vector<int64_t> offsets(runs + 1, 0);
  at::parallel_for(0, runs, std::max<int64_t>(1, kChunk / run), [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      offsets[j + 1] = kept_count(rule, y + j * run, no_residual, j * run, (j + 1) * run,
                                  j % channels, channels);
    }
  });
  for (int64_t j = 0; j < runs; ++j) offsets[j + 1] += offsets[j];
  check_kept_count(op, offsets.back(), kept_input);
  const scalar_t no_value = scalar_t(0);
  const scalar_t* kept = kept_input.numel() > 0 ? kept_input.const_data_ptr<scalar_t>() : &no_value;
  const int64_t last_kept = std::max<int64_t>(kept_input.numel() - 1, 0);

  out.sum_dz = at::empty({channels}, options);
  out.sum_dz_x_hat = at::empty({channels}, options);
  // The coefficients of each channel, filled by the thread that then reads them. (Float and
  // double only come here: scalar_t is the statistics dtype.)
  const at::Tensor scale = has(weight) ? weight->to(options.dtype()).mul(invstd) : invstd;
  const at::Tensor dy_mean = at::empty({channels}, options), a = at::empty({channels}, options),
                   b = at::empty({channels}, options);
  scalar_t* grad_input = out.grad_input.data_ptr<scalar_t>();
  const auto count = static_cast<scalar_t>(per_channel);
  const int64_t grain = std::max<int64_t>(1, kChunk / per_channel);
  at::parallel_for(0, channels, grain, [&](int64_t first, int64_t last) {
    scalar_t* const x_hat = thread_scratch<scalar_t>(per_channel);
    std::vector<double> totals(2 * channels);  // the element kernels add to [c] and [C + c]
    for (int64_t c = first; c < last; ++c) {
      totals[c] = totals[channels + c] = 0.0;
      for (int64_t j = c, n = 0; j < runs; j += channels, ++n) {
        scalar_t* x = x_hat + n * run;
        recover(rule, y, no_residual, kept, last_kept, offsets[j], j * run, (j + 1) * run, c,
                params, x);
        kernels().reduce_grad_activation_elements(grad_output, output, x, j * run, (j + 1) * run,
                                                  zeros, act, totals.data(), nullptr);
      }
      const scalar_t sum_dz = static_cast<scalar_t>(totals[c]);
      const scalar_t sum_dz_x_hat = static_cast<scalar_t>(totals[channels + c]);
      out.sum_dz.data_ptr<scalar_t>()[c] = sum_dz;
      out.sum_dz_x_hat.data_ptr<scalar_t>()[c] = sum_dz_x_hat;
      const GradInputCoefficients<scalar_t> k = grad_input_coefficients_training(
          scalar_t(1), scale.const_data_ptr<scalar_t>()[c], sum_dz, sum_dz_x_hat, count);
      dy_mean.data_ptr<scalar_t>()[c] = k.dy_mean;
      a.data_ptr<scalar_t>()[c] = k.a;
      b.data_ptr<scalar_t>()[c] = k.b;
      for (int64_t j = c, n = 0; j < runs; j += channels, ++n) {
        kernels().apply_grad_input_elements(grad_output, output, nullptr, x_hat + n * run, j * run,
                                            (j + 1) * run, zeros, dy_mean, a, b, act,
                                            grad_input + j * run);
      }
    }
  });
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> inplace_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output,
    const at::Tensor& kept_input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const at::Tensor& mean, const at::Tensor& invstd, bool training,
    std::array<bool, 4> output_mask, const Activation& act) {
  if (output.numel() == 0 || keeps_every_value(output.scalar_type()) ||
      !walks_memory(output, grad_output, residual) || has_short_runs(output)) {
    return std::nullopt;
  }
  Gradients out{output_mask[0] ? empty_gradient(output) : at::Tensor(),
                output_mask[3] ? empty_gradient(output) : at::Tensor(), at::Tensor(), at::Tensor()};
  const bool wants_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]);
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "batch_norm_relu_inplace_backward", [&] {
    if (goes_channel_at_a_time(output, residual, training, output_mask)) {
      backward_a_channel_at_a_time<scalar_t>(op, grad_output, output, kept_input, weight, bias,
                                             mean, invstd, act, out);
    } else {
      backward_in_chunks<scalar_t>(op, grad_output, output, kept_input, weight, bias, residual,
                                   mean, invstd, training, wants_sums, act, out);
    }
  });
  // grad_weight = sum(dz * x_hat) whatever the weight; the gradients in the forward's dtypes.
  const at::ScalarType param_dtype = has(weight) ? weight->scalar_type() : output.scalar_type();
  return std::tuple{out.grad_input,
                    has(weight) && output_mask[1] ? out.sum_dz_x_hat.to(param_dtype) : at::Tensor(),
                    output_mask[2] ? out.sum_dz.to(param_dtype) : at::Tensor(), out.grad_residual};
}

}  // namespace custom_bn::cpu
