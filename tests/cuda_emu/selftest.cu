// Kernels that test the CUDA emulation itself (tests/test_cuda_emulation.py):
// a tensor-core tiled matmul (cp.async, ldmatrix x2/x4 with and without .trans,
// mma.m16n8k16 bf16/f16), warp collectives, barriers, atomics, and kernels that
// break the rules on purpose. Written as ordinary CUDA: under nvcc it compiles
// for the device (it is not part of the extension build).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

#include "common/cuda_launch.cuh"
#include "common/cuda_primitives.cuh"
#include "selftest.h"

namespace vae_ext::emu_selftest {
namespace {

// ---------------------------------------------------------------- tensor-core matmul

constexpr int kBM = 64, kBN = 32, kBK = 32;  // block tile; 4 warps, each 16 rows x 32 cols
constexpr int kPad = 8;                      // smem row padding (elements): rows stay 16-byte aligned
constexpr int kThreads = 128;

// C[M, N] (fp32) = A[M, K] @ B where B is row-major [K, N] or, with b_nk, stored as [N, K]; the grid
// covers M / 64 x N / 32 blocks. M % 64 == 0, N % 32 == 0, K % 32 == 0.
template <typename T, bool kBf16>
__global__ void __launch_bounds__(kThreads)
    mma_matmul_kernel(const T* __restrict__ A, const T* __restrict__ B, float* __restrict__ C, int N, int K,
                      bool b_nk) {
  T* sA = reinterpret_cast<T*>(dev::dynamic_smem());                      // [kBM][kBK + kPad]
  T* sB = sA + kBM * (kBK + kPad);                                         // [kBK][kBN + kPad] or [kBN][kBK + kPad]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int lda = kBK + kPad;
  const int ldb = b_nk ? kBK + kPad : kBN + kPad;
  float acc[kBN / 8][4] = {};

  for (int k0 = 0; k0 < K; k0 += kBK) {
    // A tile: 64 rows x 32 cols = 256 chunks of 8 elements; B tile: 32 x 32 = 128 chunks.
    for (int c = tid; c < kBM * kBK / 8; c += kThreads) {
      const int r = c / (kBK / 8), col = (c % (kBK / 8)) * 8;
      dev::cp_async_16(sA + r * lda + col, A + static_cast<int64_t>(m0 + r) * K + k0 + col);
    }
    for (int c = tid; c < kBK * kBN / 8; c += kThreads) {
      if (b_nk) {
        const int r = c / (kBK / 8), col = (c % (kBK / 8)) * 8;  // r: n, col: k
        dev::cp_async_16(sB + r * ldb + col, B + static_cast<int64_t>(n0 + r) * K + k0 + col);
      } else {
        const int r = c / (kBN / 8), col = (c % (kBN / 8)) * 8;  // r: k, col: n
        dev::cp_async_16(sB + r * ldb + col, B + static_cast<int64_t>(k0 + r) * N + n0 + col);
      }
    }
    dev::cp_async_commit();
    dev::cp_async_wait<0>();
    __syncthreads();

    for (int kk = 0; kk < kBK; kk += 16) {
      // A fragment (16 x 16) of this warp's rows: lane l gives row l % 16, column kk + 8 * (l / 16).
      uint32_t a[4];
      dev::ldmatrix_x4(a, sA + (warp * 16 + lane % 16) * lda + kk + 8 * (lane / 16));
      for (int nt = 0; nt < kBN / 8; ++nt) {
        uint32_t b[2];
        if (b_nk) {
          // [n][k] storage: rows are n, so a plain ldmatrix gives (k 2t..2t+1, n g). Lanes 0-15 give the
          // rows; lanes 16-31 repeat them (ignored by .x2).
          dev::ldmatrix_x2(b, sB + (nt * 8 + lane % 8) * ldb + kk + 8 * ((lane / 8) % 2));
        } else if (nt % 2 == 0 && nt + 1 < kBN / 8 && nt < 2) {
          // Two n-tiles at once with .x4.trans: matrices (k 0-7, n-tile nt), (k 8-15, nt), (k 0-7, nt + 1),
          // (k 8-15, nt + 1).
          uint32_t b4[4];
          dev::ldmatrix_x4_trans(b4, sB + (kk + lane % 8 + 8 * ((lane / 8) % 2)) * ldb + nt * 8 + 8 * (lane / 16));
          float (&d0)[4] = acc[nt];
          float (&d1)[4] = acc[nt + 1];
          const uint32_t b0[2] = {b4[0], b4[1]}, b1[2] = {b4[2], b4[3]};
          if constexpr (kBf16) {
            dev::mma_m16n8k16_bf16(d0, a, b0, d0);
            dev::mma_m16n8k16_bf16(d1, a, b1, d1);
          } else {
            dev::mma_m16n8k16_f16(d0, a, b0, d0);
            dev::mma_m16n8k16_f16(d1, a, b1, d1);
          }
          ++nt;
          continue;
        } else {
          dev::ldmatrix_x2_trans(b, sB + (kk + lane % 8 + 8 * ((lane / 8) % 2)) * ldb + nt * 8);
        }
        if constexpr (kBf16) {
          dev::mma_m16n8k16_bf16(acc[nt], a, b, acc[nt]);
        } else {
          dev::mma_m16n8k16_f16(acc[nt], a, b, acc[nt]);
        }
      }
    }
    __syncthreads();
  }
  const int g = lane / 4, t = lane % 4;
  for (int nt = 0; nt < kBN / 8; ++nt) {
    float* c0 = C + static_cast<int64_t>(m0 + warp * 16 + g) * N + n0 + nt * 8 + 2 * t;
    float* c1 = c0 + 8 * static_cast<int64_t>(N);
    c0[0] = acc[nt][0];
    c0[1] = acc[nt][1];
    c1[0] = acc[nt][2];
    c1[1] = acc[nt][3];
  }
}

// out[2i] = pack(x[2i], x[2i+1]) as bf16, out[2i+1] as f16.
__global__ void pack_kernel(const float* x, uint32_t* out, int pairs) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < pairs) {
    out[2 * i] = dev::pack_bf16(x[2 * i], x[2 * i + 1]);
    out[2 * i + 1] = dev::pack_f16(x[2 * i], x[2 * i + 1]);
  }
}

