// CPU kernels of masked_attention, flash-attention style: tiles of queries and
// keys, online softmax, the row log-sum-exp saved for the backward, which
// recomputes the probabilities from it. Extra memory is O(B·H·S·D) (the float32
// dq accumulator for 16-bit dtypes or a split key range), never O(S²).
//
// Work is split into tasks that own their outputs (forward: one (batch, head,
// query tile); backward: one (batch, kv head, key-tile range) that accumulates
// dk/dv of its key tiles over the query heads of its group, and dq of those
// heads), handed out dynamically, most expensive first, to the at::parallel_for
// threads. Results do not depend on the scheduling: no atomics, no races (for a
// given thread count they are bit-identical run to run).
//
// Tiles that the causal mask or the key padding hide entirely are never
// computed: keys >= key_len[b] and key tiles whose keys are all padding are
// skipped, and with is_causal a query tile stops at its last query's last
// visible key (j <= i + causal_offset, attention.h).
//
// Tile products run on float32/float64 tiles (16-bit inputs are widened tile by
// tile), either with the BLAS that torch links (MKL's sgemm_/dgemm_ where
// present) or with the at::vec register-blocked kernel below; see kGemm.
#ifndef CPU_CAPABILITY
#error "CPU kernels are compiled with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> (setup.py)"
#endif
#include "attention/attention.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "attention/attention_math.h"
#include "common/cpu_capability.h"
#include "common/cpu_scratch.h"
#include "common/cpu_utils.h"
#include "common/philox_cpu.h"

// The Fortran BLAS that libtorch_cpu exports on builds with MKL or OpenBLAS.
// Weak: on a torch without them the at::vec kernel runs.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (0 = back to the global one): run_tasks' serial path sets 1.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // mkl_service.h's C name (the lowercase one is Fortran's)
}

namespace vae_ext {
namespace {

// ---------------------------------------------------------------- configuration

// Tile sizes (queries x keys). The key tile is a multiple of 64: one vectorised
// Philox call covers 64 keys of a row. The forward picks them per call
// (fwd_blocks); the backward keeps fixed ones. Tuning knobs for benchmarks:
// VAE_EXT_ATTN_BLOCK_Q, VAE_EXT_ATTN_BLOCK_K (forward; fixed sizes instead of the
// per-call choice), VAE_EXT_ATTN_BWD_BLOCK_Q/_K, VAE_EXT_ATTN_GEMM=blas|vec.
struct Config {
  int64_t fwd_block_q = 0, fwd_block_k = 0;  // 0: chosen per call
  int64_t bwd_block_q = 128, bwd_block_k = 128;  // with panels: 128 query rows amortise the packing
  bool blas = true;
};

const Config& config() {
  static const Config cfg = [] {
    Config c;
    auto get = [](const char* name, int64_t& value, int64_t multiple) {
      if (const char* s = std::getenv(name)) {
        value = std::max<int64_t>(multiple, (std::atoll(s) + multiple - 1) / multiple * multiple);
      }
    };
    get("VAE_EXT_ATTN_BLOCK_Q", c.fwd_block_q, 1);
    get("VAE_EXT_ATTN_BLOCK_K", c.fwd_block_k, 64);
    get("VAE_EXT_ATTN_BWD_BLOCK_Q", c.bwd_block_q, 1);
    get("VAE_EXT_ATTN_BWD_BLOCK_K", c.bwd_block_k, 64);
    // VAE_EXT_ATTN_GEMM: "vec" (at::vec kernel for every product, no BLAS), "blas" (BLAS for every
    // product, no panels: attention_cpu_panels()); default: panels where use_kv_panels /
    // use_bwd_panels take them, BLAS elsewhere.
    if (const char* s = std::getenv("VAE_EXT_ATTN_GEMM")) c.blas = std::strcmp(s, "vec") != 0;
    return c;
  }();
  return cfg;
}

// Forward tile sizes for one call (benchmarks/results/cpu-attention-models-20261202.md):
// long key ranges take wide key tiles (fewer, larger BLAS calls and online-softmax
// rescales; the causal diagonal wastes up to half a tile, so causal stops at 256),
// and query tiles grow while every thread still gets several tasks, within a
// per-thread working set (q, scores, accumulator) of about 1.5 MiB.
std::pair<int64_t, int64_t> fwd_blocks(const AttentionParams& p) {
  const Config& c = config();
  const int64_t Sk = p.kv_len, Sq = p.q_len, D = p.head_dim;
  int64_t bk = c.fwd_block_k;
  if (bk == 0) {
    bk = Sk >= 2048 ? 512 : Sk >= 768 ? 256 : 128;
    if (p.is_causal) bk = std::min<int64_t>(bk, 256);
  }
  int64_t bq = c.fwd_block_q;
  if (bq == 0) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t bh = static_cast<int64_t>(p.batch) * p.heads;
    bq = 64;
    for (const int64_t cand : {256, 128}) {
      const int64_t tasks = bh * ((Sq + cand - 1) / cand);
      const int64_t bytes = 4 * (cand * D * 2 + cand * bk);
      if (Sq >= cand && tasks >= 4 * threads && bytes <= (int64_t{3} << 19)) {
        bq = cand;
        break;
      }
    }
  }
  return {bq, bk};
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

inline Vec<float> vexp(const Vec<float>& x) { return x.exp_u20(); }
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }
struct VecExp {
  template <typename T>
  Vec<T> operator()(const Vec<T>& x) const {
    return vexp(x);
  }
};

// The float forward's scores are in the log2 domain, as in the CUDA kernels: the
// scale is folded into log2(e) in the Q·Kᵀ product, additive mask terms are taken
// times log2(e) (mask_term_log2), the softmax runs on exp2, and the lse is turned
// back into the natural domain (softmax_lse with ln 2). Float64 stays natural.
constexpr double kLog2e = 1.4426950408889634074;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// 2^n for integral n in [-127, 0] (float lanes): the biased exponent n + 127 in the exponent bits.
inline Vec<float> pow2_int(const Vec<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
#else
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
#endif
}
#endif

// 2^x for x <= 0 (a score minus its row's reference): x is clamped to -127 (so that
// -inf, a hidden pair, gives exactly 0), split into n = round(x) and f = x - n in
// [-0.5, 0.5]; 2^f is Cephes' exp2f polynomial (relative error ~1e-7, below exp_u20's),
// 2^n is built in the exponent bits (n = -127: all zero bits, 0). A NaN stays NaN (the
// clamp returns its second operand, x, when x is NaN). Positive x (not reached) gives
// garbage above 2^128. Without AVX2 it is exp(x ln 2).
inline Vec<float> vexp2(const Vec<float>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using F = Vec<float>;
  const F t = at::vec::clamp_min(x, F(-127.f));  // max(-127, x): x itself when x is NaN
  const F n = t.round();                         // to nearest
  const F f = t - n;
  F p(1.535336188319500e-4f);
#pragma GCC unroll 8
  for (const float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f,
                        6.931472028550421e-1f, 1.f}) {
    p = at::vec::fmadd(p, f, F(c));
  }
  return p * pow2_int(n);
#else
  return (x * Vec<float>(static_cast<float>(1.0 / kLog2e))).exp_u20();
#endif
}

// The exp of the softmax of accumulator type T: exp2 in the log2 domain (float), exp (double).
template <typename T>
inline constexpr bool kLog2Domain = std::is_same_v<T, float>;
struct ScalarExpDomain {
  template <typename T>
  T operator()(T x) const {
    if constexpr (kLog2Domain<T>) {
      return std::exp2(x);
    } else {
      return std::exp(x);
    }
  }
};
template <typename T>
inline Vec<T> vexp_domain(const Vec<T>& x) {
  if constexpr (kLog2Domain<T>) {
    return vexp2(x);
  } else {
    return vexp(x);
  }
}
struct VecExpDomain {
  template <typename T>
  Vec<T> operator()(const Vec<T>& x) const {
    return vexp_domain(x);
  }
};
// The factor that takes a natural-domain score (scale·q·k, an lse) to T's domain.
template <typename T>
constexpr double domain_factor() {
  return kLog2Domain<T> ? kLog2e : 1.0;
}

}  // namespace

// attention_math.h's primitives on a vector of lanes.
VAE_EXT_CPU_NS_BEGIN
template <typename T>
struct AttentionMath<Vec<T>> {
  using scalar = T;
  static Vec<T> select_eq(const Vec<T>& x, const Vec<T>& c, const Vec<T>& a, const Vec<T>& b) {
    return Vec<T>::blendv(b, a, x == c);
  }
};
VAE_EXT_CPU_NS_END

namespace {

// ---------------------------------------------------------------- tile products

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, op(X) = X or Xᵀ; A is
// stored m x k (or k x m when trans_a) with row stride lda, B k x n (or n x k).
// beta == 0 never reads C.

// Register block of block_kernel as gemm_vec and panel_gemm use it: 6 rows x 2 vectors.
constexpr int kPanelMR = 6;
template <typename T>
constexpr int64_t panel_nr() {
  return 2 * Vec<T>::size();
}

// The register-blocked at::vec kernel of every product that does not go to the BLAS:
// C rows [0, rows) x cols [0, ncols) = alpha * A B + beta * C over k, with an MR x NV
// vectors block of C in registers. A element (r, p) at a[r * a_rs + p * a_cs] is
// broadcast (all MR rows are read: callers hand whole MR-row blocks); B is a packed
// panel, row p the NV vectors at b + p * NV * L (a constant stride: the unrolled loads
// take immediate offsets). beta == 0 never reads C.
template <typename T, int MR, int NV>
inline void block_kernel(const T* __restrict__ a, int64_t a_rs, int64_t a_cs, const T* __restrict__ b, int64_t k,
                         T* c, int64_t ldc, int64_t rows, int64_t ncols, T alpha, T beta) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec<T>(T(0));
  }
#pragma GCC unroll 8
  for (int64_t p = 0; p < k; ++p) {
    Vec<T> bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = Vec<T>::loadu(b + (p * NV + v) * L);
    const T* ap = a + p * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec<T> av(ap[r * a_rs]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
  const Vec<T> va(alpha), vb(beta);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;
    T* cr = c + r * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const int64_t n = std::min<int64_t>(L, ncols - v * L);
      if (n <= 0) break;
      Vec<T> x = acc[r][v] * va;
      if (n == L) {
        if (beta != T(0)) x = at::vec::fmadd(vb, Vec<T>::loadu(cr + v * L), x);
        x.store(cr + v * L);
      } else {
        if (beta != T(0)) x = at::vec::fmadd(vb, Vec<T>::loadu(cr + v * L, n), x);
        x.store(cr + v * L, n);
      }
    }
  }
}

