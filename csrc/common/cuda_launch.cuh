// Kernel launches go through launch() rather than <<<...>>>, so that the same
// .cu sources also build as plain C++ against the CPU emulation of the CUDA
// execution model (VAE_EXT_CUDA_EMULATION, see tests/cuda_emu/cuda_emu.h), which the
// tests use to run the CUDA kernels on machines without a GPU.
#pragma once

#if defined(VAE_EXT_CUDA_EMULATION)
#include "cuda_emu.h"  // before the CUDA headers
#endif

#include <cuda_runtime.h>

#include <cstddef>

namespace vae_ext {

template <typename... KernelArgs, typename... Args>
inline void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
#if defined(VAE_EXT_CUDA_EMULATION)
  (void)stream;
  emu::launch(kernel, grid, block, smem_bytes, static_cast<KernelArgs>(args)...);
#else
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<KernelArgs>(args)...);
#endif
}

// Lets `kernel` use more than 48 KB of dynamic shared memory.
template <typename... KernelArgs>
inline cudaError_t set_max_dynamic_smem(void (*kernel)(KernelArgs...), size_t bytes) {
#if defined(VAE_EXT_CUDA_EMULATION)
  return emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
#else
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
#endif
}

}  // namespace vae_ext
