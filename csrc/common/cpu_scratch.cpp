#include "common/cpu_scratch.h"

#include <cstdlib>
#include <mutex>
#include <new>

namespace vae_ext {
namespace {

constexpr size_t kAlign = 64;

struct Block {
  void* data = nullptr;
  size_t bytes = 0;
};

// The process's cached block (one, so the memory kept is bounded whatever the number of
// threads that call the kernels), kept until exit.
struct Cache {
  std::mutex mutex;
  Block block;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: kernels may run during static destruction
  return *c;
}

}  // namespace

void ScratchBuffer::reset(size_t bytes) {
  release();
  if (bytes == 0) return;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.block.data != nullptr && c.block.bytes >= bytes) {
      // Take the cached block: a call running meanwhile (another thread, a nested buffer)
      // allocates its own.
      data_ = c.block.data;
      capacity_ = c.block.bytes;
      c.block = Block{};
      return;
    }
  }
  const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  data_ = std::aligned_alloc(kAlign, rounded);
  if (data_ == nullptr) throw std::bad_alloc();
  capacity_ = rounded;
}

void ScratchBuffer::release() {
  if (data_ == nullptr) return;
  void* to_free = data_;
  if (capacity_ <= kScratchCacheBytes) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    if (capacity_ > c.block.bytes) {  // keep the larger block
      to_free = c.block.data;
      c.block = Block{data_, capacity_};
    }
  }
  std::free(to_free);
  data_ = nullptr;
  capacity_ = 0;
}

size_t scratch_cached_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.block.bytes;
}

}  // namespace vae_ext
