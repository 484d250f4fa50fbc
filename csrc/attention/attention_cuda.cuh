// masked_attention on CUDA: tensor-core (mma.sync m16n8k16) kernels in the
// style of FlashAttention-2, for bfloat16 and float16. Instantiated per
// (dtype, head dim) in attention_{fwd,bwd}_hdim*.cu; dispatched by
// attention_cuda.cu. Only the params struct of attention/attention.h reaches
// the kernels.
//
// Design note
// -----------
// Forward (attn_fwd_kernel). One thread block per (query tile of kBlockM rows,
// batch, head); 4 warps, each owning kBlockM / 4 query rows (one or two
// 16-row mma tiles). The Q tile is copied to shared memory once; K and V
// tiles of kBlockN keys are streamed through shared memory with cp.async in the
// FlashAttention-2 ping-pong: the copy of V_j is in flight while S = Q K_jᵀ
// runs, the copy of K_j+1 while the softmax and O += P V_j run. S is computed
// with ldmatrix-fed mma.sync into fp32 registers; scale and masks are applied
// on the accumulator fragments (each element's (row, key) is known from the
// fragment layout); the online softmax keeps the row max and a per-thread
// partial row sum in registers (exp2 with the scale folded into log2(e)), with
// the max reduced across the 4 lanes that share a row by shuffles; P is
// converted in registers into the A operand of the P·V mma (no shared-memory
// round trip). At the end O is divided by the row sum, staged in shared memory
// and written with 16-byte stores; the row log-sum-exp is written as float32,
// +inf (and O = 0) for rows that see no key.
//
// Shared-memory tiles are row-major with a row stride of D + 8 elements: the
// 16-byte pad makes the 8 row addresses of every ldmatrix phase fall in 8
// different 16-byte bank groups (conflict-free for both ldmatrix and
// ldmatrix.trans), at the cost of 16 bytes per row.
//
// Skipping: key tiles at or beyond key_len[b] (the last non-padding key + 1,
// computed once per call by the glue) and, with is_causal, beyond the last row
// of the query tile are never loaded nor computed; a query tile that sees no
// key at all writes zeros and lse = +inf and exits. Under is_causal the grid
// runs the longest query tiles (the last ones) first. Element masks are applied
// only on tiles that need them: the causal diagonal, the key_len edge, and
// every tile when there is a per-key padding mask (one byte per column of the
// thread, loaded once per tile) or an attn_mask (read through its (B, H, Sq, Sk)
// broadcast strides, element by element, only for the tiles that are computed).
//
// Dropout: the Philox layout of attention.h (word j % 4 of the block with
// counter (offset / 4, row * ceil(Sk / 4) + j / 4)), the same stream as the CPU
// kernel, so for one explicit seed both devices drop the same elements. In the
// forward each pair of lanes that shares a 4-key group computes one Philox
// block each (one for each of its two rows) and swaps half of the words with a
// shuffle. The forward writes the (seed, offset) it used into rng_state.
//
// Backward: (1) a preprocessing kernel computes delta = rowsum(dO ∘ O), copies
// lse (times log2 e) and delta into padded workspace arrays (+inf / 0 for the
// pad rows, so no bounds checks are needed later) and zeroes the fp32 dQ
// accumulator; (2) attn_bwd_dkdv_kernel: one block per (key tile, batch, kv
// head), 8 (or 4) warps each owning 16 keys; it loops over the query tiles and
// over the H / Hkv query heads of a GQA group, so dK and dV are summed in
// registers without atomics. It works on the transposed problem: Sᵀ = K Qᵀ,
// Pᵀ = exp2(Sᵀ - lse), dV += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ - delta),
// dK += dSᵀ Q, with P and dS kept in registers as A operands (Q and dO tiles
// double-buffered with cp.async). dQ is, by default, accumulated by the same
// kernel: dS goes through shared memory and each block adds dS K into the fp32
// accumulator with atomicAdd, then (3) a small kernel converts it. This is
// FlashAttention-2's scheme: dK and dV are deterministic, dQ is summed in a
// run-to-run varying order (differences at the level of float32 rounding).
// With AttentionBackwardParams::deterministic, (2) skips dQ and (3) is a
// separate attn_bwd_dq_kernel (one block per query tile, looping over key
// tiles: S, P, dP = dO Vᵀ, dS recomputed, dQ += dS K in registers): every
// gradient is then bitwise reproducible, for about 40% more backward FLOPs.
//
// Head dims: 32, 64, 96 and 128 are compiled; any other D <= 128 runs the next
// compiled size with zero-filled loads of the missing columns (zeros add
// nothing to q·k, and the extra output columns are never stored), so padding
// cannot change a result. D in (128, 256] and float32 inputs run the SIMT
// (FFMA) kernels of attention_simt.cu, which share the masking and dropout code
// of this file and compute in float32 throughout; float64 inputs run the
// PyTorch reference (vae_ext.ops.attention.supports says so).
//
// Tiles (TileConfig below; shared memory fits A100 and H100, 2 forward blocks per SM):
//   head dim   forward (rows x keys, warps)   dK/dV (queries x keys, warps)   dQ pass (rows x keys, warps)
//   32         128 x 64, 4                    64 x 128, 8                     64 x 128, 4
//   64         128 x 64, 4                    64 x 128, 8                     64 x 64, 4
//   96         128 x 32, 4                    64 x 128, 8                     64 x 64, 4
//   128        128 x 32, 4                    64 x 128, 8                     64 x 64, 4
// The forward gives each warp 32 rows (two mma row tiles share every K / V
// fragment: 0.375 ldmatrix per mma instead of 0.56 with 16 rows), with key
// tiles as long as the 255 registers allow. A device with less opt-in shared
// memory per block than the dK/dV kernel needs runs the SIMT kernels instead.
//
// Why hand-written mma.sync rather than CUTLASS/CuTe: the kernels must also
// build as plain C++ against the CPU emulation of the CUDA execution model
// (tests/cuda_emu/cuda_emu.h), which is how CI runs them without a GPU; CuTe's
// architecture-specific atoms do not build there, while four primitives
// (mma.sync, ldmatrix, cp.async, shuffles) are easy to emulate exactly. mma.sync
// with ldmatrix is also what FlashAttention-2 itself runs on A100 and H100, and
// it keeps the build light (no CUTLASS headers in every translation unit).
#pragma once

