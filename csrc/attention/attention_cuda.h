// masked_attention CUDA: what the dispatcher (attention_cuda.cu) and the
// per-(dtype, head dim) instantiation files share. Host code and CUDA headers
// only; the kernels are in attention_cuda.cuh (tensor cores) and
// attention_simt.cu (FFMA).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention/attention.h"
#include "common/cuda_utils.cuh"

namespace vae_ext::attn {

// Views into the backward's workspace (attention_backward_cuda_workspace_bytes).
struct BwdWorkspace {
  float* dq_accum;  // (B * H * Sq, dq_ld) fp32 dQ accumulator; nullptr in deterministic mode
  float* lse2;      // (B * H, q_pad): lse * log2(e), +inf on the pad rows
  float* delta;     // (B * H, q_pad): rowsum(dO * O), 0 on the pad rows
  int64_t q_pad;    // Sq rounded up to a multiple of 128
  int dq_ld;        // row stride of dq_accum: the compiled head dim
};

// Whether every row of a (B, H, S, D) operand starts 16-byte aligned (cp.async of 8 16-bit elements).
inline bool rows_aligned16(const void* ptr, int64_t batch_stride, int64_t head_stride, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && batch_stride % 8 == 0 && head_stride % 8 == 0 &&
         row_stride % 8 == 0;
}

// The largest dynamic shared memory a tensor-core kernel of a compiled head dim uses
// (its dK/dV kernel; attention_cuda.cuh checks the tile configs against it). A device
// with less opt-in shared memory per block (not A100 / H100) runs the SIMT kernels.
constexpr size_t tc_smem_bytes(int padded_d) {
  return padded_d == 32 ? 60416 : padded_d == 64 ? 93184 : padded_d == 96 ? 125952 : 158720;
}

// Tensor-core kernels (attention_{fwd,bwd}_hdim<kD>.cu), T = __nv_bfloat16 or __half.
template <typename T, int kD>
void run_fwd_tc(const AttentionParams& p, cudaStream_t stream);
template <typename T, int kD>
void run_bwd_tc(const AttentionBackwardParams& p, const BwdWorkspace& ws, cudaStream_t stream);

// FFMA kernels (attention_simt.cu), T = float, __nv_bfloat16 or __half; any D <= 256.
template <typename T>
void run_fwd_simt(const AttentionParams& p, cudaStream_t stream);
template <typename T>
void run_bwd_simt(const AttentionBackwardParams& p, cudaStream_t stream);

}  // namespace vae_ext::attn
