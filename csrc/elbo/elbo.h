// elbo_loss: the parameter structs the CPU and CUDA kernels take, and the
// kernels' entry points. Only the torch glue (elbo.cpp, elbo_glue.h) knows about
// at::Tensor.
//
// One forward call computes, per sample b (dim 0 is the batch):
//   recon_b = sum over the sample's elements of the likelihood's NLL term
//   kl_b    = sum over the sample's latent elements of KL(N(mu, e^lv) || prior)
//             (with free bits: a latent dimension d whose batch-mean KL is below
//             lambda counts lambda for every sample, and has zero gradient)
//   loss_b  = recon_b + beta kl_b
// reduced over the batch ('mean', 'sum' or 'none'), and, for every gradient
// pointer that is not null, the gradient of the *reduced* loss for an upstream
// gradient of 1: d recon / d input (recon group) and d kl / d input (latent
// group), i.e. the per-element derivatives times grad_factor (1/B for 'mean').
// The backward multiplies each row by its upstream scale (elbo_scale_grad); on
// the CPU it returns the buffer as it is when every scale is exactly 1
// (loss.backward() of a 'mean' or 'sum' loss) and the graph is freed after that
// backward (on a retained graph, a copy). See elbo_autograd.cpp.
//
// Determinism: every partial sum covers a fixed range of elements (independent
// of the thread or block count) and partials are combined in a fixed order, so
// results are bitwise reproducible run to run.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace vae_ext {

// kBernoulli: recon are logits (BCE with logits); kBernoulliProbs: recon are
// probabilities (F.binary_cross_entropy, logs clamped at -100).
enum class Likelihood : int { kBernoulli = 0, kGaussian = 1, kCategorical = 2, kBernoulliProbs = 3 };
enum class Reduction : int { kMean = 0, kSum = 1, kNone = 2 };
// Observation log-variance of the Gaussian likelihood: none (sum of squared
// errors), one value per sample (obs[b * obs_row_stride], stride 0 or 1), or
// one per element (obs[b * obs_row_stride + j], stride 0 or N).
enum class ObsKind : int { kNone = 0, kPerRow = 1, kPerElement = 2 };

struct ElboParams {
  int64_t batch;  // B

  // ---- reconstruction group: recon, target, obs_logvar, grad_recon, grad_obs_logvar
  // are contiguous and of recon_dtype (categorical target: int64).
  Likelihood likelihood;
  DType recon_dtype;
  const void* recon;   // (B, N); categorical (B, T, V) with N = T V
  const void* target;  // (B, N); categorical (B, T) int64 class ids
  int64_t recon_row;   // N, elements per sample
  int64_t vocab;       // V (categorical)
  int64_t ignore_index;  // positions with this class id count 0 (zero gradient); other ids outside
                         // [0, V) give a NaN loss and zero gradient (the Python API rejects them first)
  ObsKind obs_kind;
  const void* obs_logvar;
  int64_t obs_row_stride;
  void* grad_recon;       // (B, N) or null
  void* grad_obs_logvar;  // per element: (B, N); per row: (B,) (the row sums); or null

  // ---- latent group: mu, logvar, priors and their gradients are of latent_dtype,
  // contiguous (B, L); a prior may instead be one row (row stride 0).
  DType latent_dtype;
  const void* mu;
  const void* logvar;
  const void* prior_mu;      // null: N(0, I) prior (prior_mu and prior_logvar come together)
  const void* prior_logvar;
  int64_t prior_mu_row_stride;      // 0 or L
  int64_t prior_logvar_row_stride;  // 0 or L
  int64_t latent_row;               // L, latent elements per sample
  double free_bits;                 // lambda; 0 disables free bits
  void* grad_mu;
  void* grad_logvar;
  void* grad_prior_mu;      // (B, L) or null
  void* grad_prior_logvar;  // (B, L) or null

  double beta;
  Reduction reduction;
  double grad_factor;  // 1 / B for 'mean', 1 otherwise; applied to every gradient

  // ---- outputs, float64, B values for 'none' and 1 otherwise
  double* out_loss;
  double* out_recon;
  double* out_kl;

  // ---- CUDA only: scratch of elbo_cuda_workspace_bytes(*this) bytes
  void* workspace;
};

// out[b, j] = grad[b, j] * scale[b * scale_stride] for b < rows, j < row_numel
// (the multiply in float32, float64 for float64); grad and out contiguous.
struct ElboScaleParams {
  const void* grad;
  void* out;
  DType dtype;
  int64_t rows;
  int64_t row_numel;
  const double* scale;
  int64_t scale_stride;  // 0 (one scale for all rows) or 1
};

VAE_EXT_DECLARE_CPU_KERNEL(void elbo_forward_cpu(const ElboParams& p))
VAE_EXT_DECLARE_CPU_KERNEL(void elbo_scale_grad_cpu(const ElboScaleParams& p))

#ifdef VAE_EXT_WITH_CUDA
size_t elbo_cuda_workspace_bytes(const ElboParams& p);
void elbo_forward_cuda(const ElboParams& p, CUstream_st* stream);
void elbo_scale_grad_cuda(const ElboScaleParams& p, CUstream_st* stream);
#endif

}  // namespace vae_ext
