// masked_attention: the parameter structs every attention kernel (CPU and CUDA)
// takes, and the kernels' entry points. Only attention.cpp knows about at::Tensor.
//
// Semantics (DESIGN.md): out = softmax(q kᵀ · scale + mask) v per (batch, head),
// masks combined by intersection:
//   - causal: query i sees keys j <= i + causal_offset: causal_offset = 0 is
//     upper-left aligned (SDPA's is_causal), Sk - Sq lower-right aligned (KV-cache
//     decoding, FlashAttention's convention; with Sq > Sk the first Sq - Sk rows
//     see no key);
//   - key padding: key j of batch b is ignored where key_padding[b * Sk + j] != 0;
//     key_len[b] = 1 + the last key of batch b that is not padding (0 if none), so
//     keys j >= key_len[b] are known hidden and their tiles are skipped;
//   - attn mask, read through the strides of its (B, H, Sq, Sk) broadcast view
//     (stride 0 on broadcast dims): bool (1 = may attend) or additive float32.
// A row that sees no key gets out = 0 and lse = +inf (so exp(s - lse) = 0 in the
// backward without a special case), and zero gradients.
//
// Dropout keeps element (b, h, i, j) iff (word >> 8) >= dropout_threshold, where
// word is lane j % 4 of philox(seed, counter_lo = offset / 4,
// counter_hi = row * ceil(Sk / 4) + j / 4), row = (b * H + h) * Sq + i, and
// dropout_threshold = ceil(dropout_p * 2^24). Kept weights are scaled by
// 1 / (1 - dropout_p). CPU and CUDA draw the same mask for one explicit seed.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "common/philox.h"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace vae_ext {

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

struct AttentionParams {
  // q (B, H, Sq, D); k, v (B, Hkv, Sk, D); the last dim is contiguous, other
  // strides in elements. Head h reads kv head h / (H / Hkv).
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;

  // out (B, H, Sq, D) contiguous; lse (B, H, Sq) contiguous float32: the natural
  // log-sum-exp of each row's scaled, masked scores (+inf for empty rows).
  void* out;
  float* lse;

  int batch, heads, kv_heads, q_len, kv_len, head_dim;
  float scale;
  bool is_causal;
  int causal_offset;  // with is_causal, query i sees keys j <= i + causal_offset (see above)

  MaskKind mask_kind;
  const void* mask;  // uint8 (bool) or float32, see mask_kind
  int64_t mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;

  const uint8_t* key_padding;  // (B, Sk) or nullptr
  const int32_t* key_len;      // (B) or nullptr (then every key up to Sk may be visible)

  float dropout_p;  // 0: no dropout
  uint32_t dropout_threshold;
  PhiloxState philox;
  // (seed, offset) the forward used, offset in 32-bit draws as PhiloxState::offset: the
  // backward regenerates the mask from it. On CPU the glue fills it; on CUDA the forward
  // kernel writes it (the values are only known on the device under graph capture) and
  // the backward reads it through PhiloxState{seed_ptr = rng_state, offset_ptr = rng_state + 1}.
  int64_t* rng_state;

  DType dtype;

  // Added for float64 math (the fields above are float32): the same scale and
  // dropout probability in double precision. Kernels computing in float64 use
  // these; float32 math may use either.
  double scale_f64;
  double dropout_p_f64;
};

struct AttentionBackwardParams {
  AttentionParams fwd;  // the forward's inputs, its out and lse, and its Philox state

  // dout (B, H, Sq, D), last dim contiguous.
  const void* dout;
  int64_t dout_batch_stride, dout_head_stride, dout_row_stride;

  // Gradients, contiguous: dq (B, H, Sq, D); dk, dv (B, Hkv, Sk, D), summed over
  // the H / Hkv query heads that share each kv head.
  void* dq;
  void* dk;
  void* dv;

  float* delta;  // (B, H, Sq) float32 workspace: rowsum(dout * out)

  // Extra device scratch of attention_backward_cuda_workspace_bytes(*this) bytes
  // (e.g. fp32 dq accumulators), allocated by the glue, not initialised; nullptr on CPU.
  void* workspace;

  // CUDA: true = bitwise reproducible gradients (dQ by a separate atomic-free pass,
  // ~40% more backward work); false (default) = dQ summed with float32 atomics, as
  // FlashAttention-2 (dK, dV are deterministic either way). The glue sets it from
  // torch.are_deterministic_algorithms_enabled(). The CPU kernel is deterministic
  // either way. Set it before calling attention_backward_cuda_workspace_bytes.
  bool deterministic = false;
};

// Whether the CPU forward and backward run their tile products on packed panels (attention_cpu.cpp) where
// they pay, rather than through the BLAS: on unless VAE_EXT_ATTN_GEMM=blas or vec; tests
// and benchmarks switch it in-process (_C._set_attention_cpu_panels). Defined in attention.cpp
// (one flag for every CPU capability's kernels).
bool attention_cpu_panels();
void set_attention_cpu_panels(bool on);
// Whether the AVX512 forward and backward run the panel products of bfloat16 inputs with AVX512-BF16
// dot products (bf16 operands, float32 sums) where the CPU has them: on unless
// VAE_EXT_ATTN_BF16_DOT=0; tests and benchmarks switch it (_C._set_attention_cpu_bf16_dot).
bool attention_cpu_bf16_dot();
void set_attention_cpu_bf16_dot(bool on);

VAE_EXT_DECLARE_CPU_KERNEL(void attention_forward_cpu(const AttentionParams& p))
VAE_EXT_DECLARE_CPU_KERNEL(void attention_backward_cpu(const AttentionBackwardParams& p))

#ifdef VAE_EXT_WITH_CUDA
void attention_forward_cuda(const AttentionParams& p, CUstream_st* stream);
void attention_backward_cuda(const AttentionBackwardParams& p, CUstream_st* stream);
size_t attention_backward_cuda_workspace_bytes(const AttentionBackwardParams& p);
#endif

// The head dims of the CUDA kernels (build_info reports them; vae_ext/ops/attention.py reads them from
// there): tensor cores (bf16/fp16) compiled at kTensorCoreHeadDims, every other D <= 128 running the next
// one up; FFMA kernels for float32, and for 16-bit D in (128, 512]: the forward up to
// kMaxSimtHeadDim (the SD VAE's one head of 512 channels), the backward up to
// kMaxSimtBackwardHeadDim (its shared-memory tiles at D = 512 would pass sm_80's limit).
namespace attn {
constexpr int kTensorCoreHeadDims[] = {32, 64, 96, 128};
constexpr int kMaxTensorCoreHeadDim = 128;
constexpr int kMaxSimtHeadDim = 512;
constexpr int kMaxSimtBackwardHeadDim = 256;
inline int padded_head_dim(int d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : 128; }
}  // namespace attn

}  // namespace vae_ext
