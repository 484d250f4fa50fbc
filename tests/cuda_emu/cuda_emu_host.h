// The host-side interface of the CPU emulation of CUDA (tests/cuda_emu/cuda_emu.h):
// emulated device memory, device settings and counters. Free of CUDA headers,
// so the torch glue of tests/cuda_emu/ can include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

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
  // Shared-memory race detection (as compute-sanitizer's racecheck): a shared-memory byte written by one
  // thread and read or written by another with no __syncthreads (or, within a warp, a __syncwarp naming
  // both lanes) between the two accesses fails the launch, naming the kernel, the byte and both accesses.
  bool racecheck = true;
  // Per-kernel memory-transaction counters (see KernelCounters); off by default (they cost time).
  bool counters = false;
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

// What one kernel did, summed over its launches since reset_counters() (with Config::counters on). A
// warp-level request is one memory instruction executed by the lanes of a warp that reach it together
// (the k-th execution of that instruction by each lane).
struct KernelCounters {
  uint64_t launches = 0;
  uint64_t threads = 0;                // threads per block, and dynamic shared memory, of its largest launch
  uint64_t dynamic_smem = 0;
  uint64_t global_requests = 0;        // loads and stores to device memory
  uint64_t global_sectors = 0;         // distinct 32-byte sectors those requests touched
  uint64_t global_ideal_sectors = 0;   // the fewest sectors the requests' bytes could have taken
  uint64_t shared_requests = 0;        // ld/st.shared (plain loads and stores of shared memory)
  uint64_t shared_wavefronts = 0;      // their bank-conflict passes (1 per phase when conflict-free)
  uint64_t shared_ideal_wavefronts = 0;
  uint64_t ldmatrix = 0;               // ldmatrix instructions (per warp)
  uint64_t ldmatrix_wavefronts = 0;    // their passes; one per 8x8 matrix when conflict-free
  uint64_t ldmatrix_ideal_wavefronts = 0;
  uint64_t cp_async_requests = 0;      // cp.async instructions (per warp)
  uint64_t cp_async_sectors = 0;       // global sectors they read
  uint64_t cp_async_ideal_sectors = 0;
  uint64_t mma = 0;                    // mma.sync instructions (per warp)
  uint64_t barriers = 0;               // __syncthreads completed (per block)
  uint64_t syncwarps = 0;              // __syncwarp completed (per warp)
};
void reset_counters();
// One line per kernel: "name\tfield=value ..." (the fields of KernelCounters).
std::string counters_report();

}  // namespace vae_ext::emu
