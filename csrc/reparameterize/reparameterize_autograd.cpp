// reparameterize: autograd in C++ (the Autograd dispatch key). The forward
// redispatches below autograd to the CPU/CUDA kernel (or, while torch.compile
// traces, to the fake kernel registered from Python); the backward calls
// vae_ext::reparameterize_backward. Doing this here rather than with
// torch.library.register_autograd saves the Python round trip of a small call
// (about 30 us forward and as much again backward on CPU). Under create_graph=True
// the backward is written with differentiable ATen ops instead, so double
// backward (a gradient penalty) gets the true second-order gradients.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace vae_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
                        int64_t num_samples, std::optional<int64_t> seed,
                        const std::optional<at::Generator>& generator) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_ext::reparameterize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               int64_t, std::optional<int64_t>, const std::optional<at::Generator>&)>();
  return op.call(mu, logvar, eps, num_samples, seed, generator);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_z, const at::Tensor& z,
                                                 const at::Tensor& mu) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vae_ext::reparameterize_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_z, z, mu);
}

// A tensor that torch.compile / make_fx / a dispatch mode is tracing (fake or functional).
bool is_traced(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize) ||
         c10::impl::TorchDispatchModeTLS::stack_len() > 0;
}

class Reparameterize : public torch::autograd::Function<Reparameterize> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                            const std::optional<at::Tensor>& eps, int64_t num_samples, std::optional<int64_t> seed,
                            const std::optional<at::Generator>& generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor z = call_forward(mu, logvar, eps, num_samples, seed, generator);
    // z - mu = eps * std: the output stands in for eps; logvar only when eps needs a gradient.
    const bool eps_grad = eps.has_value() && eps->requires_grad();
    ctx->save_for_backward({mu, z, eps_grad ? logvar : at::Tensor()});
    ctx->saved_data["has_eps"] = eps.has_value() && eps->defined();  // eps is autograd edge 2 only if given
    return z;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& mu = saved[0];
    const at::Tensor& z = saved[1];
    const at::Tensor& grad_z = grads[0];
    at::Tensor grad_mu, grad_logvar, grad_eps;
    const bool need_mu = ctx->needs_input_grad(0), need_logvar = ctx->needs_input_grad(1);
    if (grad_z.defined() && (need_mu || need_logvar)) {
      if (at::GradMode::is_enabled() && !is_traced(grad_z)) {
        // create_graph=True: the same gradients from differentiable ATen ops (z - mu = eps * std, and
        // z's own graph edge gives d(z - mu)/dlogvar), so that this backward can be differentiated again.
        const bool widen = mu.scalar_type() == at::kHalf || mu.scalar_type() == at::kBFloat16;
        const at::Tensor g = widen ? grad_z.to(at::kFloat) : grad_z;
        const at::Tensor z_mu = widen ? z.to(at::kFloat) - mu.to(at::kFloat) : z - mu;
        grad_mu = g.sum(0).to(mu.scalar_type());
        grad_logvar = ((g * z_mu).sum(0) * 0.5).to(mu.scalar_type());
      } else {
        std::tie(grad_mu, grad_logvar) = call_backward(grad_z, z, mu);
      }
    }
    if (grad_z.defined() && ctx->saved_data["has_eps"].toBool() && ctx->needs_input_grad(2)) grad_eps = grad_z.mul(saved[2].mul(0.5).exp());
    return {need_mu ? grad_mu : at::Tensor(), need_logvar ? grad_logvar : at::Tensor(), grad_eps,
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor reparameterize_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                   const std::optional<at::Tensor>& eps, int64_t num_samples,
                                   std::optional<int64_t> seed, const std::optional<at::Generator>& generator) {
  return Reparameterize::apply(mu, logvar, eps, num_samples, seed, generator);
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, Autograd, m) { m.impl("reparameterize", &reparameterize_autograd); }

}  // namespace vae_ext
