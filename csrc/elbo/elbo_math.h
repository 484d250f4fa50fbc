// Per-element formulas of elbo_loss, shared by the CPU and the CUDA kernels.
//
// Each formula is a template over the value type V: the CUDA kernels use it
// with float / double, the CPU kernels with at::vec::Vectorized<float / double>
// (eight or four lanes at once). The few primitive operations the formulas need
// come from ElboMath<V>: the scalar specialisations are below, the vector ones
// in elbo/elbo_cpu.cpp. So both devices evaluate the same expressions.
//
// Notation: x = reconstruction (logit or mean), t = target, s = observation
// log-variance, mu / lv = posterior mean / log-variance, pm / plv = prior mean /
// log-variance. Every gradient is the derivative of the per-element term.
#pragma once

#include <cmath>

#include "common/macros.h"
#include "common/math.h"

namespace vae_ext {
VAE_EXT_CPU_NS_BEGIN

template <typename V>
struct ElboMath;  // scalar type; primitives exp, expm1, log, log1p, log1p_unit (argument in [0, 1]), abs,
                 // relu, select_nonneg, max_nan (max(a, b) that keeps a NaN a)

template <>
struct ElboMath<float> {
  using scalar = float;
  static VAE_HD float exp(float x) { return exp_(x); }
#if defined(__CUDA_ARCH__)
  static VAE_HD float expm1(float x) { return expm1f(x); }
#else
  static VAE_HD float expm1(float x) { return std::expm1(x); }
#endif
  static VAE_HD float log(float x) { return log_(x); }
  static VAE_HD float log1p(float x) { return log1p_(x); }
  static VAE_HD float log1p_unit(float x) { return log1p_(x); }  // x in [0, 1]
  static VAE_HD float abs(float x) { return x < 0.0f ? -x : x; }
  static VAE_HD float relu(float x) { return x > 0.0f ? x : 0.0f; }
  // c >= 0 ? a : b (NaN c gives b)
  static VAE_HD float select_nonneg(float c, float a, float b) { return c >= 0.0f ? a : b; }
  static VAE_HD float max_nan(float a, float b) { return a < b ? b : a; }  // std::max: NaN a stays
};

template <>
struct ElboMath<double> {
  using scalar = double;
  static VAE_HD double exp(double x) { return exp_(x); }
#if defined(__CUDA_ARCH__)
  static VAE_HD double expm1(double x) { return ::expm1(x); }
#else
  static VAE_HD double expm1(double x) { return std::expm1(x); }
#endif
  static VAE_HD double log(double x) { return log_(x); }
  static VAE_HD double log1p(double x) { return log1p_(x); }
  static VAE_HD double log1p_unit(double x) { return log1p_(x); }
  static VAE_HD double abs(double x) { return x < 0.0 ? -x : x; }
  static VAE_HD double relu(double x) { return x > 0.0 ? x : 0.0; }
  static VAE_HD double select_nonneg(double c, double a, double b) { return c >= 0.0 ? a : b; }
  static VAE_HD double max_nan(double a, double b) { return a < b ? b : a; }
};

constexpr double kLog2Pi = 1.8378770664093454835606594728112;  // log(2 pi)

// ---------------------------------------------------------------- Bernoulli (BCE with logits)
// loss = max(x, 0) - x t + log1p(exp(-|x|))     (no overflow for any finite x)
// d/dx = sigmoid(x) - t, sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e), e = exp(-|x|)

template <typename V>
VAE_HD V bce_exp_neg_abs(V x) {
  using M = ElboMath<V>;
  return M::exp(V(0.0f) - M::abs(x));
}

template <typename V>
VAE_HD V bce_loss(V x, V t, V e) {
  using M = ElboMath<V>;
  return M::relu(x) - x * t + M::log1p_unit(e);
}

template <typename V>
VAE_HD V bce_grad(V x, V t, V e) {
  using M = ElboMath<V>;
  const V r = V(1.0f) / (V(1.0f) + e);
  return M::select_nonneg(x, r, e * r) - t;
}

// ---------------------------------------------------------------- Bernoulli on probabilities
// x is a probability (a decoder ending in a sigmoid), as F.binary_cross_entropy, whose
// clamps these are (the logs at -100, the gradient's denominator at 1e-12):
//   loss = (t - 1) max(log1p(-x), -100) - t max(log x, -100)
//   d/dx = (x - t) / max((1 - x) x, 1e-12)
template <typename V>
VAE_HD V bce_prob_loss(V x, V t) {
  using M = ElboMath<V>;
  const V floor(-100.0f);
  return (t - V(1.0f)) * M::max_nan(M::log1p(V(0.0f) - x), floor) - t * M::max_nan(M::log(x), floor);
}

template <typename V>
VAE_HD V bce_prob_grad(V x, V t) {
  using M = ElboMath<V>;
  return (x - t) / M::max_nan((V(1.0f) - x) * x, V(static_cast<typename M::scalar>(1e-12f)));  // torch: float 1e-12
}

// ---------------------------------------------------------------- Gaussian
// Sum of squared errors: loss = (x - t)^2, d/dx = 2 (x - t).
template <typename V>
VAE_HD V sse_loss(V x, V t) {
  const V d = x - t;
  return d * d;
}

template <typename V>
VAE_HD V sse_grad(V x, V t) {
  const V d = x - t;
  return d + d;
}

// Exact NLL with observation log-variance s:
//   loss = 0.5 (log 2pi + s + (x - t)^2 exp(-s))
//   d/dx = (x - t) exp(-s),   d/ds = 0.5 (1 - (x - t)^2 exp(-s))
template <typename V>
struct GaussNllTerms {
  V loss, grad_x, grad_s;
};

template <typename V>
VAE_HD GaussNllTerms<V> gauss_nll(V x, V t, V s) {
  using M = ElboMath<V>;
  const V w = M::exp(V(0.0f) - s);
  const V d = x - t;
  const V dw = d * w;
  const V q = d * dw;
  const V half(0.5f);
  const V log_2pi(static_cast<typename M::scalar>(kLog2Pi));
  return {half * (log_2pi + s + q), dw, half * (V(1.0f) - q)};
}

// ---------------------------------------------------------------- KL(N(mu, e^lv) || prior)
// Standard normal prior, with expm1 so that small lv keeps its digits:
//   kl = 0.5 (mu^2 + expm1(lv) - lv),   d/dmu = mu,   d/dlv = 0.5 expm1(lv)
// Diagonal Gaussian prior N(pm, e^plv), u = lv - plv, w = exp(-plv), d = mu - pm:
//   kl = 0.5 (expm1(u) - u + d^2 w)
//   d/dmu = d w = -d/dpm,   d/dlv = 0.5 expm1(u),   d/dplv = -0.5 (expm1(u) + d^2 w)
template <typename V>
struct KlTerms {
  V kl, grad_mu, grad_lv, grad_plv;  // grad_pm = -grad_mu
};

template <typename V>
VAE_HD KlTerms<V> kl_standard(V mu, V lv) {
  using M = ElboMath<V>;
  const V em1 = M::expm1(lv);
  const V half(0.5f);
  return {half * (mu * mu + em1 - lv), mu, half * em1, V(0.0f)};
}

template <typename V>
VAE_HD KlTerms<V> kl_prior(V mu, V lv, V pm, V plv) {
  using M = ElboMath<V>;
  const V u = lv - plv;
  const V em1 = M::expm1(u);
  const V w = M::exp(V(0.0f) - plv);
  const V d = mu - pm;
  const V dw = d * w;
  const V dd = d * dw;
  const V half(0.5f);
  return {half * (em1 - u + dd), dw, half * em1, V(-0.5f) * (em1 + dd)};
}

// ---------------------------------------------------------------- categorical (cross-entropy)
// Per row of V logits with class y: loss = lse - x_y, lse = m + log(sum_j exp(x_j - m)),
// d/dx_j = exp(x_j - lse) - [j == y]. The online log-sum-exp keeps (m, s) with
// s = sum exp(x - m) over the elements seen so far; -inf logits contribute 0.

template <typename T>
VAE_HD T nan_max(T a, T b) {  // NaN-propagating max
  return (a > b || a != a) ? a : b;
}

template <typename T>
VAE_HD void lse_update(T& m, T& s, T x) {
  const T m_new = nan_max(m, x);
  if (m_new == -INFINITY) return;  // everything so far is -inf
  s = s * ElboMath<T>::exp(m - m_new) + ElboMath<T>::exp(x - m_new);
  m = m_new;
}

template <typename T>
VAE_HD void lse_merge(T& m, T& s, T m2, T s2) {
  const T m_new = nan_max(m, m2);
  if (m_new == -INFINITY) return;
  s = s * ElboMath<T>::exp(m - m_new) + s2 * ElboMath<T>::exp(m2 - m_new);
  m = m_new;
}

template <typename T>
VAE_HD T ce_loss(T lse, T x_target) {
  return lse - x_target;
}

VAE_EXT_CPU_NS_END
}  // namespace vae_ext
