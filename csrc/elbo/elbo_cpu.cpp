// CPU kernels of elbo_loss: one read of every input, the per-element terms and
// their gradients from elbo/elbo_math.h evaluated on at::vec vectors (Sleef
// exp / log1p / expm1 under AVX2), threads over fixed chunks (at::parallel_for).
//
// Determinism: the reconstruction of each sample is cut into chunks of
// kReconChunk elements (categorical: one chunk per position), the latent into
// chunks of kLatentChunk; each chunk's partial sum is accumulated in a fixed
// lane order and the partials of a sample are added in chunk order in float64.
// Nothing depends on which thread ran which chunk.
#ifndef CPU_CAPABILITY
#error "CPU kernels are compiled with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> (setup.py)"
#endif
#include "elbo/elbo.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_utils.h"
#include "elbo/elbo_math.h"

namespace vae_ext {

// Vector primitives for the shared formulas (see ElboMath in elbo/elbo_math.h).
template <typename T>
struct ElboMathVec {
  using V = at::vec::Vectorized<T>;
  using scalar = T;
  static V exp(const V& x) { return x.exp(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V log1p_unit(const V& x) { return x.log1p(); }
  static V abs(const V& x) { return x.abs(); }
  static V relu(const V& x) { return at::vec::maximum(x, V(T(0))); }  // NaN-propagating
  static V select_nonneg(const V& c, const V& a, const V& b) { return V::blendv(b, a, c >= V(T(0))); }
  static V max_nan(const V& a, const V& b) { return at::vec::maximum(a, b); }  // NaN-propagating
};
template <>
struct ElboMath<at::vec::Vectorized<float>> : ElboMathVec<float> {
  // log1p(x) for x in [0, 1] (Bernoulli's log1p(exp(-|x|))): with s = x / (2 + x) in [0, 1/3],
  // log1p(x) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ... + s^12/13); the next term is below
  // 1.5e-8 relative. About three times faster than Sleef's general log1p.
  static at::vec::Vectorized<float> log1p_unit(const at::vec::Vectorized<float>& x) {
    using V = at::vec::Vectorized<float>;
    const V s = x / (V(2.0f) + x);
    const V z = s * s;
    V p = V(1.0f / 13.0f);
    p = at::vec::fmadd(p, z, V(1.0f / 11.0f));
    p = at::vec::fmadd(p, z, V(1.0f / 9.0f));
    p = at::vec::fmadd(p, z, V(1.0f / 7.0f));
    p = at::vec::fmadd(p, z, V(1.0f / 5.0f));
    p = at::vec::fmadd(p, z, V(1.0f / 3.0f));
    p = at::vec::fmadd(p, z, V(1.0f));
    return (s + s) * p;
  }
};
template <>
struct ElboMath<at::vec::Vectorized<double>> : ElboMathVec<double> {};

namespace {

constexpr int64_t kReconChunk = 8192;   // elements per reconstruction partial sum
constexpr int64_t kLatentChunk = 8192;  // elements per latent partial sum
constexpr int kStage = 512;             // elements staged at a time for the 16-bit types
constexpr int64_t kGrainElems = 32768;  // elements per parallel task, at least

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t grain_for(int64_t elems_per_item) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item)); }

// Sum of a vector's lanes in lane order.
template <typename acc_t>
acc_t lane_sum(const at::vec::Vectorized<acc_t>& v) {
  alignas(64) acc_t tmp[at::vec::Vectorized<acc_t>::size()];
  v.store(tmp);
  acc_t s = 0;
  for (int l = 0; l < at::vec::Vectorized<acc_t>::size(); ++l) s += tmp[l];
  return s;
}

// Keeps the first `count` lanes of v, zeroes the rest (count < size for a tail).
template <typename acc_t>
at::vec::Vectorized<acc_t> head(const at::vec::Vectorized<acc_t>& v, int count) {
  using Vec = at::vec::Vectorized<acc_t>;
  return count >= Vec::size() ? v : Vec::set(Vec(acc_t(0)), v, count);
}

// ---------------------------------------------------------------- Bernoulli / Gaussian

enum class Term { kBce, kBceProb, kSse, kNll };

// Pointers of one run of `n` consecutive elements, widened to acc_t.
template <typename acc_t>
struct Run {
  const acc_t* x;
  const acc_t* t;
  const acc_t* s;   // per-element obs log-variance, or null
  acc_t s_row;      // per-row obs log-variance (Term::kNll with s == null)
  acc_t* gx;        // d/dx out, or null
  acc_t* gs;        // per-element d/ds out, or null
  bool sum_gs;      // accumulate d/ds into gs_acc (per-row obs log-variance)
};

// Adds the run's loss terms to loss_acc (and its d/ds to gs_acc); writes factor * gradients.
template <typename acc_t, Term term>
void recon_run(const Run<acc_t>& r, int n, acc_t factor, at::vec::Vectorized<acc_t>& loss_acc,
               at::vec::Vectorized<acc_t>& gs_acc) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec f(factor);
  for (int i = 0; i < n; i += Vec::size()) {
    const int count = std::min<int>(Vec::size(), n - i);
    const bool full = count == Vec::size();
    const Vec x = full ? Vec::loadu(r.x + i) : Vec::loadu(r.x + i, count);
    const Vec t = full ? Vec::loadu(r.t + i) : Vec::loadu(r.t + i, count);
    Vec loss, gx, gs;
    if constexpr (term == Term::kBce) {
      const Vec e = bce_exp_neg_abs(x);
      loss = bce_loss(x, t, e);
      if (r.gx != nullptr) gx = bce_grad(x, t, e);
    } else if constexpr (term == Term::kBceProb) {
      loss = bce_prob_loss(x, t);
      if (r.gx != nullptr) gx = bce_prob_grad(x, t);
    } else if constexpr (term == Term::kSse) {
      loss = sse_loss(x, t);
      if (r.gx != nullptr) gx = sse_grad(x, t);
    } else {
      const Vec s = r.s != nullptr ? (full ? Vec::loadu(r.s + i) : Vec::loadu(r.s + i, count)) : Vec(r.s_row);
      const GaussNllTerms<Vec> g = gauss_nll(x, t, s);
      loss = g.loss;
      gx = g.grad_x;
      gs = g.grad_s;
      if (r.gs != nullptr) {
        const Vec v = gs * f;
        full ? v.store(r.gs + i) : v.store(r.gs + i, count);
      }
      if (r.sum_gs) gs_acc = gs_acc + head(gs, count);
    }
    loss_acc = loss_acc + head(loss, count);
    if (r.gx != nullptr) {
      const Vec v = gx * f;
      full ? v.store(r.gx + i) : v.store(r.gx + i, count);
    }
  }
}