#include "attention/attention_cuda_common.cuh"

namespace vae_ext::attn {

using dev::ldmatrix_x4;
using dev::ldmatrix_x4_trans;

// ---------------------------------------------------------------- tiles

// Copies rows [0, kRows) x columns [0, kD) of a row-major global matrix (row
// stride ld elements; rows >= valid_rows and columns >= d are zero-filled) into
// a shared tile with row stride kStride, by kThreads threads. `vec` (d % 8 == 0
// and 16-byte aligned rows): 16-byte cp.async copies, zero-filling by predicate;
// otherwise 2-byte loads and stores.
// `hidden` (optional, one byte per row: the key padding mask from the tile's first key)
// zero-fills the rows it marks too: V rows of padded keys, so that their weight 0 never
// multiplies a NaN or an infinity they may hold.
template <int kRows, int kD, int kStride, int kThreads>
VAE_DEV void load_tile(uint16_t* smem, const uint16_t* gmem, int64_t ld, int valid_rows, int d, bool vec, int tid,
                       const uint8_t* hidden = nullptr) {
  constexpr int kChunks = kD / 8;
  constexpr int kTotal = kRows * kChunks;
  static_assert(kTotal % kThreads == 0, "tile chunks must divide among the threads");
  if (vec) {
#pragma unroll
    for (int it = 0; it < kTotal / kThreads; ++it) {
      const int idx = it * kThreads + tid;
      const int r = idx / kChunks, col = (idx % kChunks) * 8;
      const bool pred = r < valid_rows && col < d && (hidden == nullptr || hidden[r] == 0);
      dev::cp_async_16(smem + r * kStride + col, pred ? gmem + static_cast<int64_t>(r) * ld + col : gmem, pred);
    }
  } else {
#pragma unroll 1
    for (int idx = tid; idx < kRows * kD; idx += kThreads) {
      const int r = idx / kD, col = idx % kD;
      const bool pred = r < valid_rows && col < d && (hidden == nullptr || hidden[r] == 0);
      smem[r * kStride + col] = pred ? gmem[static_cast<int64_t>(r) * ld + col] : uint16_t(0);
    }
  }
}

// Whether rows [0, valid_rows) x columns [0, d) of a shared 16-bit tile hold a NaN or an
// infinity (all exponent bits set), for the whole block (one barrier).
template <typename T, int kRows, int kD, int kStride, int kThreads>
VAE_DEV bool tile_has_nonfinite(const uint16_t* smem, int valid_rows, int d, int tid) {
  constexpr uint16_t kExp = Elem<T>::kExponentMask;
  bool bad = false;
#pragma unroll 1
  for (int idx = tid; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD, col = idx % kD;
    if (r < valid_rows && col < d) bad |= (smem[r * kStride + col] & kExp) == kExp;
  }
  return __syncthreads_or(bad) != 0;
}

// O += P V for one warp, element by element, skipping the zero weights: the P V product of
// a tile with hidden pairs whose V holds a NaN or an infinity (rare), so that a hidden
// key's value reaches no row that does not see it (an mma would give 0 * NaN = NaN).
// p: the warp's probabilities in the accumulator layout (rows 16 mt + g (+8), keys
// 8 nt + 2 t (+1)); each lane fetches the weights of its rows from its quad. Every loop is
// unrolled: a run-time index into the register arrays would move them to local memory.
template <typename T, int kMT, int kNT, int kDT, int kStride>
VAE_DEV void pv_skip_zero(float (&acc)[kMT][kDT][4], const float (&p)[kMT][kNT][4], const uint16_t* v, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            const float w = __shfl_sync(0xffffffffu, p[mt][nt][2 * hf + bb], (lane & ~3) | tt);
            if (w == 0.f) continue;
            const uint16_t* vrow = v + (nt * 8 + 2 * tt + bb) * kStride + 2 * t;
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt) {
              acc[mt][dt][2 * hf] += w * Elem<T>::to_float(vrow[dt * 8]);
              acc[mt][dt][2 * hf + 1] += w * Elem<T>::to_float(vrow[dt * 8 + 1]);
            }
          }
        }
      }
    }
  }
}

// Copies rows [0, rows) of a shared tile to a global matrix with row stride ld
// (the columns < d), by `nthreads` threads starting at `idx0`.
template <int kD, int kStride>
VAE_DEV void store_tile(uint16_t* gmem, int64_t ld, const uint16_t* smem, int rows, int valid_rows, int d, bool vec,
                        int idx0, int nthreads) {
  constexpr int kChunks = kD / 8;
  for (int idx = idx0; idx < rows * kChunks; idx += nthreads) {
    const int r = idx / kChunks, col = (idx % kChunks) * 8;
    if (r >= valid_rows || col >= d) continue;
    const uint16_t* src = smem + r * kStride + col;
    uint16_t* dst = gmem + static_cast<int64_t>(r) * ld + col;
    if (vec && col + 8 <= d) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && col + e < d; ++e) dst[e] = src[e];
    }
  }
}

// ---------------------------------------------------------------- warp GEMMs

// acc[mt][nt] += A Bᵀ over k in [0, kK): A rows from `a` (the warp's first row,
// 16 kMT rows, row stride kSA), B rows (the n index) from `b` (16-row pairs of
// kNT n-tiles, row stride kSB). Both operands row-major with k contiguous, as
// Q and K (S = Q Kᵀ), dO and V (dP = dO Vᵀ), or K and Q (Sᵀ = K Qᵀ).
template <typename T, int kMT, int kNT, int kK, int kSA, int kSB>
VAE_DEV void gemm_nt(float (&acc)[kMT][kNT][4], const uint16_t* a, const uint16_t* b, int lane) {
  static_assert(kNT % 2 == 0 && kK % 16 == 0, "tile shape");
  const int lr = lane & 7, l8 = (lane >> 3) & 1, l16 = lane >> 4;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t af[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(af[mt], a + (mt * 16 + lr + l8 * 8) * kSA + kk * 16 + l16 * 8);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (np * 16 + lr + l16 * 8) * kSB + kk * 16 + l8 * 8);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        Elem<T>::mma(acc[mt][2 * np], af[mt], b0);
        Elem<T>::mma(acc[mt][2 * np + 1], af[mt], b1);
      }
    }
  }
}

