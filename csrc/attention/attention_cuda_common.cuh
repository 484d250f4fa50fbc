// Device helpers shared by the masked_attention CUDA kernels (tensor-core and
// SIMT): conversions, warp reductions, the mask predicate, the dropout stream.
// See attention_cuda.cuh for the design note.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "attention/attention.h"
#include "attention/attention_cuda.h"
#include "attention/attention_math.h"
#include "common/cuda_launch.cuh"
#include "common/cuda_primitives.cuh"
#include "common/philox.h"

namespace vae_ext::attn {

constexpr float kLog2e = 1.4426950408889634074f;
constexpr float kLn2 = 0.69314718055994530942f;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------- scalar helpers

// 2^x: the hardware's ex2.approx on the device (relative error ~2^-22, -inf -> 0).
VAE_DEV float exp2_fast(float x) {
#if defined(VAE_EXT_CUDA_EMULATION) || !defined(__CUDA_ARCH__)
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
// exp2_fast as the Exp of attention_math.h's formulas (scores in the log2 domain).
struct Exp2Fast {
  VAE_DEV float operator()(float x) const { return exp2_fast(x); }
};

VAE_DEV float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}

VAE_DEV float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

VAE_DEV float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

VAE_DEV float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Element conversions by bits (torch builds disable the implicit half/bfloat16 conversions).
template <typename T> struct Elem;
template <> struct Elem<__nv_bfloat16> {
  static constexpr uint16_t kExponentMask = 0x7f80;  // all set: NaN or infinity
  static VAE_DEV float to_float(uint16_t bits) {
    const uint32_t w = static_cast<uint32_t>(bits) << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
  }
  static VAE_DEV uint32_t pack(float lo, float hi) { return dev::pack_bf16(lo, hi); }
  static VAE_DEV uint16_t from_float(float x) { return static_cast<uint16_t>(pack(x, 0.f) & 0xffffu); }
  static VAE_DEV void mma(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const float c[4] = {acc[0], acc[1], acc[2], acc[3]};
    dev::mma_m16n8k16_bf16(acc, a, b, c);
  }
};
template <> struct Elem<__half> {
  static constexpr uint16_t kExponentMask = 0x7c00;
  static VAE_DEV float to_float(uint16_t bits) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
  static VAE_DEV uint32_t pack(float lo, float hi) { return dev::pack_f16(lo, hi); }
  static VAE_DEV uint16_t from_float(float x) { return static_cast<uint16_t>(pack(x, 0.f) & 0xffffu); }
  static VAE_DEV void mma(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const float c[4] = {acc[0], acc[1], acc[2], acc[3]};
    dev::mma_m16n8k16_f16(acc, a, b, c);
  }
};

// Hides a pointer's value from the optimizer (per loop iteration), so that the
// many fixed offsets from it are added where they are used, not hoisted out
// of the main loop into dozens of live registers.
template <typename P>
VAE_DEV P* opaque(P* ptr) {
#if defined(VAE_EXT_CUDA_EMULATION) || !defined(__CUDA_ARCH__)
  return ptr;
#else
  uint64_t x = reinterpret_cast<uint64_t>(ptr);
  asm volatile("" : "+l"(x));
  return reinterpret_cast<P*>(x);
#endif
}

// Loads and stores of the element types, through float.
template <typename T> struct IO;
template <> struct IO<float> {
  static VAE_DEV float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static VAE_DEV void store(void* p, int64_t i, float x) { static_cast<float*>(p)[i] = x; }
};
template <typename T> struct IO16 {
  static VAE_DEV float load(const void* p, int64_t i) { return Elem<T>::to_float(static_cast<const uint16_t*>(p)[i]); }
  static VAE_DEV void store(void* p, int64_t i, float x) { static_cast<uint16_t*>(p)[i] = Elem<T>::from_float(x); }
};
template <> struct IO<__nv_bfloat16> : IO16<__nv_bfloat16> {};
template <> struct IO<__half> : IO16<__half> {};

// ---------------------------------------------------------------- masks

// Which keys a (batch, head) plane hides, in the log2 domain of the kernels'
// scores. Keys fail key_ok at or beyond key_len[b] (or Sk) and where the
// padding mask is set; pair_term adds the causal and attn_mask terms of one
// (query i, key j) pair for a key that passed key_ok: 0 or the additive mask
// times log2(e), -inf when hidden. Rows i >= Sq (the padding of the last query
// tile) are hidden, so no mask is read out of bounds.
struct MaskCtx {
  int q_len;
  int kv_limit;  // keys >= kv_limit are hidden (min(key_len[b], Sk))
  bool causal;
  int causal_offset;  // causal: query i sees keys j <= i + causal_offset (0 upper-left, Sk - Sq lower-right)
  MaskKind kind;
  const uint8_t* key_padding;  // row b of the (B, Sk) padding mask, or nullptr
  const void* mask;            // the (b, h) plane of the attn mask
  int64_t mask_row, mask_col;

