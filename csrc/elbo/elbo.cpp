// elbo_loss: the torch glue. Checks what the kernels assume, allocates the
// outputs and the gradient buffers that were asked for, fills the params struct
// and launches the CPU or CUDA kernel.
#include "elbo/elbo.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string_view>
#include <tuple>

#include "common/torch_utils.h"

#ifdef VAE_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace vae_ext {
namespace {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor>;

Likelihood parse_likelihood(std::string_view s) {
  if (s == "bernoulli") return Likelihood::kBernoulli;
  if (s == "gaussian") return Likelihood::kGaussian;
  if (s == "categorical") return Likelihood::kCategorical;
  TORCH_CHECK(false, "elbo_forward: unknown likelihood '", s, "'");
}

Reduction parse_reduction(std::string_view s) {
  if (s == "mean") return Reduction::kMean;
  if (s == "sum") return Reduction::kSum;
  if (s == "none") return Reduction::kNone;
  TORCH_CHECK(false, "elbo_forward: unknown reduction '", s, "'");
}

// A prior of mu's shape that repeats one row over the batch (stride 0 in dim 0,
// the rest contiguous) is read in place with row stride 0; anything else is
// made contiguous (row stride L).
std::pair<at::Tensor, int64_t> prior_layout(const at::Tensor& prior, int64_t latent_row) {
  if (prior.dim() >= 1 && prior.size(0) > 1 && prior.stride(0) == 0 && prior.select(0, 0).is_contiguous()) {
    return {prior, 0};
  }
  return {prior.contiguous(), latent_row};
}

ForwardResult elbo_forward_impl(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                                const std::optional<at::Tensor>& prior_logvar,
                                const std::optional<at::Tensor>& obs_logvar, c10::string_view likelihood_name,
                                c10::string_view reduction_name, double beta, double free_bits, int64_t ignore_index,
                                std::array<bool, 6> needs_grad) {
  const Likelihood likelihood = parse_likelihood(std::string_view(likelihood_name.data(), likelihood_name.size()));
  const Reduction reduction = parse_reduction(std::string_view(reduction_name.data(), reduction_name.size()));
  TORCH_CHECK(recon.dim() >= 1, "elbo_forward: recon needs a batch dim");
  const int64_t B = recon.size(0);
  TORCH_CHECK(mu.sizes() == logvar.sizes(), "elbo_forward: logvar must have the shape of mu");
  TORCH_CHECK(mu.dim() >= 1 && mu.size(0) == B, "elbo_forward: mu must have the batch size of recon in dim 0");
  TORCH_CHECK(mu.scalar_type() == logvar.scalar_type(), "elbo_forward: mu and logvar dtypes differ");
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
              "elbo_forward: prior_mu and prior_logvar come together");
  const auto device = recon.device();
  for (const at::Tensor* t : {&target, &mu, &logvar}) {
    TORCH_CHECK(t->device() == device, "elbo_forward: all tensors must be on one device");
  }
  if (likelihood == Likelihood::kCategorical) {
    TORCH_CHECK(recon.dim() == 3, "elbo_forward: categorical recon must be (B, T, V)");
    TORCH_CHECK(target.scalar_type() == at::kLong, "elbo_forward: categorical target must be int64");
    TORCH_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == recon.size(1),
                "elbo_forward: categorical target must be (B, T)");
  } else {
    TORCH_CHECK(target.sizes() == recon.sizes(), "elbo_forward: target must have the shape of recon");
    TORCH_CHECK(target.scalar_type() == recon.scalar_type(), "elbo_forward: target and recon dtypes differ");
  }
  ObsKind obs_kind = ObsKind::kNone;
  if (obs_logvar.has_value()) {
    TORCH_CHECK(likelihood == Likelihood::kGaussian, "elbo_forward: obs_logvar is for the gaussian likelihood");
    TORCH_CHECK(obs_logvar->scalar_type() == recon.scalar_type(), "elbo_forward: obs_logvar and recon dtypes differ");
    TORCH_CHECK(obs_logvar->device() == device, "elbo_forward: all tensors must be on one device");
    const int64_t rows = obs_logvar->dim() >= 1 ? obs_logvar->size(0) : 0;
    TORCH_CHECK(rows == 1 || rows == B, "elbo_forward: obs_logvar must have 1 or B rows in dim 0");
    if (obs_logvar->dim() == 1) {
      obs_kind = ObsKind::kPerRow;
    } else {
      TORCH_CHECK(obs_logvar->sizes().slice(1) == recon.sizes().slice(1),
                  "elbo_forward: obs_logvar must be (B,), (1,), or recon's shape with 1 or B rows");
      obs_kind = ObsKind::kPerElement;
    }
  }
  if (prior_mu.has_value()) {
    for (const auto* t : {&*prior_mu, &*prior_logvar}) {
      TORCH_CHECK(t->sizes() == mu.sizes(), "elbo_forward: priors must have the shape of mu");
      TORCH_CHECK(t->scalar_type() == mu.scalar_type(), "elbo_forward: priors must have the dtype of mu");
      TORCH_CHECK(t->device() == device, "elbo_forward: all tensors must be on one device");
    }
  }
  const bool grad_recon = needs_grad[0], grad_mu = needs_grad[1], grad_logvar = needs_grad[2];
  const bool grad_prior_mu = needs_grad[3] && prior_mu.has_value();
  const bool grad_prior_logvar = needs_grad[4] && prior_logvar.has_value();
  const bool grad_obs = needs_grad[5] && obs_kind != ObsKind::kNone;

  const at::Tensor recon_c = recon.contiguous();
  const at::Tensor target_c = target.contiguous();
  const at::Tensor mu_c = mu.contiguous();
  const at::Tensor logvar_c = logvar.contiguous();
  const int64_t N = B > 0 ? recon.numel() / B : 0;
  const int64_t L = B > 0 ? mu.numel() / B : 0;
  at::Tensor obs_c, prior_mu_c, prior_logvar_c;
  int64_t obs_row_stride = 0, pm_stride = 0, plv_stride = 0;
  if (obs_kind != ObsKind::kNone) {
    obs_c = obs_logvar->contiguous();
    const bool per_sample = obs_c.size(0) == B && B > 1;
    obs_row_stride = per_sample ? (obs_kind == ObsKind::kPerRow ? 1 : N) : 0;
  }
  if (prior_mu.has_value()) {
    std::tie(prior_mu_c, pm_stride) = prior_layout(*prior_mu, L);
    std::tie(prior_logvar_c, plv_stride) = prior_layout(*prior_logvar, L);
  }

  const auto dopt = recon.options().dtype(at::kDouble);
  const std::vector<int64_t> out_shape = reduction == Reduction::kNone ? std::vector<int64_t>{B} : std::vector<int64_t>{};
  at::Tensor out_loss = at::empty(out_shape, dopt), out_recon = at::empty(out_shape, dopt),
             out_kl = at::empty(out_shape, dopt);
  auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor g_recon = grad_recon ? at::empty_like(recon_c) : empty(recon);
  at::Tensor g_mu = grad_mu ? at::empty_like(mu_c) : empty(mu);
  at::Tensor g_logvar = grad_logvar ? at::empty_like(mu_c) : empty(mu);
  at::Tensor g_prior_mu = grad_prior_mu ? at::empty_like(mu_c) : empty(mu);
  at::Tensor g_prior_logvar = grad_prior_logvar ? at::empty_like(mu_c) : empty(mu);
  at::Tensor g_obs = empty(recon);
  if (grad_obs) g_obs = obs_kind == ObsKind::kPerRow ? at::empty({B}, recon.options()) : at::empty_like(recon_c);

  ElboParams p{};
  p.batch = B;
  p.likelihood = likelihood;
  p.recon_dtype = to_dtype(recon.scalar_type(), "elbo_forward");
  p.recon = recon_c.const_data_ptr();
  p.target = target_c.const_data_ptr();
  p.recon_row = N;
  p.vocab = likelihood == Likelihood::kCategorical ? recon.size(2) : 0;
  p.ignore_index = ignore_index;
  p.obs_kind = obs_kind;
  p.obs_logvar = obs_c.defined() ? obs_c.const_data_ptr() : nullptr;
  p.obs_row_stride = obs_row_stride;
  p.grad_recon = grad_recon ? g_recon.data_ptr() : nullptr;
  p.grad_obs_logvar = grad_obs ? g_obs.data_ptr() : nullptr;
  p.latent_dtype = to_dtype(mu.scalar_type(), "elbo_forward");
  p.mu = mu_c.const_data_ptr();
  p.logvar = logvar_c.const_data_ptr();
  p.prior_mu = prior_mu_c.defined() ? prior_mu_c.const_data_ptr() : nullptr;
  p.prior_logvar = prior_logvar_c.defined() ? prior_logvar_c.const_data_ptr() : nullptr;
  p.prior_mu_row_stride = pm_stride;
  p.prior_logvar_row_stride = plv_stride;
  p.latent_row = L;
  p.free_bits = free_bits;
  p.grad_mu = grad_mu ? g_mu.data_ptr() : nullptr;
  p.grad_logvar = grad_logvar ? g_logvar.data_ptr() : nullptr;
  p.grad_prior_mu = grad_prior_mu ? g_prior_mu.data_ptr() : nullptr;
  p.grad_prior_logvar = grad_prior_logvar ? g_prior_logvar.data_ptr() : nullptr;
  p.beta = beta;
  p.reduction = reduction;
  p.grad_factor = reduction == Reduction::kMean && B > 0 ? 1.0 / static_cast<double>(B) : 1.0;
  p.out_loss = out_loss.data_ptr<double>();
  p.out_recon = out_recon.data_ptr<double>();
  p.out_kl = out_kl.data_ptr<double>();

  if (recon.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(device);
    at::Tensor workspace = at::empty({static_cast<int64_t>(elbo_cuda_workspace_bytes(p))},
                                     recon.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    elbo_forward_cuda(p, at::cuda::getCurrentCUDAStream());
#else
    TORCH_CHECK(false, "elbo_forward: this build has no CUDA kernels");
#endif
  } else {
    elbo_forward_cpu(p);
  }
  const auto loss_dtype = at::promote_types(recon.scalar_type(), mu.scalar_type());
  return {out_loss.to(loss_dtype), out_recon.to(recon.scalar_type()), out_kl.to(mu.scalar_type()),
          g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_obs};
}

