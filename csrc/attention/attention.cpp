// masked_attention: the torch glue. attention_glue.h checks what the kernels
// assume, derives the per-batch key lengths and the mask view, allocates the
// outputs and fills the params structs (the same code fills them for the
// emulated CUDA kernels of tests/cuda_emu/attention_ops.cpp); here the CPU or
// CUDA kernels are launched.
#include "attention/attention.h"
#include "attention/attention_glue.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "common/torch_utils.h"

#ifdef VAE_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace vae_ext {

namespace {
std::atomic<bool>& panels_flag() {
  static std::atomic<bool> flag{[] {
    const char* s = std::getenv("VAE_EXT_ATTN_GEMM");
    return s == nullptr || (std::strcmp(s, "blas") != 0 && std::strcmp(s, "vec") != 0);
  }()};
  return flag;
}
}  // namespace

bool attention_cpu_panels() { return panels_flag().load(std::memory_order_relaxed); }
void set_attention_cpu_panels(bool on) { panels_flag().store(on, std::memory_order_relaxed); }

namespace {
std::atomic<bool>& bf16_dot_flag() {
  static std::atomic<bool> flag{[] {
    const char* s = std::getenv("VAE_EXT_ATTN_BF16_DOT");
    return s == nullptr || std::strcmp(s, "0") != 0;
  }()};
  return flag;
}
}  // namespace

bool attention_cpu_bf16_dot() { return bf16_dot_flag().load(std::memory_order_relaxed); }
void set_attention_cpu_bf16_dot(bool on) { bf16_dot_flag().store(on, std::memory_order_relaxed); }

namespace {

using attention_glue::check_and_prepare;
using attention_glue::Inputs;
using glue::AtenMemory;

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale, double dropout_p,
    std::optional<int64_t> seed, const std::optional<at::Generator>& generator, bool causal_lower_right) {
  const char* op = "masked_attention_forward";
  const Inputs in = check_and_prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, op);
  attention_glue::ForwardCall call = attention_glue::prepare_forward(in, is_causal, scale, dropout_p, op,
                                                                     causal_lower_right, AtenMemory(q.device()));
  AttentionParams& p = call.params;
  if (p.kv_len == 0) {  // no key at all: every row is empty
    call.out.zero_();
    call.lse.fill_(std::numeric_limits<float>::infinity());
    return {call.out, call.lse, call.rng_state};
  }
  const bool any_rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len > 0;
  if (q.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    // One Philox counter_lo value per call: the element index lives in counter_hi.
    if (dropout_p > 0.0) p.philox = philox_state_cuda(seed, generator, 4);  // rng_state is written by the kernel
    if (any_rows) attention_forward_cuda(p, at::cuda::getCurrentCUDAStream());
#else
    TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
  } else {
    if (dropout_p > 0.0) {
      p.philox = philox_state_cpu(seed, generator);
      p.rng_state[0] = static_cast<int64_t>(p.philox.seed);
      p.rng_state[1] = static_cast<int64_t>(p.philox.offset);
    }
    if (any_rows) VAE_EXT_CPU_DISPATCH(attention_forward_cpu, p);
  }
  return {call.out, call.lse, call.rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double scale, double dropout_p,
    bool causal_lower_right) {
  const char* op = "masked_attention_backward";
  const Inputs in = check_and_prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, op);
  const AtenMemory mem(q.device());
  attention_glue::BackwardCall call = attention_glue::prepare_backward(
      in, grad_out, out, lse, rng_state, is_causal, scale, dropout_p, op, causal_lower_right, mem);
  AttentionBackwardParams& bp = call.params;
  if (static_cast<int64_t>(bp.fwd.batch) * bp.fwd.heads * bp.fwd.q_len == 0 || bp.fwd.kv_len == 0) {
    call.dq.zero_();  // nothing attends: every gradient is zero
    call.dk.zero_();
    call.dv.zero_();
    return {call.dq, call.dk, call.dv};
  }
  if (q.is_cuda()) {
#ifdef VAE_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    bp.deterministic = at::globalContext().deterministicAlgorithms();
    const at::Tensor workspace = attention_glue::attach_cuda_workspace(bp, mem);
    attention_backward_cuda(bp, at::cuda::getCurrentCUDAStream());
#else
    TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
  } else {
    VAE_EXT_CPU_DISPATCH(attention_backward_cpu, bp);
  }
  return {call.dq, call.dk, call.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("masked_attention_forward", &masked_attention_forward_impl);
  m.impl("masked_attention_backward", &masked_attention_backward_impl);
}

#ifdef VAE_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("masked_attention_forward", &masked_attention_forward_impl);
  m.impl("masked_attention_backward", &masked_attention_backward_impl);
}
#endif

}  // namespace vae_ext
