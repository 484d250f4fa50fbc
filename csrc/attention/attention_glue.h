// masked_attention: the torch half of the glue, shared by the extension
// (attention.cpp, which launches the CPU or CUDA kernels) and by the emulated CUDA
// tests (tests/cuda_emu/attention_ops.cpp), so those tests run the kernels on
// exactly the params production fills. check_and_prepare checks the inputs and
// derives the layouts, the per-batch key lengths and the mask view on the inputs'
// device; prepare_forward / prepare_backward check the backward's extra inputs,
// allocate the outputs through the caller's Memory (common/glue_memory.h) and fill
// the params structs. ATen only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

#include <optional>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_math.h"
#include "common/glue_memory.h"
#include "common/torch_utils.h"

namespace vae_ext::attention_glue {

using glue::Memory;

// The kernels read (B, H, S, D) tensors through their strides with a contiguous
// last dim and rows at least D apart (the tile products need a proper leading dim).
inline bool rows_readable(const at::Tensor& t) {
  return t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) >= t.size(3));
}
inline at::Tensor rows_contiguous(const at::Tensor& t) { return rows_readable(t) ? t : t.contiguous(); }

// The row stride the kernels see: a single row may carry any stride (even 0),
// but the tile products need a leading dimension of at least D.
inline int64_t row_stride(const at::Tensor& t) { return t.size(2) <= 1 ? t.size(3) : t.stride(2); }

struct Inputs {
  at::Tensor q, k, v;
  at::Tensor mask;         // (B, H, Sq, Sk) view: bool or float32, or undefined
  at::Tensor key_padding;  // (B, Sk) bool contiguous, or undefined
  at::Tensor key_len;      // (B) int32, or undefined
};

inline Inputs check_and_prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
                         double dropout_p, const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, Sq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, Hkv, Sk, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, Hkv, Sk, D), got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k, v must be on one device");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, op, ": batch sizes differ: q ", B, ", k ", k.size(0), ", v ",
              v.size(0));
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, op, ": head dims differ: q ", D, ", k ", k.size(3), ", v ",
              v.size(3));
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == Sk, op, ": v must have the (Hkv, Sk) of k");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": q heads H=", H, " must be a multiple of k/v heads Hkv=", Hkv);
  TORCH_CHECK(D >= 1, op, ": head dim must be >= 1");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(B < (int64_t(1) << 31) && H < (int64_t(1) << 31) && Sq < (int64_t(1) << 31) &&
                  Sk < (int64_t(1) << 31) && D < (int64_t(1) << 31),
              op, ": sizes must fit in int32");
  to_dtype(q.scalar_type(), op);  // a supported dtype

  Inputs in;
  in.q = rows_contiguous(q);
  in.k = rows_contiguous(k);
  in.v = rows_contiguous(v);
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& kpm = *key_padding_mask;
    TORCH_CHECK(kpm.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ", kpm.scalar_type());
    TORCH_CHECK(kpm.dim() == 2 && kpm.size(0) == B && kpm.size(1) == Sk, op,
                ": key_padding_mask must have shape (B, Sk) = (", B, ", ", Sk, "), got ", kpm.sizes());
    TORCH_CHECK(kpm.device() == q.device(), op, ": key_padding_mask must be on the device of q");
    in.key_padding = kpm.contiguous();
    // key_len[b] = 1 + the last key that is not padding (0 if none), on the device, no host sync.
    if (Sk > 0) {
      const at::Tensor pos = at::arange(1, Sk + 1, kpm.options().dtype(at::kInt));
      in.key_len = at::where(in.key_padding, at::zeros({}, pos.options()), pos).amax(1).to(at::kInt).contiguous();
    } else {
      in.key_len = at::zeros({B}, kpm.options().dtype(at::kInt));
    }
  }
  if (attn_mask.has_value() && attn_mask->defined()) {
    at::Tensor m = *attn_mask;
    TORCH_CHECK(m.device() == q.device(), op, ": attn_mask must be on the device of q");
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                ": attn_mask must be bool or floating, got ", m.scalar_type());
    TORCH_CHECK(m.dim() <= 4, op, ": attn_mask must have at most 4 dims, got ", m.sizes());
    if (m.scalar_type() != at::kBool && m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
    const std::vector<int64_t> full{B, H, Sq, Sk};
    TORCH_CHECK(at::is_expandable_to(m.sizes(), full), op, ": attn_mask of shape ", m.sizes(),
                " does not broadcast to (B, H, Sq, Sk) = ", at::IntArrayRef(full));
    in.mask = m.expand(full);  // stride 0 on broadcast dims
  }
  return in;
}

