// CPU emulation of the CUDA execution model (VAE_EXT_CUDA_EMULATION).
//
// The project's .cu sources build as plain C++ (g++ -std=c++20, the CUDA
// headers in host mode) against this header and run their kernels on the CPU
// with CUDA semantics, so tests without a GPU can run the real CUDA kernels.
// The runtime lives in tests/cuda_emu/cuda_emu.cpp; tests/cuda_emu/ builds the .cu
// sources and this runtime into a torch extension (see tests/cuda_emu/README.md).
//
// Model:
//  - Every CUDA thread of a block is a fiber with its own stack (cooperative
//    user-space context switching on the calling OS thread). A thread runs until
//    it reaches a synchronisation point (__syncthreads, a warp collective) or
//    exits; then the next runnable thread of the block runs. Blocks of a grid run
//    one after another, forward thread order on even blocks and reverse order on
//    odd ones, so a missing barrier shows up as a wrong result.
//  - __shared__ variables are function statics (shared by the threads of the
//    block; blocks run one at a time). Dynamic shared memory (dev::dynamic_smem())
//    is exactly smem_bytes long, followed by an inaccessible guard page and
//    preceded by canary bytes, and is filled with 0xFF bytes (NaN) before every
//    block.
//  - Warp collectives (shuffles, votes, __syncwarp, ldmatrix, mma) exchange the
//    lanes' operands when every lane of the mask has arrived; lanes that exited
//    leave the mask of shuffles and votes (a value read from them is all ones bits,
//    NaN), and mma / ldmatrix need all 32 lanes. A barrier or collective that can
//    never complete (divergence, threads exited, mismatched masks) is an error
//    naming who waits where, never a hang.
//  - cp.async reads global memory when issued and writes shared memory when its
//    group completes (cp_async_wait<N>, or thread exit), as asynchronously as the
//    hardware allows, so a missing wait or barrier reads stale / poison data.
//  - Errors (bad launch configuration, shared memory overrun, a fault inside a
//    kernel, a trap, a divergent barrier...) abort the launch: vae_ext::launch
//    throws std::runtime_error with the block, the thread and what went wrong.
//  - "Device memory" is host memory. The device reports itself as an H100 (sm_90,
//    132 SMs, 227 KB of opt-in dynamic shared memory per block).
//
// Only what is declared here (and the host-callable parts of cuda_fp16.h /
// cuda_bf16.h) is available to kernels; anything else fails to compile, and a
// CUDA runtime function the emulator does not provide fails the harness build
// (it checks the built library for undefined cuda* symbols).
//
// This header must come before any CUDA header in an emulated translation unit:
// the harness compiles every .cu with `#include "cuda_emu.h"` first.
#ifndef VAE_EXT_COMMON_CUDA_EMU_H_
#define VAE_EXT_COMMON_CUDA_EMU_H_

#if !defined(VAE_EXT_CUDA_EMULATION)
#error "tests/cuda_emu/cuda_emu.h is only for builds with -DVAE_EXT_CUDA_EMULATION"
#endif
#if defined(__CUDACC__)
#error "the CUDA emulation is built by a host C++ compiler (g++ -x c++), not nvcc"
#endif
#if defined(__CUDA_RUNTIME_H__) || defined(__CUDA_RUNTIME_API_H__)
#error "tests/cuda_emu/cuda_emu.h must be included before any CUDA header (the harness force-includes it first)"
#endif
#if defined(CUDA_API_PER_THREAD_DEFAULT_STREAM)
#error "the CUDA emulation does not support CUDA_API_PER_THREAD_DEFAULT_STREAM"
#endif

