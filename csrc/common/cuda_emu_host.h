// The host-side interface of the CPU emulation of CUDA (common/cuda_emu.h):
// emulated device memory, device settings and counters. Free of CUDA headers,
// so the torch glue of tests/cuda_emu/ can include it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vae_ext::emu {

// "Device memory" for tests: host memory that ends less than 16 bytes before an
// inaccessible page (an access past the end faults and the launch reports it),
// with canary bytes before it and in the alignment slack, checked after every
// launch. The address is `misalign` (mod 16) past a 16-byte boundary: aligned as
// far as the size allows when misalign is 0 (a multiple of 32 bytes starts
// 32-byte aligned...). The contents start as 0xFF bytes (NaN), as uninitialised
// memory does.
void* device_alloc(size_t bytes, size_t misalign = 0);
void device_free(void* ptr);

// Emulated device properties the tests may change.
struct Config {
  int num_sms = 132;               // cudaDevAttrMultiProcessorCount (fewer blocks for grid-stride kernels)
  size_t stack_bytes = 256 << 10;  // stack of each emulated thread
};
Config& config();

// Counters, for tests of the emulator itself.
struct Stats {
  uint64_t launches = 0;
  uint64_t blocks = 0;
  uint64_t threads = 0;
  uint64_t context_switches = 0;
};
Stats stats();

}  // namespace vae_ext::emu