template <typename T>
void gemm_vec(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
              const T* b, int64_t ldb, T beta, T* c, int64_t ldc, std::vector<T>& pack) {
  constexpr int64_t NR = panel_nr<T>();
  constexpr int MR = kPanelMR;
  // op(B) as panels of NR columns (k rows of NR, zero columns past n), block_kernel's B.
  const int64_t n_panels = (n + NR - 1) / NR;
  pack.assign(static_cast<size_t>(n_panels * k * NR), T(0));
  for (int64_t j = 0; j < n; ++j) {
    T* dst = pack.data() + (j / NR) * k * NR + j % NR;
    for (int64_t p = 0; p < k; ++p) dst[p * NR] = trans_b ? b[j * ldb + p] : b[p * ldb + j];
  }
  const int64_t a_rs = trans_a ? 1 : lda, a_cs = trans_a ? lda : 1;
  for (int64_t j = 0; j < n; j += NR) {
    const T* panel = pack.data() + (j / NR) * k * NR;
    const int64_t nc = std::min(NR, n - j);
    int64_t i = 0;
    for (; i + MR <= m; i += MR) {
      block_kernel<T, MR, 2>(a + i * a_rs, a_rs, a_cs, panel, k, c + i * ldc + j, ldc, MR, nc, alpha, beta);
    }
    const T* ai = a + i * a_rs;
    T* ci = c + i * ldc + j;
    const int64_t rest = m - i;  // the last rows: a block of exactly that many (A is not padded here)
    switch (rest) {
      case 5: block_kernel<T, 5, 2>(ai, a_rs, a_cs, panel, k, ci, ldc, rest, nc, alpha, beta); break;
      case 4: block_kernel<T, 4, 2>(ai, a_rs, a_cs, panel, k, ci, ldc, rest, nc, alpha, beta); break;
      case 3: block_kernel<T, 3, 2>(ai, a_rs, a_cs, panel, k, ci, ldc, rest, nc, alpha, beta); break;
      case 2: block_kernel<T, 2, 2>(ai, a_rs, a_cs, panel, k, ci, ldc, rest, nc, alpha, beta); break;
      case 1: block_kernel<T, 1, 2>(ai, a_rs, a_cs, panel, k, ci, ldc, rest, nc, alpha, beta); break;
      default: break;
    }
  }
}

inline void blas_call(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_call(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <typename T>
bool blas_linked() {
  if constexpr (std::is_same_v<T, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

// Whether the BLAS is there and computes what the row-major wrapper expects (a
// small product of every transpose form against the at::vec kernel, once per
// process): a BLAS with another integer width or calling convention is not used.
template <typename T>
bool blas_usable() {
  static const bool ok = [] {
    if (!blas_linked<T>()) return false;
    constexpr int64_t m = 5, n = 3, k = 4;
    T a[m * k], b[k * n], c1[m * n], c2[m * n];
    std::vector<T> pack;
    for (int64_t i = 0; i < m * k; ++i) a[i] = static_cast<T>((i * 7) % 11) - T(5);
    for (int64_t i = 0; i < k * n; ++i) b[i] = static_cast<T>((i * 5) % 13) - T(6);
    for (const bool ta : {false, true}) {
      for (const bool tb : {false, true}) {
        const int64_t lda = ta ? m : k, ldb = tb ? k : n;
        for (int64_t i = 0; i < m * n; ++i) c1[i] = c2[i] = T(1);
        blas_call(tb ? "T" : "N", ta ? "T" : "N", static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                  T(2), b, static_cast<int>(ldb), a, static_cast<int>(lda), T(1), c1, static_cast<int>(n));
        gemm_vec<T>(ta, tb, m, n, k, T(2), a, lda, b, ldb, T(1), c2, n, pack);
        for (int64_t i = 0; i < m * n; ++i) {
          if (c1[i] != c2[i]) return false;  // small integers: exact in both
        }
      }
    }
    return true;
  }();
  return ok;
}

// C = alpha A op(B) + beta C for a few rows of A (row-major, not transposed), with no
// packing: decoding's tiles are the G query heads of one kv head (1-8 rows), where the
// BLAS spent more time copying B into its panels than multiplying (perf, 1x32/8x1x128).
// op(B) = Bᵀ: one key row against every row of A per step, a horizontal sum per entry;
// op(B) = B: each B row is loaded once and added to every row of C.
constexpr int64_t kSmallGemmRows = 8;

// out[0:n] += w * x[0:n]: one row of B into one row of C (gemm_few_rows, gemm_skip_zero).
template <typename T>
inline void axpy_row(T* out, T w, const T* x, int64_t n) {
  const Vec<T> vw(w);
  at::vec::map2<T>([vw](Vec<T> o, Vec<T> xv) { return at::vec::fmadd(vw, xv, o); }, out, out, x, n);
}

template <typename T>
void gemm_few_rows(bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                   int64_t ldb, T beta, T* c, int64_t ldc) {
  constexpr int64_t L = Vec<T>::size();
  auto finish = [&](T* cij, T x) { *cij = beta == T(0) ? alpha * x : alpha * x + beta * *cij; };
  if (trans_b) {
    for (int64_t j = 0; j < n; ++j) {
      const T* bj = b + j * ldb;
      for (int64_t i = 0; i < m; ++i) {
        const T* ai = a + i * lda;
        Vec<T> acc0(T(0)), acc1(T(0));
        int64_t p = 0;
        for (; p + 2 * L <= k; p += 2 * L) {
          acc0 = at::vec::fmadd(Vec<T>::loadu(ai + p), Vec<T>::loadu(bj + p), acc0);
          acc1 = at::vec::fmadd(Vec<T>::loadu(ai + p + L), Vec<T>::loadu(bj + p + L), acc1);
        }
        for (; p < k; p += L) {
          const int64_t w = std::min(L, k - p);
          acc0 = at::vec::fmadd(Vec<T>::loadu(ai + p, w), Vec<T>::loadu(bj + p, w), acc0);
        }
        finish(c + i * ldc + j, at::vec::vec_reduce_all<T>([](Vec<T> x, Vec<T> y) { return x + y; }, acc0 + acc1));
      }
    }
    return;
  }
  for (int64_t i = 0; i < m; ++i) {  // C row i = alpha sum_p a_ip B_p + beta C row i
    T* ci = c + i * ldc;
    if (beta == T(0)) {
      std::fill(ci, ci + n, T(0));
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    const T* bp = b + p * ldb;
    for (int64_t i = 0; i < m; ++i) axpy_row(c + i * ldc, alpha * a[i * lda + p], bp, n);
  }
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc, std::vector<T>& pack) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    }
    return;
  }
  if (!trans_a && m <= kSmallGemmRows) {
    gemm_few_rows<T>(trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else if (config().blas && blas_usable<T>()) {
    // Column-major BLAS sees each row-major matrix transposed: Cᵀ = op(B)ᵀ op(A)ᵀ.
    blas_call(trans_b ? "T" : "N", trans_a ? "T" : "N", static_cast<int>(n), static_cast<int>(m),
              static_cast<int>(k), alpha, b, static_cast<int>(ldb), a, static_cast<int>(lda), beta, c,
              static_cast<int>(ldc));
  } else {
    gemm_vec<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, pack);
  }
}


// ---------------------------------------------------------------- packed-panel products
//
// The tile products (the forward's S = scale Q Kᵀ and O += P V; the backward's five
// likewise, with K, V, Q and dO packed per tile), on operands laid out
// for a register-blocked kernel: an MR x (NV vectors) block of C in registers, A
// broadcast one element at a time, B read as whole vectors from a contiguous panel
// (k rows of NV vectors). K and V are packed into such panels once per call (every
// query tile of a head reads the same panels), the Q tile once per task (MR rows
// interleaved: the broadcasts walk one line); P is read in place. On this project's
// AVX2 machine the kernel runs at ~88 GFLOP/s per core against MKL's ~66 on the same
// tile shapes (benchmarks/results/cpu-attention-models-20261202.md), and no per-call
// packing or C scaling is paid.

constexpr int64_t kPanelKc = 256;  // k chunk: A block and B panel stay in L1 / L2

// C (m x ncols) (= or +=) alpha A B with B one panel of width NV * L (k rows) on
// block_kernel; A as there per row block: row block i starts at a + i * a_blk. k is split into chunks of
// kPanelKc (b's rows, a's columns); only the first chunk stores when !accumulate.
template <typename T, int NV>
void panel_gemm(int64_t m, int64_t ncols, int64_t k, T alpha, const T* a, int64_t a_blk, int64_t a_rs, int64_t a_cs,
                const T* b, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t W = NV * Vec<T>::size();
  for (int64_t p0 = 0; p0 < k; p0 += kPanelKc) {
    const int64_t kc = std::min(kPanelKc, k - p0);
    const bool acc = accumulate || p0 > 0;
    const T* bp = b + p0 * W;
    for (int64_t i = 0; i < m; i += kPanelMR) {
      const T* ai = a + (i / kPanelMR) * a_blk + p0 * a_cs;
      block_kernel<T, kPanelMR, NV>(ai, a_rs, a_cs, bp, kc, c + i * ldc, ldc, std::min<int64_t>(kPanelMR, m - i),
                                    ncols, alpha, acc ? T(1) : T(0));
    }
  }
}

// The V panels' widths: NR columns each, the last L wide when at most L columns remain.
template <typename T>
int64_t v_panel_width(int64_t D, int64_t j0) {
  constexpr int64_t L = Vec<T>::size(), NR = panel_nr<T>();
  return D - j0 <= L ? L : NR;
}
template <typename T>
int64_t v_packed_cols(int64_t D) {
  int64_t n = 0;
  for (int64_t j0 = 0; j0 < D; j0 += v_panel_width<T>(D, j0)) n += v_panel_width<T>(D, j0);
  return n;
}

// Packing into panel_gemm's operands, from acc_t rows (rows x D, row stride ld):
// interleaved groups of G rows (element (r, d) of a group at d * G + r): with G = MR
// the A of a product over D, with G = NR key panels, the B of a product A xᵀ;
// column panels (v_panel_width columns each; a panel's rows contiguous, panel_rows of
// them, these from row0 on), the B of A x. Rows and columns past the data are zero.
template <int64_t G, typename T>
void pack_interleaved(const T* x, int64_t ld, int64_t rows, int64_t D, T* dst) {
  const int64_t padded = (rows + G - 1) / G * G;
  for (int64_t i = 0; i < padded; ++i) {
    T* out = dst + (i / G) * G * D + i % G;
    for (int64_t d = 0; d < D; ++d) out[d * G] = i < rows ? x[i * ld + d] : T(0);
  }
}
template <typename T>
void pack_row_blocks(const T* x, int64_t ld, int64_t rows, int64_t D, T* dst) {
  pack_interleaved<kPanelMR>(x, ld, rows, D, dst);
}
template <typename T>
void pack_key_panels(const T* x, int64_t ld, int64_t rows, int64_t D, T* dst) {
  pack_interleaved<panel_nr<T>()>(x, ld, rows, D, dst);
}
template <typename T>
void pack_col_panels(const T* x, int64_t ld, int64_t rows, int64_t D, T* dst, int64_t panel_rows, int64_t row0) {
  for (int64_t c0 = 0; c0 < D;) {
    const int64_t w = v_panel_width<T>(D, c0), n = std::min(w, D - c0);
    T* panel = dst + c0 * panel_rows + row0 * w;
    for (int64_t j = 0; j < rows; ++j) {
      std::copy(x + j * ld + c0, x + j * ld + c0 + n, panel + j * w);
      std::fill(panel + j * w + n, panel + (j + 1) * w, T(0));
    }
    c0 += w;
  }
}
template <typename T>
void pack_col_panels(const T* x, int64_t ld, int64_t rows, int64_t D, T* dst) {
  pack_col_panels(x, ld, rows, D, dst, rows, 0);
}

// C (m x nk) = alpha A xᵀ: A packed as MR-row blocks (k = D), x as key panels.
template <typename T>
void panel_gemm_keys(int64_t m, int64_t nk, int64_t D, T alpha, const T* a_blocks, const T* key_panels, T* c,
                     int64_t ldc) {
  constexpr int64_t NR = panel_nr<T>();
  for (int64_t j = 0; j < nk; j += NR) {
    panel_gemm<T, 2>(m, std::min(NR, nk - j), D, alpha, a_blocks, kPanelMR * D, 1, kPanelMR, key_panels + j * D,
                     c + j, ldc, false);
  }
}

// C (m x D) += alpha A x over k rows of x: x as column panels of panel_rows rows, from row
// row0 on; A as panel_gemm takes it (a_blk, a_rs, a_cs).
template <typename T>
void panel_gemm_cols(int64_t m, int64_t D, int64_t k, T alpha, const T* a, int64_t a_blk, int64_t a_rs, int64_t a_cs,
                     const T* col_panels, int64_t panel_rows, int64_t row0, T* c, int64_t ldc) {
  constexpr int64_t NR = panel_nr<T>();
  for (int64_t c0 = 0; c0 < D;) {
    const int64_t w = v_panel_width<T>(D, c0), n = std::min(w, D - c0);
    const T* panel = col_panels + c0 * panel_rows + row0 * w;
    if (w == NR) {
      panel_gemm<T, 2>(m, n, k, alpha, a, a_blk, a_rs, a_cs, panel, c + c0, ldc, true);
    } else {
      panel_gemm<T, 1>(m, n, k, alpha, a, a_blk, a_rs, a_cs, panel, c + c0, ldc, true);
    }
    c0 += w;
  }
}

// ---------------------------------------------------------------- AVX512-BF16 panel products
//
// bfloat16 inputs on a CPU with AVX512-BF16 (the AVX512 build checks cpuid at run time):
// the forward's two tile products take bf16 operands in pairs along k and sum in float32
// with vdpbf16ps, two products per lane per instruction where the float kernel does one
// FMA on widened values: S = Q Kᵀ over pairs of head-dim entries, O += P V over pairs of
// keys, with P rounded to bf16 (to nearest even), as the CUDA tensor-core kernels round it;
// the softmax statistics stay float32. K and V are packed once per call straight from the
// bf16 input (no widening; half the bytes of the float panels). Layouts, in uint32 units
// (one pair of bf16, the lower element first), pairs past the data zero:
//   Q blocks  MR-row blocks, pair q of row r at q * MR + r (Dp = ceil(D / 2) pairs per row)
//   K panels  NR keys each, pair q of key j at q * NR + j (a panel: Dp * NR)
//   V panels  v_panel_width columns each, key pair t of column c at t * w + c (Skp = ceil(Sk / 2) rows)
//   P         bf16 rows of the scores tile, read in place as pairs of keys
// The backward's five products use the same kernels (backward_impl: S and dP as Q·Kᵀ; Pᵀ dO
// and dSᵀ Q on transposed pairs of query rows; dS K on dS's bf16 rows).
// The kernels below are defined in the AVX512 build only. Every build declares the four
// entry points, so the call sites, each under `if constexpr (kBf16Dot<scalar_t>)`, compile
// everywhere and are instantiated only where the kernels exist (elsewhere nothing calls them).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kBf16DotBuilt = true;
#else
constexpr bool kBf16DotBuilt = false;
#endif
template <typename scalar_t>
inline constexpr bool kBf16Dot = std::is_same_v<scalar_t, c10::BFloat16> && kBf16DotBuilt;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"  // declared, not defined, outside the AVX512 build
// C (m x nk) = alpha Q Kᵀ: Q as pair blocks, K as pair panels from the tile's first key on.
inline void bf16_gemm_keys(int64_t m, int64_t nk, int64_t Dp, float alpha, const uint32_t* q_blocks,
                           const uint32_t* key_panels, float* c, int64_t ldc);
// C (m x D) += alpha A X over nk rows of X: A's element pair (row r, pair q) at
// a[r * a_rs + q * a_cs] (P or dS as bf16 rows, read in place: a_rs = row stride in pairs,
// a_cs = 1; Pᵀ or dSᵀ as transposed pairs: a_rs = 1, a_cs = their row stride), X as column
// panels of row pairs (Skp pair rows) from pair t0 on.
inline void bf16_gemm_cols(int64_t m, int64_t D, int64_t nk, float alpha, const uint32_t* a_pairs, int64_t a_rs,
                           int64_t a_cs, const uint32_t* col_panels, int64_t Skp, int64_t t0, float* c,
                           int64_t ldc);
// dst rows (row stride ldd, uint16) = the first n entries of each of `rows` float rows of s
// (row stride lds) rounded to bf16 (to nearest even; NaN stays NaN), and a zero after them
// when n is odd (the last pair's upper half).
inline void round_rows_bf16(const float* s, int64_t lds, int64_t rows, int64_t n, uint16_t* dst, int64_t ldd);
// T[t * ldt + r] = the pair (x[2t][r], x[2t + 1][r]) rounded to bf16 (to nearest even), for
// t < ceil(rows / 2) and r < n: x's float rows (row stride ldx) transposed into pairs of rows,
// the A of a product Xᵀ Y over the rows (the backward's Pᵀ dO and dSᵀ Q); a missing last row is zero.
inline void round_pairs_transposed(const float* x, int64_t ldx, int64_t rows, int64_t n, uint32_t* T,
                                   int64_t ldt);
#pragma GCC diagnostic pop

#if defined(CPU_CAPABILITY_AVX512)
#define VAE_EXT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// The lanes [0, n) of a 16-lane vector (n <= 16).
inline __mmask16 lanes16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// C rows [0, rows) x cols [0, ncols) (= or +=) alpha A B over kp pairs: as block_kernel, with
// A element pair (r, q) at a[r * a_rs + q * a_cs] broadcast and B's row pair q the NV vectors
// at b + q * NV * 16.
template <int MR, int NV>
VAE_EXT_BF16_TARGET void bf16_block_kernel(
    const uint32_t* __restrict__ a, int64_t a_rs, int64_t a_cs, const uint32_t* __restrict__ b, int64_t kp,
    float* c, int64_t ldc, int64_t rows, int64_t ncols, float alpha, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t q = 0; q < kp; ++q) {
    __m512i bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + (q * NV + v) * 16);
    const uint32_t* aq = a + q * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(aq[r * a_rs]));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;
    float* cr = c + r * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const int64_t n = std::min<int64_t>(16, ncols - v * 16);
      if (n <= 0) break;
      const __mmask16 m = lanes16(n);
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, cr + v * 16));
      _mm512_mask_storeu_ps(cr + v * 16, m, x);
    }
  }
}