// Packs a row-layout fp32 tile (C fragments over kNT 8-column tiles) into the
// A fragments of kNT / 2 k-steps of 16.
template <typename T, int kMT, int kNT>
VAE_DEV void pack_a(uint32_t (&pa)[kMT][kNT / 2][4], const float (&x)[kMT][kNT][4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      pa[mt][kk][0] = Elem<T>::pack(x[mt][2 * kk][0], x[mt][2 * kk][1]);
      pa[mt][kk][1] = Elem<T>::pack(x[mt][2 * kk][2], x[mt][2 * kk][3]);
      pa[mt][kk][2] = Elem<T>::pack(x[mt][2 * kk + 1][0], x[mt][2 * kk + 1][1]);
      pa[mt][kk][3] = Elem<T>::pack(x[mt][2 * kk + 1][2], x[mt][2 * kk + 1][3]);
    }
  }
}

// acc[mt][dt] += A B with A in registers (kKS k-steps of 16) and B row-major in
// shared memory with k along the rows (`b`: row 0, column 0 of the warp's n
// range; row stride kSB), as V in O = P V, dO in dV = Pᵀ dO, Q in dK = dSᵀ Q, K
// in dQ = dS K.
template <typename T, int kMT, int kKS, int kDT, int kSB>
VAE_DEV void gemm_rn(float (&acc)[kMT][kDT][4], const uint32_t (&pa)[kMT][kKS][4], const uint16_t* b, int lane) {
  static_assert(kDT % 2 == 0, "tile shape");
  const int lr = lane & 7, l8 = (lane >> 3) & 1, l16 = lane >> 4;
#pragma unroll
  for (int kk = 0; kk < kKS; ++kk) {
#pragma unroll
    for (int dp = 0; dp < kDT / 2; ++dp) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (kk * 16 + lr + l8 * 8) * kSB + dp * 16 + l16 * 8);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        Elem<T>::mma(acc[mt][2 * dp], pa[mt][kk], b0);
        Elem<T>::mma(acc[mt][2 * dp + 1], pa[mt][kk], b1);
      }
    }
  }
}

template <int kMT, int kNT>
VAE_DEV void zero(float (&acc)[kMT][kNT][4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// Writes a warp's fp32 accumulator (rows 16 mt + g (+8) of its slab, columns
// 8 dt + 2t (+1)), times mul[mt][half], as 16-bit elements into shared rows.
template <typename T, int kMT, int kDT, int kStride>
VAE_DEV void stage_rows(uint16_t* rows, const float (&acc)[kMT][kDT][4], const float (&mul)[kMT][2], int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      uint32_t* lo = reinterpret_cast<uint32_t*>(rows + (mt * 16 + g) * kStride + dt * 8 + 2 * t);
      uint32_t* hi = reinterpret_cast<uint32_t*>(rows + (mt * 16 + g + 8) * kStride + dt * 8 + 2 * t);
      *lo = Elem<T>::pack(acc[mt][dt][0] * mul[mt][0], acc[mt][dt][1] * mul[mt][0]);
      *hi = Elem<T>::pack(acc[mt][dt][2] * mul[mt][1], acc[mt][dt][3] * mul[mt][1]);
    }
  }
}

// ---------------------------------------------------------------- forward

template <int kD_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdCfg {
  static constexpr int kD = kD_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kWarpRows = kBlockM / kNWarps;
  static constexpr int kMT = kWarpRows / 16;
  static constexpr int kNT = kBlockN / 8;
  static constexpr int kDT = kD / 8;
  static constexpr int kStride = kD + 8;
  static constexpr size_t kSmemBytes = static_cast<size_t>(kBlockM + 2 * kBlockN) * kStride * 2;
  static_assert(kWarpRows % 16 == 0 && kBlockN % 16 == 0 && kD % 16 == 0, "tile shape");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attn_fwd_kernel(const AttentionParams p, bool vec_in, bool vec_out) {
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kDT = Cfg::kDT, kStride = Cfg::kStride;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int hkv = h / (p.heads / p.kv_heads);
  const int m_block = gridDim.y - 1 - blockIdx.y;  // the last (under is_causal the longest) tiles first
  const int m0 = m_block * kBlockM;
  const int d = p.head_dim;
  if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) write_rng_state(p);

  const MaskCtx mask = make_mask_ctx(p, b, h);
  const int q_rows = min(kBlockM, p.q_len - m0);
  const int n_end = mask.key_end(m0, q_rows);  // keys [0, n_end) may be visible to this tile
  const int n_tiles = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;

  uint16_t* out = static_cast<uint16_t*>(p.out) + (static_cast<int64_t>(bh) * p.q_len + m0) * d;
  float* lse_out = p.lse + static_cast<int64_t>(bh) * p.q_len + m0;
  if (n_tiles == 0) {  // no key visible to any row of the tile
    for (int idx = tid; idx < q_rows * d; idx += kThreads) out[idx] = 0;
    for (int r = tid; r < q_rows; r += kThreads) lse_out[r] = INFINITY;
    return;
  }

  uint16_t* sQ = reinterpret_cast<uint16_t*>(dev::dynamic_smem());
  uint16_t* sK = sQ + kBlockM * kStride;
  uint16_t* sV = sK + kBlockN * kStride;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                      static_cast<int64_t>(m0) * p.q_row_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;

  load_tile<kBlockM, kD, kStride, kThreads>(sQ, q, p.q_row_stride, q_rows, d, vec_in, tid);
  load_tile<kBlockN, kD, kStride, kThreads>(sK, k, p.k_row_stride, n_end, d, vec_in, tid);
  dev::cp_async_commit();

  const DropoutCtx drop = make_dropout_ctx(p, b, h);
  const float scale_log2 = p.scale * kLog2e;
  const int warp_row0 = warp * Cfg::kWarpRows;  // first row of this warp inside the tile
  const int row_first = m0 + warp_row0;         // ... in the (b, h) plane
  const bool per_key = mask.key_padding != nullptr;

  float acc_o[kMT][kDT][4];
  zero(acc_o);
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int n = 0; n < n_tiles; ++n) {
    const int n0 = n * kBlockN;
    load_tile<kBlockN, kD, kStride, kThreads>(opaque(sV), opaque(v + static_cast<int64_t>(n0) * p.v_row_stride), p.v_row_stride,
                                              n_end - n0, d, vec_in, tid,
                                              mask.key_padding != nullptr ? mask.key_padding + n0 : nullptr);
    dev::cp_async_commit();
    dev::cp_async_wait<1>();  // Q and K_n have landed
    __syncthreads();

    float acc_s[kMT][kNT][4];
    zero(acc_s);
    gemm_nt<T, kMT, kNT, kD, kStride, kStride>(acc_s, opaque(sQ + warp_row0 * kStride), opaque(sK), lane);
    __syncthreads();  // every warp is done with K_n
    if (n + 1 < n_tiles) {
      load_tile<kBlockN, kD, kStride, kThreads>(opaque(sK), opaque(k + static_cast<int64_t>(n0 + kBlockN) * p.k_row_stride),
                                                p.k_row_stride, n_end - n0 - kBlockN, d, vec_in, tid);
    }
    dev::cp_async_commit();

    // Scale, mask, online softmax. Scores are in the log2 domain from here on.
    const bool edge = n0 + kBlockN > mask.kv_limit;
    const bool diag = mask.crosses_diagonal(row_first, n0 + kBlockN - 1);
    const bool pairs = mask.kind != MaskKind::kNone || diag;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      bool col_ok[2] = {true, true};
      if (edge || per_key) {
        col_ok[0] = mask.key_ok(n0 + nt * 8 + 2 * t);
        col_ok[1] = mask.key_ok(n0 + nt * 8 + 2 * t + 1);
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float s = acc_s[mt][nt][e] * scale_log2;
          if (!col_ok[e & 1]) {
            s = -INFINITY;
          } else if (pairs) {
            s = masked_score(s, mask.pair_term(row_first + mt * 16 + g + (e >> 1) * 8, n0 + nt * 8 + 2 * t + (e & 1)));
          }
          acc_s[mt][nt][e] = s;
        }
      }
    }

