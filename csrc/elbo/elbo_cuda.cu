// CUDA kernels of elbo_loss. The per-element terms and their gradients come
// from elbo/elbo_math.h, as on the CPU.
//
//   recon_kernel   Bernoulli / Gaussian: one block per tile of kTile elements of
//                  one sample (grid-stride over tiles), 16-byte loads and stores
//                  where the layout allows; the tile's loss sum (block reduction:
//                  warp shuffles, then shared memory) goes to its own workspace slot.
//   ce_kernel      categorical: a warp (V <= 1024) or a block per (sample,
//                  position) row; rows of up to 32 logits per thread are held in
//                  registers (one read of the logits); longer rows stream with an
//                  online log-sum-exp, then a second sweep writes softmax - onehot.
//   kl_colsum_kernel  free bits only: each latent dimension's batch-mean KL.
//   kl_kernel      KL terms and gradients, tiles like recon_kernel.
//   finalize_kernel   one block: per-sample sums of the partials in slot order,
//                  then the batch reduction in a fixed tree order.
// No atomics: every partial has a fixed slot and a fixed summation order, so the
// results are bitwise reproducible run to run.
#include "elbo/elbo.h"

#include <cstdint>

#include "common/cuda_launch.cuh"
#include "common/cuda_primitives.cuh"
#include "common/cuda_utils.cuh"
#include "elbo/elbo_math.h"

namespace vae_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTile = 4096;  // elements per partial sum (multiple of kThreads * 16 bytes / 4 bytes)
constexpr size_t kSmemBytes = 2 * kWarps * sizeof(double);

enum class Term { kBce, kBceProb, kSse, kNll };

// VEC elements in 16 bytes.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Sum over the block in a fixed order (butterfly within warps, then warp 0 over
// the warp sums). The result is valid in every thread of warp 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  T* smem = reinterpret_cast<T*>(dev::dynamic_smem());
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = T(0);
  if (warp == 0) {
    r = lane < kWarps ? smem[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  }
  __syncthreads();  // smem is reused by the next call
  return r;
}

// Workspace layout (float64 slots): recon partials, obs-gradient partials, KL
// partials, then the free-bits mask (float, one per latent dimension).
struct Workspace {
  double* recon_part;
  double* gs_part;
  double* kl_part;
  float* below;
  int64_t recon_slots_per_row;  // tiles per sample (categorical: positions T)
  int64_t kl_slots_per_row;
};

Workspace workspace_layout(const ElboParams& p, void* base) {
  Workspace w{};
  if (p.likelihood == Likelihood::kCategorical) {
    w.recon_slots_per_row = p.vocab > 0 ? p.recon_row / p.vocab : 0;
  } else {
    w.recon_slots_per_row = ceil_div(p.recon_row, kTile);
  }
  w.kl_slots_per_row = ceil_div(p.latent_row, kTile);
  const int64_t recon_slots = p.batch * w.recon_slots_per_row;
  const int64_t kl_slots = p.batch * w.kl_slots_per_row;
  char* ptr = static_cast<char*>(base);
  auto take = [&](size_t bytes) {
    char* out = ptr;
    if (ptr != nullptr) ptr += (bytes + 255) / 256 * 256;
    return out;
  };
  w.recon_part = reinterpret_cast<double*>(take(sizeof(double) * recon_slots));
  w.gs_part = reinterpret_cast<double*>(take(sizeof(double) * recon_slots));
  w.kl_part = reinterpret_cast<double*>(take(sizeof(double) * kl_slots));
  w.below = reinterpret_cast<float*>(take(sizeof(float) * p.latent_row));
  return w;
}

// ---------------------------------------------------------------- Bernoulli / Gaussian

