// Metal flavour of the primitives used by tree_attention_core.inc.
// Handed to mx.fast.metal_kernel as `header` (after MLX's own preamble, which
// provides metal_stdlib, float16_t and bfloat16_t).
#include <metal_stdlib>

#define SS_SHARED threadgroup
#define SS_TG_BARRIER() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define SS_SIMD_BARRIER() metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup)
#define SS_LOAD(x) static_cast<float>(x)
#define SS_STORE(T, x) static_cast<T>(x)
// Finite "minus infinity": the kernel never relies on IEEE infinities, so it
// stays correct under any Metal math mode.
#define SS_NEG_BIG (-3.0e38f)

inline float ss_simd_sum(float x) {
  return metal::simd_sum(x);
}

inline float ss_simd_max(float x) {
  return metal::simd_max(x);
}

inline float ss_exp(float x) {
  return metal::exp(x);
}
