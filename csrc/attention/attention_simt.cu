// masked_attention on CUDA without tensor cores: FFMA kernels, float32
// arithmetic throughout, for float32 inputs (any head dim <= 256) and for
// bfloat16 / float16 inputs whose head dim has no tensor-core kernel
// (128 < D <= 256). Same tiling idea as the tensor-core kernels (K tiles in
// shared memory, online softmax, lse saved, backward recomputing P from it,
// dK/dV summed per key block over the GQA group, deterministic everywhere), the
// same mask predicate and dropout stream (attention_cuda_common.cuh).
//
// Mapping: a warp owns kRows = 4 rows (queries in the forward and dQ kernels,
// keys in the dK/dV kernel) and its 32 lanes take 32 columns of a tile (keys,
// resp. queries) for the dot products; for the output updates (O += P V,
// dQ += dS K, dV += Pᵀ dO, dK += dSᵀ Q) lane l owns the head-dim columns
// l + 32 c and the tile's weights are broadcast from shared memory.
#include "attention/attention_cuda_common.cuh"

namespace vae_ext::attn {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 4;                     // rows per warp
constexpr int kBlockRows = kWarps * kRows;   // rows per block
constexpr int kTile = 32;                    // columns per tile (one per lane)
constexpr int kMaxChunks = kMaxSimtBackwardHeadDim / 32;  // backward: head-dim chunks of 32 per lane
// Forward: lane l owns the head-dim columns l + 32 c, c < Chunks; Chunks = 8 (D <= 256) or
// 16 (D <= 512), so the common head dims do not pay the registers of D = 512.

// Copies rows [0, kR) x [0, d) of a strided global matrix into float shared rows of stride `ld_s`.
template <typename T>
__device__ __forceinline__ void load_rows(float* smem, int ld_s, const void* gmem, int64_t offset, int64_t ld,
                                          int rows, int valid_rows, int d, int tid) {
  for (int idx = tid; idx < rows * d; idx += kThreads) {
    const int r = idx / d, c = idx % d;
    smem[r * ld_s + c] = r < valid_rows ? IO<T>::load(gmem, offset + static_cast<int64_t>(r) * ld + c) : 0.f;
  }
}

// acc[r][c] += w[r] * x for the warp's rows. With skip_zero (a tile with per-pair hidden weights)
// a NaN or infinite x is added only to the rows whose weight is not 0, so that a hidden key's value
// (O += P V) or key (dQ += dS K) reaches no row that does not see it (0 * NaN = NaN).
template <int C>
__device__ __forceinline__ void add_weighted(float (&acc)[kRows][C], int c, const float (&w)[kRows], float x,
                                             bool skip_zero) {
  if (skip_zero && !(fabsf(x) < INFINITY)) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (w[r] != 0.f) acc[r][c] += w[r] * x;
    }
  } else {
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r][c] += w[r] * x;
  }
}

// ------------------------------------------------------------------ forward

template <typename T, int Chunks>
__global__ void __launch_bounds__(kThreads) attn_fwd_simt_kernel(const AttentionParams p) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int hkv = h / (p.heads / p.kv_heads);
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBlockRows;
  const int d = p.head_dim;
  if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) write_rng_state(p);

  const MaskCtx mask = make_mask_ctx(p, b, h);
  const int q_rows = min(kBlockRows, p.q_len - m0);
  const int n_end = mask.key_end(m0, q_rows);  // keys [0, n_end) may be visible to this tile
  const int64_t out_row0 = static_cast<int64_t>(bh) * p.q_len + m0;

  float* sQ = reinterpret_cast<float*>(dev::dynamic_smem());  // [kBlockRows][d]
  float* sK = sQ + kBlockRows * d;                             // [kTile][d + 1]
  float* sP = sK + kTile * (d + 1);                            // [kWarps][kRows][kTile]
  load_rows<T>(sQ, d, p.q, b * p.q_batch_stride + h * p.q_head_stride + static_cast<int64_t>(m0) * p.q_row_stride,
               p.q_row_stride, kBlockRows, q_rows, d, tid);
  const int64_t k_off = b * p.k_batch_stride + hkv * p.k_head_stride;
  const int64_t v_off = b * p.v_batch_stride + hkv * p.v_head_stride;
  const DropoutCtx drop = make_dropout_ctx(p, b, h);
  const float scale_log2 = p.scale * kLog2e;

  float o[kRows][Chunks], row_max[kRows], row_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