template <typename acc_t, Term term>
__device__ __forceinline__ void recon_element(acc_t x, acc_t t, acc_t s, bool want_grad, acc_t& loss, acc_t& gx,
                                              acc_t& gs) {
  if constexpr (term == Term::kBce) {
    const acc_t e = bce_exp_neg_abs(x);
    loss = bce_loss(x, t, e);
    if (want_grad) gx = bce_grad(x, t, e);
  } else if constexpr (term == Term::kBceProb) {
    loss = bce_prob_loss(x, t);
    if (want_grad) gx = bce_prob_grad(x, t);
  } else if constexpr (term == Term::kSse) {
    loss = sse_loss(x, t);
    if (want_grad) gx = sse_grad(x, t);
  } else {
    const GaussNllTerms<acc_t> g = gauss_nll(x, t, s);
    loss = g.loss;
    gx = g.grad_x;
    gs = g.grad_s;
  }
}

template <typename T, Term term>
__global__ void __launch_bounds__(kThreads) recon_kernel(ElboParams p, Workspace w, bool vectorized) {
  using acc_t = acc_t_of<T>;
  constexpr int VEC = VecWidth<T>::value;
  using Vec = AlignedVec<T, VEC>;
  const T* recon = static_cast<const T*>(p.recon);
  const T* target = static_cast<const T*>(p.target);
  const T* obs = static_cast<const T*>(p.obs_logvar);
  T* grad = static_cast<T*>(p.grad_recon);
  T* grad_obs = static_cast<T*>(p.grad_obs_logvar);
  const bool obs_elem = p.obs_kind == ObsKind::kPerElement;
  const bool sum_gs = p.obs_kind == ObsKind::kPerRow && grad_obs != nullptr;
  T* grad_obs_elem = obs_elem ? grad_obs : nullptr;
  const acc_t f = static_cast<acc_t>(p.grad_factor);
  const int64_t N = p.recon_row;
  const int64_t tiles = p.batch * w.recon_slots_per_row;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b = tile / w.recon_slots_per_row;
    const int64_t j0 = (tile % w.recon_slots_per_row) * kTile;
    const int64_t len = N - j0 < kTile ? N - j0 : kTile;
    const int64_t base = b * N + j0;
    const T* obs_row = obs == nullptr ? nullptr : obs + b * p.obs_row_stride + (obs_elem ? j0 : 0);
    const acc_t s_row = (obs != nullptr && !obs_elem) ? to_acc(obs_row[0]) : acc_t(0);
    acc_t loss_sum = 0, gs_sum = 0;
    if (vectorized) {
      for (int64_t v = threadIdx.x; v < len / VEC; v += kThreads) {
        const int64_t i = base + v * VEC;
        const Vec xv = *reinterpret_cast<const Vec*>(recon + i);
        const Vec tv = *reinterpret_cast<const Vec*>(target + i);
        Vec sv;
        if (obs_elem) sv = *reinterpret_cast<const Vec*>(obs_row + v * VEC);
        Vec gxv, gsv;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t loss, gx = 0, gs = 0;
          recon_element<acc_t, term>(to_acc(xv.v[k]), to_acc(tv.v[k]), obs_elem ? to_acc(sv.v[k]) : s_row,
                                     grad != nullptr, loss, gx, gs);
          loss_sum += loss;
          gs_sum += gs;
          gxv.v[k] = from_acc<T>(gx * f);
          gsv.v[k] = from_acc<T>(gs * f);
        }
        if (grad != nullptr) *reinterpret_cast<Vec*>(grad + i) = gxv;
        if (grad_obs_elem != nullptr) *reinterpret_cast<Vec*>(grad_obs_elem + i) = gsv;
      }
    } else {
      for (int64_t j = threadIdx.x; j < len; j += kThreads) {
        acc_t loss, gx = 0, gs = 0;
        recon_element<acc_t, term>(to_acc(recon[base + j]), to_acc(target[base + j]),
                                   obs_elem ? to_acc(obs_row[j]) : s_row, grad != nullptr, loss, gx, gs);
        loss_sum += loss;
        gs_sum += gs;
        if (grad != nullptr) grad[base + j] = from_acc<T>(gx * f);
        if (grad_obs_elem != nullptr) grad_obs_elem[base + j] = from_acc<T>(gs * f);
      }
    }
    const acc_t total = block_sum(loss_sum);
    if (threadIdx.x == 0) w.recon_part[tile] = static_cast<double>(total);
    if (sum_gs) {
      const acc_t g = block_sum(gs_sum);
      if (threadIdx.x == 0) w.gs_part[tile] = static_cast<double>(g);
    }
  }
}

