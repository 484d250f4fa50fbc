// Run-time CPU-capability dispatch, as ATen does it: each CPU kernel source is
// compiled once per capability this build has (setup.py: DEFAULT always; AVX2
// and AVX512 on x86-64), into namespace vae_ext::<CAPABILITY>, and the best one
// the CPU supports is chosen once, at the first call, from cpuid.
// VAE_EXT_CPU_CAPABILITY=default|avx2|avx512 asks for a lower one (a request
// above what the CPU or the build has is lowered to the best available).
#pragma once

#include <string>

#include "common/macros.h"

namespace vae_ext {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The capability the CPU kernels run with (chosen once, then fixed).
CpuCapability cpu_capability();
const char* cpu_capability_name(CpuCapability c);
// The best capability this CPU supports and this build contains.
CpuCapability best_cpu_capability();
// Comma-separated capabilities compiled into this build, lowest first.
std::string built_cpu_capabilities();
// Whether the CPU has AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16): the AVX512 kernels use it for
// bfloat16 inputs where it pays (attention_cpu.cpp). Checked once, from cpuid.
bool cpu_has_avx512_bf16();
// For tests: run the kernels with `name` from now on ("" = the env/best choice).
// Returns the capability now in effect; unknown names raise.
CpuCapability set_cpu_capability(const std::string& name);

}  // namespace vae_ext

// Declares `decl` (a function declaration) in every capability's namespace.
#define VAE_EXT_DECLARE_CPU_KERNEL(decl) \
  namespace DEFAULT {                     \
  decl;                                   \
  }                                       \
  namespace AVX2 {                        \
  decl;                                   \
  }                                       \
  namespace AVX512 {                      \
  decl;                                   \
  }

// Calls vae_ext::<capability>::fn(args...) for the capability in effect. Only
// the capabilities this build compiled are referenced.
#if defined(VAE_EXT_HAVE_CPU_AVX512)
#define VAE_EXT_CPU_CASE_AVX512(fn, ...) \
  case ::vae_ext::CpuCapability::kAvx512: return ::vae_ext::AVX512::fn(__VA_ARGS__);
#else
#define VAE_EXT_CPU_CASE_AVX512(fn, ...)
#endif
#if defined(VAE_EXT_HAVE_CPU_AVX2)
#define VAE_EXT_CPU_CASE_AVX2(fn, ...) \
  case ::vae_ext::CpuCapability::kAvx2: return ::vae_ext::AVX2::fn(__VA_ARGS__);
#else
#define VAE_EXT_CPU_CASE_AVX2(fn, ...)
#endif
#define VAE_EXT_CPU_DISPATCH(fn, ...)                   \
  [&] {                                                 \
    switch (::vae_ext::cpu_capability()) {              \
      VAE_EXT_CPU_CASE_AVX512(fn, __VA_ARGS__)          \
      VAE_EXT_CPU_CASE_AVX2(fn, __VA_ARGS__)            \
      default: return ::vae_ext::DEFAULT::fn(__VA_ARGS__); \
    }                                                   \
  }()