#pragma unroll
    for (int c = 0; c < Chunks; ++c) o[r][c] = 0.f;
  }
  const float* q_rows_s = sQ + warp * kRows * d;
  float* p_s = sP + warp * kRows * kTile;

  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    __syncthreads();
    load_rows<T>(sK, d + 1, p.k, k_off + static_cast<int64_t>(n0) * p.k_row_stride, p.k_row_stride, kTile, n_end - n0,
                 d, tid);
    __syncthreads();
    const int j = n0 + lane;
    float s[kRows] = {};
    const float* kr = sK + lane * (d + 1);
    for (int c = 0; c < d; ++c) {
      const float kv = kr[c];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] += q_rows_s[r * d + c] * kv;
    }
    const bool key_vis = j < n_end && mask.key_ok(j);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = m0 + warp * kRows + r;
      float s2 = -INFINITY;
      if (key_vis) {
        s2 = s[r] * scale_log2;
        if (mask.has_pair_mask()) s2 = masked_score(s2, mask.pair_term(i, j));
      }
      const float mx = warp_max(fmaxf(row_max[r], s2));
      const SoftmaxStep<float> step = online_softmax_step(row_max[r], row_sum[r], mx, Exp2Fast{});
      const float pr = exp2_fast(s2 - step.ref);
      row_sum[r] += pr;
      float pd = pr;
      if (drop.enabled) pd = drop.keep(word_of(drop.block(i, j / 4), j % 4)) ? pr * drop.inv_keep : 0.f;
      p_s[r * kTile + lane] = pd;
#pragma unroll
      for (int c = 0; c < Chunks; ++c) o[r][c] *= step.factor;
    }
    __syncwarp();
    const int keys = min(kTile, n_end - n0);
    // Weights of 0 never multiply a value that may be NaN or infinite: a padded key (hidden
    // from every row) is skipped; in a tile with per-pair hidden weights (the causal
    // diagonal, an attn_mask) a non-finite value is added only to the rows that see it.
    const bool pair_tile = mask.kind != MaskKind::kNone || mask.crosses_diagonal(m0, n0 + kTile - 1);
    for (int jj = 0; jj < keys; ++jj) {
      if (mask.key_padding != nullptr && mask.key_padding[n0 + jj] != 0) continue;
      const int64_t vrow = v_off + static_cast<int64_t>(n0 + jj) * p.v_row_stride;
      float pw[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) pw[r] = p_s[r * kTile + jj];
#pragma unroll
      for (int c = 0; c < Chunks; ++c) {
        const int col = c * 32 + lane;
        if (col < d) {
          add_weighted(o, c, pw, IO<T>::load(p.v, vrow + col), pair_tile);
        }
      }
    }
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rl = warp * kRows + r;
    if (rl >= q_rows) continue;
    const float sum = warp_sum(row_sum[r]);
    const float inv = softmax_out_scale(sum);  // attention_math.h: 0 for a row that saw no key
    const int64_t row = out_row0 + rl;
#pragma unroll
    for (int c = 0; c < Chunks; ++c) {
      const int col = c * 32 + lane;
      if (col < d) IO<T>::store(p.out, row * d + col, o[r][c] * inv);
    }
    if (lane == 0) p.lse[row] = softmax_lse(row_max[r], sum, kLn2);
  }
}

