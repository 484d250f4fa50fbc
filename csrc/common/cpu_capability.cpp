#include "common/cpu_capability.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>

namespace vae_ext {
namespace {

bool cpu_has(CpuCapability c) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (c) {
    case CpuCapability::kAvx512:  // what ATen's AVX512 kernels need (libgcc checks the OS saves zmm state)
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case CpuCapability::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
    default: return true;
  }
#else
  return c == CpuCapability::kDefault;
#endif
}

bool detect_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return cpu_has(CpuCapability::kAvx512) && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool built(CpuCapability c) {
  switch (c) {
#if defined(VAE_EXT_HAVE_CPU_AVX512)
    case CpuCapability::kAvx512: return true;
#endif
#if defined(VAE_EXT_HAVE_CPU_AVX2)
    case CpuCapability::kAvx2: return true;
#endif
    case CpuCapability::kDefault: return true;
    default: return false;
  }
}

bool parse(std::string name, CpuCapability* out) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (name == "default") *out = CpuCapability::kDefault;
  else if (name == "avx2") *out = CpuCapability::kAvx2;
  else if (name == "avx512") *out = CpuCapability::kAvx512;
  else return false;
  return true;
}

CpuCapability from_env() {
  CpuCapability c = best_cpu_capability();
  if (const char* s = std::getenv("VAE_EXT_CPU_CAPABILITY")) {
    CpuCapability asked;
    if (parse(s, &asked)) c = std::min(c, asked);  // unknown values are ignored, as ATEN_CPU_CAPABILITY's are
  }
  return c;
}

std::atomic<int>& current() {
  static std::atomic<int> value{static_cast<int>(from_env())};
  return value;
}

}  // namespace

bool cpu_has_avx512_bf16() {
  static const bool has = detect_avx512_bf16();
  return has;
}

CpuCapability best_cpu_capability() {
  for (CpuCapability c : {CpuCapability::kAvx512, CpuCapability::kAvx2}) {
    if (built(c) && cpu_has(c)) return c;
  }
  return CpuCapability::kDefault;
}

CpuCapability cpu_capability() { return static_cast<CpuCapability>(current().load(std::memory_order_relaxed)); }

const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::kAvx512: return "avx512";
    case CpuCapability::kAvx2: return "avx2";
    default: return "default";
  }
}

std::string built_cpu_capabilities() {
  std::string s = "default";
  if (built(CpuCapability::kAvx2)) s += ",avx2";
  if (built(CpuCapability::kAvx512)) s += ",avx512";
  return s;
}

CpuCapability set_cpu_capability(const std::string& name) {
  CpuCapability c = CpuCapability::kDefault;
  if (name.empty()) {
    c = from_env();
  } else {
    TORCH_CHECK(parse(name, &c), "vae_ext: unknown CPU capability '", name, "' (default, avx2, avx512)");
    TORCH_CHECK(built(c) && cpu_has(c), "vae_ext: CPU capability '", name, "' is not available here (built: ",
                built_cpu_capabilities(), "; best on this CPU: ", cpu_capability_name(best_cpu_capability()), ")");
  }
  current().store(static_cast<int>(c), std::memory_order_relaxed);
  return c;
}

}  // namespace vae_ext