  VAE_DEV bool has_pair_mask() const { return causal || kind != MaskKind::kNone; }

  VAE_DEV bool key_ok(int j) const { return j < kv_limit && (key_padding == nullptr || key_padding[j] == 0); }

  // Keys [0, key_end) may be visible to the query rows [m0, m0 + rows): the causal
  // mask hides every key past the tile's last row's diagonal (<= 0: no key).
  VAE_DEV int key_end(int m0, int rows) const {
    return causal ? min(kv_limit, m0 + rows + causal_offset) : kv_limit;
  }

  // Whether the causal mask hides some key <= last_key from some query row >= first_row
  // (the tile crosses the diagonal and needs per-pair masking).
  VAE_DEV bool crosses_diagonal(int first_row, int last_key) const {
    return causal && last_key > first_row + causal_offset;
  }

  VAE_DEV float pair_term(int i, int j) const {
    if (causal && j > i + causal_offset) return -INFINITY;
    if (kind == MaskKind::kNone) return 0.f;
    if (i >= q_len) return -INFINITY;
    const int64_t off = static_cast<int64_t>(i) * mask_row + static_cast<int64_t>(j) * mask_col;
    if (kind == MaskKind::kBool) return static_cast<const uint8_t*>(mask)[off] != 0 ? 0.f : -INFINITY;
    return mask_term_log2(static_cast<const float*>(mask)[off], kLog2e);
  }
};

// Keys visible to some query of a (batch, head): [0, kv_limit).
VAE_DEV int kv_limit_of(const AttentionParams& p, int b) {
  int lim = p.kv_len;
  if (p.key_len != nullptr) lim = min(lim, static_cast<int>(p.key_len[b]));
  return lim < 0 ? 0 : lim;
}

// The first query that may see key n0: the causal mask hides it from queries i < n0 - causal_offset.
VAE_DEV int first_query_of(const AttentionParams& p, int n0) {
  return p.is_causal ? max(0, n0 - p.causal_offset) : 0;
}

VAE_DEV MaskCtx make_mask_ctx(const AttentionParams& p, int b, int h) {
  MaskCtx m;
  m.q_len = p.q_len;
  m.kv_limit = kv_limit_of(p, b);
  m.causal = p.is_causal;
  m.causal_offset = p.is_causal ? p.causal_offset : 0;
  m.kind = p.mask == nullptr ? MaskKind::kNone : p.mask_kind;
  m.key_padding = p.key_padding == nullptr ? nullptr : p.key_padding + static_cast<int64_t>(b) * p.kv_len;
  const size_t elem = m.kind == MaskKind::kAdditive ? 4 : 1;
  m.mask = m.kind == MaskKind::kNone
               ? nullptr
               : static_cast<const char*>(p.mask) +
                     (static_cast<int64_t>(b) * p.mask_batch_stride + static_cast<int64_t>(h) * p.mask_head_stride) *
                         static_cast<int64_t>(elem);
  m.mask_row = p.mask_row_stride;
  m.mask_col = p.mask_col_stride;
  return m;
}

// Writes the (seed, offset) the forward draws from into rng_state (once per call).
VAE_DEV void write_rng_state(const AttentionParams& p) {
  if (p.rng_state == nullptr || !(p.dropout_p > 0.f)) return;
  const PhiloxState& s = p.philox;
  if (s.seed_ptr != nullptr) {
    p.rng_state[0] = *s.seed_ptr;
    p.rng_state[1] = static_cast<int64_t>(static_cast<uint64_t>(*s.offset_ptr) + s.offset_intragraph);
  } else {
    p.rng_state[0] = static_cast<int64_t>(s.seed);
    p.rng_state[1] = static_cast<int64_t>(s.offset);
  }
}

// ---------------------------------------------------------------- dropout

// The dropout stream of one (batch, head) plane (attention.h): element (i, j)
// uses word j % 4 of philox(seed, counter_lo, (row_base + i) * ceil(Sk / 4) + j / 4).
struct DropoutCtx {
  bool enabled;
  uint32_t threshold;
  float inv_keep;  // 1 / (1 - p)
  uint64_t seed, counter_lo, row_base;
  int64_t kv_len;