#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = row_max[mt][hf];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * hf], acc_s[mt][nt][2 * hf + 1]));
        mx = quad_max(mx);
        // attention_math.h: a row that has seen no visible key keeps max -inf, its weights are 0.
        const SoftmaxStep<float> step = online_softmax_step(row_max[mt][hf], row_sum[mt][hf], mx, Exp2Fast{});
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          acc_s[mt][nt][2 * hf] = exp2_fast(acc_s[mt][nt][2 * hf] - step.ref);
          acc_s[mt][nt][2 * hf + 1] = exp2_fast(acc_s[mt][nt][2 * hf + 1] - step.ref);
          sum += acc_s[mt][nt][2 * hf] + acc_s[mt][nt][2 * hf + 1];
        }
        row_sum[mt][hf] += sum;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          acc_o[mt][dt][2 * hf] *= step.factor;
          acc_o[mt][dt][2 * hf + 1] *= step.factor;
        }
      }
    }
    if (drop.enabled) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const uint64_t keep = dropout_keep_rows<kNT>(drop, row_first + mt * 16, n0, lane);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = bit(keep, nt * 4 + e) ? acc_s[mt][nt][e] * drop.inv_keep : 0.f;
      }
    }
    uint32_t pa[kMT][kNT / 2][4];
    pack_a<T, kMT, kNT>(pa, acc_s);

    dev::cp_async_wait<1>();  // V_n has landed
    __syncthreads();
    // A tile with per-pair hidden weights (the causal diagonal, an attn_mask) whose V holds a
    // NaN or an infinity takes the element-wise product (padded keys' V rows are zero already).
    const bool careful = (mask.kind != MaskKind::kNone || mask.crosses_diagonal(m0, n0 + kBlockN - 1)) &&
                         tile_has_nonfinite<T, kBlockN, kD, kStride, kThreads>(sV, n_end - n0, d, tid);
    if (careful) {
      pv_skip_zero<T, kMT, kNT, kDT, kStride>(acc_o, acc_s, sV, lane);
    } else {
      gemm_rn<T, kMT, kNT / 2, kDT, kStride>(acc_o, pa, opaque(sV), lane);
    }
    __syncthreads();  // every warp is done with V_n
  }
  dev::cp_async_wait<0>();

  // Normalise, write lse, stage O in this warp's own Q rows and store it.
  float mul[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float sum = quad_sum(row_sum[mt][hf]);
      // attention_math.h: 0 / +inf for a row that saw no key; a NaN sum gives NaN out and lse
      mul[mt][hf] = softmax_out_scale(sum);
      const int r = warp_row0 + mt * 16 + g + hf * 8;
      if (t == 0 && r < q_rows) lse_out[r] = softmax_lse(row_max[mt][hf], sum, kLn2);
    }
  }
  uint16_t* rows = sQ + warp_row0 * kStride;
  stage_rows<T, kMT, kDT, kStride>(rows, acc_o, mul, lane);
  __syncwarp();
  store_tile<kD, kStride>(out + static_cast<int64_t>(warp_row0) * d, d, rows, Cfg::kWarpRows, q_rows - warp_row0, d,
                          vec_out, lane, 32);
}

// ---------------------------------------------------------------- backward: dK, dV (and dQ by atomics)

