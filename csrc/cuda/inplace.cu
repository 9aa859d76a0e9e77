// The CUDA steps of in-place activated batch norm (csrc/inplace.h): the kernels of
// csrc/cuda/kernels/inplace.cuh over an input that is channels-first or channels-last dense and
// shares its element offsets with the output and the residual (the layouts models train in);
// any other layout takes the generic steps, which keep the same values in the same order. The
// stage ops around them (statistics, output, gradients) are the CUDA backend's own.
#include "cuda/kernels/inplace.cuh"
#include "inplace.h"
#include "layout.h"
#include "optional_tensor.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace custom_bn::cuda {
namespace {

constexpr int kInplaceThreads = 256;
// Elements per block: 16 consecutive values per thread.
constexpr int64_t kInplaceChunk = int64_t{kInplaceThreads} * 16;

template <typename T>
__global__ void count_kept_kernel(kernels::KeepRule<T> rule, ChannelView view, int64_t numel,
                                  const T* output, const T* residual, int64_t* chunk_counts) {
  kernels::count_kept(rule, view, numel, kInplaceChunk, output, residual, chunk_counts);
}

template <typename T>
__global__ void gather_kept_kernel(kernels::KeepRule<T> rule, ChannelView view, int64_t numel,
                                   T* input, const T* output, const T* residual,
                                   const int64_t* chunk_starts, T* kept_input) {
  kernels::gather_kept(rule, view, numel, kInplaceChunk, input, output, residual, chunk_starts,
                       kept_input);
}

template <typename T>
__global__ void recover_kernel(kernels::KeepRule<T> rule, kernels::Recovery<T> recovery,
                               ChannelView view, int64_t numel, const T* output, const T* residual,
                               const int64_t* chunk_starts, const T* kept_input, T* x_hat) {
  kernels::recover_normalized(rule, recovery, view, numel, kInplaceChunk, output, residual,
                              chunk_starts, kept_input, x_hat);
}

// The view the kernels walk `input` by, when the output and residual share its offsets.
std::optional<ChannelView> walkable(const at::Tensor& input, const at::Tensor& output,
                                    const std::optional<at::Tensor>& residual) {
  if (keeps_every_value(input.scalar_type())) return std::nullopt;
  if (!same_offsets(output, input) || (has(residual) && !same_offsets(*residual, input))) {
    return std::nullopt;
  }
  return channel_view_of(input);
}

template <typename T>
kernels::KeepRule<T> keep_rule(const Activation& act, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, bool residual) {
  const T infinity = std::numeric_limits<T>::infinity();
  return {act.slope == 0.0 ? static_cast<T>(act.lower) : -infinity,
          std::isnan(act.upper) ? infinity : static_cast<T>(act.upper),
          static_cast<T>(kRecoveryMargin),
          has(weight) ? weight->data_ptr<T>() : nullptr,
          has(bias) ? bias->data_ptr<T>() : nullptr,
          residual};
}

int64_t chunks_of(int64_t numel) { return (numel + kInplaceChunk - 1) / kInplaceChunk; }

// Each chunk's first index in kept_input, and the kept total (one sync, as masked_select's).
template <typename T>
std::pair<at::Tensor, int64_t> chunk_starts(const kernels::KeepRule<T>& rule,
                                            const ChannelView& view, const at::Tensor& output,
                                            const std::optional<at::Tensor>& residual) {
  const int64_t numel = output.numel(), chunks = chunks_of(numel);
  at::Tensor counts = at::empty({chunks}, output.options().dtype(at::kLong));
  count_kept_kernel<T><<<chunks, kInplaceThreads, kInplaceThreads * sizeof(int64_t),
                         at::cuda::getCurrentCUDAStream()>>>(
      rule, view, numel, output.const_data_ptr<T>(),
      has(residual) ? residual->const_data_ptr<T>() : nullptr, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor ends = counts.cumsum(0);
  return {ends.sub(counts), ends.select(0, chunks - 1).item<int64_t>()};
}

at::Tensor write_output_keeping_input(at::Tensor& input, const at::Tensor& output,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual,
                                      const Activation& act) {
  const std::optional<ChannelView> view = walkable(input, output, residual);
  if (!view || input.numel() == 0) {
    return kGenericInplaceSteps.write_output_keeping_input(input, output, weight, bias, residual,
                                                           act);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor kept_input;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_forward_", [&] {
    const auto rule = keep_rule<scalar_t>(act, weight, bias, has(residual));
    const auto [starts, total] = chunk_starts(rule, *view, output, residual);
    kept_input = at::empty({total}, input.options());
    gather_kept_kernel<scalar_t>
        <<<chunks_of(input.numel()), kInplaceThreads, kInplaceThreads * sizeof(int64_t),
           at::cuda::getCurrentCUDAStream()>>>(
            rule, *view, input.numel(), input.data_ptr<scalar_t>(),
            output.const_data_ptr<scalar_t>(),
            has(residual) ? residual->const_data_ptr<scalar_t>() : nullptr,
            starts.const_data_ptr<int64_t>(), kept_input.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return kept_input;
}

at::Tensor normalized_input(const char* op, const at::Tensor& output, const at::Tensor& kept_input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                            const at::Tensor& invstd, const Activation& act) {
  const std::optional<ChannelView> view = walkable(output, output, residual);
  if (!view || output.numel() == 0) {
    return kGenericInplaceSteps.normalized_input(op, output, kept_input, weight, bias, residual,
                                                 mean, invstd, act);
  }
  const c10::cuda::CUDAGuard guard(output.device());
  const at::Tensor x_hat = at::empty_like(output);
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "normalized_input", [&] {
    const auto rule = keep_rule<scalar_t>(act, weight, bias, has(residual));
    const auto [starts, total] = chunk_starts(rule, *view, output, residual);
    check_kept_count(op, total, kept_input);
    const at::Tensor mean_values = mean.contiguous(), invstd_values = invstd.contiguous();
    const kernels::Recovery<scalar_t> recovery{static_cast<scalar_t>(act.lower),
                                               static_cast<scalar_t>(act.slope),
                                               has(weight) ? weight->data_ptr<scalar_t>() : nullptr,
                                               has(bias) ? bias->data_ptr<scalar_t>() : nullptr,
                                               mean_values.const_data_ptr<scalar_t>(),
                                               invstd_values.const_data_ptr<scalar_t>()};
    recover_kernel<scalar_t>
        <<<chunks_of(output.numel()), kInplaceThreads, kInplaceThreads * sizeof(int64_t),
           at::cuda::getCurrentCUDAStream()>>>(
            rule, recovery, *view, output.numel(), output.const_data_ptr<scalar_t>(),
            has(residual) ? residual->const_data_ptr<scalar_t>() : nullptr,
            starts.const_data_ptr<int64_t>(), kept_input.const_data_ptr<scalar_t>(),
            x_hat.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return x_hat;
}

}  // namespace

// Outside the anonymous namespace: a template argument must have linkage.
extern const InplaceSteps kCudaInplaceSteps;
const InplaceSteps kCudaInplaceSteps{write_output_keeping_input, normalized_input};

TORCH_LIBRARY_IMPL(custom_bn, CUDA, m) { CUSTOM_BN_REGISTER_INPLACE_OPS(m, kCudaInplaceSteps); }

}  // namespace custom_bn::cuda