// The CUDA runtime functions the emulator implements (tests/cuda_emu/cuda_emu.cpp), renamed
// so that they never bind to a real libcudart loaded in the same process.
#define cudaGetLastError vae_ext_emu_cudaGetLastError
#define cudaPeekAtLastError vae_ext_emu_cudaPeekAtLastError
#define cudaGetErrorString vae_ext_emu_cudaGetErrorString
#define cudaGetErrorName vae_ext_emu_cudaGetErrorName
#define cudaGetDevice vae_ext_emu_cudaGetDevice
#define cudaSetDevice vae_ext_emu_cudaSetDevice
#define cudaGetDeviceCount vae_ext_emu_cudaGetDeviceCount
#define cudaDeviceGetAttribute vae_ext_emu_cudaDeviceGetAttribute
#define cudaFuncSetAttribute vae_ext_emu_cudaFuncSetAttribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor vae_ext_emu_cudaOccupancyMaxActiveBlocksPerMultiprocessor
#define cudaMemset vae_ext_emu_cudaMemset
#define cudaMemsetAsync vae_ext_emu_cudaMemsetAsync
#define cudaMemcpy vae_ext_emu_cudaMemcpy
#define cudaMemcpyAsync vae_ext_emu_cudaMemcpyAsync
#define cudaStreamSynchronize vae_ext_emu_cudaStreamSynchronize
#define cudaDeviceSynchronize vae_ext_emu_cudaDeviceSynchronize

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>  // before __noinline__ is defined: libstdc++ spells __attribute__((__noinline__))
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_emu_host.h"  // device memory, settings, counters

// A failed assert() in a kernel fails the launch (naming the thread and the assertion) instead of aborting
// the process: glibc's assert macro calls __assert_fail, renamed here to the emulator's.
extern "C" [[noreturn]] void vae_ext_emu_assert_fail(const char* assertion, const char* file, unsigned int line,
                                                     const char* function) noexcept;
#define __assert_fail vae_ext_emu_assert_fail

// ---------------------------------------------------------------- qualifiers

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
// One instance for the block that is running, in a section of its own so the race detector knows it.
#define __shared__ static __attribute__((section("vae_emu_shared")))
#undef __constant__
#define __constant__
#if !defined(__noinline__)
#define __noinline__ __attribute__((noinline))
#endif

namespace vae_ext::emu {

// ---------------------------------------------------------------- runtime interface

// The built-in variables of the CUDA thread that is running.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

namespace detail {

extern ThreadState* g_state;  // the running CUDA thread (set by the scheduler)

using Entry = void (*)(void* job);
void launch(const void* kernel, const char* signature, dim3 grid, dim3 block, size_t smem_bytes, Entry entry,
            void* job);

// Warp collectives. `kind` names the operation; lanes meet when they run the same kind with the same mask.
enum class ShflMode : int { kIdx = 0, kUp = 1, kDown = 2, kXor = 3 };
uint64_t shfl(ShflMode mode, unsigned mask, uint64_t value, int lane_arg, int width, const char* file, int line);
enum class VoteMode : int { kBallot = 0, kAny = 1, kAll = 2 };
unsigned vote(VoteMode mode, unsigned mask, int predicate, const char* file, int line);
enum class ReduceMode : int { kAddU = 0, kMinU, kMaxU, kAddI, kMinI, kMaxI, kAnd, kOr, kXor };
uint32_t reduce(ReduceMode mode, unsigned mask, uint32_t value, const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
// __syncthreads and its reductions: op 0 plain, 1 count, 2 and, 3 or.
int syncthreads(int op, int predicate, const char* file, int line);
// Lets the other threads run (spin-wait loops with __nanosleep).
void yield();
[[noreturn]] void trap(const char* what, const char* file, int line);

template <typename T>
inline uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, sizeof(T));
  return v;
}

// The types the CUDA shuffle overloads take (smaller integers convert to int, as there).
template <typename T>
using shfl_type_t = std::conditional_t<std::is_integral_v<T> && (sizeof(T) < 4), int, T>;
template <typename T>
constexpr bool kShuffleable = std::is_arithmetic_v<T> || std::is_same_v<T, __half> || std::is_same_v<T, __half2> ||
                              std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __nv_bfloat162>;

// 8-byte values are two 32-bit shuffles on the device: the same lanes, so the same result as one.
template <typename T>
inline T shfl_typed(ShflMode mode, unsigned mask, T var, int lane_arg, int width, const char* file, int line) {
  static_assert(kShuffleable<T>, "__shfl*_sync takes arithmetic types, __half(2) and __nv_bfloat16(2)");
  return from_bits<T>(shfl(mode, mask, to_bits(var), lane_arg, width, file, line));
}

}  // namespace detail