template <int kD_, int kBlockM_, int kBlockN_, int kNWarps_>
struct BwdCfg {
  static constexpr int kD = kD_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kNTq = kBlockM / 8;  // query columns of the transposed scores, in n-tiles
  static constexpr int kDT = kD / 8;
  static constexpr int kStride = kD + 8;
  static constexpr int kStrideS = kBlockM + 8;  // dSᵀ tile
  // dQ = dS K: warps split the kBlockM x kD tile into kMq row tiles x kWn column slabs.
  static constexpr int kMq = kBlockM / 16;
  static constexpr int kWn = kNWarps / kMq;
  static constexpr int kDTw = kDT / kWn;
  // dP, dS and the dK update run over chunks of kQChunk queries (fewer live registers).
  static constexpr int kQChunk = kD > 64 && kBlockM > 32 ? 32 : kBlockM;
  static constexpr size_t kSmemFloats = 4 * kBlockM;  // lse2, delta: two buffers each
  static constexpr size_t kSmemBytes =
      kSmemFloats * 4 + static_cast<size_t>(2 * kBlockN + 4 * kBlockM) * kStride * 2 + kBlockN * kStrideS * 2;
  static_assert(kBlockN == 16 * kNWarps, "each warp owns 16 keys");
  static_assert(kNWarps % kMq == 0 && kDT % kWn == 0 && kDTw % 2 == 0, "dQ warp layout");
  static_assert(kBlockM % 16 == 0 && 128 % kBlockM == 0, "query tile");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    attn_bwd_dkdv_kernel(const AttentionBackwardParams bp, const BwdWorkspace ws, bool vec_in, bool vec_out,
                         bool atomic_dq) {
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kNTq = Cfg::kNTq, kDT = Cfg::kDT, kStride = Cfg::kStride, kStrideS = Cfg::kStrideS;
  const AttentionParams& p = bp.fwd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.x / p.kv_heads, hkv = blockIdx.x % p.kv_heads;
  const int n0 = blockIdx.y * kBlockN;  // under is_causal the first key tiles have the most work: they go first
  const int group = p.heads / p.kv_heads;
  const int d = p.head_dim;
  const int kv_limit = kv_limit_of(p, b);
  const int key_rows = min(kBlockN, p.kv_len - n0);
  const int m_blocks = (p.q_len + kBlockM - 1) / kBlockM;
  const int m_begin = first_query_of(p, n0) / kBlockM;  // earlier query tiles see none of these keys
  const bool hidden = n0 >= kv_limit || m_begin >= m_blocks;
  const int per_head = hidden ? 0 : m_blocks - m_begin;
  const int n_iter = per_head * group;

  const int64_t kv_row0 = (static_cast<int64_t>(b) * p.kv_heads + hkv) * p.kv_len + n0;
  uint16_t* dk_out = static_cast<uint16_t*>(bp.dk) + kv_row0 * d;
  uint16_t* dv_out = static_cast<uint16_t*>(bp.dv) + kv_row0 * d;
  if (n_iter == 0) {  // no query sees these keys
    for (int idx = tid; idx < key_rows * d; idx += kThreads) dk_out[idx] = dv_out[idx] = 0;
    return;
  }

  float* sLse = reinterpret_cast<float*>(dev::dynamic_smem());
  float* sDelta = sLse + 2 * kBlockM;
  uint16_t* sK = reinterpret_cast<uint16_t*>(sDelta + 2 * kBlockM);
  uint16_t* sV = sK + kBlockN * kStride;
  uint16_t* sQ = sV + kBlockN * kStride;
  uint16_t* sdO = sQ + 2 * kBlockM * kStride;
  uint16_t* sdS = sdO + 2 * kBlockM * kStride;

  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride +
                      static_cast<int64_t>(n0) * p.k_row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride +
                      static_cast<int64_t>(n0) * p.v_row_stride;
  // Padded keys' K rows are zero-filled: their dS is 0 and must not multiply a NaN into dQ.
  const uint8_t* pad_rows = p.key_padding != nullptr ? p.key_padding + static_cast<int64_t>(b) * p.kv_len + n0 : nullptr;
  load_tile<kBlockN, kD, kStride, kThreads>(sK, k, p.k_row_stride, kv_limit - n0, d, vec_in, tid, pad_rows);
  load_tile<kBlockN, kD, kStride, kThreads>(sV, v, p.v_row_stride, kv_limit - n0, d, vec_in, tid);

  auto load_queries = [&](int it) {
    const int hq = hkv * group + it / per_head;
    const int m0 = (m_begin + it % per_head) * kBlockM;
    const int buf = it & 1;
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + hq * p.q_head_stride +
                        static_cast<int64_t>(m0) * p.q_row_stride;
    const uint16_t* dout = static_cast<const uint16_t*>(bp.dout) + b * bp.dout_batch_stride +
                           hq * bp.dout_head_stride + static_cast<int64_t>(m0) * bp.dout_row_stride;
    load_tile<kBlockM, kD, kStride, kThreads>(opaque(sQ + buf * kBlockM * kStride), opaque(q), p.q_row_stride,
                                              p.q_len - m0, d, vec_in, tid);
    load_tile<kBlockM, kD, kStride, kThreads>(opaque(sdO + buf * kBlockM * kStride), opaque(dout),
                                              bp.dout_row_stride, p.q_len - m0, d, vec_in, tid);
    const int64_t row = (static_cast<int64_t>(b) * p.heads + hq) * ws.q_pad + m0;  // padded: no bounds to check
    if (tid < kBlockM / 4) {
      dev::cp_async_16(sLse + buf * kBlockM + 4 * tid, ws.lse2 + row + 4 * tid);
    } else if (tid < kBlockM / 2) {
      const int c = tid - kBlockM / 4;
      dev::cp_async_16(sDelta + buf * kBlockM + 4 * c, ws.delta + row + 4 * c);
    }
  };
  load_queries(0);
  dev::cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  const int key0 = n0 + warp * 16;  // this warp's keys: key0 + g, key0 + g + 8
  bool key_ok[2];
  {
    const MaskCtx m = make_mask_ctx(p, b, hkv * group);
    key_ok[0] = m.key_ok(key0 + g);
    key_ok[1] = m.key_ok(key0 + g + 8);
  }
  const int lr = lane & 7, l8 = (lane >> 3) & 1, l16 = lane >> 4;

  float acc_dk[1][kDT][4], acc_dv[1][kDT][4];
  zero(acc_dk);
  zero(acc_dv);
  // Whether this block's K holds a NaN or an infinity (then dQ of tiles with per-pair hidden
  // weights takes the element-wise product that skips dS = 0; found at the first step).
  const bool pair_masks = p.is_causal || p.mask_kind != MaskKind::kNone;
  bool k_bad = false;

  for (int it = 0; it < n_iter; ++it) {
    if (it + 1 < n_iter) load_queries(it + 1);
    dev::cp_async_commit();
    dev::cp_async_wait<1>();
    __syncthreads();
    if (it == 0 && atomic_dq && pair_masks) {
      k_bad = tile_has_nonfinite<T, kBlockN, kD, kStride, kThreads>(sK, kv_limit - n0, d, tid);
    }

    const int hq = hkv * group + it / per_head;
    const int m0 = (m_begin + it % per_head) * kBlockM;
    const int buf = it & 1;
    const uint16_t* sQb = opaque(sQ + buf * kBlockM * kStride);
    const uint16_t* sdOb = opaque(sdO + buf * kBlockM * kStride);
    const float* sLseb = opaque(sLse + buf * kBlockM);
    const float* sDeltab = opaque(sDelta + buf * kBlockM);
    const uint16_t* sKw = opaque(sK + warp * 16 * kStride);  // this warp's keys
    const uint16_t* sVw = opaque(sV + warp * 16 * kStride);
    const MaskCtx mask = make_mask_ctx(p, b, hq);

    // Pᵀ = exp2(Sᵀ · scale · log2 e - lse2), 0 where hidden.
    float acc_s[1][kNTq][4];
    zero(acc_s);
    gemm_nt<T, 1, kNTq, kD, kStride, kStride>(acc_s, sKw, sQb, lane);
    const bool pairs = mask.kind != MaskKind::kNone || mask.crosses_diagonal(m0, key0 + 15);
#pragma unroll
    for (int nt = 0; nt < kNTq; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + 2 * t + (e & 1);  // query, local to the tile
        float s = key_ok[e >> 1] ? acc_s[0][nt][e] * scale_log2 : -INFINITY;
        if (key_ok[e >> 1] && pairs) s = masked_score(s, mask.pair_term(m0 + il, key0 + g + (e >> 1) * 8));
        acc_s[0][nt][e] = softmax_prob_from_lse(s, sLseb[il], Exp2Fast{});
      }
    }

    DropoutCtx drop = make_dropout_ctx(p, b, hq);
    const uint64_t keep = drop.enabled ? dropout_keep_cols<kNTq>(drop, key0, m0, lane) : 0;

    // dV += (P ∘ Z / (1 - p))ᵀ dO
    uint32_t pa[1][kNTq / 2][4];
    if (drop.enabled) {
      float pd[1][kNTq][4];
#pragma unroll
      for (int nt = 0; nt < kNTq; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) pd[0][nt][e] = bit(keep, nt * 4 + e) ? acc_s[0][nt][e] * drop.inv_keep : 0.f;
      pack_a<T, 1, kNTq>(pa, pd);
    } else {
      pack_a<T, 1, kNTq>(pa, acc_s);
    }
    gemm_rn<T, 1, kNTq / 2, kDT, kStride>(acc_dv, pa, sdOb, lane);

    // Per chunk of kQC queries (bounded registers): dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ ∘ Z / (1 - p) - delta),
    // dK += dSᵀ Q, and dSᵀ to shared memory for dQ.
    constexpr int kQC = Cfg::kQChunk, kNTc = kQC / 8;
    uint16_t* sdSw = opaque(sdS + (warp * 16 + g) * kStrideS + 2 * t);
#pragma unroll
    for (int qc = 0; qc < kBlockM / kQC; ++qc) {
      float ds[1][kNTc][4];
      zero(ds);
      gemm_nt<T, 1, kNTc, kD, kStride, kStride>(ds, sVw, sdOb + qc * kQC * kStride, lane);
#pragma unroll
      for (int nc = 0; nc < kNTc; ++nc) {
        const int nt = qc * kNTc + nc;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float dpv = ds[0][nc][e];
          if (drop.enabled) dpv = bit(keep, nt * 4 + e) ? dpv * drop.inv_keep : 0.f;
          ds[0][nc][e] = softmax_grad(acc_s[0][nt][e], dpv, sDeltab[nt * 8 + 2 * t + (e & 1)]);
        }
      }
      uint32_t pc[1][kNTc / 2][4];
      pack_a<T, 1, kNTc>(pc, ds);
      gemm_rn<T, 1, kNTc / 2, kDT, kStride>(acc_dk, pc, sQb + qc * kQC * kStride, lane);
      if (atomic_dq) {  // dSᵀ rows = keys
#pragma unroll
        for (int kk = 0; kk < kNTc / 2; ++kk) {
          uint16_t* r0 = sdSw + qc * kQC + kk * 16;
          uint16_t* r1 = r0 + 8 * kStrideS;
          *reinterpret_cast<uint32_t*>(r0) = pc[0][kk][0];
          *reinterpret_cast<uint32_t*>(r1) = pc[0][kk][1];
          *reinterpret_cast<uint32_t*>(r0 + 8) = pc[0][kk][2];
          *reinterpret_cast<uint32_t*>(r1 + 8) = pc[0][kk][3];
        }
      }
    }