// One chunk [j0, j0 + len) of sample b: returns its loss partial, and its d/ds partial in *gs_partial.
template <typename scalar_t, Term term>
void recon_chunk(const ElboParams& p, int64_t b, int64_t j0, int64_t len, acc_type_t<scalar_t>* loss_partial,
                 acc_type_t<scalar_t>* gs_partial) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t base = b * p.recon_row + j0;
  const auto* x = static_cast<const scalar_t*>(p.recon) + base;
  const auto* t = static_cast<const scalar_t*>(p.target) + base;
  auto* gx = p.grad_recon != nullptr ? static_cast<scalar_t*>(p.grad_recon) + base : nullptr;
  const scalar_t* s = nullptr;
  scalar_t* gs = nullptr;
  acc_t s_row = 0;
  const bool sum_gs = p.obs_kind == ObsKind::kPerRow && p.grad_obs_logvar != nullptr;
  if (p.obs_kind == ObsKind::kPerElement) {
    s = static_cast<const scalar_t*>(p.obs_logvar) + b * p.obs_row_stride + j0;
    if (p.grad_obs_logvar != nullptr) gs = static_cast<scalar_t*>(p.grad_obs_logvar) + base;
  } else if (p.obs_kind == ObsKind::kPerRow) {
    s_row = static_cast<acc_t>(static_cast<const scalar_t*>(p.obs_logvar)[b * p.obs_row_stride]);
  }
  const acc_t factor = static_cast<acc_t>(p.grad_factor);
  Vec loss_acc(acc_t(0)), gs_acc(acc_t(0));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const Run<acc_t> r{x, t, s, s_row, gx, gs, sum_gs};
    recon_run<acc_t, term>(r, static_cast<int>(len), factor, loss_acc, gs_acc);
  } else {
    alignas(64) acc_t xs[kStage], ts[kStage], ss[kStage], gxs[kStage], gss[kStage];
    for (int64_t k = 0; k < len; k += kStage) {
      const int n = static_cast<int>(std::min<int64_t>(kStage, len - k));
      load_widen(x + k, xs, n);
      load_widen(t + k, ts, n);
      if (s != nullptr) load_widen(s + k, ss, n);
      const Run<acc_t> r{xs, ts, s != nullptr ? ss : nullptr, s_row, gx != nullptr ? gxs : nullptr,
                         gs != nullptr ? gss : nullptr, sum_gs};
      recon_run<acc_t, term>(r, n, factor, loss_acc, gs_acc);
      if (gx != nullptr) store_narrow(gxs, gx + k, n);
      if (gs != nullptr) store_narrow(gss, gs + k, n);
    }
  }
  *loss_partial = lane_sum(loss_acc);
  *gs_partial = lane_sum(gs_acc);
}

