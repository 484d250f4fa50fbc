// Glue of csrc/attention/attention_cuda.cu: the masked_attention CUDA entry points,
// run under the CPU emulation, as vae_ext_emu ops on CPU tensors. The params are
// filled as csrc/attention/attention.cpp fills them (strides of the views, key_len
// from the padding mask, the attn mask expanded to (B, H, Sq, Sk) with stride 0 on
// broadcast dims, the forward's rng_state feeding the backward's Philox state).
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>

#include <cmath>
#include <tuple>

#include "attention/attention.h"
#include "emu_glue.h"

namespace vae_ext::emu_glue::attention {
namespace {

struct Masks {
  at::Tensor mask;      // expanded (B, H, Sq, Sk) view in device memory, or undefined
  at::Tensor padding;   // (B, Sk) uint8 in device memory, or undefined
  at::Tensor key_len;   // (B) int32 in device memory, or undefined
};

Masks prepare_masks(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& attn_mask,
                    const std::optional<at::Tensor>& key_padding_mask, bool pass_padding_mask) {
  Masks m;
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Sk = k.size(2);
  if (key_padding_mask.has_value()) {
    const at::Tensor kpm = key_padding_mask->contiguous();
    const at::Tensor pos = at::arange(1, Sk + 1, at::TensorOptions().dtype(at::kLong));
    const at::Tensor len = at::where(kpm, at::zeros({}, pos.options()), pos).amax(1).to(at::kInt);
    m.key_len = to_device(len.contiguous());
    if (pass_padding_mask) m.padding = to_device(kpm.to(at::kByte).contiguous());
  }
  if (attn_mask.has_value()) {
    at::Tensor am = *attn_mask;
    if (am.scalar_type() != at::kBool) am = am.to(at::kFloat);
    m.mask = to_device(am.contiguous()).expand({B, H, Sq, Sk});
  }
  return m;
}

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Masks& m,
                            bool is_causal, double scale, double dropout_p) {
  AttentionParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.v_row_stride = v.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.q_len = static_cast<int>(q.size(2));
  p.kv_len = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.is_causal = is_causal;
  p.mask_kind = MaskKind::kNone;
  p.mask = nullptr;
  if (m.mask.defined()) {
    p.mask_kind = m.mask.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    p.mask = m.mask.const_data_ptr();
    p.mask_batch_stride = m.mask.stride(0);
    p.mask_head_stride = m.mask.stride(1);
    p.mask_row_stride = m.mask.stride(2);
    p.mask_col_stride = m.mask.stride(3);
  }
  p.key_padding = m.padding.defined() ? static_cast<const uint8_t*>(m.padding.const_data_ptr()) : nullptr;
  p.key_len = m.key_len.defined() ? m.key_len.const_data_ptr<int32_t>() : nullptr;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_threshold = dropout_p > 0.0 ? static_cast<uint32_t>(std::ceil(dropout_p * 16777216.0)) : 0u;
  p.dtype = dtype_of(q);
  return p;
}

// (out, lse, rng_state) of attention_forward_cuda. Dropout draws from (seed, offset), read through
// device pointers when seed_in_device_memory (as under CUDA-graph capture).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale, double dropout_p, int64_t seed,
    int64_t offset, bool seed_in_device_memory, bool pass_padding_mask, int64_t misalign) {
  const at::Tensor dq = to_device_strided(q, misalign), dk = to_device_strided(k, misalign),
                   dv = to_device_strided(v, misalign);
  const Masks m = prepare_masks(q, k, attn_mask, key_padding_mask, pass_padding_mask);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  at::Tensor out = device_empty({B, H, Sq, D}, q.scalar_type());
  at::Tensor lse = device_empty({B, H, Sq}, at::kFloat);
  at::Tensor rng_state = device_empty({2}, at::kLong);
  rng_state.zero_();
  at::Tensor gen_state = device_empty({2}, at::kLong);  // a generator's graph-safe (seed, offset)
  gen_state.mutable_data_ptr<int64_t>()[0] = seed;
  gen_state.mutable_data_ptr<int64_t>()[1] = offset;

  AttentionParams p = make_params(dq, dk, dv, m, is_causal, scale, dropout_p);
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.rng_state = rng_state.mutable_data_ptr<int64_t>();
  if (dropout_p > 0.0) {
    if (seed_in_device_memory) {
      p.philox.seed_ptr = gen_state.const_data_ptr<int64_t>();
      p.philox.offset_ptr = gen_state.const_data_ptr<int64_t>() + 1;
    } else {
      p.philox.seed = static_cast<uint64_t>(seed);
      p.philox.offset = static_cast<uint64_t>(offset);
    }
  }
  attention_forward_cuda(p, nullptr);
  return {out, lse, rng_state};
}

