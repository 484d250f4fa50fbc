// Vectorised Philox-4x32-10 and Box–Muller for the CPU kernels: kPhiloxLanes
// consecutive subsequences at once, bit-identical to philox4x32_10() in
// common/philox.h, whose box_muller_uniforms they run on vectors. With AVX2 the rounds run on 8-lane integer vectors, two
// independent vectors at a time to hide the multiply latency.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "common/philox.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#include <sleef.h>
#endif

namespace vae_ext {

// BoxMullerMath (common/philox.h) for the CPU's vectors: at::vec's functions in
// general; for float with AVX2 or AVX-512, eight lanes of Sleef's 3.5-ulp log and
// sincospi (Float8), which the fast path below runs on. (Both types live in the
// capability's namespace, so each capability's build has its own specialisations.)
template <typename T>
struct BoxMullerMath<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using scalar = T;
  static V log(const V& x) { return x.log(); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static void sincos_2pi(const V& u, V& s, V& c) {
    const V t = V(T(6.283185307179586476925286766559)) * u;
    s = t.sin();
    c = t.cos();
  }
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
VAE_EXT_CPU_NS_BEGIN
struct Float8 {
  __m256 v;
  Float8() = default;
  Float8(__m256 x) : v(x) {}  // NOLINT: implicit, as a register
  explicit Float8(float x) : v(_mm256_set1_ps(x)) {}
};
inline Float8 operator*(const Float8& a, const Float8& b) { return _mm256_mul_ps(a.v, b.v); }
VAE_EXT_CPU_NS_END

template <>
struct BoxMullerMath<Float8> {
  using scalar = float;
  static Float8 log(const Float8& x) { return Sleef_logf8_u35avx2(x.v); }
  static Float8 sqrt(const Float8& x) { return _mm256_sqrt_ps(x.v); }
  static void sincos_2pi(const Float8& u, Float8& s, Float8& c) {
    const Sleef___m256_2 sc = Sleef_sincospif8_u35avx2(_mm256_add_ps(u.v, u.v));  // sin, cos of 2 pi u
    s = sc.x;
    c = sc.y;
  }
};
#endif

VAE_EXT_CPU_NS_BEGIN

constexpr int kPhiloxLanes = 16;                  // Philox blocks per call
constexpr int kPhiloxNormals = 4 * kPhiloxLanes;  // normals per call

// bits[j][l] = word j of philox4x32_10(seed, counter_lo, first_group + l).
inline void philox_blocks_cpu(uint64_t seed, uint64_t counter_lo, uint64_t first_group,
                              uint32_t bits[4][kPhiloxLanes]) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  constexpr int V = kPhiloxLanes / 8;
  __m256i c0[V], c1[V], c2[V], c3[V];
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int v = 0; v < V; ++v) {
    const uint64_t g = first_group + 8 * static_cast<uint64_t>(v);
    const __m256i base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g)));
    c0[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter_lo)));
    c1[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter_lo >> 32)));
    c2[v] = _mm256_add_epi32(base, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // Carry into the high word where the low word wrapped (unsigned compare via the sign flip).
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base, sign), _mm256_xor_si256(c2[v], sign));
    c3[v] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))), wrapped);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0)), vk1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < V; ++v) {
      // 32x32 -> 64-bit products of the even and odd lanes, split into high and low words.
      const __m256i e0 = _mm256_mul_epu32(c0[v], m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(c0[v], 32), m0);
      const __m256i e1 = _mm256_mul_epu32(c2[v], m1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(c2[v], 32), m1);
      const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), vk0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), vk1);
      c1[v] = lo1;
      c3[v] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int v = 0; v < V; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&bits[0][8 * v]), c0[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&bits[1][8 * v]), c1[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&bits[2][8 * v]), c2[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&bits[3][8 * v]), c3[v]);
  }
#else
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const Philox4 b = philox4x32_10(seed, counter_lo, first_group + static_cast<uint64_t>(l));
    bits[0][l] = b.x;
    bits[1][l] = b.y;
    bits[2][l] = b.z;
    bits[3][l] = b.w;
  }
#endif
}

// The kPhiloxNormals N(0, 1) draws of flat elements [4 * first_group, 4 * first_group + kPhiloxNormals)
// in the layout of common/philox.h, in acc_t precision.
template <typename acc_t>
inline void philox_normals_cpu(uint64_t seed, uint64_t counter_lo, uint64_t first_group, acc_t* out) {
  alignas(32) uint32_t bits[4][kPhiloxLanes];
  philox_blocks_cpu(seed, counter_lo, first_group, bits);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 scale = _mm256_set1_ps(5.9604644775390625e-08f);
    const __m256i one = _mm256_set1_epi32(1);
    for (int v = 0; v < kPhiloxLanes / 8; ++v) {
      __m256 n[4];
      for (int pair = 0; pair < 2; ++pair) {
        const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(&bits[2 * pair][8 * v]));
        const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(&bits[2 * pair + 1][8 * v]));
        const __m256 u1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_srli_epi32(a, 8), one)), scale);
        const __m256 u2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 8)), scale);
        Float8 n0, n1;
        box_muller_uniforms(Float8(u1), Float8(u2), n0, n1);
        n[2 * pair] = n0.v;
        n[2 * pair + 1] = n1.v;
      }
      // 4 x 8 transpose: lane l of n[j] is element 4 * l + j.
      const __m256 a = _mm256_unpacklo_ps(n[0], n[1]), b = _mm256_unpackhi_ps(n[0], n[1]);
      const __m256 c = _mm256_unpacklo_ps(n[2], n[3]), d = _mm256_unpackhi_ps(n[2], n[3]);
      const __m256 e = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 f = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 g = _mm256_shuffle_ps(b, d, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 h = _mm256_shuffle_ps(b, d, _MM_SHUFFLE(3, 2, 3, 2));
      float* dst = out + 32 * v;
      _mm256_storeu_ps(dst, _mm256_permute2f128_ps(e, f, 0x20));
      _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(g, h, 0x20));
      _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(e, f, 0x31));
      _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(g, h, 0x31));
    }
    return;
  }
#endif
  using Vec = at::vec::Vectorized<acc_t>;
  static_assert(kPhiloxLanes % Vec::size() == 0, "lanes must hold whole vectors");
  alignas(64) acc_t u[4][kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    u[0][l] = static_cast<acc_t>(uniform_open_closed(bits[0][l]));
    u[1][l] = static_cast<acc_t>(uniform_closed_open(bits[1][l]));
    u[2][l] = static_cast<acc_t>(uniform_open_closed(bits[2][l]));
    u[3][l] = static_cast<acc_t>(uniform_closed_open(bits[3][l]));
  }
  alignas(64) acc_t normal[4][kPhiloxLanes];
  for (int pair = 0; pair < 2; ++pair) {
    for (int l = 0; l < kPhiloxLanes; l += Vec::size()) {
      Vec n0, n1;
      box_muller_uniforms(Vec::loadu(&u[2 * pair][l]), Vec::loadu(&u[2 * pair + 1][l]), n0, n1);
      n0.store(&normal[2 * pair][l]);
      n1.store(&normal[2 * pair + 1][l]);
    }
  }
  for (int l = 0; l < kPhiloxLanes; ++l) {
    for (int j = 0; j < 4; ++j) out[4 * l + j] = normal[j][l];
  }
}

VAE_EXT_CPU_NS_END
}  // namespace vae_ext