// ---------------------------------------------------------------- categorical

// Each row (sample, position) of V logits belongs to a group of G threads: a
// warp (G = 32, eight rows per block) for V <= 32 * kRegElems, else the whole
// block. A row that fits in the group's registers (V <= G * kRegElems) is read
// from global memory once: each thread keeps its elements, takes their max and
// sum of exp, the group merges the (max, sum) pairs in a fixed order, and the
// gradient is written from the registers. Longer rows stream: an online
// log-sum-exp sweep, then a second sweep for the gradient.
constexpr int kRegElems = 32;  // logits per thread kept in registers

// Merges (m, s) over the G threads of a group; every thread gets the same result.
template <typename acc_t, int G>
__device__ __forceinline__ void group_lse_merge(acc_t& m, acc_t& s) {
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, m2, s2);
  }
  if constexpr (G > 32) {
    acc_t* smem = reinterpret_cast<acc_t*>(dev::dynamic_smem());
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      smem[2 * warp] = m;
      smem[2 * warp + 1] = s;
    }
    __syncthreads();
    m = -INFINITY;
    s = 0;
    for (int k = 0; k < G / 32; ++k) lse_merge(m, s, smem[2 * k], smem[2 * k + 1]);
    __syncthreads();  // smem is reused by the next row
  }
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads) ce_kernel(ElboParams p, Workspace w, bool vectorized) {
  using acc_t = acc_t_of<T>;
  constexpr int VEC = VecWidth<T>::value;
  constexpr int NV = kRegElems / VEC;  // register vectors per thread
  constexpr int kRowsPerBlock = kThreads / G;
  using Vec = AlignedVec<T, VEC>;
  const T* logits = static_cast<const T*>(p.recon);
  const int64_t* target = static_cast<const int64_t*>(p.target);
  T* grad = static_cast<T*>(p.grad_recon);
  const int64_t V = p.vocab;
  const int64_t rows = p.batch * w.recon_slots_per_row;
  const acc_t f = static_cast<acc_t>(p.grad_factor);
  const int t = threadIdx.x % G;
  const bool in_regs = V <= static_cast<int64_t>(G) * kRegElems;

  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; r0 < rows;
       r0 += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t r = r0 + threadIdx.x / G;
    if (r >= rows) continue;  // only for G == 32 (whole warps), which never synchronise the block
    const int64_t y = target[r];
    const T* x = logits + r * V;
    T* g = grad != nullptr ? grad + r * V : nullptr;
    if (y == p.ignore_index || y < 0 || y >= V) {  // padding (or an invalid id: NaN); zero gradient
      if (t == 0) w.recon_part[r] = y == p.ignore_index ? 0.0 : static_cast<double>(NAN);
      if (g != nullptr) {
        for (int64_t j = t; j < V; j += G) g[j] = from_acc<T>(acc_t(0));
      }
      continue;
    }
    acc_t m = -INFINITY, s = 0;
    acc_t xr[NV][VEC];
    if (in_regs) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int64_t j0 = (static_cast<int64_t>(k) * G + t) * VEC;
        if (vectorized && j0 < V) {
          const Vec xv = *reinterpret_cast<const Vec*>(x + j0);
#pragma unroll
          for (int i = 0; i < VEC; ++i) xr[k][i] = to_acc(xv.v[i]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) xr[k][i] = j0 + i < V ? to_acc(x[j0 + i]) : acc_t(-INFINITY);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) m = nan_max(m, xr[k][i]);
      }
      if (m != -INFINITY) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) s += ElboMath<acc_t>::exp(xr[k][i] - m);
        }
      }
    } else if (vectorized) {
      for (int64_t v = t; v < V / VEC; v += G) {
        const Vec xv = *reinterpret_cast<const Vec*>(x + v * VEC);
        acc_t xs[VEC];
        acc_t vmax = -INFINITY;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          xs[i] = to_acc(xv.v[i]);
          vmax = nan_max(vmax, xs[i]);
        }
        acc_t vs = 0;
#pragma unroll
        for (int i = 0; i < VEC; ++i) vs += ElboMath<acc_t>::exp(xs[i] - vmax);
        if (vmax != -INFINITY) lse_merge(m, s, vmax, vs);
      }
    } else {
      for (int64_t j = t; j < V; j += G) lse_update(m, s, to_acc(x[j]));
    }
    group_lse_merge<acc_t, G>(m, s);
    const acc_t lse = m + ElboMath<acc_t>::log(s);
    if (t == 0) w.recon_part[r] = static_cast<double>(ce_loss(lse, to_acc(x[y])));
    if (g == nullptr) continue;
    if (in_regs) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int64_t j0 = (static_cast<int64_t>(k) * G + t) * VEC;
        Vec gv;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const acc_t d = ElboMath<acc_t>::exp(xr[k][i] - lse) * f;
          gv.v[i] = from_acc<T>(j0 + i == y ? d - f : d);
        }
        if (vectorized && j0 < V) {
          *reinterpret_cast<Vec*>(g + j0) = gv;
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            if (j0 + i < V) g[j0 + i] = gv.v[i];
          }
        }
      }
    } else if (vectorized) {
      for (int64_t v = t; v < V / VEC; v += G) {
        const Vec xv = *reinterpret_cast<const Vec*>(x + v * VEC);
        Vec gv;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const acc_t d = ElboMath<acc_t>::exp(to_acc(xv.v[i]) - lse) * f;
          gv.v[i] = from_acc<T>(v * VEC + i == y ? d - f : d);
        }
        *reinterpret_cast<Vec*>(g + v * VEC) = gv;
      }
    } else {
      for (int64_t j = t; j < V; j += G) {
        const acc_t d = ElboMath<acc_t>::exp(to_acc(x[j]) - lse) * f;
        g[j] = from_acc<T>(j == y ? d - f : d);
      }
    }
  }
}