// ------------------------------------------------------------------ backward: dQ

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_simt_kernel(const AttentionBackwardParams bp) {
  const AttentionParams& p = bp.fwd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int hkv = h / (p.heads / p.kv_heads);
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBlockRows;
  const int d = p.head_dim;

  const MaskCtx mask = make_mask_ctx(p, b, h);
  const int q_rows = min(kBlockRows, p.q_len - m0);
  const int n_end = mask.key_end(m0, q_rows);  // keys [0, n_end) may be visible to this tile
  const int64_t row0 = static_cast<int64_t>(bh) * p.q_len + m0;

  float* sQ = reinterpret_cast<float*>(dev::dynamic_smem());  // [kBlockRows][d]
  float* sdO = sQ + kBlockRows * d;                            // [kBlockRows][d]
  float* sK = sdO + kBlockRows * d;                            // [kTile][d + 1]
  float* sV = sK + kTile * (d + 1);                            // [kTile][d + 1]
  float* sS = sV + kTile * (d + 1);                            // [kWarps][kRows][kTile]
  load_rows<T>(sQ, d, p.q, b * p.q_batch_stride + h * p.q_head_stride + static_cast<int64_t>(m0) * p.q_row_stride,
               p.q_row_stride, kBlockRows, q_rows, d, tid);
  load_rows<T>(sdO, d, bp.dout,
               b * bp.dout_batch_stride + h * bp.dout_head_stride + static_cast<int64_t>(m0) * bp.dout_row_stride,
               bp.dout_row_stride, kBlockRows, q_rows, d, tid);
  const int64_t k_off = b * p.k_batch_stride + hkv * p.k_head_stride;
  const int64_t v_off = b * p.v_batch_stride + hkv * p.v_head_stride;
  const DropoutCtx drop = make_dropout_ctx(p, b, h);
  const float scale_log2 = p.scale * kLog2e;

  float lse2[kRows], delta[kRows], dq[kRows][kMaxChunks];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rl = warp * kRows + r;
    lse2[r] = rl < q_rows ? p.lse[row0 + rl] * kLog2e : INFINITY;
    delta[r] = rl < q_rows ? bp.delta[row0 + rl] : 0.f;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) dq[r][c] = 0.f;
  }
  const float* q_s = sQ + warp * kRows * d;
  const float* do_s = sdO + warp * kRows * d;
  float* ds_s = sS + warp * kRows * kTile;

  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    __syncthreads();
    load_rows<T>(sK, d + 1, p.k, k_off + static_cast<int64_t>(n0) * p.k_row_stride, p.k_row_stride, kTile, n_end - n0,
                 d, tid);
    load_rows<T>(sV, d + 1, p.v, v_off + static_cast<int64_t>(n0) * p.v_row_stride, p.v_row_stride, kTile, n_end - n0,
                 d, tid);
    __syncthreads();
    const int j = n0 + lane;
    float s[kRows] = {}, dp[kRows] = {};
    const float* kr = sK + lane * (d + 1);
    const float* vr = sV + lane * (d + 1);
    for (int c = 0; c < d; ++c) {
      const float kv = kr[c], vv = vr[c];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        s[r] += q_s[r * d + c] * kv;
        dp[r] += do_s[r * d + c] * vv;
      }
    }
    const bool key_vis = j < n_end && mask.key_ok(j);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = m0 + warp * kRows + r;
      float pr = 0.f;
      if (key_vis) {
        float s2 = s[r] * scale_log2;
        if (mask.has_pair_mask()) s2 = masked_score(s2, mask.pair_term(i, j));
        pr = softmax_prob_from_lse(s2, lse2[r], Exp2Fast{});
      }
      float dpv = dp[r];
      if (drop.enabled) dpv = drop.keep(word_of(drop.block(i, j / 4), j % 4)) ? dpv * drop.inv_keep : 0.f;
      ds_s[r * kTile + lane] = softmax_grad(pr, dpv, delta[r]);
    }
    __syncwarp();
    const int keys = min(kTile, n_end - n0);
    // As in the forward: dS = 0 never multiplies a NaN or infinite key (a padded key is
    // skipped; in a tile with per-pair hidden weights a non-finite key reaches only the rows
    // that see it).
    const bool pair_tile = mask.kind != MaskKind::kNone || mask.crosses_diagonal(m0, n0 + kTile - 1);
    for (int jj = 0; jj < keys; ++jj) {
      if (mask.key_padding != nullptr && mask.key_padding[n0 + jj] != 0) continue;
      float w[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) w[r] = ds_s[r * kTile + jj];
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) {
        const int col = c * 32 + lane;
        if (col < d) {
          add_weighted(dq, c, w, sK[jj * (d + 1) + col], pair_tile);
        }
      }
    }
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rl = warp * kRows + r;
    if (rl >= q_rows) continue;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int col = c * 32 + lane;
      if (col < d) IO<T>::store(bp.dq, (row0 + rl) * d + col, dq[r][c] * p.scale);
    }
  }
}

