// masked_attention on CUDA: the entry points of attention.h. Chooses the path
// for (dtype, head dim), lays out the backward's workspace, and runs the small
// backward kernels (delta = rowsum(dO ∘ O) with the padded lse / delta copies,
// and the fp32 -> dtype conversion of the atomically accumulated dQ).
//
// Paths (see the design note in attention_cuda.cuh):
//   bfloat16 / float16, D <= 128   tensor cores, D padded up to 32 / 64 / 96 / 128
//   bfloat16 / float16, D <= 256   SIMT (FFMA, float32 arithmetic)
//   float32, D <= 256              SIMT (FFMA, float32 arithmetic; no TF32, no cast)
//   float64, or D > 256            not handled here: vae_ext.ops.attention.supports
//                                  routes them to the PyTorch reference
#include "attention/attention.h"

#include <stdexcept>
#include <string>

#include "attention/attention_cuda.h"
#include "attention/attention_cuda_common.cuh"

namespace vae_ext {
namespace attn {
namespace {

bool is16(DType t) { return t == DType::kBFloat16 || t == DType::kFloat16; }

// Opt-in shared memory per block of the current device (cached per device).
size_t device_smem_optin() {
  static int cache[64] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) dev = 0;
  if (cache[dev] == 0) {
    int value = 0;
    check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
               "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    cache[dev] = value;
  }
  return static_cast<size_t>(cache[dev]);
}

bool tensor_core_path(const AttentionParams& p) {
  return is16(p.dtype) && p.head_dim <= kMaxTensorCoreHeadDim &&
         tc_smem_bytes(padded_head_dim(p.head_dim)) <= device_smem_optin();
}

void check_supported(const AttentionParams& p, const char* what, bool backward) {
  if (p.dtype == DType::kFloat64) {
    throw std::invalid_argument(std::string("vae_ext: ") + what + ": float64 has no CUDA kernel (the Python API "
                                "runs the reference for it)");
  }
  const int max_dim = backward ? kMaxSimtBackwardHeadDim : kMaxSimtHeadDim;
  if (p.head_dim > max_dim) {
    throw std::invalid_argument(std::string("vae_ext: ") + what + ": head dim " + std::to_string(p.head_dim) +
                                " > " + std::to_string(max_dim) + " has no CUDA kernel");
  }
  // Query (and, SIMT, key) tiles index gridDim.y (<= 65535).
  const int64_t rows_per_block = tensor_core_path(p) ? 128 : 16;
  if ((p.q_len + rows_per_block - 1) / rows_per_block > 65535 ||
      (p.kv_len + rows_per_block - 1) / rows_per_block > 65535) {
    throw std::invalid_argument(std::string("vae_ext: ") + what + ": sequence length too long for the CUDA grid");
  }
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0) {
    throw std::invalid_argument(std::string("vae_ext: ") + what + ": heads must be a multiple of kv_heads");
  }
}

template <typename F>
void dispatch_head_dim(int d, F&& f) {
  switch (padded_head_dim(d)) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    default: f(std::integral_constant<int, 128>{}); break;
  }
}

template <typename F>
void dispatch_16bit(DType t, F&& f) {
  if (t == DType::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    f(__half{});
  }
}

// Workspace layout (bytes, every region 256-byte aligned).
struct WsLayout {
  size_t lse2 = 0, delta = 0, dq = 0, total = 0;
  int64_t q_pad = 0;
  int dq_ld = 0;
  bool atomic_dq = false;
};

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

WsLayout ws_layout(const AttentionBackwardParams& bp) {
  const AttentionParams& p = bp.fwd;
  WsLayout w;
  if (!tensor_core_path(p)) return w;  // the SIMT kernels read lse and delta directly
  const int64_t planes = static_cast<int64_t>(p.batch) * p.heads;
  w.q_pad = (static_cast<int64_t>(p.q_len) + 127) / 128 * 128;
  w.dq_ld = padded_head_dim(p.head_dim);
  w.atomic_dq = !bp.deterministic;
  w.lse2 = 0;
  w.delta = align256(w.lse2 + static_cast<size_t>(planes * w.q_pad) * sizeof(float));
  w.dq = align256(w.delta + static_cast<size_t>(planes * w.q_pad) * sizeof(float));
  w.total = w.dq;
  if (w.atomic_dq) w.total = align256(w.dq + static_cast<size_t>(planes * p.q_len) * w.dq_ld * sizeof(float));
  return w;
}

