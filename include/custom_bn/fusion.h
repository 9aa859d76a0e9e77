// fuse_batchnorm_relu for LibTorch: BatchNorm2d then ReLU (or ReLU6, Hardtanh, LeakyReLU, SiLU,
// GELU) in a torch::nn::Sequential becomes one custom_bn::BatchNormReLU2d, as
// custom_bn.fuse_batchnorm_relu does for Python models.
#pragma once

#include <torch/nn/modules/container/sequential.h>

namespace custom_bn {

/// An equivalent Sequential in which every BatchNorm2d (torch::nn's or ours) directly followed
/// by an activation the fused op applies (torch::nn::ReLU, ReLU6, Hardtanh, LeakyReLU with a
/// slope >= 0, SiLU, GELU without approximation) is one BatchNormReLU2d with that activation over
/// the very same parameters (and buffers that share their storage), in the batch norm's training
/// mode. The activation's slot holds a torch::nn::Identity, so children keep their names and the
/// state_dict its keys. Other modules are shared with `sequential`, which is left as it was
/// (LibTorch's Sequential cannot hold a Sequential, so there is no nesting to follow). With nothing
/// to fuse, returns `sequential` itself.
torch::nn::Sequential fuse_batchnorm_relu(const torch::nn::Sequential& sequential);

}  // namespace custom_bn
