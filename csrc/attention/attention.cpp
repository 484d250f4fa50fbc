// masked_attention: the torch glue. attention_glue.h checks what the kernels
// assume, derives the per-batch key lengths and the mask view and fills the
// params structs (the same code fills them for the emulated CUDA kernels of
// tests/cuda_emu/attention_ops.cpp); here the outputs are allocated and the CPU
// or CUDA kernels launched.
#include "attention/attention.h"
#include "attention/attention_glue.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "common/torch_utils.h"

#ifdef VAE_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace vae_ext {
namespace {

using attention_glue::check_and_prepare;
using attention_glue::Inputs;
using attention_glue::make_backward_params;
using attention_glue::make_params;
using attention_glue::rows_contiguous;

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale, double dropout_p,
    std::optional<int64_t> seed, const std::optional<at::Generator>& generator, bool causal_lower_right) {
  const char* op = "masked_attention_forward";
  const Inputs in = check_and_prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, op);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, H, Sq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  // (seed, offset) of the dropout stream; zeros without dropout.
  at::Tensor rng_state = at::zeros({2}, q.options().dtype(at::kLong));
  AttentionParams p = make_params(in, out, lse, is_causal, scale, dropout_p, op, causal_lower_right);
  if (in.k.size(2) == 0) {  // no key at all: every row is empty
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse, rng_state};
  }
  if (q.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    // One Philox counter_lo value per call: the element index lives in counter_hi.
    if (dropout_p > 0.0) p.philox = philox_state_cuda(seed, generator, 4);
    p.rng_state = rng_state.data_ptr<int64_t>();  // written by the kernel
    if (B * H * Sq > 0) attention_forward_cuda(p, at::cuda::getCurrentCUDAStream());
#else
    TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
  } else {
    if (dropout_p > 0.0) {
      p.philox = philox_state_cpu(seed, generator);
      int64_t* rs = rng_state.data_ptr<int64_t>();
      rs[0] = static_cast<int64_t>(p.philox.seed);
      rs[1] = static_cast<int64_t>(p.philox.offset);
    }
    p.rng_state = rng_state.data_ptr<int64_t>();
    if (B * H * Sq > 0) VAE_EXT_CPU_DISPATCH(attention_forward_cpu, p);
  }
  return {out, lse, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale, double dropout_p,
    bool causal_lower_right) {
  const char* op = "masked_attention_backward";
  const Inputs in = check_and_prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, op);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have the shape of q ", q.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have the dtype of q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H &&
                  lse.size(2) == Sq,
              op, ": lse must be float32 (B, H, Sq)");
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2, op, ": rng_state must be int64 (2,)");
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device() &&
                  rng_state.device() == q.device(),
              op, ": all tensors must be on the device of q");
  const at::Tensor out_c = out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor rng_c = rng_state.contiguous();
  const at::Tensor dout = rows_contiguous(grad_out);

  // Both devices' kernels write every element (the emulated CUDA tests run on poisoned memory).
  at::Tensor dq = at::empty({B, H, Sq, D}, q.options());
  at::Tensor dk = at::empty({B, Hkv, Sk, D}, q.options());
  at::Tensor dv = at::empty({B, Hkv, Sk, D}, q.options());
  at::Tensor delta = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));

  AttentionBackwardParams bp =
      make_backward_params(in, dout, out_c, lse_c, rng_c, dq, dk, dv, delta, is_causal, scale, dropout_p, op,
                           causal_lower_right);

  if (B * H * Sq == 0 || Sk == 0) {  // nothing attends: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  if (q.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    bp.deterministic = at::globalContext().deterministicAlgorithms();
    const size_t bytes = attention_backward_cuda_workspace_bytes(bp);
    at::Tensor workspace;
    if (bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
      bp.workspace = workspace.data_ptr();
    }
    attention_backward_cuda(bp, at::cuda::getCurrentCUDAStream());
#else
    TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
  } else {
    VAE_EXT_CPU_DISPATCH(attention_backward_cpu, bp);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("masked_attention_forward", &masked_attention_forward_impl);
  m.impl("masked_attention_backward", &masked_attention_backward_impl);
}

#ifdef VAE_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("masked_attention_forward", &masked_attention_forward_impl);
  m.impl("masked_attention_backward", &masked_attention_backward_impl);
}
#endif

}  // namespace vae_ext
