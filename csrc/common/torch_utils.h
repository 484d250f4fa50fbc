// Glue shared by the ops' .cpp files: ScalarType -> DType, and where a
// kernel's Philox key comes from (explicit seed, or a torch.Generator).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/dtype.h"
#include "common/philox.h"

namespace vae_ext {

inline DType to_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", type, " (expected float32, float64, bfloat16 or float16)");
  }
}

// Explicit seed: key = seed, counter offset 0 (the stateless mode: CPU and CUDA
// draw the same integers). Otherwise the CPU generator (or the default one)
// supplies a fresh 64-bit key, so torch.manual_seed reproduces a run.
PhiloxState philox_state_cpu(std::optional<int64_t> seed, const std::optional<at::Generator>& generator);

#ifdef VAE_EXT_WITH_CUDA
// As above, with the CUDA generator's graph-safe philox state for the CUDA
// path; `draws_per_element` 32-bit draws per element index are reserved.
PhiloxState philox_state_cuda(std::optional<int64_t> seed, const std::optional<at::Generator>& generator,
                              uint64_t draws_per_element);
#endif

}  // namespace vae_ext
