// Philox-4x32-10 counter-based RNG and the Box–Muller transform, identical on
// host and device. The stream is bit-compatible with at::Philox4_32 (PyTorch's
// philox_engine): key = seed, counter = (offset_lo, offset_hi, sub_lo, sub_hi).
//
// The layout every vae_ext kernel uses for N(0, 1) draws: element i of an op's
// flat random index space takes lane (i % 4) of the block
//   philox(seed, counter_lo = offset / 4, counter_hi = i / 4)
// with normals (n0, n1) = BoxMuller(x, y) and (n2, n3) = BoxMuller(z, w).
// `offset` counts 32-bit draws, as PyTorch's CUDA generator does; CPU and the
// explicit-seed mode use offset 0. So for one explicit seed the CPU and CUDA
// kernels produce the same Philox integers for every element.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/math.h"

namespace vae_ext {

constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key schedule (sqrt(3) - 1)
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;

struct Philox4 {
  uint32_t x, y, z, w;
};

VAE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One Philox-4x32-10 block for key `seed` and the 128-bit counter (lo, hi).
VAE_HD Philox4 philox4x32_10(uint64_t seed, uint64_t counter_lo, uint64_t counter_hi) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = kPhiloxM0 * c0, hi0 = mulhi32(kPhiloxM0, c0);
    const uint32_t lo1 = kPhiloxM1 * c2, hi1 = mulhi32(kPhiloxM1, c2);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {c0, c1, c2, c3};
}

// Where a kernel's Philox key and counter offset come from. During CUDA-graph
// capture the values live in device memory (PyTorch's graph-safe protocol):
// then seed = *seed_ptr and offset = *offset_ptr + offset_intragraph.
struct PhiloxState {
  uint64_t seed = 0;
  uint64_t offset = 0;  // in 32-bit draws; the counter block is offset / 4
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
};

VAE_HD void unpack_philox(const PhiloxState& s, uint64_t& seed, uint64_t& counter_lo) {
  if (s.seed_ptr != nullptr) {
    seed = static_cast<uint64_t>(*s.seed_ptr);
    counter_lo = (static_cast<uint64_t>(*s.offset_ptr) + s.offset_intragraph) / 4;
  } else {
    seed = s.seed;
    counter_lo = s.offset / 4;
  }
}

// 24 random bits to a float in (0, 1] (safe for log) or [0, 1); exact in float.
VAE_HD float uniform_open_closed(uint32_t bits) { return static_cast<float>((bits >> 8) + 1u) * 5.9604644775390625e-08f; }
VAE_HD float uniform_closed_open(uint32_t bits) { return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f; }

// Box–Muller: uniforms u1 in (0, 1] and u2 in [0, 1) to two independent N(0, 1)
// draws, r = sqrt(-2 log u1), (n0, n1) = (r cos 2 pi u2, r sin 2 pi u2). A template
// over the value type V with the primitives of BoxMullerMath<V>: the scalar ones are
// here (CUDA, host); the CPU kernels' vector ones are in common/philox_cpu.h.
template <typename V>
struct BoxMullerMath {  // scalars
  using scalar = V;
  static VAE_HD V log(V x) { return log_(x); }
  static VAE_HD V sqrt(V x) { return sqrt_(x); }
  static VAE_HD void sincos_2pi(V u, V& s, V& c) { sincos_2pi_(u, &s, &c); }
};

template <typename V>
VAE_HD void box_muller_uniforms(const V& u1, const V& u2, V& n0, V& n1) {
  using M = BoxMullerMath<V>;
  const V r = M::sqrt(V(typename M::scalar(-2)) * M::log(u1));
  V s, c;
  M::sincos_2pi(u2, s, c);
  n0 = r * c;
  n1 = r * s;
}

// Two 32-bit Philox words to two N(0, 1) draws, in acc_t precision.
template <typename acc_t>
VAE_HD void box_muller(uint32_t a, uint32_t b, acc_t& n0, acc_t& n1) {
  box_muller_uniforms(static_cast<acc_t>(uniform_open_closed(a)), static_cast<acc_t>(uniform_closed_open(b)), n0, n1);
}

}  // namespace vae_ext