    if (atomic_dq) {  // dQ = dS K, added into the fp32 accumulator
      __syncthreads();
      const int mq = warp % Cfg::kMq, d0 = (warp / Cfg::kMq) * Cfg::kDTw * 8;
      const uint16_t* sdSq = opaque(sdS + (lr + l16 * 8) * kStrideS + mq * 16 + l8 * 8);
      const uint16_t* sKd = opaque(sK + d0);
      float acc_dq[1][Cfg::kDTw][4];
      zero(acc_dq);
      if (k_bad && (mask.kind != MaskKind::kNone || mask.crosses_diagonal(m0, n0 + kBlockN - 1))) {
        // rare: a NaN / infinite key in a tile with hidden pairs; dS_ij = sdS[j][i]
#pragma unroll 1
        for (int j = 0; j < kBlockN; ++j) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const float w = Elem<T>::to_float(sdS[j * kStrideS + mq * 16 + g + hf * 8]);
            if (w == 0.f) continue;
            const uint16_t* krow = sKd + j * kStride + 2 * t;
#pragma unroll
            for (int dt = 0; dt < Cfg::kDTw; ++dt) {
              acc_dq[0][dt][2 * hf] += w * Elem<T>::to_float(krow[dt * 8]);
              acc_dq[0][dt][2 * hf + 1] += w * Elem<T>::to_float(krow[dt * 8 + 1]);
            }
          }
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t af[1][1][4];
          ldmatrix_x4_trans(af[0][0], sdSq + kk * 16 * kStrideS);
          gemm_rn<T, 1, 1, Cfg::kDTw, kStride>(acc_dq, af, sKd + kk * 16 * kStride, lane);
        }
      }
      float* dq_rows = ws.dq_accum + (static_cast<int64_t>(b) * p.heads + hq) * p.q_len * ws.dq_ld;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = m0 + mq * 16 + g + hf * 8;
        if (i < p.q_len) {
          float* row = dq_rows + static_cast<int64_t>(i) * ws.dq_ld;
#pragma unroll
          for (int dt = 0; dt < Cfg::kDTw; ++dt) {
            const int c = d0 + dt * 8 + 2 * t;
            if (c < d) atomicAdd(row + c, acc_dq[0][dt][2 * hf] * p.scale);
            if (c + 1 < d) atomicAdd(row + c + 1, acc_dq[0][dt][2 * hf + 1] * p.scale);
          }
        }
      }
    }
    __syncthreads();  // buffers of this iteration (and sdS) are free again
  }
  dev::cp_async_wait<0>();

  // dK = scale · Σ dSᵀ Q and dV, staged in this warp's own rows of sK / sV.
  const float mul_k[1][2] = {{p.scale, p.scale}}, mul_v[1][2] = {{1.f, 1.f}};
  stage_rows<T, 1, kDT, kStride>(sK + warp * 16 * kStride, acc_dk, mul_k, lane);
  stage_rows<T, 1, kDT, kStride>(sV + warp * 16 * kStride, acc_dv, mul_v, lane);
  __syncwarp();
  const int valid = key_rows - warp * 16;
  store_tile<kD, kStride>(dk_out + static_cast<int64_t>(warp * 16) * d, d, sK + warp * 16 * kStride, 16, valid, d,
                          vec_out, lane, 32);
  store_tile<kD, kStride>(dv_out + static_cast<int64_t>(warp * 16) * d, d, sV + warp * 16 * kStride, 16, valid, d,
                          vec_out, lane, 32);
}