// ---------------------------------------------------------------- warp collectives, barriers, atomics

// One row of kWarpOpsCols results per thread; see tests/test_cuda_emulation.py for the expected values.
__global__ void warp_ops_kernel(const float* x, float* out, float* fsum, int* isum, unsigned long long* usum,
                                double* dsum, int* imax, unsigned* cas_counter) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  const int gtid = blockIdx.x * nthreads + tid;
  const int lane = tid % 32;
  const float v = x[gtid];
  float* o = out + static_cast<int64_t>(gtid) * kWarpOpsCols;
  o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3);
  o[2] = __shfl_down_sync(0xffffffffu, v, 5);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 9);
  o[4] = __shfl_xor_sync(0xffffffffu, v, 2, 8);   // width 8
  o[5] = __shfl_sync(0xffffffffu, v, 17, 16);     // width 16: lane 1 of each half
  o[6] = static_cast<float>(__shfl_down_sync(0xffffffffu, static_cast<double>(v) * 3.0, 1));  // 8-byte value
  const unsigned ballot = __ballot_sync(0xffffffffu, v > 0.0f);
  o[7] = static_cast<float>(ballot & 0xffffu);
  o[8] = static_cast<float>(ballot >> 16);
  o[9] = static_cast<float>(__any_sync(0xffffffffu, v > 2.5f));
  o[10] = static_cast<float>(__all_sync(0xffffffffu, v > -2.5f));
  o[11] = static_cast<float>(__reduce_add_sync(0xffffffffu, lane));
  o[12] = static_cast<float>(__reduce_max_sync(0xffffffffu, static_cast<int>(v * 100.0f)));
  // Warp sum by butterfly.
  float s = v;
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  o[13] = s;
  // Half-warp shuffle with a partial mask: lanes 0-15 and 16-31 run separate collectives.
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  o[14] = __shfl_sync(half, v, (lane + 1) % 16 + (lane & 16));
  // Block sum through static shared memory and barriers.
  __shared__ float partial[32];
  if (lane == 0) partial[tid / 32] = s;
  __syncthreads();
  float block_sum = 0.0f;
  for (int w = 0; w < (nthreads + 31) / 32; ++w) block_sum += partial[w];
  o[15] = block_sum;
  o[16] = static_cast<float>(__syncthreads_count(v > 0.0f));
  o[17] = static_cast<float>(__syncthreads_and(v > -10.0f));
  o[18] = static_cast<float>(__syncthreads_or(v > 2.9f));
  // Atomics on global counters.
  atomicAdd(fsum, v);
  atomicAdd(isum, 1);
  atomicAdd(usum, 2ull);
  atomicAdd(dsum, static_cast<double>(v));
  atomicMax(imax, static_cast<int>(v * 1000.0f));
  unsigned old = *cas_counter, assumed;
  do {
    assumed = old;
    old = atomicCAS(cas_counter, assumed, assumed + 3u);
  } while (old != assumed);
  o[19] = static_cast<float>(__umulhi(0x80000000u + static_cast<unsigned>(lane), 6u));
  o[20] = __uint_as_float(__float_as_uint(v));
  o[21] = static_cast<float>(__popc(static_cast<unsigned>(lane)) + 100 * __ffs(lane));
  o[22] = __expf(v);
  o[23] = static_cast<float>(__shfl_xor_sync(0xffffffffu, v > 0.0f, 1));  // bool: shuffled as int
  o[24] = __half2float(__shfl_xor_sync(0xffffffffu, __float2half_rn(v), 3));
  __syncwarp();
}

