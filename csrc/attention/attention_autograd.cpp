// masked_attention_forward: autograd in C++ (the Autograd dispatch key), so a
// call pays no Python round trip in forward or backward. The forward
// redispatches below autograd to the CPU/CUDA kernel (or, while torch.compile
// traces, to the fake kernel registered from Python) and keeps q, k, v, out, the
// row log-sum-exp and the dropout stream's (seed, offset); the backward calls
// vae_ext::masked_attention_backward, which recomputes the probabilities.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace vae_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask,
                    const OptTensor& key_padding_mask, bool is_causal, double scale, double dropout_p,
                    std::optional<int64_t> seed, const std::optional<at::Generator>& generator,
                    bool causal_lower_right) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_ext::masked_attention_forward", "")
                             .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                           const OptTensor&, bool, double, double, std::optional<int64_t>,
                                           const std::optional<at::Generator>&, bool)>();
  return op.call(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p, seed, generator,
                 causal_lower_right);
}

Triple call_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng_state,
                     const OptTensor& attn_mask, const OptTensor& key_padding_mask, bool is_causal, double scale,
                     double dropout_p, bool causal_lower_right) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vae_ext::masked_attention_backward", "")
          .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                        bool, double, double, bool)>();
  return op.call(grad_out, q, k, v, out, lse, rng_state, attn_mask, key_padding_mask, is_causal, scale, dropout_p,
                 causal_lower_right);
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class MaskedAttention : public torch::autograd::Function<MaskedAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& attn_mask, const OptTensor& key_padding_mask, bool is_causal,
                               double scale, double dropout_p, std::optional<int64_t> seed,
                               const std::optional<at::Generator>& generator, bool causal_lower_right) {
    Triple result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = call_forward(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p, seed, generator,
                            causal_lower_right);
    }
    const auto& [out, lse, rng_state] = result;
    ctx->save_for_backward({q, k, v, out, lse, rng_state, present(attn_mask) ? *attn_mask : at::Tensor(),
                            present(key_padding_mask) ? *key_padding_mask : at::Tensor()});
    ctx->mark_non_differentiable({lse, rng_state});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["causal_lower_right"] = causal_lower_right;
    return {out, lse, rng_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& attn_mask = s[6];
    // Autograd edges: q 0, k 1, v 2, then attn_mask 3 when it was given.
    TORCH_CHECK(!(attn_mask.defined() && ctx->needs_input_grad(3)),
                "vae_ext.masked_attention: the compiled kernels do not compute a gradient for a float attn_mask; "
                "vae_ext.masked_attention runs the reference for such a mask");
    const bool need_q = ctx->needs_input_grad(0), need_k = ctx->needs_input_grad(1),
               need_v = ctx->needs_input_grad(2);
    variable_list result(11);
    if (!(need_q || need_k || need_v) || !grads[0].defined()) return result;
    auto [dq, dk, dv] = call_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], optional_of(attn_mask),
                                      optional_of(s[7]), ctx->saved_data["is_causal"].toBool(),
                                      ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                                      ctx->saved_data["causal_lower_right"].toBool());
    if (need_q) result[0] = dq;
    if (need_k) result[1] = dk;
    if (need_v) result[2] = dv;
    return result;
  }
};

Triple masked_attention_forward_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const OptTensor& attn_mask, const OptTensor& key_padding_mask,
                                         bool is_causal, double scale, double dropout_p, std::optional<int64_t> seed,
                                         const std::optional<at::Generator>& generator, bool causal_lower_right) {
  const variable_list out = MaskedAttention::apply(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p,
                                                   seed, generator, causal_lower_right);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, Autograd, m) { m.impl("masked_attention_forward", &masked_attention_forward_autograd); }

}  // namespace vae_ext
