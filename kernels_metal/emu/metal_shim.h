// Just enough of the Metal Shading Language, as C++, to compile and run the
// kernel bodies of kernels_metal/ on a CPU (see emu_runtime.h).
//
// Address-space qualifiers vanish (device, constant, thread) except
// `threadgroup`, which becomes `static`: kernels declare threadgroup arrays at
// function scope and the emulator runs one threadgroup at a time, so static
// storage is exactly "shared by the threads of the running threadgroup".
// Consequence: the shim cannot check Metal's address-space rules; only a Mac
// can.
#pragma once

#include "emu_runtime.h"

using uint = unsigned int;
using ushort = unsigned short;
struct uint3 {
  uint x, y, z;
};
using half = _Float16;
using float16_t = _Float16;
using bfloat16_t = ss_emu::bf16;

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

template <typename V>
inline V simd_sum(V x) {
  const auto all = ss_emu::exchange(x);
  V total = all[0];
  for (int i = 1; i < 32; ++i) {
    total += all[i];
  }
  return total;
}

template <typename V>
inline V simd_max(V x) {
  const auto all = ss_emu::exchange(x);
  V best = all[0];
  for (int i = 1; i < 32; ++i) {
    best = all[i] > best ? all[i] : best;
  }
  return best;
}

template <typename V>
inline V simd_min(V x) {
  const auto all = ss_emu::exchange(x);
  V best = all[0];
  for (int i = 1; i < 32; ++i) {
    best = all[i] < best ? all[i] : best;
  }
  return best;
}

template <typename V>
inline V simd_shuffle(V x, ushort from_lane) {
  return ss_emu::exchange(x)[from_lane & 31];
}

template <typename V>
inline V simd_shuffle_xor(V x, ushort mask) {
  return ss_emu::exchange(x)[(ss_emu::lane_id() ^ mask) & 31];
}

template <typename V>
inline V simd_broadcast(V x, ushort from_lane) {
  return ss_emu::exchange(x)[from_lane & 31];
}

inline void threadgroup_barrier(mem_flags) { ss_emu::group_wait(); }
inline void simdgroup_barrier(mem_flags) { ss_emu::simd_wait(); }

inline float exp(float x) { return std::exp(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
namespace fast {
inline float exp(float x) { return std::exp(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
}  // namespace precise

}  // namespace metal

using namespace metal;  // MLX's Metal preamble does the same

#define device
#define constant
#define thread
#define threadgroup static
