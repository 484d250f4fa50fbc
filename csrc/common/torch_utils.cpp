#include "common/torch_utils.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>

#include <mutex>

#ifdef VAE_EXT_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#endif

namespace vae_ext {

PhiloxState philox_state_cpu(std::optional<int64_t> seed, const std::optional<at::Generator>& generator) {
  PhiloxState state;
  if (seed.has_value()) {
    state.seed = static_cast<uint64_t>(*seed);
    return state;
  }
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  state.seed = gen->random64();
  return state;
}

#ifdef VAE_EXT_WITH_CUDA
PhiloxState philox_state_cuda(std::optional<int64_t> seed, const std::optional<at::Generator>& generator,
                              uint64_t draws_per_element) {
  PhiloxState state;
  if (seed.has_value()) {
    state.seed = static_cast<uint64_t>(*seed);
    return state;
  }
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    // Offsets advance in multiples of 4 draws: one Philox block per element index.
    philox = gen->philox_cuda_state(((draws_per_element + 3) / 4) * 4);
  }
  if (philox.captured_) {
    state.seed_ptr = philox.seed_.ptr;
    state.offset_ptr = philox.offset_.ptr;
    state.offset_intragraph = philox.offset_intragraph_;
  } else {
    state.seed = philox.seed_.val;
    state.offset = philox.offset_.val;
  }
  return state;
}
#endif

}  // namespace vae_ext
