// Glue of csrc/attention/attention_cuda.cu: the masked_attention CUDA entry points,
// run under the CPU emulation, as vae_ext_emu ops on CPU tensors. The inputs are
// checked and the params filled by the production glue (attention/attention_glue.h),
// over copies of the tensors in emulated device memory, allocating through it.
#include <ATen/ops/empty.h>

#include <tuple>

#include "attention/attention.h"
#include "attention/attention_glue.h"
#include "emu_glue.h"

namespace vae_ext::emu_glue::attention {
namespace {

using attention_glue::Inputs;

// The production glue's checks and params (attention_glue.h) on the CPU tensors, then every tensor the
// kernels read moved into device memory with its layout: q, k, v (misaligned by `misalign` bytes), the
// mask view (a broadcast dim stays stride 0), the padding mask (left out unless pass_padding_mask, to
// run the key_len-only path) and key_len.
Inputs device_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
                     double dropout_p, bool pass_padding_mask, int64_t misalign, const char* op) {
  Inputs in = attention_glue::check_and_prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, op);
  in.q = to_device_strided(in.q, misalign);
  in.k = to_device_strided(in.k, misalign);
  in.v = to_device_strided(in.v, misalign);
  if (in.mask.defined()) in.mask = to_device_strided(in.mask, 0);
  in.key_padding = pass_padding_mask && in.key_padding.defined() ? to_device(in.key_padding) : at::Tensor();
  if (in.key_len.defined()) in.key_len = to_device(in.key_len);
  return in;
}

// (out, lse, rng_state) of attention_forward_cuda. Dropout draws from (seed, offset), read through
// device pointers when seed_in_device_memory (as under CUDA-graph capture).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale, double dropout_p, int64_t seed,
    int64_t offset, bool seed_in_device_memory, bool pass_padding_mask, int64_t misalign, bool causal_lower_right) {
  const Inputs in = device_inputs(q, k, v, attn_mask, key_padding_mask, dropout_p, pass_padding_mask, misalign,
                                  "attention_forward");
  at::Tensor gen_state = device_empty({2}, at::kLong);  // a generator's graph-safe (seed, offset)
  gen_state.mutable_data_ptr<int64_t>()[0] = seed;
  gen_state.mutable_data_ptr<int64_t>()[1] = offset;

  attention_glue::ForwardCall call = attention_glue::prepare_forward(in, is_causal, scale, dropout_p,
                                                                     "attention_forward", causal_lower_right,
                                                                     DeviceMemory());
  AttentionParams& p = call.params;
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
  return {call.out, call.lse, call.rng_state};
}

// (dq, dk, dv, delta) of attention_backward_cuda.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale, double dropout_p,
    bool deterministic, bool pass_padding_mask, int64_t misalign, bool causal_lower_right) {
  const Inputs in = device_inputs(q, k, v, attn_mask, key_padding_mask, dropout_p, pass_padding_mask, misalign,
                                  "attention_backward");
  const at::Tensor ddout = to_device_strided(attention_glue::rows_contiguous(grad_out), misalign);
  const at::Tensor dout_c = to_device(out.contiguous()), dlse = to_device(lse.contiguous()),
                   drng = to_device(rng_state.contiguous());
  const DeviceMemory mem;
  attention_glue::BackwardCall call =
      attention_glue::prepare_backward(in, ddout, dout_c, dlse, drng, is_causal, scale, dropout_p,
                                       "attention_backward", causal_lower_right, mem);
  AttentionBackwardParams& bp = call.params;
  bp.deterministic = deterministic;
  const at::Tensor workspace = attention_glue::attach_cuda_workspace(bp, mem);  // uninitialised (0xFF)
  attention_backward_cuda(bp, nullptr);
  return {call.dq, call.dk, call.dv, call.delta};
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
      "bool pass_padding_mask=True, int misalign=0, bool causal_lower_right=False) -> (Tensor, Tensor, Tensor)",
      &attention_forward);
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor rng_state, "
      "Tensor? attn_mask, Tensor? key_padding_mask, bool is_causal, float scale, float dropout_p=0.0, "
      "bool deterministic=False, bool pass_padding_mask=True, int misalign=0, bool causal_lower_right=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      &attention_backward);
  m.def("attention_workspace_bytes(Tensor q, Tensor k, bool deterministic=False) -> int", &attention_workspace_bytes);
}

}  // namespace vae_ext::emu_glue::attention