// ---------------------------------------------------------------- KL

template <typename acc_t>
__device__ __forceinline__ KlTerms<acc_t> kl_element(acc_t mu, acc_t lv, const acc_t* pm, const acc_t* plv) {
  return pm != nullptr ? kl_prior(mu, lv, *pm, *plv) : kl_standard(mu, lv);
}

// below[d] = 1 where the batch-mean KL of latent dimension d is under free_bits (sum over b in order).
template <typename T>
__global__ void __launch_bounds__(kThreads) kl_colsum_kernel(ElboParams p, Workspace w) {
  using acc_t = acc_t_of<T>;
  const T* mu = static_cast<const T*>(p.mu);
  const T* lv = static_cast<const T*>(p.logvar);
  const T* pm = static_cast<const T*>(p.prior_mu);
  const T* plv = static_cast<const T*>(p.prior_logvar);
  const int64_t L = p.latent_row;
  for (int64_t d = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; d < L;
       d += static_cast<int64_t>(gridDim.x) * kThreads) {
    acc_t sum = 0;
    for (int64_t b = 0; b < p.batch; ++b) {
      acc_t pmv = 0, plvv = 0;
      if (pm != nullptr) {
        pmv = to_acc(pm[b * p.prior_mu_row_stride + d]);
        plvv = to_acc(plv[b * p.prior_logvar_row_stride + d]);
      }
      sum += kl_element<acc_t>(to_acc(mu[b * L + d]), to_acc(lv[b * L + d]), pm != nullptr ? &pmv : nullptr,
                               pm != nullptr ? &plvv : nullptr)
                 .kl;
    }
    w.below[d] = static_cast<double>(sum) / static_cast<double>(p.batch) < p.free_bits ? 1.0f : 0.0f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kl_kernel(ElboParams p, Workspace w, bool vectorized) {
  using acc_t = acc_t_of<T>;
  constexpr int VEC = VecWidth<T>::value;
  using Vec = AlignedVec<T, VEC>;
  const T* mu = static_cast<const T*>(p.mu);
  const T* lv = static_cast<const T*>(p.logvar);
  const T* pm = static_cast<const T*>(p.prior_mu);
  const T* plv = static_cast<const T*>(p.prior_logvar);
  T* gmu = static_cast<T*>(p.grad_mu);
  T* glv = static_cast<T*>(p.grad_logvar);
  T* gpm = static_cast<T*>(p.grad_prior_mu);
  T* gplv = static_cast<T*>(p.grad_prior_logvar);
  const bool clamp = p.free_bits > 0;
  const acc_t fb = static_cast<acc_t>(p.free_bits);
  const acc_t f = static_cast<acc_t>(p.grad_factor);
  const int64_t L = p.latent_row;
  const int64_t tiles = p.batch * w.kl_slots_per_row;

  // One latent element: its KL (clamped to free bits where marked) and its gradients.
  auto element = [&](acc_t m, acc_t l, acc_t pmv, acc_t plvv, int64_t d, acc_t& kl, acc_t& g0, acc_t& g1, acc_t& g2,
                     acc_t& g3) {
    KlTerms<acc_t> k = pm != nullptr ? kl_prior(m, l, pmv, plvv) : kl_standard(m, l);
    if (clamp && w.below[d] != 0.0f) {
      k.kl = fb;
      k.grad_mu = k.grad_lv = k.grad_plv = acc_t(0);
    }
    kl = k.kl;
    g0 = k.grad_mu * f;
    g1 = k.grad_lv * f;
    g2 = acc_t(0) - k.grad_mu * f;
    g3 = k.grad_plv * f;
  };

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b = tile / w.kl_slots_per_row;
    const int64_t j0 = (tile % w.kl_slots_per_row) * kTile;
    const int64_t len = L - j0 < kTile ? L - j0 : kTile;
    const int64_t base = b * L + j0;
    const T* pm_row = pm != nullptr ? pm + b * p.prior_mu_row_stride + j0 : nullptr;
    const T* plv_row = pm != nullptr ? plv + b * p.prior_logvar_row_stride + j0 : nullptr;
    acc_t kl_sum = 0;
    if (vectorized) {
      for (int64_t v = threadIdx.x; v < len / VEC; v += kThreads) {
        const int64_t j = v * VEC;
        const Vec mv = *reinterpret_cast<const Vec*>(mu + base + j);
        const Vec lvv = *reinterpret_cast<const Vec*>(lv + base + j);
        Vec pmv, plvv;
        if (pm != nullptr) {
          pmv = *reinterpret_cast<const Vec*>(pm_row + j);
          plvv = *reinterpret_cast<const Vec*>(plv_row + j);
        }
        Vec o0, o1, o2, o3;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t kl, g0, g1, g2, g3;
          element(to_acc(mv.v[k]), to_acc(lvv.v[k]), pm != nullptr ? to_acc(pmv.v[k]) : acc_t(0),
                  pm != nullptr ? to_acc(plvv.v[k]) : acc_t(0), j0 + j + k, kl, g0, g1, g2, g3);
          kl_sum += kl;
          o0.v[k] = from_acc<T>(g0);
          o1.v[k] = from_acc<T>(g1);
          o2.v[k] = from_acc<T>(g2);
          o3.v[k] = from_acc<T>(g3);
        }
        if (gmu != nullptr) *reinterpret_cast<Vec*>(gmu + base + j) = o0;
        if (glv != nullptr) *reinterpret_cast<Vec*>(glv + base + j) = o1;
        if (gpm != nullptr) *reinterpret_cast<Vec*>(gpm + base + j) = o2;
        if (gplv != nullptr) *reinterpret_cast<Vec*>(gplv + base + j) = o3;
      }
    } else {
      for (int64_t j = threadIdx.x; j < len; j += kThreads) {
        acc_t kl, g0, g1, g2, g3;
        element(to_acc(mu[base + j]), to_acc(lv[base + j]), pm != nullptr ? to_acc(pm_row[j]) : acc_t(0),
                pm != nullptr ? to_acc(plv_row[j]) : acc_t(0), j0 + j, kl, g0, g1, g2, g3);
        kl_sum += kl;
        if (gmu != nullptr) gmu[base + j] = from_acc<T>(g0);
        if (glv != nullptr) glv[base + j] = from_acc<T>(g1);
        if (gpm != nullptr) gpm[base + j] = from_acc<T>(g2);
        if (gplv != nullptr) gplv[base + j] = from_acc<T>(g3);
      }
    }
    const acc_t total = block_sum(kl_sum);
    if (threadIdx.x == 0) w.kl_part[tile] = static_cast<double>(total);
  }
}

