// Per-element math of masked_attention shared by the CPU and CUDA kernels: the
// dropout stream and predicate, the mask term, the online-softmax step, the row
// finalisation (out scale and log-sum-exp, +inf for a row that sees no key) and the
// backward's probability recomputation and softmax gradient. The kernels keep only
// their reductions (vector, quad and warp) and tiling. See csrc/attention/attention.h
// for the contract.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"
#include "common/math.h"

namespace vae_ext {
VAE_EXT_CPU_NS_BEGIN

// ---------------------------------------------------------------- dropout

// ceil(dropout_p * 2^24): an element is kept iff its 24 random bits are >= this.
// Computed on the host from the double the op received (exact: 2^24 * p is exact in double).
inline uint32_t attention_dropout_threshold(double dropout_p) {
  return static_cast<uint32_t>(std::ceil(dropout_p * 16777216.0));
}

// Philox counter_hi of the block holding element (row, col): one block of four
// 32-bit words per four consecutive keys, row = (b * H + h) * Sq + i.
VAE_HD uint64_t attention_dropout_group(int64_t row, int64_t kv_len, int64_t col) {
  return static_cast<uint64_t>(row) * static_cast<uint64_t>((kv_len + 3) / 4) + static_cast<uint64_t>(col / 4);
}

// Whether the Philox word of an element keeps it.
VAE_HD bool attention_dropout_keep(uint32_t word, uint32_t threshold) { return (word >> 8) >= threshold; }

// ---------------------------------------------------------------- masks

// A score with a mask term added (0 or an additive mask value; -inf where the pair
// is hidden: causal, a False of a bool mask, -inf in an additive mask). A hidden
// pair's score is -inf itself, not score + (-inf): a NaN score (NaN in q or in a
// hidden key) stays out of a row that cannot see that key.
template <typename T>
VAE_HD T masked_score(T score, T term) {
  return term == -std::numeric_limits<T>::infinity() ? term : score + term;
}

// An additive mask term in the log2 domain (the kernels whose scores are scale·log2(e)·q·k):
// term · log2(e), with -inf kept (a hidden pair) and a finite term kept finite. A term below
// -FLT_MAX / log2(e), such as the finfo(float32).min masks transformers builds, would
// overflow to -inf and hide a pair that the natural-domain softmax only pushes down (a row
// whose keys all carry it attends to them uniformly there): it becomes -FLT_MAX, as
// score + term already is in the natural domain.
template <typename T>
VAE_HD T mask_term_log2(T term, T log2e) {
  const T t = term * log2e;
  return t == -std::numeric_limits<T>::infinity() && term != t ? -std::numeric_limits<T>::max() : t;
}

// ---------------------------------------------------------------- primitives

// The formulas below are templates over the value type V: the CUDA kernels use them
// with float, the CPU kernel with float / double and with at::vec::Vectorized (a
// whole row chunk at once; that specialisation is in attention_cpu.cpp). The exp is
// a parameter: the CPU takes it in the natural domain (NaturalExp, or the vector
// exp), the CUDA kernels in the log2 domain (exp2, the scale folded into log2 e),
// so scores, maxima and lse are in that domain there; every rule is the same.
template <typename V>
struct AttentionMath {  // scalars
  using scalar = V;
  // x == c ? a : b
  static VAE_HD V select_eq(V x, V c, V a, V b) { return x == c ? a : b; }
};

struct NaturalExp {
  template <typename T>
  VAE_HD T operator()(T x) const {
    return exp_(x);
  }
};

// ---------------------------------------------------------------- online softmax

// Running state of one query row: the largest score seen so far (-inf before
// any visible key) and the sum of exp(score - max) over the keys seen.
template <typename acc_t>
struct SoftmaxRow {
  acc_t max;
  acc_t sum;
};

// The running max after a tile whose largest score is tile_max. A NaN tile_max
// (a visible score is NaN) wins, so the row's output and lse are NaN, as softmax
// gives. (`tile_max > max` would be false for NaN.) The CUDA kernels reduce with
// fmaxf, which drops a NaN; the NaN still reaches the row through its exp.
template <typename acc_t>
VAE_HD acc_t softmax_new_max(acc_t row_max, acc_t tile_max) {
  return !(tile_max <= row_max) ? tile_max : row_max;
}

// The reference the exp of a tile's scores is taken against: the row's max, or 0 while
// the row has seen no visible key (max = -inf), so that every weight of such a row is
// exp(-inf) = 0 and no -inf - (-inf) = NaN arises.
template <typename acc_t>
VAE_HD acc_t softmax_exp_reference(acc_t row_max) {
  return row_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : row_max;
}

// One online-softmax step: the row's max becomes new_max (the max over the row so
// far and the new tile); the row's sum is multiplied by factor = exp(old max - ref),
// and so must the row's output accumulator be; the tile's weights are then
// exp(score - ref), to be added to the sum. For a row that has seen no key, ref = 0
// and factor = 0 on a sum and accumulator that are 0. Once max or sum is NaN it stays
// NaN whatever later tiles hold.
template <typename acc_t>
struct SoftmaxStep {
  acc_t ref;
  acc_t factor;
};
template <typename acc_t, typename Exp>
VAE_HD SoftmaxStep<acc_t> online_softmax_step(acc_t& row_max, acc_t& row_sum, acc_t new_max, Exp exp) {
  const acc_t ref = softmax_exp_reference(new_max);
  const acc_t factor = exp(row_max - ref);  // exp(-inf) = 0 for the first visible tile
  row_max = new_max;
  row_sum *= factor;
  return {ref, factor};
}

// After the last tile: the factor that turns the output accumulator into the
// output (1 / sum, or 0 for a row that saw no key; NaN for a NaN sum) ...
// (A row that saw a key has sum >= 1: its largest score contributes exp(0).)
template <typename acc_t>
VAE_HD acc_t softmax_out_scale(acc_t sum) {
  return sum == acc_t(0) ? acc_t(0) : acc_t(1) / sum;
}
template <typename acc_t>
VAE_HD acc_t softmax_out_scale(const SoftmaxRow<acc_t>& state) {
  return softmax_out_scale(state.sum);
}

// ... and the row's natural log-sum-exp, +inf for a row that saw no key, so that
// exp(score - lse) is 0 for every key of such a row in the backward; NaN for a
// row whose sum is NaN, so that its backward is NaN too. max_to_natural: 1 for a
// max in the natural domain (CPU), ln 2 for one in the log2 domain (CUDA).
template <typename acc_t>
VAE_HD acc_t softmax_lse(acc_t row_max, acc_t sum, acc_t max_to_natural) {
  return sum == acc_t(0) ? std::numeric_limits<acc_t>::infinity() : row_max * max_to_natural + log_(sum);
}
template <typename acc_t>
VAE_HD acc_t softmax_lse(const SoftmaxRow<acc_t>& state) {
  return softmax_lse(state.max, state.sum, acc_t(1));
}

// ---------------------------------------------------------------- backward

// P = exp(score - lse), recomputed from the saved lse; exactly 0 for a hidden pair
// (score = -inf) even when lse is +inf (a row that saw no key) or NaN (a row that saw
// a NaN score): NaN flows along visible pairs only.
template <typename V, typename Exp>
VAE_HD V softmax_prob_from_lse(V score, V lse, Exp exp) {
  using M = AttentionMath<V>;
  using S = typename M::scalar;
  return M::select_eq(score, V(-std::numeric_limits<S>::infinity()), V(S(0)), exp(score - lse));
}

// dS = P * (dP - delta), delta = rowsum(dO * O): the softmax backward of one element;
// exactly 0 where P is 0 (a hidden pair) even when dP or delta is NaN (a NaN value of a
// hidden key, the delta of a NaN row): NaN flows along visible pairs only.
template <typename V>
VAE_HD V softmax_grad(V prob, V dprob, V delta) {
  using M = AttentionMath<V>;
  using S = typename M::scalar;
  return M::select_eq(prob, V(S(0)), V(S(0)), prob * (dprob - delta));
}

VAE_EXT_CPU_NS_END
}  // namespace vae_ext
