// Scalar math used by both the CPU and the CUDA kernels, one overload per
// precision, so the two devices evaluate the same formulas.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace vae_ext {

#if defined(__CUDA_ARCH__)
VAE_HD float exp_(float x) { return expf(x); }
VAE_HD double exp_(double x) { return ::exp(x); }
VAE_HD float log_(float x) { return logf(x); }
VAE_HD double log_(double x) { return ::log(x); }
VAE_HD float log1p_(float x) { return log1pf(x); }
VAE_HD double log1p_(double x) { return ::log1p(x); }
VAE_HD float sqrt_(float x) { return sqrtf(x); }
VAE_HD double sqrt_(double x) { return ::sqrt(x); }
VAE_HD void sincos_2pi_(float u, float* s, float* c) { sincospif(2.0f * u, s, c); }
VAE_HD void sincos_2pi_(double u, double* s, double* c) { ::sincospi(2.0 * u, s, c); }
#else
VAE_HD float exp_(float x) { return std::exp(x); }
VAE_HD double exp_(double x) { return std::exp(x); }
VAE_HD float log_(float x) { return std::log(x); }
VAE_HD double log_(double x) { return std::log(x); }
VAE_HD float log1p_(float x) { return std::log1p(x); }
VAE_HD double log1p_(double x) { return std::log1p(x); }
VAE_HD float sqrt_(float x) { return std::sqrt(x); }
VAE_HD double sqrt_(double x) { return std::sqrt(x); }
VAE_HD void sincos_2pi_(float u, float* s, float* c) {
  const float t = 6.28318530717958647692f * u;
  *s = std::sin(t);
  *c = std::cos(t);
}
VAE_HD void sincos_2pi_(double u, double* s, double* c) {
  const double t = 6.28318530717958647692 * u;
  *s = std::sin(t);
  *c = std::cos(t);
}
#endif

}  // namespace vae_ext