VAE_EXT_BF16_TARGET inline void round_rows_bf16(const float* s, int64_t lds, int64_t rows, int64_t n,
                                                uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = s + r * lds;
    uint16_t* y = dst + r * ldd;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = lanes16(n - j);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + j));
      _mm256_mask_storeu_epi16(y + j, m, (__m256i)h);
    }
    if (n % 2 != 0) y[n] = 0;
  }
}

#endif

inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// rows x D bf16 values (row stride ld) as interleaved groups of G rows of pairs: pair q of
// row r of a group at q * G + r (G = MR: the Q blocks; G = NR: the K panels).
template <int64_t G>
void pack_pair_groups(const c10::BFloat16* x, int64_t ld, int64_t rows, int64_t D, uint32_t* dst) {
  const int64_t Dp = (D + 1) / 2, padded = (rows + G - 1) / G * G;
  for (int64_t i = 0; i < padded; ++i) {
    uint32_t* out = dst + (i / G) * G * Dp + i % G;
    const c10::BFloat16* xi = x + i * ld;
    for (int64_t q = 0; q < Dp; ++q) {
      const uint16_t lo = i < rows ? xi[2 * q].x : uint16_t(0);
      const uint16_t hi = i < rows && 2 * q + 1 < D ? xi[2 * q + 1].x : uint16_t(0);
      out[q * G] = bf16_pair(lo, hi);
    }
  }
}

// Keys row0.. (row0 even) of V, `rows` of them (row stride ld), into the column panels of
// pairs of keys (Skp pair rows per panel).
inline void pack_v_pair_panels(const c10::BFloat16* x, int64_t ld, int64_t rows, int64_t D, uint32_t* dst,
                               int64_t Skp, int64_t row0) {
  for (int64_t c0 = 0; c0 < D;) {
    const int64_t w = v_panel_width<float>(D, c0), n = std::min(w, D - c0);
    uint32_t* panel = dst + c0 * Skp + (row0 / 2) * w;
    for (int64_t t = 0; t < (rows + 1) / 2; ++t) {
      const c10::BFloat16* lo = x + 2 * t * ld + c0;
      const c10::BFloat16* hi = 2 * t + 1 < rows ? lo + ld : nullptr;
      for (int64_t c = 0; c < w; ++c) {
        panel[t * w + c] = c < n ? bf16_pair(lo[c].x, hi != nullptr ? hi[c].x : uint16_t(0)) : 0u;
      }
    }
    c0 += w;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
inline void bf16_gemm_keys(int64_t m, int64_t nk, int64_t Dp, float alpha, const uint32_t* q_blocks,
                           const uint32_t* key_panels, float* c, int64_t ldc) {
  constexpr int64_t NR = panel_nr<float>(), MR = kPanelMR;
  for (int64_t j = 0; j < nk; j += NR) {
    for (int64_t i = 0; i < m; i += MR) {
      bf16_block_kernel<kPanelMR, 2>(q_blocks + (i / MR) * MR * Dp, 1, MR, key_panels + j * Dp, Dp, c + i * ldc + j,
                                     ldc, std::min(MR, m - i), std::min(NR, nk - j), alpha, false);
    }
  }
}

inline void bf16_gemm_cols(int64_t m, int64_t D, int64_t nk, float alpha, const uint32_t* a_pairs, int64_t a_rs,
                           int64_t a_cs, const uint32_t* col_panels, int64_t Skp, int64_t t0, float* c,
                           int64_t ldc) {
  constexpr int64_t MR = kPanelMR;
  const int64_t kp = (nk + 1) / 2;
  for (int64_t c0 = 0; c0 < D;) {
    const int64_t w = v_panel_width<float>(D, c0), n = std::min(w, D - c0);
    const uint32_t* panel = col_panels + c0 * Skp + t0 * w;
    for (int64_t i = 0; i < m; i += MR) {
      const uint32_t* a = a_pairs + i * a_rs;
      const int64_t rows = std::min(MR, m - i);
      if (w == panel_nr<float>()) {
        bf16_block_kernel<kPanelMR, 2>(a, a_rs, a_cs, panel, kp, c + i * ldc + c0, ldc, rows, n, alpha, true);
      } else {
        bf16_block_kernel<kPanelMR, 1>(a, a_rs, a_cs, panel, kp, c + i * ldc + c0, ldc, rows, n, alpha, true);
      }
    }
    c0 += w;
  }
}

VAE_EXT_BF16_TARGET inline void round_pairs_transposed(const float* x, int64_t ldx, int64_t rows, int64_t n,
                                                       uint32_t* T, int64_t ldt) {
  for (int64_t t = 0; 2 * t < rows; ++t) {
    const float* x0 = x + 2 * t * ldx;
    const float* x1 = 2 * t + 1 < rows ? x0 + ldx : nullptr;
    for (int64_t r = 0; r < n; r += 16) {
      const __mmask16 m = lanes16(n - r);
      const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x0 + r));
      const __m256i hi = x1 != nullptr ? (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x1 + r))
                                       : _mm256_setzero_si256();
      const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      _mm512_mask_storeu_epi32(T + t * ldt + r, m, pair);
    }
  }
}
#endif