// ------------------------------------------------------------------ backward: dK, dV

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_simt_kernel(const AttentionBackwardParams bp) {
  const AttentionParams& p = bp.fwd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.x / p.kv_heads, hkv = blockIdx.x % p.kv_heads;
  const int n0 = blockIdx.y * kBlockRows;
  const int group = p.heads / p.kv_heads;
  const int d = p.head_dim;
  const int kv_limit = kv_limit_of(p, b);
  const int key_rows = min(kBlockRows, p.kv_len - n0);
  const int m_begin = first_query_of(p, n0);  // earlier queries see none of these keys
  const bool hidden = n0 >= kv_limit || m_begin >= p.q_len;
  const int64_t kv_row0 = (static_cast<int64_t>(b) * p.kv_heads + hkv) * p.kv_len + n0;
  if (hidden) {
    for (int idx = tid; idx < key_rows * d; idx += kThreads) {
      IO<T>::store(bp.dk, kv_row0 * d + idx, 0.f);
      IO<T>::store(bp.dv, kv_row0 * d + idx, 0.f);
    }
    return;
  }

  float* sK = reinterpret_cast<float*>(dev::dynamic_smem());  // [kBlockRows][d]
  float* sV = sK + kBlockRows * d;                             // [kBlockRows][d]
  float* sQ = sV + kBlockRows * d;                             // [kTile][d + 1]
  float* sdO = sQ + kTile * (d + 1);                           // [kTile][d + 1]
  float* sLse = sdO + kTile * (d + 1);                         // [kTile]
  float* sDelta = sLse + kTile;                                // [kTile]
  float* sP = sDelta + kTile;                                  // [kWarps][kRows][kTile]
  float* sS = sP + kWarps * kRows * kTile;                     // [kWarps][kRows][kTile]
  load_rows<T>(sK, d, p.k, b * p.k_batch_stride + hkv * p.k_head_stride + static_cast<int64_t>(n0) * p.k_row_stride,
               p.k_row_stride, kBlockRows, kv_limit - n0, d, tid);
  load_rows<T>(sV, d, p.v, b * p.v_batch_stride + hkv * p.v_head_stride + static_cast<int64_t>(n0) * p.v_row_stride,
               p.v_row_stride, kBlockRows, kv_limit - n0, d, tid);
  const float scale_log2 = p.scale * kLog2e;

  float dk[kRows][kMaxChunks], dv[kRows][kMaxChunks];
  bool key_vis[kRows];
  const MaskCtx mask0 = make_mask_ctx(p, b, hkv * group);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    key_vis[r] = mask0.key_ok(n0 + warp * kRows + r);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) dk[r][c] = dv[r][c] = 0.f;
  }
  const float* k_s = sK + warp * kRows * d;
  const float* v_s = sV + warp * kRows * d;
  float* p_s = sP + warp * kRows * kTile;
  float* ds_s = sS + warp * kRows * kTile;

  for (int gi = 0; gi < group; ++gi) {
    const int hq = hkv * group + gi;
    const MaskCtx mask = make_mask_ctx(p, b, hq);
    const DropoutCtx drop = make_dropout_ctx(p, b, hq);
    const int64_t qrow0 = (static_cast<int64_t>(b) * p.heads + hq) * p.q_len;
    for (int m0 = (m_begin / kTile) * kTile; m0 < p.q_len; m0 += kTile) {
      __syncthreads();
      load_rows<T>(sQ, d + 1, p.q, b * p.q_batch_stride + hq * p.q_head_stride + static_cast<int64_t>(m0) * p.q_row_stride,
                   p.q_row_stride, kTile, p.q_len - m0, d, tid);
      load_rows<T>(sdO, d + 1, bp.dout,
                   b * bp.dout_batch_stride + hq * bp.dout_head_stride + static_cast<int64_t>(m0) * bp.dout_row_stride,
                   bp.dout_row_stride, kTile, p.q_len - m0, d, tid);
      if (tid < kTile) {
        const bool ok = m0 + tid < p.q_len;
        sLse[tid] = ok ? p.lse[qrow0 + m0 + tid] * kLog2e : INFINITY;
        sDelta[tid] = ok ? bp.delta[qrow0 + m0 + tid] : 0.f;
      }
      __syncthreads();
      const int i = m0 + lane;
      float s[kRows] = {}, dp[kRows] = {};
      const float* qr = sQ + lane * (d + 1);
      const float* dor = sdO + lane * (d + 1);
      for (int c = 0; c < d; ++c) {
        const float qv = qr[c], dov = dor[c];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          s[r] += k_s[r * d + c] * qv;
          dp[r] += v_s[r * d + c] * dov;
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int j = n0 + warp * kRows + r;
        float pr = 0.f;
        if (key_vis[r]) {
          float s2 = s[r] * scale_log2;
          if (mask.has_pair_mask()) s2 = masked_score(s2, mask.pair_term(i, j));
          pr = softmax_prob_from_lse(s2, sLse[lane], Exp2Fast{});
        }
        float pd = pr, dpv = dp[r];
        if (drop.enabled) {
          const bool keep = drop.keep(word_of(drop.block(i, j / 4), j % 4));
          pd = keep ? pr * drop.inv_keep : 0.f;
          dpv = keep ? dpv * drop.inv_keep : 0.f;
        }
        p_s[r * kTile + lane] = pd;
        ds_s[r * kTile + lane] = softmax_grad(pr, dpv, sDelta[lane]);
      }
      __syncwarp();
      const int queries = min(kTile, p.q_len - m0);
      for (int ii = 0; ii < queries; ++ii) {
        float pw[kRows], sw[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          pw[r] = p_s[r * kTile + ii];
          sw[r] = ds_s[r * kTile + ii];
        }
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int col = c * 32 + lane;
          if (col < d) {
            const float dov = sdO[ii * (d + 1) + col], qv = sQ[ii * (d + 1) + col];
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              dv[r][c] += pw[r] * dov;
              dk[r][c] += sw[r] * qv;
            }
          }
        }
      }
      __syncwarp();
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rl = warp * kRows + r;
    if (rl >= key_rows) continue;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int col = c * 32 + lane;
      if (col < d) {
        IO<T>::store(bp.dk, (kv_row0 + rl) * d + col, dk[r][c] * p.scale);
        IO<T>::store(bp.dv, (kv_row0 + rl) * d + col, dv[r][c]);
      }
    }
  }
}

}  // namespace