// ---------------------------------------------------------------- finalize (one block)

template <typename T>
__global__ void __launch_bounds__(kThreads) finalize_kernel(ElboParams p, Workspace w) {
  T* grad_obs = p.obs_kind == ObsKind::kPerRow ? static_cast<T*>(p.grad_obs_logvar) : nullptr;
  const bool none = p.reduction == Reduction::kNone;
  double r_all = 0, k_all = 0, l_all = 0;
  for (int64_t b = threadIdx.x; b < p.batch; b += kThreads) {
    double r = 0, k = 0, g = 0;
    for (int64_t c = 0; c < w.recon_slots_per_row; ++c) r += w.recon_part[b * w.recon_slots_per_row + c];
    for (int64_t c = 0; c < w.kl_slots_per_row; ++c) k += w.kl_part[b * w.kl_slots_per_row + c];
    if (grad_obs != nullptr) {
      for (int64_t c = 0; c < w.recon_slots_per_row; ++c) g += w.gs_part[b * w.recon_slots_per_row + c];
      grad_obs[b] = from_acc<T>(static_cast<acc_t_of<T>>(p.grad_factor * g));
    }
    if (none) {
      p.out_recon[b] = r;
      p.out_kl[b] = k;
      p.out_loss[b] = r + p.beta * k;
    } else {
      r_all += r;
      k_all += k;
      l_all += r + p.beta * k;
    }
  }
  if (none) return;
  r_all = block_sum(r_all);
  k_all = block_sum(k_all);
  l_all = block_sum(l_all);
  if (threadIdx.x == 0) {
    const double div = p.reduction == Reduction::kMean ? static_cast<double>(p.batch) : 1.0;
    p.out_recon[0] = r_all / div;  // 'mean' of an empty batch is NaN, as torch's
    p.out_kl[0] = k_all / div;
    p.out_loss[0] = l_all / div;
  }
}