// Per-sample reconstruction sums (and per-row obs-gradient sums) for Bernoulli / Gaussian.
template <typename scalar_t, Term term>
void recon_pass(const ElboParams& p, std::vector<double>& recon_b, std::vector<double>& gs_b) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t chunks = ceil_div(p.recon_row, kReconChunk);
  const int64_t items = p.batch * chunks;
  std::vector<acc_t> loss_part(items), gs_part(items);
  at::parallel_for(0, items, grain_for(std::min(p.recon_row, kReconChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / chunks, c = it % chunks;
      const int64_t j0 = c * kReconChunk;
      recon_chunk<scalar_t, term>(p, b, j0, std::min(kReconChunk, p.recon_row - j0), &loss_part[it], &gs_part[it]);
    }
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    double l = 0, g = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      l += static_cast<double>(loss_part[b * chunks + c]);
      g += static_cast<double>(gs_part[b * chunks + c]);
    }
    recon_b[b] = l;
    gs_b[b] = g;
  }
}

// ---------------------------------------------------------------- categorical

// Cross-entropy of one row of V logits (already acc_t) with class y; writes
// factor * (softmax - onehot) to g when g != null. Returns the row's loss.
template <typename acc_t>
acc_t ce_row(const acc_t* x, int64_t V_len, int64_t y, acc_t factor, acc_t* g) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int n = static_cast<int>(V_len);
  // max (NaN-propagating)
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  int i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + i));
  alignas(64) acc_t lanes[Vec::size()];
  vmax.store(lanes);
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int l = 0; l < Vec::size(); ++l) m = nan_max(m, lanes[l]);
  for (; i < n; ++i) m = nan_max(m, x[i]);
  // sum of exp(x - m), keeping exp(x - m) in g
  const Vec vm(m);
  Vec vsum(acc_t(0));
  for (i = 0; i < n; i += Vec::size()) {
    const int count = std::min<int>(Vec::size(), n - i);
    const bool full = count == Vec::size();
    const Vec e = ((full ? Vec::loadu(x + i) : Vec::loadu(x + i, count)) - vm).exp();
    vsum = vsum + head(e, count);
    if (g != nullptr) full ? e.store(g + i) : e.store(g + i, count);
  }
  const acc_t s = lane_sum(vsum);
  const acc_t lse = m + ElboMath<acc_t>::log(s);
  if (g != nullptr) {
    const Vec scale(factor / s);
    for (i = 0; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(g + i) * scale).store(g + i);
    for (; i < n; ++i) g[i] *= factor / s;
    g[y] -= factor;
  }
  return ce_loss(lse, x[y]);
}

template <typename scalar_t>
void categorical_pass(const ElboParams& p, std::vector<double>& recon_b) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t V_len = p.vocab;
  const int64_t positions = V_len > 0 ? p.recon_row / V_len : 0;  // T
  const int64_t rows = p.batch * positions;
  const auto* logits = static_cast<const scalar_t*>(p.recon);
  const auto* target = static_cast<const int64_t*>(p.target);
  auto* grad = static_cast<scalar_t*>(p.grad_recon);
  const acc_t factor = static_cast<acc_t>(p.grad_factor);
  std::vector<acc_t> row_loss(rows);
  at::parallel_for(0, rows, grain_for(V_len), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs, gs;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      xs.resize(V_len);
      if (grad != nullptr) gs.resize(V_len);
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = target[r];
      const scalar_t* x = logits + r * V_len;
      scalar_t* g = grad != nullptr ? grad + r * V_len : nullptr;
      if (y == p.ignore_index) {  // padding: no loss, no gradient
        row_loss[r] = 0;
        if (g != nullptr) std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * V_len);
        continue;
      }
      if (y < 0 || y >= V_len) {  // invalid id (the Python API rejects it): NaN, never an out-of-bounds read
        row_loss[r] = std::numeric_limits<acc_t>::quiet_NaN();
        if (g != nullptr) std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * V_len);
        continue;
      }
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        row_loss[r] = ce_row<acc_t>(x, V_len, y, factor, g);
      } else {
        load_widen(x, xs.data(), static_cast<int>(V_len));
        row_loss[r] = ce_row<acc_t>(xs.data(), V_len, y, factor, g != nullptr ? gs.data() : nullptr);
        if (g != nullptr) store_narrow(gs.data(), g, static_cast<int>(V_len));
      }
    }
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    double l = 0;
    for (int64_t t = 0; t < positions; ++t) l += static_cast<double>(row_loss[b * positions + t]);
    recon_b[b] = l;
  }
}

