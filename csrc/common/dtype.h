// The element types a kernel can be asked to handle. The torch glue maps
// at::ScalarType onto this enum so kernels never see torch types.
#pragma once

namespace vae_ext {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

}  // namespace vae_ext
