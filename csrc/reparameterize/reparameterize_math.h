// Per-element formulas of reparameterize, shared by the CPU kernel (V = at::vec::Vectorized<float /
// double>, eight or four lanes at once) and the CUDA kernels (V = float / double), so both devices
// evaluate the same expressions. The one primitive they need, exp, comes from ReparameterizeMath<V>:
// the scalar specialisations are here, the vector ones in reparameterize_cpu.cpp.
#pragma once

#include "common/macros.h"
#include "common/math.h"

namespace vae_ext {
VAE_EXT_CPU_NS_BEGIN

template <typename V>
struct ReparameterizeMath;

template <>
struct ReparameterizeMath<float> {
  static VAE_HD float exp(float x) { return exp_(x); }
};

template <>
struct ReparameterizeMath<double> {
  static VAE_HD double exp(double x) { return exp_(x); }
};

// z = mu + eps * exp(0.5 * logvar): the reparameterization trick.
template <typename V>
VAE_HD V reparameterize_sample(V mu, V logvar, V eps) {
  return mu + eps * ReparameterizeMath<V>::exp(V(0.5) * logvar);
}

// The backward, summed over the K samples z_k = mu + eps_k * sigma of one element:
// dL/dmu = sum_k g_k, and dL/dlogvar = 0.5 * sum_k g_k * (z_k - mu) (since eps_k * sigma = z_k - mu,
// no exp is recomputed). Accumulate with reparameterize_grad_accumulate, finish with ..._grad_logvar.
template <typename V>
VAE_HD void reparameterize_grad_accumulate(V g, V z, V mu, V& dmu, V& dlogvar) {
  dmu = dmu + g;
  dlogvar = dlogvar + g * (z - mu);
}

template <typename V>
VAE_HD V reparameterize_grad_logvar(V dlogvar_sum) {
  return V(0.5) * dlogvar_sum;
}

VAE_EXT_CPU_NS_END
}  // namespace vae_ext