// ---------------------------------------------------------------- row helpers

template <typename T>
inline T row_max(const T* x, int64_t n) {
  return at::vec::reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, x, n);
}

// x[j] = exp(x[j] - sub) in T's softmax domain (vexp_domain); returns the sum. Tail
// lanes are computed as -inf -> 0. Two vectors per step: two sums in flight.
template <typename T>
inline T exp_sub_sum(T* x, int64_t n, T sub) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(sub), vninf(neg_inf<T>());
  Vec<T> acc0(T(0)), acc1(T(0));
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    const Vec<T> e0 = vexp_domain(Vec<T>::loadu(x + j) - vs);
    const Vec<T> e1 = vexp_domain(Vec<T>::loadu(x + j + L) - vs);
    e0.store(x + j);
    e1.store(x + j + L);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; j < n; j += L) {
    const int64_t c = std::min(L, n - j);
    const Vec<T> e = vexp_domain(Vec<T>::set(vninf, Vec<T>::loadu(x + j, c), c) - vs);
    e.store(x + j, c);
    acc0 = acc0 + e;
  }
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc0 + acc1);
}

// x[j] = exp(x[j] - lse) in T's softmax domain (softmax_prob_from_lse): exactly 0 where
// x[j] = -inf (a hidden pair).
template <typename T>
inline void exp_sub(T* x, int64_t n, T sub) {
  if (sub != sub) {  // a NaN row: NaN at every visible pair (the fast vector exp need not keep a NaN)
    for (int64_t j = 0; j < n; ++j) x[j] = x[j] == neg_inf<T>() ? T(0) : std::numeric_limits<T>::quiet_NaN();
    return;
  }
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(sub), vninf(neg_inf<T>());
  int64_t j = 0;
  for (; j + L <= n; j += L) softmax_prob_from_lse(Vec<T>::loadu(x + j), vs, VecExpDomain{}).store(x + j);
  if (j < n) {
    softmax_prob_from_lse(Vec<T>::set(vninf, Vec<T>::loadu(x + j, n - j), n - j), vs, VecExpDomain{}).store(x + j, n - j);
  }
}

template <typename T>
inline void scale_row(T* x, int64_t n, T s) {
  at::vec::map<T>([s](Vec<T> v) { return v * Vec<T>(s); }, x, x, n);
}

template <typename T>
inline void mul_rows(T* x, const T* y, int64_t n) {
  at::vec::map2<T>([](Vec<T> a, Vec<T> b) { return a * b; }, x, x, y, n);
}

template <typename T>
inline T dot(const T* x, const T* y, int64_t n) {
  return at::vec::map2_reduce_all<T>([](Vec<T> a, Vec<T> b) { return a * b; },
                                     [](Vec<T> a, Vec<T> b) { return a + b; }, x, y, n);
}

// A (rows x D) tile of a (B, H, S, D) tensor as acc_t rows: the input itself when
// no widening is needed (row stride `ld`), else widened into `buf` (row stride D).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_rows(const scalar_t* src, int64_t src_rs, int64_t rows, int64_t d, acc_t* buf,
                              int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld = src_rs;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) load_widen(src + r * src_rs, buf + r * d, static_cast<int>(d));
    ld = d;
    return buf;
  }
}

// ---------------------------------------------------------------- problem description

enum PadStatus : uint8_t { kNoPadding = 0, kSomePadding = 1, kAllPadding = 2 };

struct Problem {
  const AttentionParams& p;
  int64_t B, H, Hkv, G, Sq, Sk, D;
  int64_t bq, bk, n_q_tiles, n_k_tiles;
  std::vector<int64_t> kv_end;      // per batch: keys >= kv_end[b] are known hidden
  std::vector<uint8_t> pad_status;  // per (batch, key tile)
  uint32_t threshold = 0;
  uint64_t seed = 0, counter_lo = 0;
  bool dropout = false;
  // Decoding with grouped-query attention (Sq = 1, G > 1): one forward task takes the G
  // query heads of a kv head as the rows of one tile, so K and V are read once per kv head
  // instead of G times. Only where no mask depends on the row (no attn_mask; causal only
  // when it hides nothing: lower-right aligned with Sq = 1); dropout's row index
  // ((b H + h) Sq + i) is then the packed row's.
  bool pack_heads = false;  // set by the forward (forward_impl), never by the backward
  // The first query and the number of rows of forward tile qt (with packed heads: 0 and G,
  // the rows being heads h .. h + G - 1).
  std::pair<int64_t, int64_t> tile_rows(int64_t qt) const {
    if (pack_heads) return {0, G};
    const int64_t q0 = qt * bq;
    return {q0, std::min(bq, Sq - q0)};
  }
  bool can_pack_heads() const {
    return Sq == 1 && G > 1 && p.mask_kind == MaskKind::kNone && (!p.is_causal || p.causal_offset >= Sk - 1);
  }

  Problem(const AttentionParams& params, int64_t block_q, int64_t block_k) : p(params) {
    B = p.batch;
    H = p.heads;
    Hkv = p.kv_heads;
    G = H / Hkv;
    Sq = p.q_len;
    Sk = p.kv_len;
    D = p.head_dim;
    bq = block_q;
    bk = block_k;
    n_q_tiles = (Sq + bq - 1) / bq;
    n_k_tiles = (Sk + bk - 1) / bk;
    kv_end.assign(static_cast<size_t>(B), Sk);
    pad_status.assign(static_cast<size_t>(B * n_k_tiles), kNoPadding);
    for (int64_t b = 0; b < B; ++b) {
      if (p.key_len != nullptr) kv_end[b] = std::min<int64_t>(Sk, std::max<int32_t>(0, p.key_len[b]));
      if (p.key_padding == nullptr) continue;
      const uint8_t* row = p.key_padding + b * Sk;
      for (int64_t t = 0; t < n_k_tiles; ++t) {
        const int64_t k0 = t * bk, k1 = std::min(Sk, k0 + bk);
        int64_t padded = 0;
        for (int64_t j = k0; j < k1; ++j) padded += row[j] != 0;
        pad_status[b * n_k_tiles + t] = padded == 0 ? kNoPadding : (padded == k1 - k0 ? kAllPadding : kSomePadding);
      }
    }
    dropout = p.dropout_p > 0.0f;
    if (dropout) {
      threshold = p.dropout_threshold;
      unpack_philox(p.philox, seed, counter_lo);
    }
  }

  // Keys [0, end) a query tile starting at q0 with mq rows may see.
  int64_t key_end(int64_t b, int64_t q0, int64_t mq) const {
    int64_t end = kv_end[b];
    if (p.is_causal) end = std::min(end, q0 + mq + p.causal_offset);
    return std::max<int64_t>(end, 0);
  }
  // Keys [0, limit) that some query of batch b may see.
  int64_t key_limit(int64_t b) const {
    return std::max<int64_t>(0, p.is_causal ? std::min<int64_t>(kv_end[b], Sq + p.causal_offset) : kv_end[b]);
  }
  // The first query that may see key j (the causal mask hides j from queries i < j - causal_offset).
  int64_t first_query(int64_t j) const { return p.is_causal ? std::max<int64_t>(0, j - p.causal_offset) : 0; }
  uint8_t status(int64_t b, int64_t kt) const { return pad_status[b * n_k_tiles + kt]; }
};

// Scores tile s (mq x nk, row stride lds) of batch b, head h, queries q0.., keys
// k0..: adds the additive mask (in T's softmax domain: times log2(e) for float,
// mask_term_log2), and sets hidden scores to -inf (bool mask, key padding, causal).
template <typename T>
void apply_masks(const Problem& pr, T* s, int64_t lds, int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t k0,
                 int64_t nk, uint8_t pad) {
  const AttentionParams& p = pr.p;
  const T ninf = neg_inf<T>();
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t cs = p.mask_col_stride;
    for (int64_t r = 0; r < mq; ++r) {
      T* srow = s + r * lds;
      const int64_t off = b * p.mask_batch_stride + h * p.mask_head_stride + (q0 + r) * p.mask_row_stride + k0 * cs;
      if (p.mask_kind == MaskKind::kAdditive) {
        const float* m = static_cast<const float*>(p.mask) + off;
        auto term = [](float x) {
          if constexpr (kLog2Domain<T>) {
            return mask_term_log2(x, static_cast<float>(kLog2e));
          } else {
            return static_cast<T>(x);
          }
        };
        for (int64_t j = 0; j < nk; ++j) srow[j] = masked_score(srow[j], term(m[j * cs]));
      } else {
        const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off;
        for (int64_t j = 0; j < nk; ++j) srow[j] = m[j * cs] ? srow[j] : ninf;
      }
    }
  }
  if (pad == kSomePadding) {
    const uint8_t* kp = p.key_padding + b * pr.Sk + k0;
    for (int64_t j = 0; j < nk; ++j) {
      if (kp[j]) {
        for (int64_t r = 0; r < mq; ++r) s[r * lds + j] = ninf;
      }
    }
  }
  if (p.is_causal && k0 + nk - 1 > q0 + p.causal_offset) {  // the tile crosses the diagonal
    for (int64_t r = 0; r < mq; ++r) {
      const int64_t first_hidden = std::max<int64_t>(q0 + r + 1 + p.causal_offset - k0, 0);
      T* srow = s + r * lds;
      for (int64_t j = first_hidden; j < nk; ++j) srow[j] = ninf;
    }
  }
}

// Whether some (query, key) pair of a tile may be hidden by a mask (a probability that is
// 0 by the mask, not by the scores): any tile of a causal or masked problem, a tile with
// some padding. (Conservative for causal: only the NaN check of gemm_tile depends on it.)
inline bool tile_hides_pairs(const Problem& pr, uint8_t pad) {
  return pad == kSomePadding || pr.p.mask_kind != MaskKind::kNone || pr.p.is_causal;
}