// ---------------------------------------------------------------- scale (backward)

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(ElboScaleParams p, bool vectorized) {
  using acc_t = acc_t_of<T>;
  constexpr int VEC = VecWidth<T>::value;
  using Vec = AlignedVec<T, VEC>;
  const T* grad = static_cast<const T*>(p.grad);
  T* out = static_cast<T*>(p.out);
  const int64_t chunks = ceil_div(p.row_numel, kTile);
  const int64_t tiles = p.rows * chunks;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b = tile / chunks;
    const acc_t s = static_cast<acc_t>(p.scale[b * p.scale_stride]);
    const int64_t j0 = (tile % chunks) * kTile;
    const int64_t len = p.row_numel - j0 < kTile ? p.row_numel - j0 : kTile;
    const int64_t base = b * p.row_numel + j0;
    if (vectorized) {
      for (int64_t v = threadIdx.x; v < len / VEC; v += kThreads) {
        Vec x = *reinterpret_cast<const Vec*>(grad + base + v * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) x.v[k] = from_acc<T>(to_acc(x.v[k]) * s);
        *reinterpret_cast<Vec*>(out + base + v * VEC) = x;
      }
    } else {
      for (int64_t j = threadIdx.x; j < len; j += kThreads) out[base + j] = from_acc<T>(to_acc(grad[base + j]) * s);
    }
  }
}

}  // namespace

size_t elbo_cuda_workspace_bytes(const ElboParams& p) {
  const Workspace w = workspace_layout(p, nullptr);
  const int64_t recon_slots = p.batch * w.recon_slots_per_row;
  const int64_t kl_slots = p.batch * w.kl_slots_per_row;
  auto round = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  return round(sizeof(double) * recon_slots) * 2 + round(sizeof(double) * kl_slots) + round(sizeof(float) * p.latent_row);
}