  // The block holding keys 4 group .. 4 group + 3 of query row i (attention/attention_math.h).
  VAE_DEV Philox4 block(int i, int group) const {
    return philox4x32_10(seed, counter_lo,
                         attention_dropout_group(static_cast<int64_t>(row_base + static_cast<uint64_t>(i)), kv_len,
                                                 4 * static_cast<int64_t>(group)));
  }
  VAE_DEV bool keep(uint32_t word) const { return attention_dropout_keep(word, threshold); }
};

VAE_DEV DropoutCtx make_dropout_ctx(const AttentionParams& p, int b, int h) {
  DropoutCtx d;
  d.enabled = p.dropout_p > 0.f;
  d.threshold = p.dropout_threshold;
  d.inv_keep = d.enabled ? 1.f / (1.f - p.dropout_p) : 1.f;
  d.seed = 0;
  d.counter_lo = 0;
  if (d.enabled) unpack_philox(p.philox, d.seed, d.counter_lo);
  d.kv_len = p.kv_len;
  d.row_base = (static_cast<uint64_t>(b) * static_cast<uint64_t>(p.heads) + static_cast<uint64_t>(h)) *
               static_cast<uint64_t>(p.q_len);
  return d;
}

VAE_DEV uint32_t word_of(const Philox4& w, int k) { return k == 0 ? w.x : k == 1 ? w.y : k == 2 ? w.z : w.w; }

// Keep bits of a row-layout tile (rows = queries row0 + g, row0 + g + 8; keys
// n0 + 8 nt + 2t (+1)); bit 4 nt + e is element e of n-tile nt (e = 2 half +
// column). Lanes t and t ^ 1 share a 4-key group: the even one draws the block
// of row g, the odd one that of row g + 8, and they swap the two words the
// other needs. A rolled loop keeps one Philox block live at a time.
template <int kNT>
VAE_DEV uint64_t dropout_keep_rows(const DropoutCtx& d, int row0, int n0, int lane) {
  static_assert(kNT * 4 <= 64, "one bit per element");
  const int g = lane >> 2, t = lane & 3;
  const bool odd = (t & 1) != 0;
  uint64_t bits = 0;
#pragma unroll 1
  for (int nt = 0; nt < kNT; ++nt) {
    const Philox4 w = d.block(row0 + g + (odd ? 8 : 0), (n0 + nt * 8) / 4 + (t >> 1));
    const uint32_t r0 = __shfl_xor_sync(kFullMask, odd ? w.x : w.z, 1);
    const uint32_t r1 = __shfl_xor_sync(kFullMask, odd ? w.y : w.w, 1);
    const uint32_t words[4] = {odd ? r0 : w.x, odd ? r1 : w.y, odd ? w.z : r0, odd ? w.w : r1};
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (d.keep(words[e])) bits |= uint64_t{1} << (nt * 4 + e);
  }
  return bits;
}

// Keep bits of a transposed tile (rows = keys key0 + g (+8), columns = queries
// m0 + 8 nt + 2t (+1)); bit 4 nt + e is element e of n-tile nt. The 8 lanes
// with the same t need, per n-tile, 8 Philox blocks (2 key groups × 2 queries ×
// 2 row halves): each draws one and 4 rotating shuffles hand every lane the
// word of its own key.
template <int kNT>
VAE_DEV uint64_t dropout_keep_cols(const DropoutCtx& d, int key0, int m0, int lane) {
  static_assert(kNT * 4 <= 64, "one bit per element");
  const int g = lane >> 2, t = lane & 3;
  const int gq = g & 3, gh = g >> 2;
  uint64_t bits = 0;
#pragma unroll 1
  for (int nt = 0; nt < kNT; ++nt) {
    // This lane draws combination c = gq: query column c & 1, row half c >> 1, key group of half gh.
    const Philox4 w = d.block(m0 + nt * 8 + 2 * t + (gq & 1), (key0 + 8 * (gq >> 1)) / 4 + gh);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t got = __shfl_sync(kFullMask, word_of(w, (gq - k) & 3), (4 * gh + ((gq + k) & 3)) * 4 + t);
      const int c = (gq + k) & 3;  // the combination `got` belongs to: element (c >> 1) * 2 + (c & 1) = c
      if (d.keep(got)) bits |= uint64_t{1} << (nt * 4 + c);
    }
  }
  return bits;
}

VAE_DEV bool bit(uint64_t bits, int i) { return ((bits >> i) & 1u) != 0; }

}  // namespace vae_ext::attn
