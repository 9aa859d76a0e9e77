// Each backend implements the ops with exactly the signatures of the public C++ API
// (include/custom_bn/ops.h); declaring them through decltype keeps one declaration per op.
#pragma once

#include "op_params.h"

#define CUSTOM_BN_DECLARE_BACKEND_OPS                                                             \
  decltype(::custom_bn::batch_norm_forward) batch_norm_forward;                                   \
  decltype(::custom_bn::batch_norm_eval) batch_norm_eval;                                         \
  decltype(::custom_bn::batch_norm_backward) batch_norm_backward;                                 \
  decltype(::custom_bn::batch_norm_relu_forward) batch_norm_relu_forward;                         \
  decltype(::custom_bn::batch_norm_relu_backward) batch_norm_relu_backward;                       \
  decltype(::custom_bn::batch_norm_stats) batch_norm_stats;                                       \
  decltype(::custom_bn::batch_norm_gather_stats_with_counts) batch_norm_gather_stats_with_counts; \
  decltype(::custom_bn::batch_norm_elemt) batch_norm_elemt;                                       \
  decltype(::custom_bn::batch_norm_backward_reduce) batch_norm_backward_reduce;                   \
  decltype(::custom_bn::batch_norm_backward_elemt) batch_norm_backward_elemt;

namespace custom_bn::cpu {
CUSTOM_BN_DECLARE_BACKEND_OPS
}  // namespace custom_bn::cpu

namespace custom_bn::meta {
CUSTOM_BN_DECLARE_BACKEND_OPS
}  // namespace custom_bn::meta

namespace custom_bn::cuda {
CUSTOM_BN_DECLARE_BACKEND_OPS
}  // namespace custom_bn::cuda

#undef CUSTOM_BN_DECLARE_BACKEND_OPS

// Registers a backend's kernels (the functions of the current namespace) for every op:
// inside TORCH_LIBRARY_IMPL(custom_bn, <Key>, m) { CUSTOM_BN_REGISTER_BACKEND_OPS(m); }.
#define CUSTOM_BN_REGISTER_BACKEND_OPS(m)                                         \
  do {                                                                            \
    (m).impl("batch_norm_forward", TORCH_FN(batch_norm_forward));                 \
    (m).impl("batch_norm_eval", TORCH_FN(batch_norm_eval));                       \
    (m).impl("batch_norm_backward", TORCH_FN(batch_norm_backward));               \
    (m).impl("batch_norm_relu_forward", TORCH_FN(batch_norm_relu_forward));       \
    (m).impl("batch_norm_relu_backward", TORCH_FN(batch_norm_relu_backward));     \
    (m).impl("batch_norm_stats", TORCH_FN(batch_norm_stats));                     \
    (m).impl("batch_norm_gather_stats_with_counts",                               \
             TORCH_FN(batch_norm_gather_stats_with_counts));                      \
    (m).impl("batch_norm_elemt", TORCH_FN(batch_norm_elemt));                     \
    (m).impl("batch_norm_backward_reduce", TORCH_FN(batch_norm_backward_reduce)); \
    (m).impl("batch_norm_backward_elemt", TORCH_FN(batch_norm_backward_elemt));   \
  } while (false)
