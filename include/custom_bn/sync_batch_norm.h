// custom_bn::SyncBatchNorm for LibTorch programs: batch statistics over every rank of a
// c10d::ProcessGroup (gloo on CPU, NCCL on GPUs), on the custom_bn stage ops. One all-gather
// of (count, mean, M2) forward, one all-reduce of (sum_dy, sum_dy_xmu) backward; weight and
// bias gradients stay local, as in torch.nn.SyncBatchNorm.
#pragma once

#include <custom_bn/nn.h>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace custom_bn {

class SyncBatchNormImpl : public BatchNormImplBase<0, SyncBatchNormImpl> {
 public:
  /// Without a process group (or with one rank, or in eval) it is the local op.
  explicit SyncBatchNormImpl(const BatchNormOptions& options,
                             c10::intrusive_ptr<c10d::ProcessGroup> process_group = {});

  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;

  c10::intrusive_ptr<c10d::ProcessGroup> process_group;

 protected:
  void check_input_dim(const torch::Tensor& input) const override;
};
TORCH_MODULE(SyncBatchNorm);

extern template class BatchNormImplBase<0, SyncBatchNormImpl>;

}  // namespace custom_bn
