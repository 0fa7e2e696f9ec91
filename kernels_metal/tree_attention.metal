// Fused tree attention, Metal entry (the body of an mx.fast.metal_kernel).
// MLX writes the signature: inputs q, k, v, rows, params, scale; output out;
// template <typename T, int HEAD_DIM, int NSIMD, int SPS>; and the Metal
// attributes named below. Grid: (blocks * NSIMD * 32, Hkv, 1) threads,
// threadgroup (NSIMD * 32, 1, 1).
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint blk = threadgroup_position_in_grid.x;
const uint kvh = threadgroup_position_in_grid.y;
#include "tree_attention_core.inc"