// Launches `kernel` on the emulated device: blocks one after another, each thread a fiber. Throws
// std::runtime_error on a launch or execution error.
template <typename... KernelArgs>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, KernelArgs... args) {
  struct Job {
    void (*kernel)(KernelArgs...);
    std::tuple<std::decay_t<KernelArgs>...> args;
    static void run(void* self) {
      Job* job = static_cast<Job*>(self);
      std::apply(job->kernel, job->args);  // every thread gets its own copy of the parameters
    }
  };
  Job job{kernel, std::tuple<std::decay_t<KernelArgs>...>(std::move(args)...)};
  detail::launch(reinterpret_cast<const void*>(kernel), __PRETTY_FUNCTION__, grid, block, smem_bytes, &Job::run,
                 &job);
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): needed, as on the device,
// before a launch with more than 48 KB of dynamic shared memory.
cudaError_t set_max_dynamic_smem(const void* kernel, size_t bytes);

// The block's dynamic shared memory (16-byte aligned; exactly the launch's smem_bytes are accessible).
char* dynamic_smem();

// Warp-level matrix primitives (common/cuda_primitives.cuh), fragment layouts of the PTX ISA. `file` and
// `line` name the call site in error messages (the dev:: wrappers pass their caller's, see VAE_EMU_SITE).
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE());
void ldmatrix(uint32_t* r, int num_matrices, const void* row_addr, bool trans, const char* file = __builtin_FILE(),
              int line = __builtin_LINE());
void cp_async_16(void* smem_dst, const void* gmem_src, bool pred, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE());
void cp_async_commit();
void cp_async_wait(int pending_groups);
uint32_t pack_16bit(float lo, float hi, bool bf16);

}  // namespace vae_ext::emu

// Trailing parameters that give a device function its caller's source position under emulation:
//   VAE_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* row VAE_EMU_SITE) { emu::ldmatrix(..., VAE_EMU_SITE_ARGS); }
#define VAE_EMU_SITE , const char *vae_emu_file = __builtin_FILE(), int vae_emu_line = __builtin_LINE()
#define VAE_EMU_SITE_ARGS vae_emu_file, vae_emu_line

// ---------------------------------------------------------------- built-in variables

#define threadIdx (static_cast<const uint3&>(::vae_ext::emu::detail::g_state->thread_idx))
#define blockIdx (static_cast<const uint3&>(::vae_ext::emu::detail::g_state->block_idx))
#define blockDim (static_cast<const dim3&>(::vae_ext::emu::detail::g_state->block_dim))
#define gridDim (static_cast<const dim3&>(::vae_ext::emu::detail::g_state->grid_dim))
constexpr int warpSize = 32;

// ---------------------------------------------------------------- synchronisation

#define __syncthreads() ::vae_ext::emu::detail::syncthreads(0, 1, __FILE__, __LINE__)
#define __syncthreads_count(pred) ::vae_ext::emu::detail::syncthreads(1, (pred) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_and(pred) ::vae_ext::emu::detail::syncthreads(2, (pred) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_or(pred) ::vae_ext::emu::detail::syncthreads(3, (pred) ? 1 : 0, __FILE__, __LINE__)
#define __syncwarp(...) ::vae_ext::emu::detail::syncwarp_at(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