at::Tensor elbo_scale_grad_impl(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() >= 1, "elbo_scale_grad: grad needs a batch dim");
  const int64_t rows = grad.size(0);
  TORCH_CHECK(scale.numel() == 1 || scale.numel() == rows, "elbo_scale_grad: scale must have 1 or ", rows,
              " elements, got ", scale.numel());
  TORCH_CHECK(scale.device() == grad.device(), "elbo_scale_grad: scale must be on the device of grad");
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty_like(g);
  if (g.numel() == 0) return out;
  const at::Tensor s = scale.to(at::kDouble).contiguous();
  ElboScaleParams p{};
  p.grad = g.const_data_ptr();
  p.out = out.data_ptr();
  p.dtype = to_dtype(g.scalar_type(), "elbo_scale_grad");
  p.rows = rows;
  p.row_numel = g.numel() / rows;
  p.scale = s.const_data_ptr<double>();
  p.scale_stride = scale.numel() == 1 ? 0 : 1;
  if (g.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(g.device());
    elbo_scale_grad_cuda(p, at::cuda::getCurrentCUDAStream());
#endif
  } else {
    elbo_scale_grad_cpu(p);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("elbo_forward", &elbo_forward_impl);
  m.impl("elbo_scale_grad", &elbo_scale_grad_impl);
}

#ifdef VAE_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("elbo_forward", &elbo_forward_impl);
  m.impl("elbo_scale_grad", &elbo_scale_grad_impl);
}
#endif

}  // namespace vae_ext