// ---------------------------------------------------------------- backward: dQ without atomics

template <int kD_, int kBlockM_, int kBlockN_, int kNWarps_>
struct DqCfg {
  static constexpr int kD = kD_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kNT = kBlockN / 8;
  static constexpr int kDT = kD / 8;
  static constexpr int kStride = kD + 8;
  static constexpr size_t kSmemBytes = static_cast<size_t>(2 * kBlockM + 4 * kBlockN) * kStride * 2;
  static_assert(kBlockM == 16 * kNWarps, "each warp owns 16 query rows");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    attn_bwd_dq_kernel(const AttentionBackwardParams bp, const BwdWorkspace ws, bool vec_in, bool vec_out) {
  constexpr int kD = Cfg::kD, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kNT = Cfg::kNT, kDT = Cfg::kDT, kStride = Cfg::kStride;
  const AttentionParams& p = bp.fwd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int hkv = h / (p.heads / p.kv_heads);
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;
  const int d = p.head_dim;

  const MaskCtx mask = make_mask_ctx(p, b, h);
  const int q_rows = min(kBlockM, p.q_len - m0);
  const int n_end = mask.key_end(m0, q_rows);  // keys [0, n_end) may be visible to this tile
  const int n_tiles = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;
  uint16_t* dq_out = static_cast<uint16_t*>(bp.dq) + (static_cast<int64_t>(bh) * p.q_len + m0) * d;
  if (n_tiles == 0) {
    for (int idx = tid; idx < q_rows * d; idx += kThreads) dq_out[idx] = 0;
    return;
  }

  uint16_t* sQ = reinterpret_cast<uint16_t*>(dev::dynamic_smem());
  uint16_t* sdO = sQ + kBlockM * kStride;
  uint16_t* sK = sdO + kBlockM * kStride;  // two buffers
  uint16_t* sV = sK + 2 * kBlockN * kStride;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                      static_cast<int64_t>(m0) * p.q_row_stride;
  const uint16_t* dout = static_cast<const uint16_t*>(bp.dout) + b * bp.dout_batch_stride +
                         h * bp.dout_head_stride + static_cast<int64_t>(m0) * bp.dout_row_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
  auto load_kv = [&](int n) {
    const int n0 = n * kBlockN, buf = n & 1;
    load_tile<kBlockN, kD, kStride, kThreads>(opaque(sK + buf * kBlockN * kStride),
                                              opaque(k + static_cast<int64_t>(n0) * p.k_row_stride), p.k_row_stride,
                                              n_end - n0, d, vec_in, tid,
                                              mask.key_padding != nullptr ? mask.key_padding + n0 : nullptr);
    load_tile<kBlockN, kD, kStride, kThreads>(opaque(sV + buf * kBlockN * kStride),
                                              opaque(v + static_cast<int64_t>(n0) * p.v_row_stride), p.v_row_stride,
                                              n_end - n0, d, vec_in, tid);
  };
  load_tile<kBlockM, kD, kStride, kThreads>(sQ, q, p.q_row_stride, q_rows, d, vec_in, tid);
  load_tile<kBlockM, kD, kStride, kThreads>(sdO, dout, bp.dout_row_stride, q_rows, d, vec_in, tid);
  load_kv(0);
  dev::cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  const int row_first = m0 + warp * 16;
  float lse2[2], delta[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int64_t row = static_cast<int64_t>(bh) * ws.q_pad + row_first + g + hf * 8;  // padded
    lse2[hf] = ws.lse2[row];
    delta[hf] = ws.delta[row];
  }
  const DropoutCtx drop = make_dropout_ctx(p, b, h);
  const bool per_key = mask.key_padding != nullptr;

  float acc_dq[1][kDT][4];
  zero(acc_dq);
  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) load_kv(n + 1);
    dev::cp_async_commit();
    dev::cp_async_wait<1>();
    __syncthreads();
    const int n0 = n * kBlockN;
    const uint16_t* sKb = opaque(sK + (n & 1) * kBlockN * kStride);
    const uint16_t* sVb = opaque(sV + (n & 1) * kBlockN * kStride);