// Whether a (n x d, row stride ld) block holds a NaN. One vector add per element: the
// sum of finite values is finite unless it overflows, so only a non-finite sum (NaN, or
// an inf or an overflow) is followed by the exact scan.
template <typename T>
bool any_nan_rows(const T* x, int64_t ld, int64_t n, int64_t d) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc(T(0));
  T total = 0;
  for (int64_t r = 0; r < n; ++r) {
    const T* row = x + r * ld;
    int64_t j = 0;
    for (; j + L <= d; j += L) acc = acc + Vec<T>::loadu(row + j);
    for (; j < d; ++j) total += row[j];
  }
  alignas(64) T lanes[L];
  acc.store(lanes);
  for (int64_t l = 0; l < L; ++l) total += lanes[l];
  if (total - total == T(0)) return false;  // finite
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < d; ++j) {
      if (x[r * ld + j] != x[r * ld + j]) return true;
    }
  }
  return false;
}

// C (m x n, row stride ldc) += alpha op(A) B over the nonzero entries of A only: the
// product of a tile with hidden pairs (A = P or dS, exactly 0 there) when B holds a NaN,
// so that 0 · NaN does not carry the NaN of a hidden key (or query, or gradient row)
// into the rows that do not see it. op(A) = A (m x k, row stride lda) or Aᵀ (A: k x m).
template <typename T>
void gemm_skip_zero(bool trans_a, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T* c, int64_t ldc) {
  for (int64_t r = 0; r < m; ++r) {
    T* out = c + r * ldc;
    for (int64_t p = 0; p < k; ++p) {
      const T w = trans_a ? a[p * lda + r] : a[r * lda + p];
      if (w != T(0)) axpy_row(out, alpha * w, b + p * ldb, n);
    }
  }
}

// The product C += alpha op(A) B of a tile: gemm, or gemm_skip_zero when skip_zero (the
// tile hides pairs and B holds a NaN).
template <typename T>
void gemm_or_skip(bool skip_zero, bool trans_a, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T* c, int64_t ldc, std::vector<T>& pack) {
  if (skip_zero) {
    gemm_skip_zero(trans_a, m, n, k, alpha, a, lda, b, ldb, c, ldc);
  } else {
    gemm<T>(trans_a, false, m, n, k, alpha, a, lda, b, ldb, T(1), c, ldc, pack);
  }
}

// ... with the NaN check of B done here, only where the tile hides pairs.
template <typename T>
void gemm_tile(bool hides_pairs, bool trans_a, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T* c, int64_t ldc, std::vector<T>& pack) {
  gemm_or_skip(hides_pairs && any_nan_rows(b, ldb, k, n), trans_a, m, n, k, alpha, a, lda, b, ldb, c, ldc, pack);
}

// z (mq x nk, row stride ldz) = 1 / (1 - p) where the dropout stream keeps the
// element (first row `row0` in the global (b, h, i) row numbering, keys k0..), else 0.
template <typename T>
void dropout_tile(const Problem& pr, int64_t row0, int64_t mq, int64_t k0, int64_t nk, T* z, int64_t ldz) {
  const T keep_scale = T(1) / (T(1) - static_cast<T>(pr.p.dropout_p_f64));
  alignas(64) uint32_t bits[4][kPhiloxLanes];
  for (int64_t r = 0; r < mq; ++r) {
    T* zr = z + r * ldz;
    for (int64_t j0 = 0; j0 < nk; j0 += 4 * kPhiloxLanes) {
      philox_blocks_cpu(pr.seed, pr.counter_lo, attention_dropout_group(row0 + r, pr.Sk, k0 + j0), bits);
      const int64_t n = std::min<int64_t>(4 * kPhiloxLanes, nk - j0);
      for (int64_t j = 0; j < n; ++j) {
        zr[j0 + j] = attention_dropout_keep(bits[j & 3][j >> 2], pr.threshold) ? keep_scale : T(0);
      }
    }
  }
}

// Runs f(task, workspace) for every task in `order`, handed out dynamically to
// the at::parallel_for threads; each thread builds one Workspace. Small problems
// (`flops` in total) run on the calling thread: waking the pool costs more. A task
// pass takes one more thread per kTaskFlopsPerThread: a GQA decode step over 128
// keys (H32/Hkv8, D128, 2 MFLOP) runs 39 -> 28 µs on two threads instead of one
// (AVX-512 machine, benchmarks/results/cpu-attention-models-20261202.md, session 5);
// row passes (row_grain: a few flops per byte) keep the coarser kFlopsPerThread.
constexpr double kFlopsPerThread = 4e6;
constexpr double kTaskFlopsPerThread = 5e5;

template <typename Workspace, typename F>
void run_tasks(const std::vector<int64_t>& order, double flops, F&& f) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    Workspace ws;
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= n) break;
      f(order[t], ws);
    }
  };
  const int64_t by_size = static_cast<int64_t>(flops / kTaskFlopsPerThread) + 1;
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n, by_size});
  if (threads <= 1 || at::in_parallel_region()) {
    // Outside an OpenMP region MKL would spread each tile product over its own threads: for
    // the small calls that run serially (decoding, short sequences) that fork/join per
    // product costs more than the product (perf: MKL's omp driver and libgomp's spin wait
    // took a third of a 1x32x1x16 GQA decode step).
    const int prev = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    worker(0, 1);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
  } else {
    at::parallel_for(0, threads, 1, worker);
  }
}

// Grain (rows) for a parallel pass over rows of `row_cost` flops each.
inline int64_t row_grain(int64_t row_cost) {
  return std::max<int64_t>(1, static_cast<int64_t>(kFlopsPerThread) / std::max<int64_t>(1, row_cost));
}

// Task order: most expensive first (longest-processing-time scheduling), ties by index.
inline std::vector<int64_t> by_cost(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// ---------------------------------------------------------------- forward

template <typename acc_t>
struct FwdWorkspace {
  std::vector<acc_t> q, qp, k, v, s, z, acc, lse, pack;
  std::vector<uint32_t> qp2;  // the AVX512-BF16 products: Q as pair blocks
  std::vector<uint16_t> p16;  // and P rounded to bf16
  std::vector<SoftmaxRow<acc_t>> rows;
};

// K and V of every (batch, kv head) as panel_gemm's B operands, in acc_t: K as key
// panels (NR keys each, D rows of NR, keys past Sk zero) for S = Q Kᵀ, V as column
// panels (v_panel_width columns each, Sk rows, columns past D zero) for O += P V.
// Their storage is scratch memory kept for the next call (cpu_scratch.h).
// With the AVX512-BF16 products (bfloat16 inputs), k2 and v2 hold the pair panels instead.
template <typename acc_t>
struct KvPanels {
  ScratchBuffer storage;
  acc_t* k = nullptr;
  acc_t* v = nullptr;
  int64_t k_head = 0, v_head = 0;  // elements per (batch, kv head)
  uint32_t* k2 = nullptr;
  uint32_t* v2 = nullptr;
  int64_t k2_head = 0, v2_head = 0;  // pairs per (batch, kv head)
};

// Whether the forward and backward of these inputs run the AVX512-BF16 products (with panels).
template <typename scalar_t>
inline bool use_bf16_dot() {
  return kBf16Dot<scalar_t> && cpu_has_avx512_bf16() && attention_cpu_bf16_dot();
}

// Whether the forward runs its tile products on panels: float accumulation, and enough
// query rows per kv head to pay for packing its K and V once; below that the BLAS, which
// packs per product (benchmarks/results/cpu-attention-models-20261202.md). With AVX-512
// (Zen 5), 16 rows: since the panels live in scratch memory kept across calls (no page
// faults per call), they beat MKL at every row count from 16 on (B8 H12 S32-128 D64:
// 1.1-1.5x; BERT S128 f32 3.3 -> 2.8 ms); below 16 rows the BLAS (or gemm_few_rows). With
// AVX2, 256 (measured before the scratch memory, on the AVX2 machines: BERT's 128 and
// ViT's 197 rows tied with MKL). Decoding's packed heads never pack.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kPanelMinRowsPerKvHead = 16;
#else
constexpr int64_t kPanelMinRowsPerKvHead = 256;
#endif
inline bool use_kv_panels(const Problem& pr, bool float_acc) {
  return float_acc && attention_cpu_panels() && !pr.pack_heads && pr.Sq * pr.G >= kPanelMinRowsPerKvHead;
}

template <typename scalar_t, typename acc_t>
void pack_kv_panels(const Problem& pr, KvPanels<acc_t>& kv) {
  const AttentionParams& p = pr.p;
  constexpr int64_t NR = panel_nr<acc_t>(), kChunk = 256;
  const int64_t D = pr.D, Sk = pr.Sk, Skp = (Sk + NR - 1) / NR * NR;
  kv.k_head = Skp * D;
  kv.v_head = Sk * v_packed_cols<acc_t>(D);
  const int64_t heads = pr.B * pr.Hkv, chunks = (Sk + kChunk - 1) / kChunk;
  if constexpr (kBf16Dot<scalar_t>) {
    if (use_bf16_dot<scalar_t>()) {  // pair panels straight from the bf16 input
      const int64_t Dp = (D + 1) / 2, Sk_pairs = (Sk + 1) / 2;
      kv.k2_head = Skp * Dp;
      kv.v2_head = Sk_pairs * v_packed_cols<float>(D);
      const int64_t k2_elems = (heads * kv.k2_head + 15) / 16 * 16;
      kv.storage.reset(sizeof(uint32_t) * static_cast<size_t>(k2_elems + heads * kv.v2_head));
      kv.k2 = static_cast<uint32_t*>(kv.storage.data());
      kv.v2 = kv.k2 + k2_elems;
      at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t bh = t / chunks, b = bh / pr.Hkv, hk = bh % pr.Hkv, j0 = (t % chunks) * kChunk;
          const int64_t n = std::min(kChunk, Sk - j0);
          const auto* K = static_cast<const c10::BFloat16*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                          j0 * p.k_row_stride;
          const auto* V = static_cast<const c10::BFloat16*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                          j0 * p.v_row_stride;
          pack_pair_groups<NR>(K, p.k_row_stride, n, D, kv.k2 + bh * kv.k2_head + j0 * Dp);
          pack_v_pair_panels(V, p.v_row_stride, n, D, kv.v2 + bh * kv.v2_head, Sk_pairs, j0);
        }
      });
      return;
    }
  }
  const int64_t k_elems = (heads * kv.k_head + 15) / 16 * 16;  // V's panels start 64-byte aligned
  kv.storage.reset(sizeof(acc_t) * static_cast<size_t>(k_elems + heads * kv.v_head));
  kv.k = static_cast<acc_t*>(kv.storage.data());
  kv.v = kv.k + k_elems;
  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(static_cast<size_t>(kChunk * D));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / chunks, b = bh / pr.Hkv, hk = bh % pr.Hkv, j0 = (t % chunks) * kChunk;
      const int64_t n = std::min(kChunk, Sk - j0);  // keys of the chunk (the last key panel is zero-padded)
      const auto* K = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                      j0 * p.k_row_stride;
      const auto* V = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                      j0 * p.v_row_stride;
      int64_t ld = 0;
      const acc_t* k_rows = load_rows(K, p.k_row_stride, n, D, buf.data(), ld);
      pack_key_panels(k_rows, ld, n, D, kv.k + bh * kv.k_head + j0 * D);
      const acc_t* v_rows = load_rows(V, p.v_row_stride, n, D, buf.data(), ld);
      pack_col_panels(v_rows, ld, n, D, kv.v + bh * kv.v_head, Sk, j0);
    }
  });
}

