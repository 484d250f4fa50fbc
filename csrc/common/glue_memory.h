// Where the torch glue of every op (<op>/<op>_glue.h) gets its memory. The glue
// checks the inputs, brings them to the layouts the kernels read, allocates the
// outputs and fills the params struct; the caller says where memory comes from.
// The extension passes AtenMemory (the tensors' own device); the emulated CUDA
// tests (tests/cuda_emu/) pass guarded, poisoned emulated device memory, so the
// emulated kernels run on exactly the params production fills. ATen only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace vae_ext::glue {

class Memory {
 public:
  virtual ~Memory() = default;
  // An uninitialised contiguous tensor.
  virtual at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) const = 0;
  // t itself when it is contiguous and of `dtype`, else a contiguous copy of it in `dtype`.
  virtual at::Tensor contiguous(const at::Tensor& t, at::ScalarType dtype) const = 0;
  at::Tensor contiguous(const at::Tensor& t) const { return contiguous(t, t.scalar_type()); }
};

// The allocator of a device of ATen's (the tensors' own).
class AtenMemory final : public Memory {
 public:
  explicit AtenMemory(at::Device device) : device_(device) {}
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) const override {
    return at::empty(sizes, at::TensorOptions().device(device_).dtype(dtype));
  }
  at::Tensor contiguous(const at::Tensor& t, at::ScalarType dtype) const override { return t.to(dtype).contiguous(); }

 private:
  at::Device device_;
};

}  // namespace vae_ext::glue