#define VAE_EMU_D ::vae_ext::emu::detail
#define __shfl_sync(...) VAE_EMU_D::shfl_at(VAE_EMU_D::ShflMode::kIdx, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) VAE_EMU_D::shfl_at(VAE_EMU_D::ShflMode::kUp, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) VAE_EMU_D::shfl_at(VAE_EMU_D::ShflMode::kDown, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) VAE_EMU_D::shfl_at(VAE_EMU_D::ShflMode::kXor, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) \
  VAE_EMU_D::vote(VAE_EMU_D::VoteMode::kBallot, (mask), (pred) ? 1 : 0, __FILE__, __LINE__)
#define __any_sync(mask, pred) \
  static_cast<int>(VAE_EMU_D::vote(VAE_EMU_D::VoteMode::kAny, (mask), (pred) ? 1 : 0, __FILE__, __LINE__))
#define __all_sync(mask, pred) \
  static_cast<int>(VAE_EMU_D::vote(VAE_EMU_D::VoteMode::kAll, (mask), (pred) ? 1 : 0, __FILE__, __LINE__))
#define __reduce_add_sync(mask, value) VAE_EMU_D::reduce_at(0, (mask), (value), __FILE__, __LINE__)
#define __reduce_min_sync(mask, value) VAE_EMU_D::reduce_at(1, (mask), (value), __FILE__, __LINE__)
#define __reduce_max_sync(mask, value) VAE_EMU_D::reduce_at(2, (mask), (value), __FILE__, __LINE__)
#define __reduce_and_sync(mask, value) \
  VAE_EMU_D::reduce(VAE_EMU_D::ReduceMode::kAnd, (mask), static_cast<unsigned>(value), __FILE__, __LINE__)
#define __reduce_or_sync(mask, value) \
  VAE_EMU_D::reduce(VAE_EMU_D::ReduceMode::kOr, (mask), static_cast<unsigned>(value), __FILE__, __LINE__)
#define __reduce_xor_sync(mask, value) \
  VAE_EMU_D::reduce(VAE_EMU_D::ReduceMode::kXor, (mask), static_cast<unsigned>(value), __FILE__, __LINE__)
#define __trap() ::vae_ext::emu::detail::trap("__trap()", __FILE__, __LINE__)

namespace vae_ext::emu::detail {

inline void syncwarp_at(const char* file, int line, unsigned mask = 0xffffffffu) { syncwarp(mask, file, line); }

template <typename T>
inline shfl_type_t<T> shfl_at(ShflMode mode, const char* file, int line, unsigned mask, T var, int lane_arg,
                              int width = 32) {
  return shfl_typed<shfl_type_t<T>>(mode, mask, static_cast<shfl_type_t<T>>(var), lane_arg, width, file, line);
}

// __reduce_{add,min,max}_sync exist for unsigned and int.
inline unsigned reduce_at(int op, unsigned mask, unsigned value, const char* file, int line) {
  return reduce(static_cast<ReduceMode>(op), mask, value, file, line);
}
inline int reduce_at(int op, unsigned mask, int value, const char* file, int line) {
  return static_cast<int>(reduce(static_cast<ReduceMode>(op + 3), mask, static_cast<uint32_t>(value), file, line));
}

}  // namespace vae_ext::emu::detail

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { ::vae_ext::emu::detail::yield(); }

// ---------------------------------------------------------------- atomics
// Threads are cooperative fibers on one OS thread and blocks run one at a time,
// so a plain read-modify-write is atomic. Atomics never race: their accesses are
// kept from the race detector (not instrumented).
#define VAE_EMU_ATOMIC inline __attribute__((no_sanitize("thread")))

#define VAE_EMU_ATOMIC_RMW(name, T, expr) \
  VAE_EMU_ATOMIC T name(T* address, T val) { \
    const T old = *address;               \
    *address = (expr);                    \
    return old;                           \
  }
