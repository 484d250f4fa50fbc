// elbo_forward: autograd in C++ (the Autograd dispatch key), so a call pays no
// Python round trip in forward or backward. The forward redispatches below
// autograd to the CPU/CUDA kernel (or, while torch.compile traces, to the fake
// kernel registered from Python); its six gradient buffers are the gradients of
// the reduced recon and kl parts for an upstream gradient of 1. The backward
// scales each buffer by its group's upstream gradient (recon group: g_loss +
// g_recon; latent group: beta * g_loss + g_kl) with vae_ext::elbo_scale_grad. On
// the CPU, where reading that gradient costs nothing, a buffer is returned as it
// is when the gradient is exactly 1 (loss.backward() of a 'mean' or 'sum' loss).
// On CUDA the scale always runs: one pass over the buffer, asynchronous, where
// the check would stall the stream with a host sync every step. A returned
// gradient never aliases saved state that a later backward reads: the buffer is
// handed out as it is only when the graph is freed after this backward (else a
// copy, or the scaled new tensor).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace vae_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor>;

constexpr const char* kGradNames[6] = {"recon", "mu", "logvar", "prior_mu", "prior_logvar", "obs_logvar"};
// Position of each gradient buffer's input among elbo_forward's 13 arguments.
constexpr int kArgIndex[6] = {0, 2, 3, 4, 5, 6};

ForwardResult call_forward(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                           const at::Tensor& logvar, const OptTensor& prior_mu, const OptTensor& prior_logvar,
                           const OptTensor& obs_logvar, c10::string_view likelihood, c10::string_view reduction,
                           double beta, double free_bits, int64_t ignore_index, std::array<bool, 6> needs_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vae_ext::elbo_forward", "")
          .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view,
                               c10::string_view, double, double, int64_t, std::array<bool, 6>)>();
  return op.call(recon, target, mu, logvar, prior_mu, prior_logvar, obs_logvar, likelihood, reduction, beta,
                 free_bits, ignore_index, needs_grad);
}

at::Tensor call_scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_ext::elbo_scale_grad", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, scale);
}

// A tensor that torch.compile / make_fx / a dispatch mode is tracing: its values
// cannot be read (fake or functional tensors, or any Python dispatch mode active).
bool is_traced(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize) ||
         c10::impl::TorchDispatchModeTLS::stack_len() > 0;
}

// weight * g_loss + g_part; undefined where both upstream gradients are.
at::Tensor combine(const at::Tensor& g_loss, const at::Tensor& g_part, double weight) {
  if (!g_loss.defined()) return g_part;
  at::Tensor scaled = weight == 1.0 ? g_loss : g_loss.mul(weight);
  return g_part.defined() ? scaled.add(g_part) : scaled;
}

// Whether a scale is exactly 1 everywhere, asked only of CPU tensors with readable
// values (false on CUDA, and while tracing, where the multiply stays in the graph).
bool all_ones(const at::Tensor& s) {
  return s.defined() && s.is_cpu() && !is_traced(s) && s.eq(1).all().item<bool>();
}

class ElboForward : public torch::autograd::Function<ElboForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& recon, const at::Tensor& target,
                               const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& prior_mu,
                               const OptTensor& prior_logvar, const OptTensor& obs_logvar,
                               c10::string_view likelihood, c10::string_view reduction, double beta, double free_bits,
                               int64_t ignore_index, std::array<bool, 6> needs_grad) {
    ForwardResult out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = call_forward(recon, target, mu, logvar, prior_mu, prior_logvar, obs_logvar, likelihood, reduction, beta,
                         free_bits, ignore_index, needs_grad);
    }
    variable_list outputs{std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out), std::get<4>(out),
                          std::get<5>(out), std::get<6>(out), std::get<7>(out), std::get<8>(out)};
    const variable_list buffers(outputs.begin() + 3, outputs.end());
    ctx->mark_non_differentiable(buffers);
    ctx->set_materialize_grads(false);  // unused outputs: undefined, not a zero tensor of the buffer's size
    ctx->save_for_backward(buffers);
    // Autograd edges exist for the tensor arguments that are present: recon 0, target 1,
    // mu 2, logvar 3, then the optional ones in order.
    int64_t edge = 4, requested = 0;
    const std::array<const OptTensor*, 3> optional{&prior_mu, &prior_logvar, &obs_logvar};
    for (int i = 0; i < 3; ++i) {
      const bool present = optional[i]->has_value() && (*optional[i])->defined();
      ctx->saved_data[std::string("edge_") + kGradNames[3 + i]] = present ? edge++ : int64_t{-1};
    }
    for (int i = 0; i < 6; ++i) requested |= static_cast<int64_t>(needs_grad[i]) << i;
    ctx->saved_data["requested"] = requested;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["batch"] = recon.size(0);
    ctx->saved_data["obs_rows"] = obs_logvar.has_value() && obs_logvar->defined() ? obs_logvar->size(0) : int64_t{-1};
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list buffers = ctx->get_saved_variables();
    const double beta = ctx->saved_data["beta"].toDouble();
    const int64_t requested = ctx->saved_data["requested"].toInt();
    const std::array<at::Tensor, 2> scales{combine(grads[0], grads[1], 1.0), combine(grads[0], grads[2], beta)};
    for (const at::Tensor& s : scales) {
      TORCH_CHECK(!(s.defined() && at::GradMode::is_enabled() && !is_traced(s)),
                  "vae_ext.elbo_loss: double backward (create_graph=True) is not supported");
    }
    const std::array<bool, 2> is_one{all_ones(scales[0]), all_ones(scales[1])};
    variable_list result(13);
    for (int k = 0; k < 6; ++k) {
      const int64_t edge = k < 3 ? int64_t{kArgIndex[k]} : ctx->saved_data[std::string("edge_") + kGradNames[k]].toInt();
      if (edge < 0 || !ctx->needs_input_grad(static_cast<size_t>(edge))) continue;
      TORCH_CHECK((requested >> k) & 1, "vae_ext.elbo_forward: the gradient of ", kGradNames[k],
                  " is needed but was not requested in needs_grad");
      const int group = (k == 0 || k == 5) ? 0 : 1;
      const at::Tensor& buf = buffers[k];
      at::Tensor grad;
      if (!scales[group].defined()) {
        grad = at::zeros_like(buf);
      } else if (is_one[group]) {
        // The buffer itself, but only when this graph is freed after this backward: on a
        // retained graph (retain_graph / create_graph) a later backward would hand out the
        // same storage again, so the caller's gradient must be a copy of the saved state.
        grad = torch::autograd::get_current_graph_task_keep_graph() ? buf.clone() : buf;
      } else {
        grad = call_scale_grad(buf, scales[group]);
      }
      if (k == 5 && ctx->saved_data["obs_rows"].toInt() != ctx->saved_data["batch"].toInt()) {
        grad = grad.sum(0, /*keepdim=*/true);
      }
      result[kArgIndex[k]] = grad;
    }
    return result;
  }
};

ForwardResult elbo_forward_autograd(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                    const at::Tensor& logvar, const OptTensor& prior_mu,
                                    const OptTensor& prior_logvar, const OptTensor& obs_logvar,
                                    c10::string_view likelihood, c10::string_view reduction, double beta,
                                    double free_bits, int64_t ignore_index, std::array<bool, 6> needs_grad) {
  const variable_list out = ElboForward::apply(recon, target, mu, logvar, prior_mu, prior_logvar, obs_logvar,
                                               likelihood, reduction, beta, free_bits, ignore_index, needs_grad);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, Autograd, m) { m.impl("elbo_forward", &elbo_forward_autograd); }

}  // namespace vae_ext