// ---------------------------------------------------------------- KL

template <typename acc_t>
struct LatentRun {
  const acc_t* mu;
  const acc_t* lv;
  const acc_t* pm;   // null: standard normal prior
  const acc_t* plv;
  const acc_t* below;  // free bits: 1 where the dimension is clamped, else 0; or null
  acc_t* gmu;
  acc_t* glv;
  acc_t* gpm;
  acc_t* gplv;
};

// KL terms of a run of n latent elements. With `clamp`, dimensions marked in
// `below` count free_bits and get zero gradients. Returns the run's KL in kl_acc.
template <typename acc_t>
void kl_run(const LatentRun<acc_t>& r, int n, acc_t factor, acc_t free_bits, at::vec::Vectorized<acc_t>& kl_acc) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec f(factor), zero(acc_t(0));
  for (int i = 0; i < n; i += Vec::size()) {
    const int count = std::min<int>(Vec::size(), n - i);
    const bool full = count == Vec::size();
    auto load = [&](const acc_t* ptr) { return full ? Vec::loadu(ptr + i) : Vec::loadu(ptr + i, count); };
    auto store = [&](const Vec& v, acc_t* ptr) { full ? v.store(ptr + i) : v.store(ptr + i, count); };
    const Vec mu = load(r.mu), lv = load(r.lv);
    KlTerms<Vec> k = r.pm != nullptr ? kl_prior(mu, lv, load(r.pm), load(r.plv)) : kl_standard(mu, lv);
    if (r.below != nullptr) {
      const Vec clamped = load(r.below) != zero;
      k.kl = Vec::blendv(k.kl, Vec(free_bits), clamped);
      k.grad_mu = Vec::blendv(k.grad_mu, zero, clamped);
      k.grad_lv = Vec::blendv(k.grad_lv, zero, clamped);
      k.grad_plv = Vec::blendv(k.grad_plv, zero, clamped);
    }
    kl_acc = kl_acc + head(k.kl, count);
    if (r.gmu != nullptr) store(k.grad_mu * f, r.gmu);
    if (r.gpm != nullptr) store(zero - k.grad_mu * f, r.gpm);
    if (r.glv != nullptr) store(k.grad_lv * f, r.glv);
    if (r.gplv != nullptr) store(k.grad_plv * f, r.gplv);
  }
}

// Column sums over the batch of the elementwise KL, for free bits: below[d] = 1
// where mean_b KL[b, d] < free_bits. Parallel over blocks of columns, each summed
// over b in order.
template <typename scalar_t>
void free_bits_mask(const ElboParams& p, acc_type_t<scalar_t>* below) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kCols = 256;
  const int64_t L = p.latent_row;
  const auto* mu = static_cast<const scalar_t*>(p.mu);
  const auto* lv = static_cast<const scalar_t*>(p.logvar);
  const auto* pm = static_cast<const scalar_t*>(p.prior_mu);
  const auto* plv = static_cast<const scalar_t*>(p.prior_logvar);
  const int64_t blocks = ceil_div(L, kCols);
  at::parallel_for(0, blocks, grain_for(kCols * std::max<int64_t>(1, p.batch)), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t ms[kCols], ls[kCols], pms[kCols], plvs[kCols], sums[kCols];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t d0 = blk * kCols;
      const int n = static_cast<int>(std::min(kCols, L - d0));
      std::fill(sums, sums + kCols, acc_t(0));
      for (int64_t b = 0; b < p.batch; ++b) {
        load_widen(mu + b * L + d0, ms, n);
        load_widen(lv + b * L + d0, ls, n);
        if (pm != nullptr) {
          load_widen(pm + b * p.prior_mu_row_stride + d0, pms, n);
          load_widen(plv + b * p.prior_logvar_row_stride + d0, plvs, n);
        }
        for (int i = 0; i < n; i += Vec::size()) {
          const int count = std::min<int>(Vec::size(), n - i);
          const Vec m = Vec::loadu(ms + i, count), l = Vec::loadu(ls + i, count);
          const Vec kl = pm != nullptr ? kl_prior(m, l, Vec::loadu(pms + i, count), Vec::loadu(plvs + i, count)).kl
                                       : kl_standard(m, l).kl;
          (Vec::loadu(sums + i) + head(kl, count)).store(sums + i);
        }
      }
      for (int i = 0; i < n; ++i) {
        below[d0 + i] = static_cast<double>(sums[i]) / static_cast<double>(p.batch) < p.free_bits ? acc_t(1) : acc_t(0);
      }
    }
  });
}

