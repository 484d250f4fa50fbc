// Helpers for the glue files of tests/cuda_emu/: each glue file exposes a
// kernel entry point of a .cu file (built under the CPU emulation) as a torch
// op in the vae_ext_emu namespace, taking CPU tensors.
//
// Tensors handed to a kernel are copied into emulated "device memory"
// (emu::device_alloc): a read or write past the end of any of them is reported
// by the launch, and outputs start as 0xFF bytes (NaN), so an element a kernel
// forgets to write shows.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "cuda_emu_host.h"
#include "common/dtype.h"
#include "common/glue_memory.h"
#include "common/torch_utils.h"

namespace vae_ext::emu_glue {

// An uninitialised (0xFF-filled) tensor in device memory, `misalign` bytes past a 16-byte boundary.
inline at::Tensor device_empty(at::IntArrayRef sizes, at::ScalarType dtype, size_t misalign = 0) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  void* ptr = emu::device_alloc(bytes, misalign);
  return at::from_blob(ptr, sizes, [](void* p) { emu::device_free(p); }, at::TensorOptions().dtype(dtype));
}

// A contiguous copy of CPU tensor `t` in device memory. A view keeps its offset's alignment (mod 16
// bytes), so a kernel's misaligned path runs for a misaligned view.
inline at::Tensor to_device(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "vae_ext_emu: tensors must be on the CPU (emulated device memory is host memory)");
  const size_t misalign = static_cast<size_t>(t.storage_offset() * t.element_size()) % 16;
  at::Tensor d = device_empty(t.sizes(), t.scalar_type(), misalign);
  d.copy_(t);
  return d;
}

// A copy of CPU tensor `t` in device memory with t's strides (non-negative), `misalign` bytes past a 16-byte
// boundary: a view keeps its layout, and a dim of stride 0 (an expanded tensor) stays a broadcast of one
// stored slice.
inline at::Tensor to_device_strided(const at::Tensor& t, int64_t misalign) {
  TORCH_CHECK(t.device().is_cpu(), "vae_ext_emu: tensors must be on the CPU (emulated device memory is host memory)");
  int64_t span = t.numel() == 0 ? 0 : 1;
  at::Tensor stored = t;  // the elements of t that have their own memory
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) >= 0, "vae_ext_emu: negative strides are not supported");
    if (t.numel() > 0) span += (t.size(d) - 1) * t.stride(d);
    if (t.stride(d) == 0 && t.size(d) > 1) stored = stored.narrow(d, 0, 1);
  }
  at::Tensor buf = device_empty({span}, t.scalar_type(), static_cast<size_t>(misalign));
  buf.as_strided(stored.sizes(), t.strides(), 0).copy_(stored);
  return buf.as_strided(t.sizes(), t.strides(), 0);
}

inline std::optional<at::Tensor> to_device(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return to_device(*t);
}

// Emulated device memory as the glue's allocator (common/glue_memory.h): as a CUDA caching
// allocator, fresh tensors start 16-byte aligned and uninitialised (here 0xFF bytes). The
// glue is handed inputs already copied into device memory (with their strides and any
// misalignment), so a contiguous one is used in place.
class DeviceMemory final : public glue::Memory {
 public:
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) const override { return device_empty(sizes, dtype); }
  at::Tensor contiguous(const at::Tensor& t, at::ScalarType dtype) const override {
    if (t.is_contiguous() && t.scalar_type() == dtype) return t;
    at::Tensor out = device_empty(t.sizes(), dtype);
    out.copy_(t);
    return out;
  }
};

inline DType dtype_of(const at::Tensor& t) { return to_dtype(t.scalar_type(), "vae_ext_emu"); }

}  // namespace vae_ext::emu_glue
