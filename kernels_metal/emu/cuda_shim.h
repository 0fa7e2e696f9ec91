// Just enough CUDA, as C++, to compile and run the kernel bodies of
// kernels_metal/ on a CPU (see emu_runtime.h): thread/block indices, warp
// shuffles, __syncthreads/__syncwarp, __shared__ (static storage: one block
// runs at a time), __half/__nv_bfloat16 and the `inf` macro that MLX's CUDA
// JIT defines.
#pragma once

#include "emu_runtime.h"

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

using __half = _Float16;
using __nv_bfloat16 = ss_emu::bf16;

namespace cooperative_groups {}

template <typename V>
inline V __shfl_xor_sync(unsigned, V x, int lane_mask) {
  return ss_emu::exchange(x)[(ss_emu::lane_id() ^ lane_mask) & 31];
}

template <typename V>
inline V __shfl_sync(unsigned, V x, int src_lane) {
  return ss_emu::exchange(x)[src_lane & 31];
}

template <typename V>
inline V __shfl_down_sync(unsigned, V x, unsigned delta) {
  const auto all = ss_emu::exchange(x);
  const unsigned src = static_cast<unsigned>(ss_emu::lane_id()) + delta;
  return src < 32 ? all[src] : x;
}

inline void __syncthreads() { ss_emu::group_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ss_emu::simd_wait(); }

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __grid_constant__
#define __shared__ static
#define inf std::numeric_limits<float>::infinity()
