// Helpers for the CPU kernels: typed dispatch over DType, and small staging
// loads/stores that widen any supported element type to the accumulation type.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "common/dtype.h"
#include "common/macros.h"

namespace vae_ext {
VAE_EXT_CPU_NS_BEGIN

// Math type for an element type: float for the 16-bit types and float32, double for float64.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Calls f(scalar_t{}) with scalar_t the C++ type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
    case DType::kFloat16: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "vae_ext: unsupported dtype");
  }
}

template <typename scalar_t, typename acc_t>
inline void load_widen(const scalar_t* src, acc_t* dst, int len) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, sizeof(acc_t) * len);
  } else {
    for (int t = 0; t < len; ++t) dst[t] = static_cast<acc_t>(src[t]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store_narrow(const acc_t* src, scalar_t* dst, int len) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, sizeof(acc_t) * len);
  } else {
    for (int t = 0; t < len; ++t) dst[t] = static_cast<scalar_t>(src[t]);
  }
}

VAE_EXT_CPU_NS_END
}  // namespace vae_ext
