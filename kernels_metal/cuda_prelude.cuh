// CUDA flavour of the primitives used by tree_attention_core.inc.
// Handed to mx.fast.cuda_kernel as `header`. Warp reductions are xor
// butterflies, so every lane ends with the bitwise-same value (as on Metal).

#define SS_SHARED __shared__
#define SS_TG_BARRIER() __syncthreads()
#define SS_SIMD_BARRIER() __syncwarp()
#define SS_LOAD(x) static_cast<float>(x)
#define SS_STORE(T, x) static_cast<T>(x)
#define SS_NEG_BIG (-3.0e38f)

__device__ __forceinline__ float ss_simd_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}

__device__ __forceinline__ float ss_simd_max(float x) {
  for (int o = 16; o > 0; o >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  }
  return x;
}

__device__ __forceinline__ float ss_exp(float x) {
  return expf(x);
}