// One query tile: online softmax over its visible key tiles. With out == nullptr
// only the log-sum-exp is computed (float64 backward), into lse_out.
template <typename scalar_t, typename acc_t>
void forward_tile(const Problem& pr, int64_t b, int64_t h, int64_t qt, FwdWorkspace<acc_t>& ws, scalar_t* out,
                  acc_t* lse_out, const KvPanels<acc_t>* kv = nullptr) {
  const AttentionParams& p = pr.p;
  const int64_t D = pr.D, bk = pr.bk;
  // Packed heads (decoding, Problem::pack_heads): the tile's rows are the one query of
  // heads h .. h + G - 1, which share one kv head: q rows a head stride apart.
  const auto [q0, mq] = pr.tile_rows(qt);
  const int64_t q_rs = pr.pack_heads ? p.q_head_stride : p.q_row_stride;
  const int64_t hk = h / pr.G;
  const int64_t end = pr.key_end(b, q0, mq);
  const bool with_out = out != nullptr;
  // Whole MR-row blocks: the panel products read every row of a block of P (rows past mq unused).
  ws.s.resize(static_cast<size_t>((mq + kPanelMR - 1) / kPanelMR * kPanelMR * bk));
  if (pr.dropout && with_out) ws.z.resize(static_cast<size_t>(mq * bk));
  if (!std::is_same_v<scalar_t, acc_t>) {
    ws.q.resize(static_cast<size_t>(mq * D));
    ws.k.resize(static_cast<size_t>(bk * D));
    ws.v.resize(static_cast<size_t>(bk * D));
  }
  const auto* qsrc = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                     q0 * p.q_row_stride;
  // AVX512-BF16 products (bf16 inputs, pair panels): Q as pair blocks, no widened copy
  const bool dot16 = kv != nullptr && kv->k2 != nullptr;
  int64_t ldq = 0;
  const acc_t* qt_ptr = dot16 ? nullptr : load_rows(qsrc, q_rs, mq, D, ws.q.data(), ldq);
  const acc_t scale = static_cast<acc_t>(p.scale_f64 * domain_factor<acc_t>());  // in acc_t's softmax domain
  acc_t* s = ws.s.data();
  const int64_t row0 = (b * pr.H + h) * pr.Sq + q0;
  constexpr int64_t MR = kPanelMR;
  const acc_t* kpan = nullptr;
  const acc_t* vpan = nullptr;
  const uint32_t* kpan2 = nullptr;
  const uint32_t* vpan2 = nullptr;
  const int64_t Dp = (D + 1) / 2;  // pairs of head-dim entries (dot16)
  if (dot16) {
    if constexpr (kBf16Dot<scalar_t>) {
      kpan2 = kv->k2 + (b * pr.Hkv + hk) * kv->k2_head;
      vpan2 = kv->v2 + (b * pr.Hkv + hk) * kv->v2_head;
      ws.qp2.resize(static_cast<size_t>((mq + MR - 1) / MR * MR * Dp));
      pack_pair_groups<MR>(qsrc, q_rs, mq, D, ws.qp2.data());
      ws.p16.resize(ws.s.size());
    }
  } else if (kv != nullptr) {  // the Q tile as MR-row blocks
    kpan = kv->k + (b * pr.Hkv + hk) * kv->k_head;
    vpan = kv->v + (b * pr.Hkv + hk) * kv->v_head;
    ws.qp.resize(static_cast<size_t>((mq + MR - 1) / MR * MR * D));
    pack_row_blocks(qt_ptr, ldq, mq, D, ws.qp.data());
  }

  // careful: the P V products of tiles with hidden pairs skip the zero weights where V holds
  // a NaN (gemm_tile). Only a sweep whose output holds a NaN is redone carefully, so the
  // usual sweep pays no NaN check per tile.
  auto sweep = [&](bool careful) {
  ws.rows.assign(static_cast<size_t>(mq), SoftmaxRow<acc_t>{neg_inf<acc_t>(), acc_t(0)});
  if (with_out) ws.acc.assign(static_cast<size_t>(mq * D), acc_t(0));
  for (int64_t kt = 0; kt * bk < end; ++kt) {
    const uint8_t pad = p.key_padding != nullptr ? pr.status(b, kt) : kNoPadding;
    if (pad == kAllPadding) continue;
    const int64_t k0 = kt * bk, nk = std::min(bk, end - k0);
    if (dot16) {
      if constexpr (kBf16Dot<scalar_t>) bf16_gemm_keys(mq, nk, Dp, scale, ws.qp2.data(), kpan2 + k0 * Dp, s, bk);
    } else if (kpan != nullptr) {  // key panels start at multiples of NR (k0 is a multiple of bk, of 64)
      panel_gemm_keys(mq, nk, D, scale, ws.qp.data(), kpan + k0 * D, s, bk);
    } else {
      const auto* ksrc = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                         k0 * p.k_row_stride;
      int64_t ldk = 0;
      const acc_t* kptr = load_rows(ksrc, p.k_row_stride, nk, D, ws.k.data(), ldk);
      gemm<acc_t>(false, true, mq, nk, D, scale, qt_ptr, ldq, kptr, ldk, acc_t(0), s, bk, ws.pack);
    }
    apply_masks(pr, s, bk, b, h, q0, mq, k0, nk, pad);
    bool any_visible = false;
    for (int64_t r = 0; r < mq; ++r) {
      acc_t* srow = s + r * bk;
      SoftmaxRow<acc_t>& st = ws.rows[r];
      const auto step = online_softmax_step(st.max, st.sum, softmax_new_max(st.max, row_max(srow, nk)), ScalarExpDomain{});
      if (st.max == neg_inf<acc_t>()) {  // nothing visible in this row yet
        std::fill(srow, srow + nk, acc_t(0));
        continue;
      }
      any_visible = true;
      if (with_out && step.factor != acc_t(1)) scale_row(ws.acc.data() + r * D, D, step.factor);
      st.sum += exp_sub_sum(srow, nk, step.ref);
    }
    if (!with_out || !any_visible) continue;
    if (pr.dropout) {
      dropout_tile(pr, row0, mq, k0, nk, ws.z.data(), bk);
      for (int64_t r = 0; r < mq; ++r) mul_rows(s + r * bk, ws.z.data() + r * bk, nk);
    }
    // out += P V (careful: a NaN value of a hidden key stays out of the rows that do not see it)
    const bool careful_tile = careful && tile_hides_pairs(pr, pad);
    if (dot16 && !careful_tile) {  // P rounded to bf16 rows (k0 is even: pair t0 = k0 / 2)
      if constexpr (kBf16Dot<scalar_t>) {
        round_rows_bf16(s, bk, mq, nk, ws.p16.data(), bk);
        bf16_gemm_cols(mq, D, nk, 1.0f, reinterpret_cast<const uint32_t*>(ws.p16.data()), bk / 2, 1, vpan2,
                       (pr.Sk + 1) / 2, k0 / 2, ws.acc.data(), D);
      }
      continue;
    }
    if (vpan != nullptr && !careful_tile) {
      panel_gemm_cols(mq, D, nk, acc_t(1), s, MR * bk, bk, 1, vpan, pr.Sk, k0, ws.acc.data(), D);
      continue;
    }
    const auto* vsrc = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                       k0 * p.v_row_stride;
    int64_t ldv = 0;
    const acc_t* vptr = load_rows(vsrc, p.v_row_stride, nk, D, ws.v.data(), ldv);
    gemm_tile<acc_t>(careful_tile, false, mq, D, nk, acc_t(1), s, bk, vptr, ldv, ws.acc.data(), D, ws.pack);
  }
  };
  sweep(false);
  const bool hides_any = p.key_padding != nullptr || p.mask_kind != MaskKind::kNone || p.is_causal;
  if (with_out && hides_any && any_nan_rows(ws.acc.data(), D, mq, D)) sweep(true);

  for (int64_t r = 0; r < mq; ++r) {
    const SoftmaxRow<acc_t>& st = ws.rows[r];
    lse_out[r] = softmax_lse(st.max, st.sum, static_cast<acc_t>(1.0 / domain_factor<acc_t>()));
    if (with_out) {
      acc_t* a = ws.acc.data() + r * D;
      scale_row(a, D, softmax_out_scale(st));
      store_narrow(a, out + r * D, static_cast<int>(D));
    }
  }
}

template <typename scalar_t>
void forward_impl(const AttentionParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  const auto [block_q, block_k] = fwd_blocks(p);
  Problem pr(p, block_q, block_k);
  pr.pack_heads = pr.can_pack_heads();
  // Tasks: (batch, head, query tile), or (batch, kv head) with packed heads.
  const int64_t heads = pr.pack_heads ? pr.Hkv : pr.H, tiles = pr.pack_heads ? 1 : pr.n_q_tiles;
  const int64_t rows = pr.pack_heads ? pr.G : pr.bq;
  std::vector<int64_t> cost(static_cast<size_t>(pr.B * heads * tiles));
  for (int64_t t = 0; t < static_cast<int64_t>(cost.size()); ++t) {
    const auto [q0, mq] = pr.tile_rows(t % tiles);
    cost[t] = 1 + pr.key_end(t / (heads * tiles), q0, mq);
  }
  auto* out = static_cast<scalar_t*>(p.out);
  double flops = 0;
  for (const int64_t c : cost) flops += 4.0 * static_cast<double>(c) * static_cast<double>(rows * pr.D);
  KvPanels<acc_t> kv;
  const bool panels = use_kv_panels(pr, std::is_same_v<acc_t, float>);
  if (panels) pack_kv_panels<scalar_t>(pr, kv);
  run_tasks<FwdWorkspace<acc_t>>(by_cost(cost), flops, [&](int64_t t, FwdWorkspace<acc_t>& ws) {
    const int64_t qt = t % tiles, b = t / tiles / heads, hh = t / tiles % heads;
    const int64_t h = pr.pack_heads ? hh * pr.G : hh, bh = b * pr.H + h;
    const auto [q0, mq] = pr.tile_rows(qt);
    ws.lse.resize(static_cast<size_t>(mq));
    forward_tile<scalar_t, acc_t>(pr, b, h, qt, ws, out + (bh * pr.Sq + q0) * pr.D, ws.lse.data(),
                                  panels ? &kv : nullptr);
    // packed: row r is head h + r (Sq = 1), so lse and out rows are consecutive either way
    for (int64_t r = 0; r < mq; ++r) p.lse[bh * pr.Sq + q0 + r] = static_cast<float>(ws.lse[r]);
  });
}

// ---------------------------------------------------------------- backward