template <typename T>
void run_fwd_simt(const AttentionParams& p, cudaStream_t stream) {
  const int d = p.head_dim;
  const size_t smem = (static_cast<size_t>(kBlockRows) * d + static_cast<size_t>(kTile) * (d + 1) +
                       kWarps * kRows * kTile) * sizeof(float);
  auto kernel = d <= kMaxSimtBackwardHeadDim ? attn_fwd_simt_kernel<T, kMaxSimtBackwardHeadDim / 32>
                                             : attn_fwd_simt_kernel<T, kMaxSimtHeadDim / 32>;
  check_cuda(set_max_dynamic_smem(kernel, smem), "attention forward (SIMT): shared memory size");
  const dim3 grid(p.batch * p.heads, (p.q_len + kBlockRows - 1) / kBlockRows);
  launch(kernel, grid, dim3(kThreads), smem, stream, p);
  check_launch("attention forward kernel (SIMT)");
}

template <typename T>
void run_bwd_simt(const AttentionBackwardParams& bp, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  const int d = p.head_dim;
  {
    const size_t smem = (2 * static_cast<size_t>(kBlockRows) * d + 2 * static_cast<size_t>(kTile) * (d + 1) +
                         kWarps * kRows * kTile) * sizeof(float);
    auto kernel = attn_bwd_dq_simt_kernel<T>;
    check_cuda(set_max_dynamic_smem(kernel, smem), "attention backward (SIMT): shared memory size");
    launch(kernel, dim3(p.batch * p.heads, (p.q_len + kBlockRows - 1) / kBlockRows), dim3(kThreads), smem, stream,
           bp);
    check_launch("attention backward dq kernel (SIMT)");
  }
  {
    const size_t smem = (2 * static_cast<size_t>(kBlockRows) * d + 2 * static_cast<size_t>(kTile) * (d + 1) +
                         2 * kTile + 2 * kWarps * kRows * kTile) * sizeof(float);
    auto kernel = attn_bwd_dkdv_simt_kernel<T>;
    check_cuda(set_max_dynamic_smem(kernel, smem), "attention backward (SIMT): shared memory size");
    launch(kernel, dim3(p.batch * p.kv_heads, (p.kv_len + kBlockRows - 1) / kBlockRows), dim3(kThreads), smem,
           stream, bp);
    check_launch("attention backward dk/dv kernel (SIMT)");
  }
}

template void run_fwd_simt<float>(const AttentionParams&, cudaStream_t);
template void run_fwd_simt<__nv_bfloat16>(const AttentionParams&, cudaStream_t);
template void run_fwd_simt<__half>(const AttentionParams&, cudaStream_t);
template void run_bwd_simt<float>(const AttentionBackwardParams&, cudaStream_t);
template void run_bwd_simt<__nv_bfloat16>(const AttentionBackwardParams&, cudaStream_t);
template void run_bwd_simt<__half>(const AttentionBackwardParams&, cudaStream_t);

}  // namespace vae_ext::attn