// (dq, dk, dv, delta) of attention_backward_cuda.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale, double dropout_p,
    bool deterministic, bool pass_padding_mask, int64_t misalign) {
  const at::Tensor dq_in = to_device_strided(q, misalign), dk_in = to_device_strided(k, misalign),
                   dv_in = to_device_strided(v, misalign), ddout = to_device_strided(grad_out, misalign);
  const at::Tensor dout_c = to_device(out.contiguous()), dlse = to_device(lse.contiguous()),
                   drng = to_device(rng_state.contiguous());
  const Masks m = prepare_masks(q, k, attn_mask, key_padding_mask, pass_padding_mask);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Sk = k.size(2);
  at::Tensor gq = device_empty({B, H, Sq, D}, q.scalar_type());
  at::Tensor gk = device_empty({B, Hkv, Sk, D}, q.scalar_type());
  at::Tensor gv = device_empty({B, Hkv, Sk, D}, q.scalar_type());
  at::Tensor delta = device_empty({B, H, Sq}, at::kFloat);

  AttentionBackwardParams bp{};
  bp.fwd = make_params(dq_in, dk_in, dv_in, m, is_causal, scale, dropout_p);
  bp.fwd.out = const_cast<void*>(dout_c.const_data_ptr());
  bp.fwd.lse = const_cast<float*>(dlse.const_data_ptr<float>());
  bp.fwd.rng_state = const_cast<int64_t*>(drng.const_data_ptr<int64_t>());
  if (dropout_p > 0.0) {
    bp.fwd.philox.seed_ptr = drng.const_data_ptr<int64_t>();
    bp.fwd.philox.offset_ptr = drng.const_data_ptr<int64_t>() + 1;
  }
  bp.dout = ddout.const_data_ptr();
  bp.dout_batch_stride = ddout.stride(0);
  bp.dout_head_stride = ddout.stride(1);
  bp.dout_row_stride = ddout.stride(2);
  bp.dq = gq.mutable_data_ptr();
  bp.dk = gk.mutable_data_ptr();
  bp.dv = gv.mutable_data_ptr();
  bp.delta = delta.mutable_data_ptr<float>();
  bp.deterministic = deterministic;
  const size_t bytes = attention_backward_cuda_workspace_bytes(bp);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = device_empty({static_cast<int64_t>(bytes)}, at::kByte);  // uninitialised (0xFF)
    bp.workspace = workspace.mutable_data_ptr();
  }
  attention_backward_cuda(bp, nullptr);
  return {gq, gk, gv, delta};
}

int64_t attention_workspace_bytes(const at::Tensor& q, const at::Tensor& k, bool deterministic) {
  AttentionBackwardParams bp{};
  bp.fwd.batch = static_cast<int>(q.size(0));
  bp.fwd.heads = static_cast<int>(q.size(1));
  bp.fwd.kv_heads = static_cast<int>(k.size(1));
  bp.fwd.q_len = static_cast<int>(q.size(2));
  bp.fwd.kv_len = static_cast<int>(k.size(2));
  bp.fwd.head_dim = static_cast<int>(q.size(3));
  bp.fwd.dtype = dtype_of(q);
  bp.deterministic = deterministic;
  return static_cast<int64_t>(attention_backward_cuda_workspace_bytes(bp));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vae_ext_emu, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, bool is_causal, "
      "float scale, float dropout_p=0.0, int seed=0, int offset=0, bool seed_in_device_memory=False, "
      "bool pass_padding_mask=True, int misalign=0) -> (Tensor, Tensor, Tensor)",
      &attention_forward);
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor rng_state, "
      "Tensor? attn_mask, Tensor? key_padding_mask, bool is_causal, float scale, float dropout_p=0.0, "
      "bool deterministic=False, bool pass_padding_mask=True, int misalign=0) -> (Tensor, Tensor, Tensor, Tensor)",
      &attention_backward);
  m.def("attention_workspace_bytes(Tensor q, Tensor k, bool deterministic=False) -> int", &attention_workspace_bytes);
}

}  // namespace vae_ext::emu_glue::attention
