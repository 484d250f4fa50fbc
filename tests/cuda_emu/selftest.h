// Host entry points of tests/cuda_emu/selftest.cu (the emulator's own tests).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace vae_ext::emu_selftest {

constexpr int kWarpOpsCols = 25;  // results per thread of warp_ops

void mma_matmul(const void* A, const void* B, float* C, int M, int N, int K, bool bf16, bool b_nk);
void pack(const float* x, uint32_t* out, int pairs);
void warp_ops(const float* x, float* out, float* fsum, int* isum, unsigned long long* usum, double* dsum, int* imax,
              unsigned* cas_counter, int blocks, int bx, int by, int bz);
void partial_warp(const float* x, float* out);
void exited_lanes(const float* x, float* out);
void spin_wait(int* flag, int* out);
void neighbours(float* out, int blocks, int threads, bool barrier);
void race(int what, bool fixed, float* out);          // out: 256 floats (cp.async source too)
void pattern(int which, const float* in, float* out);  // in: 128 floats, out: 32
void cp_async_copy(const float* in, float* out, int threads, bool wait, bool pred);
void big_smem(float* out, int floats, bool opt_in);
void noop(int* out, int blocks, int bx, int by, int bz, int smem);
// Launches a kernel that breaks a rule (`what`); the emulator must report it.
void misbehave(const char* what, float* out, const float* in, int* iout, const int* iin, int n);

}  // namespace vae_ext::emu_selftest
