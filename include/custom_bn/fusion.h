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
///
/// With `inplace`, a fused layer with a piecewise-linear activation right after a convolution
/// (torch::nn::Conv1d/2d/3d: in a Sequential, its output has no other reader) is in place
/// (FusedActivationOptions::inplace, in-place activated batch norm): it writes over the
/// convolution's output and keeps for the backward only its own output.
torch::nn::Sequential fuse_batchnorm_relu(const torch::nn::Sequential& sequential,
                                          bool inplace = false);

}  // namespace custom_bn