// causal_lower_right: the causal mask is aligned to the lower-right corner (query i
// sees keys j <= i + Sk - Sq) instead of the upper-left one (j <= i).
inline AttentionParams make_params(const Inputs& in, const at::Tensor& out, const at::Tensor& lse, bool is_causal,
                            double scale, double dropout_p, const char* op, bool causal_lower_right = false) {
  AttentionParams p{};
  p.q = in.q.const_data_ptr();
  p.k = in.k.const_data_ptr();
  p.v = in.v.const_data_ptr();
  p.q_batch_stride = in.q.stride(0);
  p.q_head_stride = in.q.stride(1);
  p.q_row_stride = row_stride(in.q);
  p.k_batch_stride = in.k.stride(0);
  p.k_head_stride = in.k.stride(1);
  p.k_row_stride = row_stride(in.k);
  p.v_batch_stride = in.v.stride(0);
  p.v_head_stride = in.v.stride(1);
  p.v_row_stride = row_stride(in.v);
  p.out = const_cast<void*>(out.const_data_ptr());
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.batch = static_cast<int>(in.q.size(0));
  p.heads = static_cast<int>(in.q.size(1));
  p.kv_heads = static_cast<int>(in.k.size(1));
  p.q_len = static_cast<int>(in.q.size(2));
  p.kv_len = static_cast<int>(in.k.size(2));
  p.head_dim = static_cast<int>(in.q.size(3));
  p.scale = static_cast<float>(scale);
  p.is_causal = is_causal;
  p.causal_offset = is_causal && causal_lower_right ? p.kv_len - p.q_len : 0;
  p.mask_kind = MaskKind::kNone;
  p.mask = nullptr;
  if (in.mask.defined()) {
    p.mask_kind = in.mask.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    p.mask = in.mask.const_data_ptr();  // bool is one byte, 0 or 1
    p.mask_batch_stride = in.mask.stride(0);
    p.mask_head_stride = in.mask.stride(1);
    p.mask_row_stride = in.mask.stride(2);
    p.mask_col_stride = in.mask.stride(3);
  }
  p.key_padding =
      in.key_padding.defined() ? reinterpret_cast<const uint8_t*>(in.key_padding.const_data_ptr()) : nullptr;
  p.key_len = in.key_len.defined() ? in.key_len.const_data_ptr<int32_t>() : nullptr;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_threshold = dropout_p > 0.0 ? attention_dropout_threshold(dropout_p) : 0u;
  p.rng_state = nullptr;
  p.dtype = to_dtype(in.q.scalar_type(), op);
  p.scale_f64 = scale;
  p.dropout_p_f64 = dropout_p;
  return p;
}

// The backward's params: the forward's, plus grad_out (rows contiguous), the
// saved out, lse and rng_state (the forward's (seed, offset), read where they
// live: on the device for CUDA) and the gradients and delta to write.
inline AttentionBackwardParams make_backward_params(const Inputs& in, const at::Tensor& dout, const at::Tensor& out,
                                                    const at::Tensor& lse, const at::Tensor& rng_state,
                                                    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                                    const at::Tensor& delta, bool is_causal, double scale,
                                                    double dropout_p, const char* op,
                                                    bool causal_lower_right = false) {
  AttentionBackwardParams bp{};
  bp.fwd = make_params(in, out, lse, is_causal, scale, dropout_p, op, causal_lower_right);
  bp.fwd.rng_state = const_cast<int64_t*>(rng_state.const_data_ptr<int64_t>());
  if (dropout_p > 0.0) {
    bp.fwd.philox = PhiloxState{};
    bp.fwd.philox.seed_ptr = rng_state.const_data_ptr<int64_t>();
    bp.fwd.philox.offset_ptr = rng_state.const_data_ptr<int64_t>() + 1;
  }
  bp.dout = dout.const_data_ptr();
  bp.dout_batch_stride = dout.stride(0);
  bp.dout_head_stride = dout.stride(1);
  bp.dout_row_stride = row_stride(dout);
  bp.dq = const_cast<void*>(dq.const_data_ptr());
  bp.dk = const_cast<void*>(dk.const_data_ptr());
  bp.dv = const_cast<void*>(dv.const_data_ptr());
  bp.delta = const_cast<float*>(delta.const_data_ptr<float>());
  bp.workspace = nullptr;
  return bp;
}

