// Scratch memory of the CPU kernels that outlives a call: the buffers of megabytes that
// every call fills (the forward's packed K/V panels, the backward's split dq
// accumulators). Allocated and freed per call, they cost the kernel its page faults:
// glibc returns such blocks to the system (munmap or a brk trim) and the next call
// touches fresh zero pages again (perf, ViT-B/16 float32 forward: page faults plus
// the trims took ~20 % of the call). A ScratchBuffer takes the process's cached block
// when it is free and large enough and gives it back when it goes out of scope (the
// larger of the two is kept); the process keeps one block of at most kScratchCacheBytes
// (past that, a call's own work dwarfs its page faults, and its buffer is freed as
// before), so what it holds is bounded however many threads call the kernels.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vae_ext {

constexpr size_t kScratchCacheBytes = size_t(32) << 20;

class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ~ScratchBuffer() { release(); }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;

  // At least `bytes` bytes, 64-byte aligned, uninitialised (what the buffer held is given back first).
  void reset(size_t bytes);
  void* data() const { return data_; }

 private:
  void release();
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

// The bytes of the cached block (tests).
size_t scratch_cached_bytes();

}  // namespace vae_ext