    float acc_s[1][kNT][4];
    zero(acc_s);
    gemm_nt<T, 1, kNT, kD, kStride, kStride>(acc_s, opaque(sQ + warp * 16 * kStride), sKb, lane);
    const bool edge = n0 + kBlockN > mask.kv_limit;
    const bool pairs = mask.kind != MaskKind::kNone || mask.crosses_diagonal(row_first, n0 + kBlockN - 1);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      bool col_ok[2] = {true, true};
      if (edge || per_key) {
        col_ok[0] = mask.key_ok(n0 + nt * 8 + 2 * t);
        col_ok[1] = mask.key_ok(n0 + nt * 8 + 2 * t + 1);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float s = col_ok[e & 1] ? acc_s[0][nt][e] * scale_log2 : -INFINITY;
        if (col_ok[e & 1] && pairs) {
          s = masked_score(s, mask.pair_term(row_first + g + (e >> 1) * 8, n0 + nt * 8 + 2 * t + (e & 1)));
        }
        acc_s[0][nt][e] = softmax_prob_from_lse(s, lse2[e >> 1], Exp2Fast{});
      }
    }

    float acc_dp[1][kNT][4];
    zero(acc_dp);
    gemm_nt<T, 1, kNT, kD, kStride, kStride>(acc_dp, opaque(sdO + warp * 16 * kStride), sVb, lane);
    if (drop.enabled) {
      const uint64_t keep = dropout_keep_rows<kNT>(drop, row_first, n0, lane);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dp[0][nt][e] = bit(keep, nt * 4 + e) ? acc_dp[0][nt][e] * drop.inv_keep : 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dp[0][nt][e] = softmax_grad(acc_s[0][nt][e], acc_dp[0][nt][e], delta[e >> 1]);
    uint32_t pa[1][kNT / 2][4];
    pack_a<T, 1, kNT>(pa, acc_dp);
    // dQ += dS K; element-wise, skipping dS = 0, in a tile with per-pair hidden weights whose K
    // holds a NaN or an infinity (padded keys' K rows are zero already).
    const bool careful = (mask.kind != MaskKind::kNone || mask.crosses_diagonal(m0, n0 + kBlockN - 1)) &&
                         tile_has_nonfinite<T, kBlockN, kD, kStride, kThreads>(sKb, n_end - n0, d, tid);
    if (careful) {
      pv_skip_zero<T, 1, kNT, kDT, kStride>(acc_dq, acc_dp, sKb, lane);
    } else {
      gemm_rn<T, 1, kNT / 2, kDT, kStride>(acc_dq, pa, sKb, lane);
    }
    __syncthreads();
  }
  dev::cp_async_wait<0>();

  const float mul[1][2] = {{p.scale, p.scale}};
  uint16_t* rows = sQ + warp * 16 * kStride;
  stage_rows<T, 1, kDT, kStride>(rows, acc_dq, mul, lane);
  __syncwarp();
  store_tile<kD, kStride>(dq_out + static_cast<int64_t>(warp * 16) * d, d, rows, 16, q_rows - warp * 16, d, vec_out,
                          lane, 32);
}

// ---------------------------------------------------------------- launchers and per-head-dim tiles

template <int kD> struct TileConfig;
// Forward: (head dim, query rows, keys per tile, warps). dK/dV: (head dim, queries per step, keys, warps).
// dQ (deterministic mode): (head dim, query rows, keys per tile, warps).
template <> struct TileConfig<32> {
  using Fwd = FwdCfg<32, 128, 64, 4>;
  using Bwd = BwdCfg<32, 64, 128, 8>;
  using Dq = DqCfg<32, 64, 128, 4>;
};
template <> struct TileConfig<64> {
  using Fwd = FwdCfg<64, 128, 64, 4>;
  using Bwd = BwdCfg<64, 64, 128, 8>;
  using Dq = DqCfg<64, 64, 64, 4>;
};
template <> struct TileConfig<96> {
  using Fwd = FwdCfg<96, 128, 32, 4>;
  using Bwd = BwdCfg<96, 64, 128, 8>;
  using Dq = DqCfg<96, 64, 64, 4>;
};
template <> struct TileConfig<128> {
  using Fwd = FwdCfg<128, 128, 32, 4>;
  using Bwd = BwdCfg<128, 64, 128, 8>;
  using Dq = DqCfg<128, 64, 64, 4>;
};

inline bool in_vec_ok(const AttentionParams& p) {
  return p.head_dim % 8 == 0 && rows_aligned16(p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride) &&
         rows_aligned16(p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride) &&
         rows_aligned16(p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
}

template <int kD>
constexpr bool smem_table_ok() {
  using C = TileConfig<kD>;
  constexpr size_t most = C::Bwd::kSmemBytes;
  return most == tc_smem_bytes(kD) && C::Fwd::kSmemBytes <= most && C::Dq::kSmemBytes <= most;
}
static_assert(smem_table_ok<32>() && smem_table_ok<64>() && smem_table_ok<96>() && smem_table_ok<128>(),
              "tc_smem_bytes (attention_cuda.h) must state the tile configs' shared memory");

template <typename T, int kD>
void run_fwd_tc(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = typename TileConfig<kD>::Fwd;
  const int m_blocks = (p.q_len + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const bool vec_out = p.head_dim % 8 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  auto kernel = attn_fwd_kernel<T, Cfg>;
  check_cuda(set_max_dynamic_smem(kernel, Cfg::kSmemBytes), "attention forward: shared memory size");
  launch(kernel, dim3(p.batch * p.heads, m_blocks), dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p, in_vec_ok(p),
         vec_out);
  check_launch("attention forward kernel");
}

template <typename T, int kD>
void run_bwd_tc(const AttentionBackwardParams& bp, const BwdWorkspace& ws, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  const bool vec_in =
      in_vec_ok(p) && rows_aligned16(bp.dout, bp.dout_batch_stride, bp.dout_head_stride, bp.dout_row_stride);
  const bool out_ok = p.head_dim % 8 == 0;
  const bool atomic_dq = ws.dq_accum != nullptr;
  {
    using Cfg = typename TileConfig<kD>::Bwd;
    const bool vec_out = out_ok && reinterpret_cast<uintptr_t>(bp.dk) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(bp.dv) % 16 == 0;
    const int n_blocks = (p.kv_len + Cfg::kBlockN - 1) / Cfg::kBlockN;
    auto kernel = attn_bwd_dkdv_kernel<T, Cfg>;
    check_cuda(set_max_dynamic_smem(kernel, Cfg::kSmemBytes), "attention backward: shared memory size");
    launch(kernel, dim3(p.batch * p.kv_heads, n_blocks), dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, bp, ws,
           vec_in, vec_out, atomic_dq);
    check_launch("attention backward dk/dv kernel");
  }
  if (!atomic_dq) {
    using Cfg = typename TileConfig<kD>::Dq;
    const bool vec_out = out_ok && reinterpret_cast<uintptr_t>(bp.dq) % 16 == 0;
    const int m_blocks = (p.q_len + Cfg::kBlockM - 1) / Cfg::kBlockM;
    auto kernel = attn_bwd_dq_kernel<T, Cfg>;
    check_cuda(set_max_dynamic_smem(kernel, Cfg::kSmemBytes), "attention backward: shared memory size");
    launch(kernel, dim3(p.batch * p.heads, m_blocks), dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, bp, ws, vec_in,
           vec_out);
    check_launch("attention backward dq kernel");
  }
}

}  // namespace vae_ext::attn
