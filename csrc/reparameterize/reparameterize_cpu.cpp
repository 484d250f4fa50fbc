// CPU kernels of reparameterize: Philox + Box–Muller + the sample in one pass,
// vectorised with at::vec and threaded with at::parallel_for.
#ifndef CPU_CAPABILITY
#error "CPU kernels are compiled with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> (setup.py)"
#endif
#include "reparameterize/reparameterize.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "common/cpu_utils.h"
#include "common/philox_cpu.h"
#include "reparameterize/reparameterize_math.h"

namespace vae_ext {

template <typename T>
struct ReparameterizeMath<at::vec::Vectorized<T>> {
  static at::vec::Vectorized<T> exp(const at::vec::Vectorized<T>& x) { return x.exp(); }
};

namespace {

constexpr int kChunk = kPhiloxNormals;  // elements per chunk: one vectorised Philox call
constexpr int64_t kGrainChunks = 256;   // chunks per parallel task (16K elements)

template <typename scalar_t>
void forward_impl(const ReparameterizeParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const auto* mu = static_cast<const scalar_t*>(p.mu);
  const auto* logvar = static_cast<const scalar_t*>(p.logvar);
  const auto* eps = static_cast<const scalar_t*>(p.eps);
  auto* out = static_cast<scalar_t*>(p.out);
  const int64_t n = p.n;
  const int64_t total = n * p.num_samples;
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  uint64_t seed = 0, counter_lo = 0;
  unpack_philox(p.philox, seed, counter_lo);

  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t c_begin, int64_t c_end) {
    alignas(64) acc_t e[kChunk], m[kChunk], lv[kChunk];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t i0 = c * kChunk;
      const int len = static_cast<int>(std::min<int64_t>(kChunk, total - i0));
      if (len < kChunk) {
        std::fill(e, e + kChunk, acc_t(0));
        std::fill(m, m + kChunk, acc_t(0));
        std::fill(lv, lv + kChunk, acc_t(0));
      }
      if (eps != nullptr) {
        load_widen(eps + i0, e, len);
      } else {
        philox_normals_cpu(seed, counter_lo, static_cast<uint64_t>(c) * kPhiloxLanes, e);
      }
      const int64_t j0 = i0 % n;
      if (j0 + len <= n) {
        load_widen(mu + j0, m, len);
        load_widen(logvar + j0, lv, len);
      } else {  // the chunk wraps around to the next sample
        for (int t = 0; t < len; ++t) {
          const int64_t j = (i0 + t) % n;
          m[t] = static_cast<acc_t>(mu[j]);
          lv[t] = static_cast<acc_t>(logvar[j]);
        }
      }
      for (int t = 0; t < kChunk; t += Vec::size()) {
        reparameterize_sample(Vec::loadu(m + t), Vec::loadu(lv + t), Vec::loadu(e + t)).store(m + t);
      }
      store_narrow(m, out + i0, len);
    }
  });
}

template <typename scalar_t>
void backward_impl(const ReparameterizeBackwardParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const auto* grad_z = static_cast<const scalar_t*>(p.grad_z);
  const auto* z = static_cast<const scalar_t*>(p.z);
  const auto* mu = static_cast<const scalar_t*>(p.mu);
  auto* grad_mu = static_cast<scalar_t*>(p.grad_mu);
  auto* grad_logvar = static_cast<scalar_t*>(p.grad_logvar);
  const int64_t n = p.n;
  const int64_t chunks = (n + kChunk - 1) / kChunk;

  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t c_begin, int64_t c_end) {
    alignas(64) acc_t m[kChunk], g[kChunk], zz[kChunk], dm[kChunk], dl[kChunk];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t i0 = c * kChunk;
      const int len = static_cast<int>(std::min<int64_t>(kChunk, n - i0));
      if (len < kChunk) {
        std::fill(m, m + kChunk, acc_t(0));
        std::fill(g, g + kChunk, acc_t(0));
        std::fill(zz, zz + kChunk, acc_t(0));
      }
      std::fill(dm, dm + kChunk, acc_t(0));
      std::fill(dl, dl + kChunk, acc_t(0));
      load_widen(mu + i0, m, len);
      for (int64_t k = 0; k < p.num_samples; ++k) {
        load_widen(grad_z + k * n + i0, g, len);
        load_widen(z + k * n + i0, zz, len);
        for (int t = 0; t < kChunk; t += Vec::size()) {
          Vec dmv = Vec::loadu(dm + t), dlv = Vec::loadu(dl + t);
          reparameterize_grad_accumulate(Vec::loadu(g + t), Vec::loadu(zz + t), Vec::loadu(m + t), dmv, dlv);
          dmv.store(dm + t);
          dlv.store(dl + t);
        }
      }
      for (int t = 0; t < kChunk; t += Vec::size()) reparameterize_grad_logvar(Vec::loadu(dl + t)).store(dl + t);
      store_narrow(dm, grad_mu + i0, len);
      store_narrow(dl, grad_logvar + i0, len);
    }
  });
}

}  // namespace

// Compiled once per CPU capability (common/cpu_capability.h).
namespace CPU_CAPABILITY {

void reparameterize_forward_cpu(const ReparameterizeParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { forward_impl<decltype(tag)>(p); });
}

void reparameterize_backward_cpu(const ReparameterizeBackwardParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { backward_impl<decltype(tag)>(p); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_ext