void elbo_forward_cuda(const ElboParams& p, CUstream_st* stream) {
  const Workspace w = workspace_layout(p, p.workspace);
  if (p.recon_row > 0 && p.batch > 0) {
    dispatch_dtype_cuda(p.recon_dtype, [&](auto tag) {
      using T = decltype(tag);
      const bool vec_ok = aligned16(p.recon) && aligned16(p.grad_recon);
      if (p.likelihood == Likelihood::kCategorical) {
        const int64_t rows = p.batch * w.recon_slots_per_row;
        const bool vectorized = vec_ok && p.vocab % VecWidth<T>::value == 0;
        if (p.vocab <= 32 * kRegElems) {  // a warp per row
          const int blocks = grid_size(ceil_div(rows, kWarps) * kThreads, kThreads);
          launch(ce_kernel<T, 32>, blocks, kThreads, kSmemBytes, stream, p, w, vectorized);
        } else {  // a block per row
          const int blocks = grid_size(rows * kThreads, kThreads);
          launch(ce_kernel<T, kThreads>, blocks, kThreads, kSmemBytes, stream, p, w, vectorized);
        }
      } else {
        const bool vectorized = vec_ok && aligned16(p.target) && p.recon_row % VecWidth<T>::value == 0 &&
                                (p.obs_kind != ObsKind::kPerElement ||
                                 (aligned16(p.obs_logvar) && aligned16(p.grad_obs_logvar)));
        const int blocks = grid_size(p.batch * w.recon_slots_per_row * kThreads, kThreads);
        if (p.likelihood == Likelihood::kBernoulli) {
          launch(recon_kernel<T, Term::kBce>, blocks, kThreads, kSmemBytes, stream, p, w, vectorized);
        } else if (p.likelihood == Likelihood::kBernoulliProbs) {
          launch(recon_kernel<T, Term::kBceProb>, blocks, kThreads, kSmemBytes, stream, p, w, vectorized);
        } else if (p.obs_kind == ObsKind::kNone) {
          launch(recon_kernel<T, Term::kSse>, blocks, kThreads, kSmemBytes, stream, p, w, vectorized);
        } else {
          launch(recon_kernel<T, Term::kNll>, blocks, kThreads, kSmemBytes, stream, p, w, vectorized);
        }
      }
    });
    check_launch("elbo_loss reconstruction kernel");
  }
  if (p.latent_row > 0 && p.batch > 0) {
    dispatch_dtype_cuda(p.latent_dtype, [&](auto tag) {
      using T = decltype(tag);
      if (p.free_bits > 0) {
        launch(kl_colsum_kernel<T>, grid_size(p.latent_row, kThreads), kThreads, 0, stream, p, w);
      }
      const bool vectorized = p.latent_row % VecWidth<T>::value == 0 && aligned16(p.mu) && aligned16(p.logvar) &&
                              aligned16(p.prior_mu) && aligned16(p.prior_logvar) && aligned16(p.grad_mu) &&
                              aligned16(p.grad_logvar) && aligned16(p.grad_prior_mu) &&
                              aligned16(p.grad_prior_logvar);
      const int blocks = grid_size(p.batch * w.kl_slots_per_row * kThreads, kThreads);
      launch(kl_kernel<T>, blocks, kThreads, kSmemBytes, stream, p, w, vectorized);
    });
    check_launch("elbo_loss KL kernel");
  }
  dispatch_dtype_cuda(p.recon_dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(finalize_kernel<T>, 1, kThreads, kSmemBytes, stream, p, w);
  });
  check_launch("elbo_loss finalize kernel");
}

void elbo_scale_grad_cuda(const ElboScaleParams& p, CUstream_st* stream) {
  if (p.rows == 0 || p.row_numel == 0) return;
  dispatch_dtype_cuda(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vectorized = aligned16(p.grad) && aligned16(p.out) && p.row_numel % VecWidth<T>::value == 0;
    const int blocks = grid_size(p.rows * ceil_div(p.row_numel, kTile) * kThreads, kThreads);
    launch(scale_kernel<T>, blocks, kThreads, 0, stream, p, vectorized);
  });
  check_launch("elbo_loss backward (scale) kernel");
}

}  // namespace vae_ext
