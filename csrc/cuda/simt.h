// The few primitives the device kernels use, behind one thin layer. Under nvcc they are
// CUDA's own; otherwise (test/simt) each CUDA thread is a fiber of the host emulator in
// test/simt/simt_runtime.h, so the very same kernel code runs on the CPU, under ASan.
//
//   CUSTOM_BN_DEVICE            a function callable from kernels
//   simt::thread_index() ...    threadIdx.x, blockIdx.{x,y}, blockDim.x, gridDim.{x,y}
//   simt::sync_block()          __syncthreads()
//   simt::shuffle_down(v, d)    __shfl_down_sync over the full warp
//   simt::shared_array<T>(n)    a block's shared memory (call in the same order in every thread)
//   simt::load(p), store(p, v)  a global-memory read and write (*p, *p = v); the emulator
//                               buffers stores and checks the order between blocks
//   simt::atomic_add(p, v)      atomicAdd, returning the old value
//   simt::thread_fence()        __threadfence()
#pragma once

#include <cstdint>

#if defined(__CUDACC__)

#define CUSTOM_BN_DEVICE __device__ __forceinline__

namespace custom_bn::simt {

constexpr int kWarpSize = 32;

CUSTOM_BN_DEVICE int thread_index() { return threadIdx.x; }
CUSTOM_BN_DEVICE int block_size() { return blockDim.x; }
CUSTOM_BN_DEVICE int block_x() { return blockIdx.x; }
CUSTOM_BN_DEVICE int block_y() { return blockIdx.y; }
CUSTOM_BN_DEVICE int grid_x() { return gridDim.x; }
CUSTOM_BN_DEVICE int grid_y() { return gridDim.y; }
CUSTOM_BN_DEVICE void sync_block() { __syncthreads(); }
CUSTOM_BN_DEVICE void thread_fence() { __threadfence(); }

template <typename T>
CUSTOM_BN_DEVICE T shuffle_down(T value, int delta) {
  return __shfl_down_sync(0xffffffffu, value, delta);
}

template <typename T>
CUSTOM_BN_DEVICE T load(const T* address) {
  return *address;
}

template <typename T>
CUSTOM_BN_DEVICE void store(T* address, const T& value) {
  *address = value;
}

template <typename T>
CUSTOM_BN_DEVICE T atomic_add(T* address, T value) {
  return atomicAdd(address, value);
}

// Dynamic shared memory, carved in declaration order.
template <typename T>
CUSTOM_BN_DEVICE T* shared_array(int count, int& offset) {
  extern __shared__ unsigned char shared_memory[];
  T* result = reinterpret_cast<T*>(shared_memory + offset);
  offset += static_cast<int>(sizeof(T)) * count;
  return result;
}

}  // namespace custom_bn::simt

#else  // the host emulator

#include "simt_runtime.h"

#define CUSTOM_BN_DEVICE inline

#endif