// A partial last warp (blockDim.x = 48): lanes that exist take part, the rest do not exist.
__global__ void partial_warp_kernel(const float* x, float* out) {
  const int tid = threadIdx.x, lane = tid % 32;
  const float v = x[tid];
  float s = v;
  for (int off = 1; off < 16; off *= 2) s += __shfl_xor_sync(0xffffffffu, s, off);  // 16-lane groups are complete
  out[3 * tid] = s;
  out[3 * tid + 1] = __shfl_down_sync(0xffffffffu, v, 4);
  out[3 * tid + 2] = static_cast<float>(__popc(__ballot_sync(0xffffffffu, true)) + 0 * lane);
}

// Lanes that exit leave later shuffles; reading an exited lane gives all ones bits (NaN).
__global__ void exited_lanes_kernel(const float* x, float* out) {
  const int lane = threadIdx.x % 32;
  if (lane >= 24) return;
  const float v = x[threadIdx.x];
  out[2 * threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 4);  // lanes 20-23 read exited lanes 24-27
  out[2 * threadIdx.x + 1] = static_cast<float>(__popc(__ballot_sync(0xffffffffu, true)));
}

// __nanosleep lets the other threads run: thread 0 waits for a flag thread 1 sets later.
__global__ void spin_wait_kernel(int* flag, int* out) {
  if (threadIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) __nanosleep(100);
    out[0] = 1;
  } else if (threadIdx.x == 1) {
    for (int i = 0; i < 10; ++i) __nanosleep(100);
    atomicExch(flag, 1);
  }
}

// ---------------------------------------------------------------- kernels that break the rules

__global__ void spin_forever_kernel(int* flag) {  // waits for a flag that no thread of the block sets
  if (threadIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) __nanosleep(100);
  }
}

__global__ void smem_write_overrun_kernel(int bytes) { dev::dynamic_smem()[bytes + threadIdx.x % 4] = 1; }

__global__ void smem_read_overrun_kernel(int bytes, float* out) {
  out[threadIdx.x] = reinterpret_cast<const float*>(dev::dynamic_smem() + bytes)[threadIdx.x];
}

__global__ void smem_write_before_start_kernel() { dev::dynamic_smem()[-1 - static_cast<int>(threadIdx.x % 8)] = 1; }

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

__global__ void skipped_barrier_kernel(float* out) {
  if (threadIdx.x >= 64) return;  // the other threads then wait at the barrier forever
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // lanes 16-31 go to __syncwarp instead
  __syncwarp();
  out[threadIdx.x] = v;
}

__global__ void partial_mma_kernel(float* out) {
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
  if (threadIdx.x % 32 == 31) return;
  dev::mma_m16n8k16_bf16(c, a, b, c);
  out[threadIdx.x] = c[0];
}

__global__ void mma_partial_warp_kernel(float* out) {  // blockDim 48: warp 1 has 16 lanes
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
  dev::mma_m16n8k16_f16(c, a, b, c);
  out[threadIdx.x] = c[0];
}