// One masked_attention_forward call: the params and the outputs they point into.
struct ForwardCall {
  AttentionParams params{};
  at::Tensor out;        // (B, H, Sq, D), q's dtype
  at::Tensor lse;        // (B, H, Sq) float32
  at::Tensor rng_state;  // (2,) int64: the dropout stream's (seed, offset); zeros without dropout
};

inline ForwardCall prepare_forward(const Inputs& in, bool is_causal, double scale, double dropout_p, const char* op,
                                   bool causal_lower_right, const Memory& mem) {
  const int64_t B = in.q.size(0), H = in.q.size(1), Sq = in.q.size(2), D = in.q.size(3);
  ForwardCall c;
  c.out = mem.empty({B, H, Sq, D}, in.q.scalar_type());
  c.lse = mem.empty({B, H, Sq}, at::kFloat);
  c.rng_state = mem.empty({2}, at::kLong);
  c.rng_state.zero_();
  c.params = make_params(in, c.out, c.lse, is_causal, scale, dropout_p, op, causal_lower_right);
  c.params.rng_state = c.rng_state.data_ptr<int64_t>();
  return c;
}

// One masked_attention_backward call: the params, the saved tensors as the kernels
// read them, and the gradients and delta they write (every element, on both devices).
struct BackwardCall {
  AttentionBackwardParams params{};
  at::Tensor dout, out, lse, rng_state;
  at::Tensor dq, dk, dv;  // of q's, k's, v's shapes
  at::Tensor delta;       // (B, H, Sq) float32
};

inline BackwardCall prepare_backward(const Inputs& in, const at::Tensor& grad_out, const at::Tensor& out,
                                     const at::Tensor& lse, const at::Tensor& rng_state, bool is_causal, double scale,
                                     double dropout_p, const char* op, bool causal_lower_right, const Memory& mem) {
  const at::Tensor& q = in.q;
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = in.k.size(1), Sk = in.k.size(2);
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
  BackwardCall c;
  c.dout = rows_readable(grad_out) ? grad_out : mem.contiguous(grad_out);
  c.out = mem.contiguous(out);
  c.lse = mem.contiguous(lse);
  c.rng_state = mem.contiguous(rng_state);
  c.dq = mem.empty({B, H, Sq, D}, q.scalar_type());
  c.dk = mem.empty({B, Hkv, Sk, D}, q.scalar_type());
  c.dv = mem.empty({B, Hkv, Sk, D}, q.scalar_type());
  c.delta = mem.empty({B, H, Sq}, at::kFloat);
  c.params = make_backward_params(in, c.dout, c.out, c.lse, c.rng_state, c.dq, c.dk, c.dv, c.delta, is_causal, scale,
                                  dropout_p, op, causal_lower_right);
  return c;
}

#ifdef VAE_EXT_WITH_CUDA
// The CUDA backward's scratch (attention_backward_cuda_workspace_bytes, uninitialised),
// attached to the params once bp.deterministic is set; the tensor must live until the
// kernels have run. Undefined when none is needed.
inline at::Tensor attach_cuda_workspace(AttentionBackwardParams& bp, const Memory& mem) {
  const size_t bytes = attention_backward_cuda_workspace_bytes(bp);
  if (bytes == 0) return at::Tensor();
  at::Tensor workspace = mem.empty({static_cast<int64_t>(bytes)}, at::kByte);
  bp.workspace = workspace.data_ptr();
  return workspace;
}
#endif

}  // namespace vae_ext::attention_glue