// delta = rowsum(dO ∘ O) (into bp.delta and, for the tensor-core path, the padded
// copy), lse * log2(e) into the padded copy (+inf / 0 on pad rows), and zeroed
// dQ accumulator rows. One warp per row.
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_preprocess_kernel(const AttentionBackwardParams bp, const BwdWorkspace ws,
                                                                  int rows) {
  const AttentionParams& p = bp.fwd;
  const int lane = threadIdx.x & 31;
  const int64_t w = blockIdx.x * static_cast<int64_t>(8) + (threadIdx.x >> 5);  // one warp per (b, h, row)
  if (w >= static_cast<int64_t>(p.batch) * p.heads * rows) return;
  const int bh = static_cast<int>(w / rows), i = static_cast<int>(w % rows);
  const int b = bh / p.heads, h = bh % p.heads;
  const int d = p.head_dim;
  const int64_t row = static_cast<int64_t>(bh) * p.q_len + i;
  if (i < p.q_len) {
    const int64_t o_off = row * d;
    const int64_t do_off = b * bp.dout_batch_stride + h * bp.dout_head_stride + static_cast<int64_t>(i) * bp.dout_row_stride;
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) acc += IO<T>::load(bp.dout, do_off + c) * IO<T>::load(p.out, o_off + c);
    acc = warp_sum(acc);
    if (lane == 0) {
      bp.delta[row] = acc;
      if (ws.delta != nullptr) {
        ws.delta[bh * ws.q_pad + i] = acc;
        ws.lse2[bh * ws.q_pad + i] = p.lse[row] * kLog2e;  // +inf stays +inf
      }
    }
    if (ws.dq_accum != nullptr) {
      float* dq = ws.dq_accum + row * ws.dq_ld;
      for (int c = lane; c < ws.dq_ld; c += 32) dq[c] = 0.f;
    }
  } else if (lane == 0) {  // pad rows of the tensor-core path
    ws.delta[bh * ws.q_pad + i] = 0.f;
    ws.lse2[bh * ws.q_pad + i] = INFINITY;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_convert_dq_kernel(const AttentionBackwardParams bp, const BwdWorkspace ws,
                                                                  int64_t n) {
  const int d = bp.fwd.head_dim;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / d;
    IO<T>::store(bp.dq, idx, ws.dq_accum[row * ws.dq_ld + (idx - row * d)]);
  }
}

template <typename T>
void run_preprocess(const AttentionBackwardParams& bp, const BwdWorkspace& ws, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  const int rows = ws.lse2 != nullptr ? static_cast<int>(ws.q_pad) : p.q_len;
  const int64_t warps = static_cast<int64_t>(p.batch) * p.heads * rows;
  launch(attn_bwd_preprocess_kernel<T>, dim3(static_cast<unsigned>((warps + 7) / 8)), dim3(256), 0, stream, bp, ws,
         rows);
  check_launch("attention backward preprocessing kernel");
}

}  // namespace
}  // namespace attn

void attention_forward_cuda(const AttentionParams& p, CUstream_st* stream) {
  using namespace attn;
  check_supported(p, "attention forward", false);
  if (static_cast<int64_t>(p.batch) * p.heads * p.q_len == 0) return;
  if (tensor_core_path(p)) {
    dispatch_16bit(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      dispatch_head_dim(p.head_dim, [&](auto dim) { run_fwd_tc<T, decltype(dim)::value>(p, stream); });
    });
  } else if (p.dtype == DType::kFloat32) {
    run_fwd_simt<float>(p, stream);
  } else if (p.dtype == DType::kBFloat16) {
    run_fwd_simt<__nv_bfloat16>(p, stream);
  } else {
    run_fwd_simt<__half>(p, stream);
  }
}

size_t attention_backward_cuda_workspace_bytes(const AttentionBackwardParams& p) { return attn::ws_layout(p).total; }

void attention_backward_cuda(const AttentionBackwardParams& bp, CUstream_st* stream) {
  using namespace attn;
  const AttentionParams& p = bp.fwd;
  check_supported(p, "attention backward", true);
  if (static_cast<int64_t>(p.batch) * p.heads * p.q_len == 0) return;
  if (p.kv_len == 0) {  // no key: every row is empty, dq = 0 (dk, dv are empty)
    const size_t bytes = static_cast<size_t>(p.batch) * p.heads * p.q_len * p.head_dim * (p.dtype == DType::kFloat32 ? 4 : 2);
    check_cuda(cudaMemsetAsync(bp.dq, 0, bytes, stream), "attention backward: zeroing dq");
    return;
  }
  const WsLayout lay = ws_layout(bp);
  BwdWorkspace ws{};
  if (lay.total > 0) {
    if (bp.workspace == nullptr) throw std::invalid_argument("vae_ext: attention backward: missing workspace");
    char* base = static_cast<char*>(bp.workspace);
    ws.lse2 = reinterpret_cast<float*>(base + lay.lse2);
    ws.delta = reinterpret_cast<float*>(base + lay.delta);
    ws.dq_accum = lay.atomic_dq ? reinterpret_cast<float*>(base + lay.dq) : nullptr;
    ws.q_pad = lay.q_pad;
    ws.dq_ld = lay.dq_ld;
  }
  if (tensor_core_path(p)) {
    dispatch_16bit(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      run_preprocess<T>(bp, ws, stream);
      dispatch_head_dim(p.head_dim, [&](auto dim) { run_bwd_tc<T, decltype(dim)::value>(bp, ws, stream); });
      if (ws.dq_accum != nullptr) {
        const int64_t n = static_cast<int64_t>(p.batch) * p.heads * p.q_len * p.head_dim;
        if (n > 0) {
          launch(attn_bwd_convert_dq_kernel<T>, dim3(grid_size(n, 256)), dim3(256), 0, stream, bp, ws, n);
          check_launch("attention backward dq conversion kernel");
        }
      }
    });
  } else if (p.dtype == DType::kFloat32) {
    run_preprocess<float>(bp, ws, stream);
    run_bwd_simt<float>(bp, stream);
  } else if (p.dtype == DType::kBFloat16) {
    run_preprocess<__nv_bfloat16>(bp, ws, stream);
    run_bwd_simt<__nv_bfloat16>(bp, stream);
  } else {
    run_preprocess<__half>(bp, ws, stream);
    run_bwd_simt<__half>(bp, stream);
  }
}

}  // namespace vae_ext