template <typename scalar_t>
void kl_chunk(const ElboParams& p, const acc_type_t<scalar_t>* below, int64_t b, int64_t j0, int64_t len,
              acc_type_t<scalar_t>* kl_partial) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t L = p.latent_row;
  const int64_t base = b * L + j0;
  const auto* mu = static_cast<const scalar_t*>(p.mu) + base;
  const auto* lv = static_cast<const scalar_t*>(p.logvar) + base;
  const bool prior = p.prior_mu != nullptr;
  const auto* pm = prior ? static_cast<const scalar_t*>(p.prior_mu) + b * p.prior_mu_row_stride + j0 : nullptr;
  const auto* plv = prior ? static_cast<const scalar_t*>(p.prior_logvar) + b * p.prior_logvar_row_stride + j0 : nullptr;
  auto out = [&](void* g) { return g != nullptr ? static_cast<scalar_t*>(g) + base : nullptr; };
  scalar_t *gmu = out(p.grad_mu), *glv = out(p.grad_logvar), *gpm = out(p.grad_prior_mu),
           *gplv = out(p.grad_prior_logvar);
  const acc_t* bl = below != nullptr ? below + j0 : nullptr;
  const acc_t factor = static_cast<acc_t>(p.grad_factor), fb = static_cast<acc_t>(p.free_bits);
  Vec kl_acc(acc_t(0));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const LatentRun<acc_t> r{mu, lv, pm, plv, bl, gmu, glv, gpm, gplv};
    kl_run<acc_t>(r, static_cast<int>(len), factor, fb, kl_acc);
  } else {
    alignas(64) acc_t ms[kStage], ls[kStage], pms[kStage], plvs[kStage];
    alignas(64) acc_t g0[kStage], g1[kStage], g2[kStage], g3[kStage];
    for (int64_t k = 0; k < len; k += kStage) {
      const int n = static_cast<int>(std::min<int64_t>(kStage, len - k));
      load_widen(mu + k, ms, n);
      load_widen(lv + k, ls, n);
      if (prior) {
        load_widen(pm + k, pms, n);
        load_widen(plv + k, plvs, n);
      }
      const LatentRun<acc_t> r{ms, ls, prior ? pms : nullptr, prior ? plvs : nullptr, bl != nullptr ? bl + k : nullptr,
                               gmu != nullptr ? g0 : nullptr, glv != nullptr ? g1 : nullptr,
                               gpm != nullptr ? g2 : nullptr, gplv != nullptr ? g3 : nullptr};
      kl_run<acc_t>(r, n, factor, fb, kl_acc);
      if (gmu != nullptr) store_narrow(g0, gmu + k, n);
      if (glv != nullptr) store_narrow(g1, glv + k, n);
      if (gpm != nullptr) store_narrow(g2, gpm + k, n);
      if (gplv != nullptr) store_narrow(g3, gplv + k, n);
    }
  }
  *kl_partial = lane_sum(kl_acc);
}

template <typename scalar_t>
void kl_pass(const ElboParams& p, std::vector<double>& kl_b) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t L = p.latent_row;
  std::vector<acc_t> below;
  if (p.free_bits > 0 && L > 0 && p.batch > 0) {
    below.resize(L);
    free_bits_mask<scalar_t>(p, below.data());
  }
  const int64_t chunks = ceil_div(L, kLatentChunk);
  const int64_t items = p.batch * chunks;
  std::vector<acc_t> part(items);
  at::parallel_for(0, items, grain_for(std::min(L, kLatentChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / chunks, c = it % chunks;
      const int64_t j0 = c * kLatentChunk;
      kl_chunk<scalar_t>(p, below.empty() ? nullptr : below.data(), b, j0, std::min(kLatentChunk, L - j0), &part[it]);
    }
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += static_cast<double>(part[b * chunks + c]);
    kl_b[b] = s;
  }
}

