// Fused tree attention, CUDA entry (the body of an mx.fast.cuda_kernel).
// MLX writes the signature: inputs q, k, v, rows, params, scale; output out;
// and `constexpr int` / `using` lines for T, HEAD_DIM, NSIMD, SPS. Grid:
// (blocks * NSIMD * 32, Hkv, 1) threads, block (NSIMD * 32, 1, 1).
const unsigned lane = threadIdx.x & 31u;
const unsigned sg = threadIdx.x >> 5;
const unsigned tid = threadIdx.x;
const unsigned blk = blockIdx.x;
const unsigned kvh = blockIdx.y;
#include "tree_attention_core.inc"