__global__ void misaligned_ldmatrix_kernel(float* out) {
  __shared__ __align__(16) uint16_t tile[8 * 16 + 8];
  for (int i = threadIdx.x; i < 8 * 16 + 8; i += blockDim.x) tile[i] = static_cast<uint16_t>(i);
  __syncthreads();
  uint32_t r[2];
  dev::ldmatrix_x2(r, tile + 1 + (threadIdx.x % 16) * 8);  // 2-byte aligned rows
  out[threadIdx.x] = static_cast<float>(r[0]);
}

__global__ void global_read_overrun_kernel(const float* in, float* out, int n) {
  out[threadIdx.x] = in[n + threadIdx.x];
}

__global__ void global_write_overrun_kernel(float* out, int n) { out[n + threadIdx.x % 2] = 1.0f; }

__global__ void trap_kernel(float* out) {
  out[threadIdx.x] = 1.0f;
  if (threadIdx.x == 37) __trap();
}

__global__ void divide_by_zero_kernel(const int* in, int* out) { out[threadIdx.x] = 100 / in[threadIdx.x]; }

__global__ void assert_kernel(float* out) {
  assert(threadIdx.x < 40);
  out[threadIdx.x] = 1.0f;
}

__device__ __noinline__ int deep_recursion(int depth) {
  volatile char frame[4096];
  frame[0] = static_cast<char>(depth);
  frame[4095] = static_cast<char>(depth);
  return depth == 0 ? frame[0] : deep_recursion(depth - 1) + frame[4095];
}

__global__ void stack_overflow_kernel(int depth, int* out) { out[threadIdx.x] = deep_recursion(depth); }

// Thread t writes slot t, then reads slot t + 1 with (barrier) or without (race) a __syncthreads between.
__global__ void neighbour_kernel(float* out, bool barrier) {
  float* slot = reinterpret_cast<float*>(dev::dynamic_smem());
  const int t = threadIdx.x, n = blockDim.x;
  slot[t] = static_cast<float>(blockIdx.x * n + t);
  if (barrier) __syncthreads();
  out[blockIdx.x * n + t] = slot[(t + 1) % n];
}

// Each thread copies one 16-byte chunk with cp.async, optionally without waiting for it.
__global__ void cp_async_kernel(const float* in, float* out, bool wait, bool pred) {
  float* s = reinterpret_cast<float*>(dev::dynamic_smem());
  const int t = threadIdx.x;
  dev::cp_async_16(s + 4 * t, in + 4 * t, pred);
  dev::cp_async_commit();
  if (wait) dev::cp_async_wait<0>();
  __syncthreads();
  const int src = (t + 1) % blockDim.x;  // read another thread's chunk
  for (int i = 0; i < 4; ++i) out[4 * t + i] = s[4 * src + i];
}

__global__ void big_smem_kernel(float* out, int floats) {
  float* s = reinterpret_cast<float*>(dev::dynamic_smem());
  for (int i = threadIdx.x; i < floats; i += blockDim.x) s[i] = static_cast<float>(i);
  __syncthreads();
  float acc = 0.0f;
  for (int i = threadIdx.x; i < floats; i += blockDim.x) acc += s[floats - 1 - i];
  atomicAdd(out, acc);
}

__global__ void noop_kernel(int* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = static_cast<int>(gridDim.x * blockDim.x * blockDim.y * blockDim.z);
}


