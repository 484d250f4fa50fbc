// masked_attention_forward: autograd in C++ (the Autograd dispatch key), so a
// call pays no Python round trip in forward or backward. The forward
// redispatches below autograd to the CPU/CUDA kernel (or, while torch.compile
// traces, to the fake kernel registered from Python) and keeps q, k, v, out, the
// row log-sum-exp and the dropout stream's (seed, offset); the backward calls
// vae_ext::masked_attention_backward, which recomputes the probabilities.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>
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

// A tensor that torch.compile / make_fx / a dispatch mode is tracing (fake or functional).
bool is_traced(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize) ||
         c10::impl::TorchDispatchModeTLS::stack_len() > 0;
}

// The backward of masked_attention written with differentiable ATen ops (S x S
// scores materialised), for a backward that must itself be differentiated
// (create_graph=True: a gradient penalty, a Hessian-vector product). Same
// semantics as the kernels: masks intersect, -inf in a float mask hides like
// False, a row with no visible key has zero probabilities; 16-bit inputs are
// computed in float32. No dropout (checked by the caller).
Triple math_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& attn_mask, const at::Tensor& key_padding_mask, bool is_causal, double scale,
                     bool causal_lower_right) {
  const bool widen = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  auto acc = [&](const at::Tensor& t) { return widen ? t.to(at::kFloat) : t; };
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Sk = k.size(2);
  const int64_t G = H / Hkv;
  const at::Tensor qf = acc(q), go = acc(grad_out);
  const at::Tensor kf = G > 1 ? acc(k).repeat_interleave(G, 1) : acc(k);
  const at::Tensor vf = G > 1 ? acc(v).repeat_interleave(G, 1) : acc(v);
  at::Tensor scores = at::matmul(qf, kf.transpose(-2, -1)) * scale;
  at::Tensor visible = at::ones({Sq, Sk}, q.options().dtype(at::kBool));
  if (is_causal) visible = visible.tril(causal_lower_right ? Sk - Sq : 0);  // query i sees keys j <= i (+ Sk - Sq)
  visible = visible.expand({B, H, Sq, Sk});
  if (key_padding_mask.defined()) visible = visible.logical_and(key_padding_mask.logical_not().view({B, 1, 1, Sk}));
  if (attn_mask.defined()) {
    if (attn_mask.scalar_type() == at::kBool) {
      visible = visible.logical_and(attn_mask);
    } else {
      visible = visible.logical_and(attn_mask.ne(-std::numeric_limits<double>::infinity()));
      scores = scores + attn_mask.to(scores.scalar_type());
    }
  }
  const double ninf = -std::numeric_limits<double>::infinity();
  scores = scores.masked_fill(visible.logical_not(), ninf);
  const at::Tensor empty = visible.any(-1, /*keepdim=*/true).logical_not();
  const at::Tensor probs = at::softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0);
  at::Tensor dv = at::matmul(probs.transpose(-2, -1), go);
  const at::Tensor dp = at::matmul(go, vf.transpose(-2, -1)).masked_fill(visible.logical_not(), 0.0);
  const at::Tensor ds = probs * (dp - (probs * dp).sum(-1, /*keepdim=*/true));
  const at::Tensor dq = at::matmul(ds, kf) * scale;
  at::Tensor dk = at::matmul(ds.transpose(-2, -1), qf) * scale;
  if (G > 1) {
    dk = dk.view({B, Hkv, G, Sk, D}).sum(2);
    dv = dv.view({B, Hkv, G, Sk, D}).sum(2);
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

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
    if (at::GradMode::is_enabled() && !is_traced(grads[0])) {
      // create_graph=True: this backward is differentiated again. The kernels' backward
      // has no derivative of its own, so the differentiable ATen formula runs instead.
      const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
      TORCH_CHECK(dropout_p == 0.0, "vae_ext.masked_attention: double backward (create_graph=True) with dropout_p > 0 "
                  "is not supported; use dropout_p=0 or the reference backend (vae_ext.use_backend('reference'))");
      auto [dq, dk, dv] = math_backward(grads[0], s[0], s[1], s[2], attn_mask, s[7],
                                        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["scale"].toDouble(),
                                        ctx->saved_data["causal_lower_right"].toBool());
      if (need_q) result[0] = dq;
      if (need_k) result[1] = dk;
      if (need_v) result[2] = dv;
      return result;
    }
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
