// Warp-level building blocks of the tensor-core kernels (sm_80+): mma.sync,
// ldmatrix, cp.async, and dynamic shared memory. Each is inline PTX on the
// device and, under VAE_EXT_CUDA_EMULATION, a CPU emulation with the same
// semantics (tests/cuda_emu/cuda_emu.h), so the kernels' fragment and tile logic can be
// tested without a GPU. Fragment layouts are those of the PTX ISA:
//
// mma.m16n8k16 (A row-major 16x16, B "col" = K-major 16x8, C/D 16x8 fp32),
// lane = 4 * group + t (group = lane / 4, t = lane % 4):
//   A regs a[0..3] (two 16-bit values each, low half = lower column):
//     a[0]: (row group,     cols 2t, 2t+1)      a[1]: (row group + 8, cols 2t, 2t+1)
//     a[2]: (row group,     cols 2t+8, 2t+9)    a[3]: (row group + 8, cols 2t+8, 2t+9)
//   B regs b[0..1]: b[0]: (k rows 2t, 2t+1, col group)   b[1]: (k rows 2t+8, 2t+9, col group)
//   C/D c[0..3]: c[0], c[1]: (row group, cols 2t, 2t+1); c[2], c[3]: (row group + 8, cols 2t, 2t+1)
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register
// r[i] of lane l receives row l / 4, columns 2 (l % 4), 2 (l % 4) + 1 of matrix i
// (.trans: the transposed matrix).
#pragma once

#if defined(VAE_EXT_CUDA_EMULATION)
#include "cuda_emu.h"  // before the CUDA headers
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vae_ext::dev {

// VAE_SITE: under emulation, trailing defaulted parameters that carry the caller's file and line into
// the emulator's error messages (callers never pass them); nothing on the device.
#if defined(VAE_EXT_CUDA_EMULATION)
#define VAE_DEV inline
#define VAE_SITE VAE_EMU_SITE
#else
#define VAE_DEV __device__ __forceinline__
#define VAE_SITE
#endif

// The block's dynamic shared memory (16-byte aligned).
VAE_DEV char* dynamic_smem() {
#if defined(VAE_EXT_CUDA_EMULATION)
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(16) char vae_ext_dynamic_smem[];
  return vae_ext_dynamic_smem;
#endif
}

#if !defined(VAE_EXT_CUDA_EMULATION)
VAE_DEV uint32_t smem_u32(const void* ptr) { return static_cast<uint32_t>(__cvta_generic_to_shared(ptr)); }
#endif

// d = a * b + c, bf16 inputs, fp32 accumulators.
VAE_DEV void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                               const float (&c)[4] VAE_SITE) {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::mma_m16n8k16(d, a, b, c, /*bf16=*/true, VAE_EMU_SITE_ARGS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// d = a * b + c, fp16 inputs, fp32 accumulators.
VAE_DEV void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4] VAE_SITE) {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::mma_m16n8k16(d, a, b, c, /*bf16=*/false, VAE_EMU_SITE_ARGS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory; `row` is this lane's row address.
VAE_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* row VAE_SITE) {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::ldmatrix(r, 4, row, /*trans=*/false, VAE_EMU_SITE_ARGS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
#endif
}

VAE_DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row VAE_SITE) {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::ldmatrix(r, 4, row, /*trans=*/true, VAE_EMU_SITE_ARGS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
#endif
}

// Two 8x8 matrices (lanes 0..15 give the row addresses).
VAE_DEV void ldmatrix_x2(uint32_t (&r)[2], const void* row VAE_SITE) {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::ldmatrix(r, 2, row, /*trans=*/false, VAE_EMU_SITE_ARGS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
#endif
}

VAE_DEV void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row VAE_SITE) {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::ldmatrix(r, 2, row, /*trans=*/true, VAE_EMU_SITE_ARGS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
#endif
}

// 16-byte global -> shared copy that bypasses registers; with pred == false the
// destination is zero-filled and nothing is read (out-of-range rows).
VAE_DEV void cp_async_16(void* smem_dst, const void* gmem_src, bool pred = true VAE_SITE) {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::cp_async_16(smem_dst, gmem_src, pred, VAE_EMU_SITE_ARGS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(pred ? 16 : 0));
#endif
}

VAE_DEV void cp_async_commit() {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
VAE_DEV void cp_async_wait() {
#if defined(VAE_EXT_CUDA_EMULATION)
  emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Two floats to a packed pair of bf16 / fp16 (low half = first), the A-fragment element format.
VAE_DEV uint32_t pack_bf16(float lo, float hi) {
#if defined(VAE_EXT_CUDA_EMULATION)
  return emu::pack_16bit(lo, hi, /*bf16=*/true);
#else
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
#endif
}

VAE_DEV uint32_t pack_f16(float lo, float hi) {
#if defined(VAE_EXT_CUDA_EMULATION)
  return emu::pack_16bit(lo, hi, /*bf16=*/false);
#else
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
#endif
}

}  // namespace vae_ext::dev