// ---------------------------------------------------------------- planted races (and their fixed twins)
// Each case is a pattern compute-sanitizer's racecheck reports; with fixed = true the missing
// synchronisation is there and the kernel is clean. Block of 64 threads (two warps).
__global__ void race_kernel(int what, bool fixed, float* out) {
  float* s = reinterpret_cast<float*>(dev::dynamic_smem());
  __shared__ float st[64];
  const int t = threadIdx.x;
  float r = 0.0f;
  switch (what) {
    case 0:  // read after write across warps: t reads what t ^ 32 wrote
      s[t] = static_cast<float>(t);
      if (fixed) __syncthreads();
      r = s[t ^ 32];
      break;
    case 1:  // write after read: t reads slot t + 1, then overwrites its own slot
      s[t] = 1.0f;
      __syncthreads();
      r = s[(t + 1) % 64];
      if (fixed) __syncthreads();
      s[t] = 2.0f;
      break;
    case 2:  // write after write: two threads store to one word
      s[fixed ? t : t / 2] = static_cast<float>(t);
      r = 1.0f;
      break;
    case 3:  // within a warp: lane reads lane ^ 1's value; __syncwarp is what orders them
      s[t] = static_cast<float>(t);
      if (fixed) __syncwarp();
      r = s[t ^ 1];
      break;
    case 4:  // a __syncwarp whose mask leaves out the writer does not order the access
      if (t < 32) {
        if (t >= 16) s[t] = static_cast<float>(t);  // lanes 16-31 write, lanes 0-15 read
        __syncwarp(fixed ? 0xffffffffu : (t < 16 ? 0x0000ffffu : 0xffff0000u));
        if (t < 16) r = s[t + 16];
      }
      break;
    case 5:  // cp.async that is not waited for before the barrier: other threads read it too early
      dev::cp_async_16(s + 4 * t, out + 4 * t, true);
      dev::cp_async_commit();
      if (fixed) dev::cp_async_wait<0>();
      __syncthreads();
      r = s[4 * ((t + 1) % 64)];
      break;
    case 6:  // static __shared__ memory
      st[t] = static_cast<float>(t);
      if (fixed) __syncthreads();
      r = st[63 - t];
      break;
    case 7:  // ldmatrix of rows other lanes stored (shared-memory reads by the emulator itself)
      {
        uint16_t* h = reinterpret_cast<uint16_t*>(s);
        for (int i = 0; i < 8; ++i) h[t * 8 + i] = static_cast<uint16_t>(t + i);
        if (fixed) __syncthreads();
        uint32_t reg[4];
        dev::ldmatrix_x4(reg, h + ((t + 8) % 64) * 8);
        r = static_cast<float>(reg[0] & 0xffffu);
      }
      break;
    case 8:  // shared-memory atomics never race with each other
      if (t == 0) s[0] = 0.0f;
      __syncthreads();
      atomicAdd(s, 1.0f);
      __syncthreads();
      r = s[0];
      break;
  }
  out[t] = r;
}

// ---------------------------------------------------------------- access patterns for the counters
// 32 threads: pattern 0 coalesced float loads, 1 stride-2 loads, 2 shared stores with a stride of 32
// words (32-way bank conflict), 3 conflict-free float4 shared stores, 4 16-byte global loads.
__global__ void pattern_kernel(int pattern, const float* in, float* out) {
  float* s = reinterpret_cast<float*>(dev::dynamic_smem());
  const int t = threadIdx.x;
  float v = 0.0f;
  switch (pattern) {
    case 0: v = in[t]; break;
    case 1: v = in[2 * t]; break;
    case 2: s[32 * t] = 1.0f; break;
    case 3: reinterpret_cast<float4*>(s)[t] = make_float4(1.0f, 2.0f, 3.0f, 4.0f); break;
    case 4: { const float4 q = reinterpret_cast<const float4*>(in)[t]; v = q.x + q.y + q.z + q.w; } break;
  }
  out[t] = v;
}
}  // namespace

void mma_matmul(const void* A, const void* B, float* C, int M, int N, int K, bool bf16, bool b_nk) {
  const dim3 grid(N / kBN, M / kBM);
  const size_t smem = sizeof(uint16_t) * (kBM * (kBK + kPad) + (b_nk ? kBN * (kBK + kPad) : kBK * (kBN + kPad)));
  if (bf16) {
    launch(mma_matmul_kernel<__nv_bfloat16, true>, grid, kThreads, smem, nullptr,
           static_cast<const __nv_bfloat16*>(A), static_cast<const __nv_bfloat16*>(B), C, N, K, b_nk);
  } else {
    launch(mma_matmul_kernel<__half, false>, grid, kThreads, smem, nullptr, static_cast<const __half*>(A),
           static_cast<const __half*>(B), C, N, K, b_nk);
  }
}

void pack(const float* x, uint32_t* out, int pairs) {
  launch(pack_kernel, (pairs + 63) / 64, 64, 0, nullptr, x, out, pairs);
}

