#include "common/cpu_scratch.h"

#include <cstdlib>
#include <new>

namespace vae_ext {
namespace {

constexpr size_t kAlign = 64;

struct Block {
  void* data = nullptr;
  size_t bytes = 0;
};

// The calling thread's cached block; freed when the thread exits.
struct ThreadCache {
  Block block;
  ~ThreadCache() { std::free(block.data); }
};

ThreadCache& thread_cache() {
  thread_local ThreadCache cache;
  return cache;
}

}  // namespace

void ScratchBuffer::reset(size_t bytes) {
  release();
  if (bytes == 0) return;
  Block& cached = thread_cache().block;
  if (cached.data != nullptr && cached.bytes >= bytes) {
    // Take the cached block: nested buffers on this thread allocate their own.
    data_ = cached.data;
    capacity_ = cached.bytes;
    cached = Block{};
    return;
  }
  const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  data_ = std::aligned_alloc(kAlign, rounded);
  if (data_ == nullptr) throw std::bad_alloc();
  capacity_ = rounded;
}

void ScratchBuffer::release() {
  if (data_ == nullptr) return;
  Block& cached = thread_cache().block;
  if (capacity_ <= kScratchCacheBytes && capacity_ > cached.bytes) {
    std::free(cached.data);  // keep the larger block
    cached = Block{data_, capacity_};
  } else {
    std::free(data_);
  }
  data_ = nullptr;
  capacity_ = 0;
}

size_t scratch_cached_bytes() { return thread_cache().block.bytes; }

}  // namespace vae_ext
