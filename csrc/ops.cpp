// The vae_ext operator library: every op's schema in one place, and the Python
// module that reports what this build contains. Kernels register per device
// in their own folders (TORCH_LIBRARY_IMPL).
#include <ATen/core/enum_tag.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#ifndef VAE_EXT_CUDA_ARCHS
#define VAE_EXT_CUDA_ARCHS ""
#endif
#ifndef VAE_EXT_CPU_ARCH
#define VAE_EXT_CPU_ARCH "generic"
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

  // out = softmax(q kᵀ · scale + masks) v, fused; returns (out, lse float32 (B, H, Sq),
  // rng_state int64 (2,) = the (seed, offset) of the dropout stream, for the backward).
  m.def(
      "masked_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, "
      "bool is_causal, float scale, float dropout_p, int? seed, Generator? generator) -> (Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "masked_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor rng_state, Tensor? attn_mask, Tensor? key_padding_mask, bool is_causal, float scale, float dropout_p) "
      "-> (Tensor, Tensor, Tensor)");
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
    info["cpu_arch"] = std::string(VAE_EXT_CPU_ARCH);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["torch_version"] = std::string(VAE_EXT_BUILT_WITH_TORCH);
    return info;
  });
}
