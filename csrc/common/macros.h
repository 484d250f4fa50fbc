// Host/device qualifiers shared by the CPU (.cpp) and CUDA (.cu) sources.
// Kept free of torch headers so nvcc never has to parse ATen.
#pragma once

#if defined(__CUDACC__)
#define VAE_HD __host__ __device__ __forceinline__
#else
// Always inlined on the host: the CPU kernels are compiled once per CPU
// capability (DEFAULT, AVX2, AVX512; common/cpu_capability.h), and an
// out-of-line copy built with AVX-512 must never be what a DEFAULT caller runs.
#define VAE_HD inline __attribute__((always_inline))
#endif

// Code the CPU kernels compile once per capability goes in an inline namespace
// named after it (as ATen's at::vec does), so the copies never meet at link time.
#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
#define VAE_EXT_CPU_NS_BEGIN inline namespace CPU_CAPABILITY {
#define VAE_EXT_CPU_NS_END }
#else
#define VAE_EXT_CPU_NS_BEGIN
#define VAE_EXT_CPU_NS_END
#endif

// The first declaration of that namespace must say `inline`; every header that
// opens it includes this one first.
namespace vae_ext {
VAE_EXT_CPU_NS_BEGIN
VAE_EXT_CPU_NS_END
}  // namespace vae_ext
