// The vae_ext operator library: every op's schema in one place, and the Python
// module that reports what this build contains. Kernels register per device
// in their own folders (TORCH_LIBRARY_IMPL).
#include <ATen/core/enum_tag.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "attention/attention.h"
#include "common/cpu_capability.h"
#include "common/cpu_scratch.h"

#ifndef VAE_EXT_CUDA_ARCHS
#define VAE_EXT_CUDA_ARCHS ""
#endif
#ifndef VAE_EXT_BUILT_WITH_TORCH
#define VAE_EXT_BUILT_WITH_TORCH ""
#endif

TORCH_LIBRARY(vae_ext, m) {
  // z[k] = mu + eps[k] * exp(0.5 * logvar); eps drawn in-kernel (Philox) unless given.
  m.def(
      "reparameterize(Tensor mu, Tensor logvar, Tensor? eps, int num_samples, int? seed, Generator? generator) "
      "-> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def("reparameterize_backward(Tensor grad_z, Tensor z, Tensor mu) -> (Tensor, Tensor)");
  // Negative ELBO (loss, recon, kl) reduced over the batch, and, where needs_grad asks
  // ([recon, mu, logvar, prior_mu, prior_logvar, obs_logvar]), the gradients of the
  // reduced recon (recon group) and kl (latent group) for an upstream gradient of 1;
  // the others come back empty. Semantics in csrc/elbo/elbo.h.
  m.def(
      "elbo_forward(Tensor recon, Tensor target, Tensor mu, Tensor logvar, Tensor? prior_mu, "
      "Tensor? prior_logvar, Tensor? obs_logvar, str likelihood, str reduction, float beta, float free_bits, "
      "int ignore_index, bool[6] needs_grad) -> (Tensor loss, Tensor recon_loss, Tensor kl, Tensor grad_recon, "
      "Tensor grad_mu, Tensor grad_logvar, Tensor grad_prior_mu, Tensor grad_prior_logvar, Tensor grad_obs_logvar)");
  // The backward of elbo_forward: grad[b] * scale[b] (or scale[0]), in grad's dtype.
  m.def("elbo_scale_grad(Tensor grad, Tensor scale) -> Tensor");

  // out = softmax(q kᵀ · scale + masks) v, fused; returns (out, lse float32 (B, H, Sq),
  // rng_state int64 (2,) = the (seed, offset) of the dropout stream, for the backward).
  // causal_lower_right: is_causal aligned to the lower-right corner (j <= i + Sk - Sq).
  m.def(
      "masked_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, "
      "bool is_causal, float scale, float dropout_p, int? seed, Generator? generator, "
      "bool causal_lower_right=False) -> (Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "masked_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor rng_state, Tensor? attn_mask, Tensor? key_padding_mask, bool is_causal, float scale, float dropout_p, "
      "bool causal_lower_right=False) -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vae_ext compiled operators (registered as torch.ops.vae_ext.*)";
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef VAE_EXT_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = std::string(VAE_EXT_CUDA_ARCHS);
#ifdef VAE_EXT_WITH_CUDA
    pybind11::list tc_dims;
    for (const int d : vae_ext::attn::kTensorCoreHeadDims) tc_dims.append(d);
    info["attention_cuda_tensor_core_head_dims"] = tc_dims;
    info["attention_cuda_max_head_dim"] = vae_ext::attn::kMaxSimtHeadDim;
    info["attention_cuda_max_backward_head_dim"] = vae_ext::attn::kMaxSimtBackwardHeadDim;
#endif
    info["cpu_capabilities"] = vae_ext::built_cpu_capabilities();
    info["cpu_capability"] = std::string(vae_ext::cpu_capability_name(vae_ext::cpu_capability()));
    info["cpu_capability_best"] = std::string(vae_ext::cpu_capability_name(vae_ext::best_cpu_capability()));
    info["cpu_avx512_bf16"] = vae_ext::cpu_has_avx512_bf16();
    info["attention_cpu_bf16_dot"] = vae_ext::attention_cpu_bf16_dot();  // the switch (VAE_EXT_ATTN_BF16_DOT)
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["torch_version"] = std::string(VAE_EXT_BUILT_WITH_TORCH);
    return info;
  });
  // Tests and benchmarks only: the CPU attention tile products (forward and backward) on packed panels or not.
  m.def("_set_attention_cpu_panels", [](bool on) {
    const bool before = vae_ext::attention_cpu_panels();
    vae_ext::set_attention_cpu_panels(on);
    return before;
  });
  // Tests and benchmarks only: the AVX512-BF16 products of the bfloat16 CPU forward and backward on or off.
  m.def("_set_attention_cpu_bf16_dot", [](bool on) {
    const bool before = vae_ext::attention_cpu_bf16_dot();
    vae_ext::set_attention_cpu_bf16_dot(on);
    return before;
  });
  // Tests only: the bytes of scratch memory the process keeps for the next call (cpu_scratch.h).
  m.def("_scratch_cached_bytes", []() { return vae_ext::scratch_cached_bytes(); });
  // Tests only: switch the CPU kernels' capability in-process ("" = the env/best choice).
  m.def("_set_cpu_capability", [](const std::string& name) {
    return std::string(vae_ext::cpu_capability_name(vae_ext::set_cpu_capability(name)));
  });
}