VAE_EMU_ATOMIC_RMW(atomicAdd, int, old + val)
VAE_EMU_ATOMIC_RMW(atomicAdd, unsigned int, old + val)
VAE_EMU_ATOMIC_RMW(atomicAdd, unsigned long long, old + val)
VAE_EMU_ATOMIC_RMW(atomicAdd, float, old + val)
VAE_EMU_ATOMIC_RMW(atomicAdd, double, old + val)
VAE_EMU_ATOMIC_RMW(atomicSub, int, old - val)
VAE_EMU_ATOMIC_RMW(atomicSub, unsigned int, old - val)
VAE_EMU_ATOMIC_RMW(atomicExch, int, val)
VAE_EMU_ATOMIC_RMW(atomicExch, unsigned int, val)
VAE_EMU_ATOMIC_RMW(atomicExch, unsigned long long, val)
VAE_EMU_ATOMIC_RMW(atomicExch, float, val)
VAE_EMU_ATOMIC_RMW(atomicMin, int, val < old ? val : old)
VAE_EMU_ATOMIC_RMW(atomicMin, unsigned int, val < old ? val : old)
VAE_EMU_ATOMIC_RMW(atomicMin, long long, val < old ? val : old)
VAE_EMU_ATOMIC_RMW(atomicMin, unsigned long long, val < old ? val : old)
VAE_EMU_ATOMIC_RMW(atomicMax, int, val > old ? val : old)
VAE_EMU_ATOMIC_RMW(atomicMax, unsigned int, val > old ? val : old)
VAE_EMU_ATOMIC_RMW(atomicMax, long long, val > old ? val : old)
VAE_EMU_ATOMIC_RMW(atomicMax, unsigned long long, val > old ? val : old)
VAE_EMU_ATOMIC_RMW(atomicAnd, int, old & val)
VAE_EMU_ATOMIC_RMW(atomicAnd, unsigned int, old & val)
VAE_EMU_ATOMIC_RMW(atomicAnd, unsigned long long, old & val)
VAE_EMU_ATOMIC_RMW(atomicOr, int, old | val)
VAE_EMU_ATOMIC_RMW(atomicOr, unsigned int, old | val)
VAE_EMU_ATOMIC_RMW(atomicOr, unsigned long long, old | val)
VAE_EMU_ATOMIC_RMW(atomicXor, int, old ^ val)
VAE_EMU_ATOMIC_RMW(atomicXor, unsigned int, old ^ val)
VAE_EMU_ATOMIC_RMW(atomicXor, unsigned long long, old ^ val)
VAE_EMU_ATOMIC_RMW(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
VAE_EMU_ATOMIC_RMW(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef VAE_EMU_ATOMIC_RMW

// 16-bit and vector atomicAdd (sm_70+ / sm_80+ / sm_90): the sum rounded to the element type.
VAE_EMU_ATOMIC __half atomicAdd(__half* address, __half val) {
  const __half old = *address;
  *address = __float2half_rn(__half2float(old) + __half2float(val));
  return old;
}
VAE_EMU_ATOMIC __nv_bfloat16 atomicAdd(__nv_bfloat16* address, __nv_bfloat16 val) {
  const __nv_bfloat16 old = *address;
  *address = __float2bfloat16_rn(__bfloat162float(old) + __bfloat162float(val));
  return old;
}
VAE_EMU_ATOMIC __half2 atomicAdd(__half2* address, __half2 val) {
  const __half2 old = *address;
  __half lo = old.x, hi = old.y;
  atomicAdd(&lo, val.x);
  atomicAdd(&hi, val.y);
  *address = __halves2half2(lo, hi);
  return old;
}
VAE_EMU_ATOMIC __nv_bfloat162 atomicAdd(__nv_bfloat162* address, __nv_bfloat162 val) {
  const __nv_bfloat162 old = *address;
  __nv_bfloat16 lo = old.x, hi = old.y;
  atomicAdd(&lo, val.x);
  atomicAdd(&hi, val.y);
  *address = __halves2bfloat162(lo, hi);
  return old;
}
VAE_EMU_ATOMIC float2 atomicAdd(float2* address, float2 val) {
  const float2 old = *address;
  *address = make_float2(old.x + val.x, old.y + val.y);
  return old;
}
VAE_EMU_ATOMIC float4 atomicAdd(float4* address, float4 val) {
  const float4 old = *address;
  *address = make_float4(old.x + val.x, old.y + val.y, old.z + val.z, old.w + val.w);
  return old;
}

#define VAE_EMU_ATOMIC_CAS(T)                            \
  VAE_EMU_ATOMIC T atomicCAS(T* address, T compare, T val) { \
    const T old = *address;                              \
    if (old == compare) *address = val;                  \
    return old;                                          \
  }
VAE_EMU_ATOMIC_CAS(int)
VAE_EMU_ATOMIC_CAS(unsigned int)
VAE_EMU_ATOMIC_CAS(unsigned long long)
VAE_EMU_ATOMIC_CAS(unsigned short)
#undef VAE_EMU_ATOMIC_CAS

// ---------------------------------------------------------------- integer and bit intrinsics

inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<int64_t>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
inline unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) |
         __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned int r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned int>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>((v << (shift & 31)) >> 32);
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>(v >> (shift & 31));
}

inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned int __float_as_uint(float x) { unsigned int i; std::memcpy(&i, &x, 4); return i; }
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }

// min / max as the CUDA math API declares them (mixed signedness: the unsigned type, as there).
#define VAE_EMU_MIN_MAX(R, A, B)                                        \
  inline R min(A a, B b) {                                              \
    return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
  }                                                                     \
  inline R max(A a, B b) {                                              \
    return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
  }
VAE_EMU_MIN_MAX(int, int, int)
VAE_EMU_MIN_MAX(unsigned int, unsigned int, unsigned int)
VAE_EMU_MIN_MAX(unsigned int, int, unsigned int)
VAE_EMU_MIN_MAX(unsigned int, unsigned int, int)
VAE_EMU_MIN_MAX(long, long, long)
VAE_EMU_MIN_MAX(unsigned long, unsigned long, unsigned long)
VAE_EMU_MIN_MAX(unsigned long, long, unsigned long)
VAE_EMU_MIN_MAX(unsigned long, unsigned long, long)
VAE_EMU_MIN_MAX(long long, long long, long long)
VAE_EMU_MIN_MAX(unsigned long long, unsigned long long, unsigned long long)
VAE_EMU_MIN_MAX(unsigned long long, long long, unsigned long long)
VAE_EMU_MIN_MAX(unsigned long long, unsigned long long, long long)
#undef VAE_EMU_MIN_MAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double min(float a, double b) { return std::fmin(static_cast<double>(a), b); }
inline double min(double a, float b) { return std::fmin(a, static_cast<double>(b)); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double max(float a, double b) { return std::fmax(static_cast<double>(a), b); }
inline double max(double a, float b) { return std::fmax(a, static_cast<double>(b)); }

// ---------------------------------------------------------------- float intrinsics
// The fast-math intrinsics compute what the hardware computes up to its
// approximation error (e.g. __expf(x) = 2^(x * log2(e)) with the product
// rounded to float, as ex2.approx sees it).

inline float __expf(float x) { return std::exp2(x * 1.44269504088896340736f); }
inline float __exp10f(float x) { return std::exp2(x * 3.32192809488736234787f); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::exp2(y * std::log2(x)); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline void sincospif(float x, float* s, float* c) {
  *s = static_cast<float>(std::sin(3.14159265358979323846 * x));
  *c = static_cast<float>(std::cos(3.14159265358979323846 * x));
}
inline void sincospi(double x, double* s, double* c) {
  *s = std::sin(3.14159265358979323846 * x);
  *c = std::cos(3.14159265358979323846 * x);
}
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0

// Cache-hinted loads and stores are plain accesses.
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

#endif  // VAE_EXT_COMMON_CUDA_EMU_H_