template <typename acc_t>
struct BwdWorkspace {
  std::vector<acc_t> q, k, v, dout, s, dp, z, dk, dv, pack;
  // panel operands (use_bwd_panels): K and V of the key tile as key panels, K as column
  // panels; Q and dout of the query tile as MR-row blocks and as column panels
  std::vector<acc_t> k_keys, v_keys, k_cols, q_blocks, g_blocks, q_cols, g_cols;
  std::vector<int8_t> nan_q, nan_dout;  // per (query head of the group, query tile): -1 unknown, 0, 1
  // the AVX512-BF16 products (bf16_bwd): K and V as key pair panels, K as column panels of key
  // pairs; Q and dout as pair blocks and as column panels of query pairs; Pᵀ / dSᵀ as
  // transposed pairs; dS as bf16 rows
  std::vector<uint32_t> k_keys2, v_keys2, k_cols2, q_blocks2, g_blocks2, q_cols2, g_cols2, t2;
  std::vector<uint16_t> ds16;
};

// Whether the backward runs its five tile products on panels (float accumulation, the
// panel switch on); else the BLAS.
inline bool use_bwd_panels(bool float_acc) { return float_acc && attention_cpu_panels(); }

template <typename scalar_t>
void backward_impl(const AttentionBackwardParams& bp) {
  using acc_t = acc_type_t<scalar_t>;
  const AttentionParams& p = bp.fwd;
  const Problem pr(p, config().bwd_block_q, config().bwd_block_k);
  const int64_t B = pr.B, H = pr.H, Hkv = pr.Hkv, G = pr.G, Sq = pr.Sq, Sk = pr.Sk, D = pr.D, bq = pr.bq,
                bk = pr.bk;
  const auto* dout_base = static_cast<const scalar_t*>(bp.dout);
  const auto* out_base = static_cast<const scalar_t*>(p.out);
  const acc_t scale = static_cast<acc_t>(p.scale_f64);
  const acc_t scale_domain = static_cast<acc_t>(p.scale_f64 * domain_factor<acc_t>());

  // Row statistics: delta = rowsum(dout * out) and the lse, in acc_t. float32
  // math keeps them in the float32 buffers of the params; float64 keeps its own
  // float64 copies (the lse is recomputed, the saved one is only float32).
  constexpr bool exact = std::is_same_v<acc_t, double>;
  std::vector<acc_t> lse64, delta64;
  acc_t* lse_acc = nullptr;
  acc_t* delta_acc = nullptr;
  if constexpr (exact) {
    lse64.resize(static_cast<size_t>(B * H * Sq));
    delta64.resize(static_cast<size_t>(B * H * Sq));
    lse_acc = lse64.data();
    delta_acc = delta64.data();
  } else {
    lse_acc = p.lse;
    delta_acc = bp.delta;
  }
  at::parallel_for(0, B * H, row_grain(2 * Sq * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(static_cast<size_t>(D)), y(static_cast<size_t>(D));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t i = 0; i < Sq; ++i) {
        const scalar_t* g = dout_base + b * bp.dout_batch_stride + h * bp.dout_head_stride + i * bp.dout_row_stride;
        const scalar_t* o = out_base + (bh * Sq + i) * D;
        load_widen(g, x.data(), static_cast<int>(D));
        load_widen(o, y.data(), static_cast<int>(D));
        delta_acc[bh * Sq + i] = dot(x.data(), y.data(), D);
      }
    }
  });
  if constexpr (exact) {
    const std::vector<int64_t> order = by_cost(std::vector<int64_t>(static_cast<size_t>(B * H * pr.n_q_tiles), 1));
    const double flops = 2.0 * static_cast<double>(B * H) * Sq * Sk * D;
    run_tasks<FwdWorkspace<acc_t>>(order, flops, [&](int64_t t, FwdWorkspace<acc_t>& ws) {
      const int64_t qt = t % pr.n_q_tiles, bh = t / pr.n_q_tiles;
      forward_tile<scalar_t, acc_t>(pr, bh / H, bh % H, qt, ws, nullptr, lse_acc + bh * Sq + qt * bq);
    });
  }

  // Key-tile ranges per (b, kv head): enough tasks to keep every thread busy.
  // (The chunking, hence dq's summation order, depends on the thread count: results
  // are bit-identical run to run for a given number of threads.)
  const int64_t threads = at::get_num_threads();
  const int64_t pairs = std::max<int64_t>(1, B * Hkv);
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(pr.n_k_tiles, (2 * threads + pairs - 1) / pairs));
  const int64_t tiles_per_chunk = std::max<int64_t>(1, (pr.n_k_tiles + n_chunks - 1) / n_chunks);

  // dq accumulates in acc_t: in dq itself for float32/float64 with one chunk,
  // else in per-chunk buffers summed in chunk order afterwards (deterministic).
  auto* dq = static_cast<scalar_t*>(bp.dq);
  auto* dk = static_cast<scalar_t*>(bp.dk);
  auto* dv = static_cast<scalar_t*>(bp.dv);
  const bool direct_dq = std::is_same_v<scalar_t, acc_t> && n_chunks == 1;
  const int64_t dq_numel = B * H * Sq * D;
  ScratchBuffer dq_scratch;  // kept for the next call (cpu_scratch.h)
  acc_t* dq_ws = nullptr;
  if (!direct_dq) {
    dq_scratch.reset(sizeof(acc_t) * static_cast<size_t>(n_chunks * dq_numel));
    dq_ws = static_cast<acc_t*>(dq_scratch.data());
    std::fill(dq_ws, dq_ws + n_chunks * dq_numel, acc_t(0));
  }

  std::vector<int64_t> cost(static_cast<size_t>(B * Hkv * n_chunks));
  for (int64_t t = 0; t < static_cast<int64_t>(cost.size()); ++t) {
    const int64_t c = t % n_chunks, b = t / (Hkv * n_chunks);
    int64_t work = 1;
    for (int64_t kt = c * tiles_per_chunk; kt < std::min(pr.n_k_tiles, (c + 1) * tiles_per_chunk); ++kt) {
      if (kt * bk >= pr.key_limit(b)) break;
      work += std::max<int64_t>(0, Sq - pr.first_query(kt * bk));
    }
    cost[t] = work;
  }

  double flops = 0;
  for (const int64_t c : cost) flops += 10.0 * static_cast<double>(c) * static_cast<double>(bk * D * G);
  run_tasks<BwdWorkspace<acc_t>>(by_cost(cost), flops, [&](int64_t t, BwdWorkspace<acc_t>& ws) {
    const int64_t c = t % n_chunks, bk_head = t / n_chunks;
    const int64_t b = bk_head / Hkv, hk = bk_head % Hkv;
    const int64_t kt_begin = c * tiles_per_chunk, kt_end = std::min(pr.n_k_tiles, (c + 1) * tiles_per_chunk);
    acc_t* dq_acc = direct_dq ? reinterpret_cast<acc_t*>(dq) : dq_ws + c * dq_numel;
    if (direct_dq) {  // this task owns dq of heads hk * G .. hk * G + G - 1 of batch b
      std::fill(dq_acc + (b * H + hk * G) * Sq * D, dq_acc + (b * H + hk * G + G) * Sq * D, acc_t(0));
    }
    // Whole MR-row blocks of s / dp / z, and a vector past the end: the panel products read
    // every row of a block (of queries, or of keys for Pᵀ and dSᵀ) without storing the extra ones.
    const bool panels = use_bwd_panels(std::is_same_v<acc_t, float>);
    const int64_t tile_elems = (bq + kPanelMR - 1) / kPanelMR * kPanelMR * bk + kPanelMR;
    const int64_t dpad = v_packed_cols<acc_t>(D), kpad = (bk + panel_nr<acc_t>() - 1) / panel_nr<acc_t>() *
                                                         panel_nr<acc_t>();
    // bfloat16 with AVX512-BF16: the five products on bf16 pairs (float32 sums; P and dS rounded to
    // bf16), as the forward's; the careful products (a NaN in a hidden row) keep the float path.
    const bool dot16 = panels && use_bf16_dot<scalar_t>();
    const int64_t Dp = (D + 1) / 2;
    if (dot16) {
      const int64_t qpad = (bq + kPanelMR - 1) / kPanelMR * kPanelMR;
      ws.k_keys2.resize(static_cast<size_t>(kpad * Dp));
      ws.v_keys2.resize(static_cast<size_t>(kpad * Dp));
      ws.k_cols2.resize(static_cast<size_t>((bk + 1) / 2 * dpad));
      ws.q_blocks2.resize(static_cast<size_t>(qpad * Dp));
      ws.g_blocks2.resize(ws.q_blocks2.size());
      ws.q_cols2.resize(static_cast<size_t>((bq + 1) / 2 * dpad));
      ws.g_cols2.resize(ws.q_cols2.size());
      ws.t2.resize(static_cast<size_t>((bq + 1) / 2 * (kpad + kPanelMR)));
      ws.ds16.resize(static_cast<size_t>(qpad * bk));
    }
    if (panels) {
      ws.k_keys.resize(static_cast<size_t>(kpad * D));
      ws.v_keys.resize(static_cast<size_t>(kpad * D));
      ws.k_cols.resize(static_cast<size_t>(bk * dpad));
      ws.q_blocks.resize(static_cast<size_t>((bq + kPanelMR - 1) / kPanelMR * kPanelMR * D));
      ws.g_blocks.resize(ws.q_blocks.size());
      ws.q_cols.resize(static_cast<size_t>(bq * dpad));
      ws.g_cols.resize(static_cast<size_t>(bq * dpad));
    }
    ws.s.resize(static_cast<size_t>(tile_elems));
    ws.nan_q.assign(static_cast<size_t>(G * pr.n_q_tiles), int8_t(-1));  // the flags of this task's query tiles
    ws.nan_dout.assign(static_cast<size_t>(G * pr.n_q_tiles), int8_t(-1));
    ws.dp.resize(static_cast<size_t>(tile_elems));
    ws.dk.resize(static_cast<size_t>(bk * D));
    ws.dv.resize(static_cast<size_t>(bk * D));
    if (pr.dropout) ws.z.resize(static_cast<size_t>(tile_elems));
    if (!std::is_same_v<scalar_t, acc_t>) {
      ws.q.resize(static_cast<size_t>(bq * D));
      ws.dout.resize(static_cast<size_t>(bq * D));
      ws.k.resize(static_cast<size_t>(bk * D));
      ws.v.resize(static_cast<size_t>(bk * D));
    }
    acc_t* s = ws.s.data();
    acc_t* dpb = ws.dp.data();

    for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
      const int64_t k0 = kt * bk;
      const int64_t k_rows = std::min(bk, Sk - k0);  // rows of dk/dv this tile owns
      scalar_t* dk_out = dk + ((b * Hkv + hk) * Sk + k0) * D;
      scalar_t* dv_out = dv + ((b * Hkv + hk) * Sk + k0) * D;
      const uint8_t pad = p.key_padding != nullptr ? pr.status(b, kt) : kNoPadding;
      const int64_t nk = std::min(k_rows, pr.key_limit(b) - k0);  // keys that may be visible
      if (nk <= 0 || pad == kAllPadding) {
        std::fill(dk_out, dk_out + k_rows * D, scalar_t(0));
        std::fill(dv_out, dv_out + k_rows * D, scalar_t(0));
        continue;
      }
      const auto* ksrc = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                         k0 * p.k_row_stride;
      const auto* vsrc = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                         k0 * p.v_row_stride;
      // NaN checks of the products' B operands, only in tiles that hide pairs: K once per key
      // tile, q and dout once per query tile of the task (cached).
      const bool hides = tile_hides_pairs(pr, pad);
      // The widened rows: the float products' operands; with dot16 only the NaN checks and the
      // careful products (tiles that hide pairs) read them, and nothing reads V's.
      const bool widen = !dot16 || hides;
      int64_t ldk = 0, ldv = 0;
      const acc_t* kptr = widen ? load_rows(ksrc, p.k_row_stride, nk, D, ws.k.data(), ldk) : nullptr;
      const acc_t* vptr = !dot16 ? load_rows(vsrc, p.v_row_stride, nk, D, ws.v.data(), ldv) : nullptr;
      std::fill(ws.dk.begin(), ws.dk.end(), acc_t(0));
      std::fill(ws.dv.begin(), ws.dv.end(), acc_t(0));
      // Queries before first_query(k0) see none of these keys under the causal mask.
      const int64_t q_first = pr.first_query(k0);
      const int64_t qt_first = q_first >= Sq ? pr.n_q_tiles : q_first / bq;
      const bool nan_k = hides && any_nan_rows(kptr, ldk, nk, D);
      if (dot16) {
        if constexpr (kBf16Dot<scalar_t>) {
          pack_pair_groups<panel_nr<float>()>(ksrc, p.k_row_stride, nk, D, ws.k_keys2.data());
          pack_pair_groups<panel_nr<float>()>(vsrc, p.v_row_stride, nk, D, ws.v_keys2.data());
          pack_v_pair_panels(ksrc, p.k_row_stride, nk, D, ws.k_cols2.data(), (nk + 1) / 2, 0);
        }
      } else if (panels) {
        pack_key_panels(kptr, ldk, nk, D, ws.k_keys.data());
        pack_key_panels(vptr, ldv, nk, D, ws.v_keys.data());
        pack_col_panels(kptr, ldk, nk, D, ws.k_cols.data());
      }

      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = hk * G + hh, bh = b * H + h;
        for (int64_t qt = qt_first; qt < pr.n_q_tiles; ++qt) {
          const int64_t q0 = qt * bq, mq = std::min(bq, Sq - q0);
          const auto* qsrc = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                             q0 * p.q_row_stride;
          const scalar_t* gsrc = dout_base + b * bp.dout_batch_stride + h * bp.dout_head_stride +
                                 q0 * bp.dout_row_stride;
          int64_t ldq = 0, ldg = 0;
          const acc_t* qptr = widen ? load_rows(qsrc, p.q_row_stride, mq, D, ws.q.data(), ldq) : nullptr;
          const acc_t* gptr = widen ? load_rows(gsrc, bp.dout_row_stride, mq, D, ws.dout.data(), ldg) : nullptr;
          const acc_t* lse = lse_acc + bh * Sq + q0;
          const acc_t* delta = delta_acc + bh * Sq + q0;
          bool nan_q = false, nan_g = false;
          if (hides) {
            int8_t& fq = ws.nan_q[hh * pr.n_q_tiles + qt];
            int8_t& fg = ws.nan_dout[hh * pr.n_q_tiles + qt];
            if (fq < 0) fq = any_nan_rows(qptr, ldq, mq, D) ? 1 : 0;
            if (fg < 0) fg = any_nan_rows(gptr, ldg, mq, D) ? 1 : 0;
            nan_q = fq == 1;
            nan_g = fg == 1;
          }

          const int64_t mqp = (mq + 1) / 2;  // query pairs
          [[maybe_unused]] const int64_t ldt = (nk + kPanelMR - 1) / kPanelMR * kPanelMR;  // transposed pairs: whole MR-key blocks
          if (dot16) {
            if constexpr (kBf16Dot<scalar_t>) {
              pack_pair_groups<kPanelMR>(qsrc, p.q_row_stride, mq, D, ws.q_blocks2.data());
              pack_pair_groups<kPanelMR>(gsrc, bp.dout_row_stride, mq, D, ws.g_blocks2.data());
              pack_v_pair_panels(qsrc, p.q_row_stride, mq, D, ws.q_cols2.data(), mqp, 0);
              pack_v_pair_panels(gsrc, bp.dout_row_stride, mq, D, ws.g_cols2.data(), mqp, 0);
            }
          } else if (panels) {
            pack_row_blocks(qptr, ldq, mq, D, ws.q_blocks.data());
            pack_row_blocks(gptr, ldg, mq, D, ws.g_blocks.data());
            pack_col_panels(qptr, ldq, mq, D, ws.q_cols.data());
            pack_col_panels(gptr, ldg, mq, D, ws.g_cols.data());
          }
          // C (nk x D) += alpha Aᵀ x, A (mq x nk) one of this tile's buffers, x the query tile's q or dout
          // (its column panels / rows); careful: over A's nonzero entries only.
          auto product_t = [&](bool careful, acc_t alpha, const acc_t* a, const acc_t* cols, const acc_t* x,
                               int64_t ldx, acc_t* c, const uint32_t* cols2) {
            if constexpr (kBf16Dot<scalar_t>) {
              if (dot16 && !careful) {  // Aᵀ as transposed bf16 pairs of query rows
                round_pairs_transposed(a, bk, mq, nk, ws.t2.data(), ldt);
                bf16_gemm_cols(nk, D, mq, alpha, ws.t2.data(), 1, ldt, cols2, mqp, 0, c, D);
                return;
              }
            }
            if (panels && !careful) {
              panel_gemm_cols(nk, D, mq, alpha, a, kPanelMR, 1, bk, cols, mq, 0, c, D);
            } else {
              gemm_or_skip<acc_t>(careful, true, nk, D, mq, alpha, a, bk, x, ldx, c, D, ws.pack);
            }
          };
          // P = exp(scale q kᵀ + mask - lse), in acc_t's softmax domain
          if (dot16) {
            if constexpr (kBf16Dot<scalar_t>) {
              bf16_gemm_keys(mq, nk, Dp, scale_domain, ws.q_blocks2.data(), ws.k_keys2.data(), s, bk);
            }
          } else if (panels) {
            panel_gemm_keys(mq, nk, D, scale_domain, ws.q_blocks.data(), ws.k_keys.data(), s, bk);
          } else {
            gemm<acc_t>(false, true, mq, nk, D, scale_domain, qptr, ldq, kptr, ldk, acc_t(0), s, bk, ws.pack);
          }
          apply_masks(pr, s, bk, b, h, q0, mq, k0, nk, pad);
          for (int64_t r = 0; r < mq; ++r) exp_sub(s + r * bk, nk, lse[r] * static_cast<acc_t>(domain_factor<acc_t>()));
          // dP = dout vᵀ
          if (dot16) {
            if constexpr (kBf16Dot<scalar_t>) bf16_gemm_keys(mq, nk, Dp, 1.0f, ws.g_blocks2.data(), ws.v_keys2.data(), dpb, bk);
          } else if (panels) {
            panel_gemm_keys(mq, nk, D, acc_t(1), ws.g_blocks.data(), ws.v_keys.data(), dpb, bk);
          } else {
            gemm<acc_t>(false, true, mq, nk, D, acc_t(1), gptr, ldg, vptr, ldv, acc_t(0), dpb, bk, ws.pack);
          }
          if (pr.dropout) {
            acc_t* z = ws.z.data();
            dropout_tile(pr, bh * Sq + q0, mq, k0, nk, z, bk);
            for (int64_t r = 0; r < mq; ++r) {
              mul_rows(dpb + r * bk, z + r * bk, nk);  // d(dropped P) -> dP
              mul_rows(z + r * bk, s + r * bk, nk);    // z <- dropped P
            }
            // dv += dropped Pᵀ dout
            product_t(nan_g, acc_t(1), z, ws.g_cols.data(), gptr, ldg, ws.dv.data(), ws.g_cols2.data());
          } else {
            product_t(nan_g, acc_t(1), s, ws.g_cols.data(), gptr, ldg, ws.dv.data(), ws.g_cols2.data());
          }
          // dS = softmax_grad(P, dP, delta), in place of dP
          for (int64_t r = 0; r < mq; ++r) {
            const Vec<acc_t> vd(delta[r]);
            at::vec::map2<acc_t>([vd](Vec<acc_t> pv, Vec<acc_t> dpv) { return softmax_grad(pv, dpv, vd); },
                                 dpb + r * bk, s + r * bk, dpb + r * bk, nk);
          }
          // dk += scale dSᵀ q; dq += scale dS k (NaN of hidden queries / keys kept out)
          product_t(nan_q, scale, dpb, ws.q_cols.data(), qptr, ldq, ws.dk.data(), ws.q_cols2.data());
          if (dot16 && !nan_k) {  // dS rounded to bf16 rows, read in place as key pairs
            if constexpr (kBf16Dot<scalar_t>) {
              round_rows_bf16(dpb, bk, mq, nk, ws.ds16.data(), bk);
              bf16_gemm_cols(mq, D, nk, scale, reinterpret_cast<const uint32_t*>(ws.ds16.data()), bk / 2, 1,
                             ws.k_cols2.data(), (nk + 1) / 2, 0, dq_acc + (bh * Sq + q0) * D, D);
            }
          } else if (panels && !nan_k) {
            panel_gemm_cols(mq, D, nk, scale, dpb, kPanelMR * bk, bk, 1, ws.k_cols.data(), nk, 0,
                            dq_acc + (bh * Sq + q0) * D, D);
          } else {
            gemm_or_skip<acc_t>(nan_k, false, mq, D, nk, scale, dpb, bk, kptr, ldk, dq_acc + (bh * Sq + q0) * D, D,
                                ws.pack);
          }
        }
      }
      for (int64_t r = 0; r < nk; ++r) {
        store_narrow(ws.dk.data() + r * D, dk_out + r * D, static_cast<int>(D));
        store_narrow(ws.dv.data() + r * D, dv_out + r * D, static_cast<int>(D));
      }
      std::fill(dk_out + nk * D, dk_out + k_rows * D, scalar_t(0));
      std::fill(dv_out + nk * D, dv_out + k_rows * D, scalar_t(0));
    }
  });

  if (!direct_dq) {  // dq = sum over chunks, in chunk order
    at::parallel_for(0, B * H * Sq, row_grain(n_chunks * D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(static_cast<size_t>(D));
      for (int64_t i = begin; i < end; ++i) {
        std::copy(dq_ws + i * D, dq_ws + (i + 1) * D, row.begin());
        for (int64_t c = 1; c < n_chunks; ++c) {
          const acc_t* src = dq_ws + c * dq_numel + i * D;
          for (int64_t d = 0; d < D; ++d) row[d] += src[d];
        }
        store_narrow(row.data(), dq + i * D, static_cast<int>(D));
      }
    });
  }
}

}  // namespace

// Compiled once per CPU capability (common/cpu_capability.h).
namespace CPU_CAPABILITY {

void attention_forward_cpu(const AttentionParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { forward_impl<decltype(tag)>(p); });
}

void attention_backward_cpu(const AttentionBackwardParams& p) {
  dispatch_dtype(p.fwd.dtype, [&](auto tag) { backward_impl<decltype(tag)>(p); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_ext