void warp_ops(const float* x, float* out, float* fsum, int* isum, unsigned long long* usum, double* dsum, int* imax,
              unsigned* cas_counter, int blocks, int bx, int by, int bz) {
  launch(warp_ops_kernel, blocks, dim3(bx, by, bz), 0, nullptr, x, out, fsum, isum, usum, dsum, imax, cas_counter);
}

void partial_warp(const float* x, float* out) { launch(partial_warp_kernel, 1, 48, 0, nullptr, x, out); }

void exited_lanes(const float* x, float* out) { launch(exited_lanes_kernel, 1, 32, 0, nullptr, x, out); }

void spin_wait(int* flag, int* out) { launch(spin_wait_kernel, 1, 64, 0, nullptr, flag, out); }

void neighbours(float* out, int blocks, int threads, bool barrier) {
  launch(neighbour_kernel, blocks, threads, threads * sizeof(float), nullptr, out, barrier);
}

void race(int what, bool fixed, float* out) { launch(race_kernel, 1, 64, 64 * 16, nullptr, what, fixed, out); }

void pattern(int which, const float* in, float* out) { launch(pattern_kernel, 1, 32, 32 * 32 * 4, nullptr, which, in, out); }

void cp_async_copy(const float* in, float* out, int threads, bool wait, bool pred) {
  launch(cp_async_kernel, 1, threads, threads * 16, nullptr, in, out, wait, pred);
}

void big_smem(float* out, int floats, bool opt_in) {
  if (opt_in) {
    const cudaError_t err = set_max_dynamic_smem(big_smem_kernel, floats * sizeof(float));
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear it
      throw std::runtime_error(std::string("set_max_dynamic_smem failed: ") + cudaGetErrorString(err));
    }
  }
  launch(big_smem_kernel, 2, 256, floats * sizeof(float), nullptr, out, floats);
}

void noop(int* out, int blocks, int bx, int by, int bz, int smem) {
  launch(noop_kernel, blocks, dim3(bx, by, bz), smem, nullptr, out);
}

void misbehave(const char* what, float* out, const float* in, int* iout, const int* iin, int n) {
  const std::string w = what;
  if (w == "smem_write_overrun") {
    launch(smem_write_overrun_kernel, 1, 64, 100, nullptr, 100);
  } else if (w == "smem_read_overrun") {
    launch(smem_read_overrun_kernel, 1, 64, 256, nullptr, 256, out);
  } else if (w == "smem_write_before_start") {
    launch(smem_write_before_start_kernel, 1, 64, 256, nullptr);
  } else if (w == "divergent_barrier") {
    launch(divergent_barrier_kernel, 1, 64, 0, nullptr, out);
  } else if (w == "skipped_barrier") {
    launch(skipped_barrier_kernel, 1, 128, 0, nullptr, out);
  } else if (w == "divergent_shuffle") {
    launch(divergent_shuffle_kernel, 1, 64, 0, nullptr, out);
  } else if (w == "partial_mma") {
    launch(partial_mma_kernel, 1, 64, 0, nullptr, out);
  } else if (w == "mma_partial_warp") {
    launch(mma_partial_warp_kernel, 1, 48, 0, nullptr, out);
  } else if (w == "misaligned_ldmatrix") {
    launch(misaligned_ldmatrix_kernel, 1, 32, 0, nullptr, out);
  } else if (w == "global_read_overrun") {
    launch(global_read_overrun_kernel, 1, 32, 0, nullptr, in, out, n);
  } else if (w == "global_write_overrun") {
    launch(global_write_overrun_kernel, 1, 32, 0, nullptr, out, n);
  } else if (w == "trap") {
    launch(trap_kernel, 2, 64, 0, nullptr, out);
  } else if (w == "spin_forever") {
    launch(spin_forever_kernel, 1, 64, 0, nullptr, iout);
  } else if (w == "assert") {
    launch(assert_kernel, 1, 64, 0, nullptr, out);
  } else if (w == "divide_by_zero") {
    launch(divide_by_zero_kernel, 1, 32, 0, nullptr, iin, iout);
  } else if (w == "stack_overflow") {
    launch(stack_overflow_kernel, 1, 32, 0, nullptr, n, iout);
  } else {
    throw std::invalid_argument("unknown misbehaviour " + w);
  }
}

}  // namespace vae_ext::emu_selftest
