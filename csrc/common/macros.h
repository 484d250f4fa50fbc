// Host/device qualifiers shared by the CPU (.cpp) and CUDA (.cu) sources.
// Kept free of torch headers so nvcc never has to parse ATen.
#pragma once

#if defined(__CUDACC__)
#define VAE_HD __host__ __device__ __forceinline__
#else
#define VAE_HD inline
#endif
