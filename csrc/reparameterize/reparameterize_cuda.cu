// CUDA kernels of reparameterize. Each thread owns groups of four consecutive
// elements: one Philox block gives their four normals, and mu / logvar / out
// move as one aligned vector when the layout allows.
#include "reparameterize/reparameterize.h"

#include "common/cuda_launch.cuh"
#include "common/cuda_utils.cuh"
#include "common/philox.h"
#include "reparameterize/reparameterize_math.h"

namespace vae_ext {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) reparameterize_forward_kernel(ReparameterizeParams p, bool vectorized) {
  using acc_t = acc_t_of<T>;
  const T* mu = static_cast<const T*>(p.mu);
  const T* logvar = static_cast<const T*>(p.logvar);
  const T* eps = static_cast<const T*>(p.eps);
  T* out = static_cast<T*>(p.out);
  const int64_t n = p.n;
  const int64_t total = n * p.num_samples;
  const int64_t groups = (total + 3) / 4;
  uint64_t seed = 0, counter_lo = 0;
  unpack_philox(p.philox, seed, counter_lo);

  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * g;
    acc_t e[4];
    if (eps == nullptr) {
      const Philox4 bits = philox4x32_10(seed, counter_lo, static_cast<uint64_t>(g));
      box_muller<acc_t>(bits.x, bits.y, e[0], e[1]);
      box_muller<acc_t>(bits.z, bits.w, e[2], e[3]);
    }
    const int64_t j0 = i0 % n;
    if (vectorized) {  // n % 4 == 0 and aligned pointers: the group never wraps
      const Pack4<T> m = *reinterpret_cast<const Pack4<T>*>(mu + j0);
      const Pack4<T> lv = *reinterpret_cast<const Pack4<T>*>(logvar + j0);
      if (eps != nullptr) {
        const Pack4<T> ev = *reinterpret_cast<const Pack4<T>*>(eps + i0);
#pragma unroll
        for (int t = 0; t < 4; ++t) e[t] = to_acc(ev.v[t]);
      }
      Pack4<T> z;
#pragma unroll
      for (int t = 0; t < 4; ++t) z.v[t] = from_acc<T>(reparameterize_sample(to_acc(m.v[t]), to_acc(lv.v[t]), e[t]));
      *reinterpret_cast<Pack4<T>*>(out + i0) = z;
    } else {
      int64_t j = j0;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (i0 + t < total) {
          const acc_t et = eps != nullptr ? to_acc(eps[i0 + t]) : e[t];
          out[i0 + t] = from_acc<T>(reparameterize_sample(to_acc(mu[j]), to_acc(logvar[j]), et));
        }
        j = (j + 1 == n) ? 0 : j + 1;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) reparameterize_backward_kernel(ReparameterizeBackwardParams p) {
  using acc_t = acc_t_of<T>;
  const T* grad_z = static_cast<const T*>(p.grad_z);
  const T* z = static_cast<const T*>(p.z);
  const T* mu = static_cast<const T*>(p.mu);
  T* grad_mu = static_cast<T*>(p.grad_mu);
  T* grad_logvar = static_cast<T*>(p.grad_logvar);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t m = to_acc(mu[i]);
    acc_t dm = 0, dl = 0;
    for (int64_t k = 0; k < p.num_samples; ++k) {
      reparameterize_grad_accumulate(to_acc(grad_z[k * p.n + i]), to_acc(z[k * p.n + i]), m, dm, dl);
    }
    grad_mu[i] = from_acc<T>(dm);
    grad_logvar[i] = from_acc<T>(reparameterize_grad_logvar(dl));
  }
}

bool aligned(const void* ptr, size_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace

void reparameterize_forward_cuda(const ReparameterizeParams& p, CUstream_st* stream) {
  const int64_t total = p.n * p.num_samples;
  if (total == 0) return;
  dispatch_dtype_cuda(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t vec_bytes = 4 * sizeof(T);
    const bool vectorized = p.n % 4 == 0 && aligned(p.mu, vec_bytes) && aligned(p.logvar, vec_bytes) &&
                            aligned(p.eps, vec_bytes) && aligned(p.out, vec_bytes);
    launch(reparameterize_forward_kernel<T>, grid_size((total + 3) / 4, kThreads), kThreads, 0, stream, p, vectorized);
  });
  check_launch("reparameterize forward kernel");
}

void reparameterize_backward_cuda(const ReparameterizeBackwardParams& p, CUstream_st* stream) {
  if (p.n == 0) return;
  dispatch_dtype_cuda(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(reparameterize_backward_kernel<T>, grid_size(p.n, kThreads), kThreads, 0, stream, p);
  });
  check_launch("reparameterize backward kernel");
}

}  // namespace vae_ext
