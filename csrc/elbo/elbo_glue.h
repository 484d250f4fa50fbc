// elbo_loss: the torch half of the glue, shared by the extension (elbo.cpp) and
// the CUDA emulation's test glue (tests/cuda_emu/elbo_ops.cpp), so the emulated
// CUDA kernels get exactly the params the real ones get. It checks what the
// kernels assume, brings the inputs to the layouts they read (contiguous, or a
// prior shared by the batch read in place with row stride 0), allocates the
// outputs and the gradient buffers that were asked for, and fills the params
// struct. ATen only (no CUDA or torch-CUDA headers); the caller says where memory
// comes from (common/glue_memory.h) and launches the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/promote_types.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "common/glue_memory.h"
#include "common/torch_utils.h"
#include "elbo/elbo.h"

namespace vae_ext::elbo_glue {

using glue::Memory;

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor>;

// One elbo_forward call: the filled params and the tensors they point into.
struct ForwardCall {
  ElboParams params{};
  at::Tensor recon, target, mu, logvar, prior_mu, prior_logvar, obs_logvar;  // what the kernels read
  at::Tensor out_loss, out_recon, out_kl;                                    // float64
  at::Tensor g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_obs;     // empty unless asked for
  at::ScalarType loss_dtype, recon_dtype, latent_dtype;
};

inline Likelihood parse_likelihood(std::string_view s) {
  if (s == "bernoulli") return Likelihood::kBernoulli;
  if (s == "bernoulli_probs") return Likelihood::kBernoulliProbs;  // recon are probabilities
  if (s == "gaussian") return Likelihood::kGaussian;
  if (s == "categorical") return Likelihood::kCategorical;
  TORCH_CHECK(false, "elbo_forward: unknown likelihood '", s, "'");
}

inline Reduction parse_reduction(std::string_view s) {
  if (s == "mean") return Reduction::kMean;
  if (s == "sum") return Reduction::kSum;
  if (s == "none") return Reduction::kNone;
  TORCH_CHECK(false, "elbo_forward: unknown reduction '", s, "'");
}

// A prior of mu's shape that repeats one row over the batch (stride 0 in dim 0,
// the rest contiguous) is read in place with row stride 0; anything else is
// made contiguous (row stride L).
inline std::pair<at::Tensor, int64_t> prior_layout(const at::Tensor& prior, int64_t latent_row, const Memory& mem) {
  if (prior.dim() >= 1 && prior.size(0) > 1 && prior.stride(0) == 0 && prior.select(0, 0).is_contiguous()) {
    return {prior, 0};
  }
  return {mem.contiguous(prior), latent_row};
}

inline ForwardCall prepare_forward(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                   const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                                   const std::optional<at::Tensor>& prior_logvar,
                                   const std::optional<at::Tensor>& obs_logvar, std::string_view likelihood_name,
                                   std::string_view reduction_name, double beta, double free_bits,
                                   int64_t ignore_index, std::array<bool, 6> needs_grad, const Memory& mem) {
  const Likelihood likelihood = parse_likelihood(likelihood_name);
  const Reduction reduction = parse_reduction(reduction_name);
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

  ForwardCall c;
  c.recon = mem.contiguous(recon);
  c.target = mem.contiguous(target);
  c.mu = mem.contiguous(mu);
  c.logvar = mem.contiguous(logvar);
  const int64_t N = B > 0 ? recon.numel() / B : 0;
  const int64_t L = B > 0 ? mu.numel() / B : 0;
  int64_t obs_row_stride = 0, pm_stride = 0, plv_stride = 0;
  if (obs_kind != ObsKind::kNone) {
    c.obs_logvar = mem.contiguous(*obs_logvar);
    const bool per_sample = c.obs_logvar.size(0) == B && B > 1;
    obs_row_stride = per_sample ? (obs_kind == ObsKind::kPerRow ? 1 : N) : 0;
  }
  if (prior_mu.has_value()) {
    std::tie(c.prior_mu, pm_stride) = prior_layout(*prior_mu, L, mem);
    std::tie(c.prior_logvar, plv_stride) = prior_layout(*prior_logvar, L, mem);
  }

  const std::vector<int64_t> out_shape = reduction == Reduction::kNone ? std::vector<int64_t>{B} : std::vector<int64_t>{};
  c.out_loss = mem.empty(out_shape, at::kDouble);
  c.out_recon = mem.empty(out_shape, at::kDouble);
  c.out_kl = mem.empty(out_shape, at::kDouble);
  auto grad_like = [&](bool wanted, const at::Tensor& like) {
    return wanted ? mem.empty(like.sizes(), like.scalar_type()) : mem.empty({0}, like.scalar_type());
  };
  c.g_recon = grad_like(grad_recon, c.recon);
  c.g_mu = grad_like(grad_mu, c.mu);
  c.g_logvar = grad_like(grad_logvar, c.mu);
  c.g_prior_mu = grad_like(grad_prior_mu, c.mu);
  c.g_prior_logvar = grad_like(grad_prior_logvar, c.mu);
  c.g_obs = grad_like(false, c.recon);
  if (grad_obs) {
    c.g_obs = obs_kind == ObsKind::kPerRow ? mem.empty({B}, recon.scalar_type()) : grad_like(true, c.recon);
  }

  ElboParams& p = c.params;
  p.batch = B;
  p.likelihood = likelihood;
  p.recon_dtype = to_dtype(recon.scalar_type(), "elbo_forward");
  p.recon = c.recon.const_data_ptr();
  p.target = c.target.const_data_ptr();
  p.recon_row = N;
  p.vocab = likelihood == Likelihood::kCategorical ? recon.size(2) : 0;
  p.ignore_index = ignore_index;
  p.obs_kind = obs_kind;
  p.obs_logvar = c.obs_logvar.defined() ? c.obs_logvar.const_data_ptr() : nullptr;
  p.obs_row_stride = obs_row_stride;
  p.grad_recon = grad_recon ? c.g_recon.data_ptr() : nullptr;
  p.grad_obs_logvar = grad_obs ? c.g_obs.data_ptr() : nullptr;
  p.latent_dtype = to_dtype(mu.scalar_type(), "elbo_forward");
  p.mu = c.mu.const_data_ptr();
  p.logvar = c.logvar.const_data_ptr();
  p.prior_mu = c.prior_mu.defined() ? c.prior_mu.const_data_ptr() : nullptr;
  p.prior_logvar = c.prior_logvar.defined() ? c.prior_logvar.const_data_ptr() : nullptr;
  p.prior_mu_row_stride = pm_stride;
  p.prior_logvar_row_stride = plv_stride;
  p.latent_row = L;
  p.free_bits = free_bits;
  p.grad_mu = grad_mu ? c.g_mu.data_ptr() : nullptr;
  p.grad_logvar = grad_logvar ? c.g_logvar.data_ptr() : nullptr;
  p.grad_prior_mu = grad_prior_mu ? c.g_prior_mu.data_ptr() : nullptr;
  p.grad_prior_logvar = grad_prior_logvar ? c.g_prior_logvar.data_ptr() : nullptr;
  p.beta = beta;
  p.reduction = reduction;
  p.grad_factor = reduction == Reduction::kMean && B > 0 ? 1.0 / static_cast<double>(B) : 1.0;
  p.out_loss = c.out_loss.data_ptr<double>();
  p.out_recon = c.out_recon.data_ptr<double>();
  p.out_kl = c.out_kl.data_ptr<double>();
  p.workspace = nullptr;
  c.loss_dtype = at::promote_types(recon.scalar_type(), mu.scalar_type());
  c.recon_dtype = recon.scalar_type();
  c.latent_dtype = mu.scalar_type();
  return c;
}

#ifdef VAE_EXT_WITH_CUDA
// The CUDA kernels' scratch (elbo_cuda_workspace_bytes, uninitialised), attached to
// the params; the tensor must live until the kernels have run.
inline at::Tensor attach_cuda_workspace(ElboParams& p, const Memory& mem) {
  at::Tensor workspace = mem.empty({static_cast<int64_t>(elbo_cuda_workspace_bytes(p))}, at::kByte);
  p.workspace = workspace.data_ptr();
  return workspace;
}
#endif

// The op's outputs once the kernels have run: loss in the promoted dtype, recon and
// kl in their groups' dtypes, the gradient buffers as they are.
inline ForwardResult finish_forward(const ForwardCall& c) {
  return {c.out_loss.to(c.loss_dtype), c.out_recon.to(c.recon_dtype), c.out_kl.to(c.latent_dtype),
          c.g_recon, c.g_mu, c.g_logvar, c.g_prior_mu, c.g_prior_logvar, c.g_obs};
}

// One elbo_scale_grad call. With nothing to scale (numel 0) params.rows is 0 and
// the kernels must not be called.
struct ScaleCall {
  ElboScaleParams params{};
  at::Tensor grad, scale, out;
};

inline ScaleCall prepare_scale_grad(const at::Tensor& grad, const at::Tensor& scale, const Memory& mem) {
  TORCH_CHECK(grad.dim() >= 1, "elbo_scale_grad: grad needs a batch dim");
  const int64_t rows = grad.size(0);
  TORCH_CHECK(scale.numel() == 1 || scale.numel() == rows, "elbo_scale_grad: scale must have 1 or ", rows,
              " elements, got ", scale.numel());
  TORCH_CHECK(scale.device() == grad.device(), "elbo_scale_grad: scale must be on the device of grad");
  ScaleCall c;
  c.grad = mem.contiguous(grad);
  c.out = mem.empty(c.grad.sizes(), c.grad.scalar_type());
  if (c.grad.numel() == 0) return c;
  c.scale = mem.contiguous(scale, at::kDouble);
  ElboScaleParams& p = c.params;
  p.grad = c.grad.const_data_ptr();
  p.out = c.out.data_ptr();
  p.dtype = to_dtype(c.grad.scalar_type(), "elbo_scale_grad");
  p.rows = rows;
  p.row_numel = c.grad.numel() / rows;
  p.scale = c.scale.const_data_ptr<double>();
  p.scale_stride = scale.numel() == 1 ? 0 : 1;
  return c;
}

}  // namespace vae_ext::elbo_glue