template <typename scalar_t>
void write_obs_row_grads(const ElboParams& p, const std::vector<double>& gs_b) {
  auto* g = static_cast<scalar_t*>(p.grad_obs_logvar);
  for (int64_t b = 0; b < p.batch; ++b) g[b] = static_cast<scalar_t>(p.grad_factor * gs_b[b]);
}

// ---------------------------------------------------------------- scale (backward)

template <typename scalar_t>
void scale_impl(const ElboScaleParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kChunk = 16384;
  const auto* grad = static_cast<const scalar_t*>(p.grad);
  auto* out = static_cast<scalar_t*>(p.out);
  const int64_t chunks = ceil_div(p.row_numel, kChunk);
  at::parallel_for(0, p.rows * chunks, grain_for(std::min(p.row_numel, kChunk)), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kStage];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / chunks, c = it % chunks;
      const acc_t s = static_cast<acc_t>(p.scale[b * p.scale_stride]);
      const int64_t j0 = c * kChunk;
      const int64_t len = std::min(kChunk, p.row_numel - j0);
      const scalar_t* g = grad + b * p.row_numel + j0;
      scalar_t* o = out + b * p.row_numel + j0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        int64_t i = 0;
        for (; i + Vec::size() <= len; i += Vec::size()) (Vec::loadu(g + i) * Vec(s)).store(o + i);
        for (; i < len; ++i) o[i] = g[i] * s;
      } else {
        for (int64_t k = 0; k < len; k += kStage) {
          const int n = static_cast<int>(std::min<int64_t>(kStage, len - k));
          load_widen(g + k, buf, n);
          for (int i = 0; i < n; ++i) buf[i] *= s;
          store_narrow(buf, o + k, n);
        }
      }
    }
  });
}

}  // namespace

// Compiled once per CPU capability (common/cpu_capability.h).
namespace CPU_CAPABILITY {

void elbo_forward_cpu(const ElboParams& p) {
  const int64_t B = p.batch;
  std::vector<double> recon_b(B, 0.0), gs_b(B, 0.0), kl_b(B, 0.0);
  if (p.recon_row > 0) {
    dispatch_dtype(p.recon_dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      if (p.likelihood == Likelihood::kCategorical) {
        categorical_pass<scalar_t>(p, recon_b);
      } else if (p.likelihood == Likelihood::kBernoulli) {
        recon_pass<scalar_t, Term::kBce>(p, recon_b, gs_b);
      } else if (p.likelihood == Likelihood::kBernoulliProbs) {
        recon_pass<scalar_t, Term::kBceProb>(p, recon_b, gs_b);
      } else if (p.obs_kind == ObsKind::kNone) {
        recon_pass<scalar_t, Term::kSse>(p, recon_b, gs_b);
      } else {
        recon_pass<scalar_t, Term::kNll>(p, recon_b, gs_b);
      }
      if (p.obs_kind == ObsKind::kPerRow && p.grad_obs_logvar != nullptr) write_obs_row_grads<scalar_t>(p, gs_b);
    });
  } else if (p.obs_kind == ObsKind::kPerRow && p.grad_obs_logvar != nullptr) {
    dispatch_dtype(p.recon_dtype, [&](auto tag) { write_obs_row_grads<decltype(tag)>(p, gs_b); });
  }
  if (p.latent_row > 0) {
    dispatch_dtype(p.latent_dtype, [&](auto tag) { kl_pass<decltype(tag)>(p, kl_b); });
  }
  // Batch reduction in sample order, float64.
  if (p.reduction == Reduction::kNone) {
    for (int64_t b = 0; b < B; ++b) {
      p.out_recon[b] = recon_b[b];
      p.out_kl[b] = kl_b[b];
      p.out_loss[b] = recon_b[b] + p.beta * kl_b[b];
    }
    return;
  }
  double r = 0, k = 0, l = 0;
  for (int64_t b = 0; b < B; ++b) {
    r += recon_b[b];
    k += kl_b[b];
    l += recon_b[b] + p.beta * kl_b[b];
  }
  if (p.reduction == Reduction::kMean) {  // B == 0 gives NaN, as torch's mean of nothing
    r /= static_cast<double>(B);
    k /= static_cast<double>(B);
    l /= static_cast<double>(B);
  }
  p.out_recon[0] = r;
  p.out_kl[0] = k;
  p.out_loss[0] = l;
}

void elbo_scale_grad_cpu(const ElboScaleParams& p) {
  if (p.rows == 0 || p.row_numel == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) { scale_impl<decltype(tag)>(p); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_ext
