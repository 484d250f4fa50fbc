// Glue of csrc/reparameterize/reparameterize_cuda.cu: the reparameterize CUDA entry points, run
// under the CPU emulation, as vae_ext_emu ops on CPU tensors. The production glue
// (reparameterize/reparameterize_glue.h) checks and fills the params over copies of the inputs in
// emulated device memory, allocating through it.
#include <tuple>

#include "emu_glue.h"
#include "reparameterize/reparameterize_glue.h"

namespace vae_ext::emu_glue::reparameterize {
namespace {

// z (num_samples, *mu.shape) = reparameterize_forward_cuda on copies of the inputs in device memory. Without eps,
// eps is drawn from Philox (seed, offset); with seed_in_device_memory the kernel reads seed and offset
// through pointers, as under CUDA-graph capture.
at::Tensor reparameterize_forward(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
                                  int64_t num_samples, int64_t seed, int64_t offset, bool seed_in_device_memory) {
  reparameterize_glue::ForwardCall call =
      reparameterize_glue::prepare_forward(to_device(mu), to_device(logvar), to_device(eps), num_samples, DeviceMemory());
  at::Tensor rng = device_empty({2}, at::kLong);  // what a captured CUDA graph reads: seed, offset
  rng.mutable_data_ptr<int64_t>()[0] = seed;
  rng.mutable_data_ptr<int64_t>()[1] = offset;
  ReparameterizeParams& p = call.params;
  if (seed_in_device_memory) {
    p.philox.seed_ptr = rng.const_data_ptr<int64_t>();
    p.philox.offset_ptr = rng.const_data_ptr<int64_t>() + 1;
  } else {
    p.philox.seed = static_cast<uint64_t>(seed);
    p.philox.offset = static_cast<uint64_t>(offset);
  }
  reparameterize_forward_cuda(p, nullptr);
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward(const at::Tensor& grad_z, const at::Tensor& z,
                                                           const at::Tensor& mu) {
  const reparameterize_glue::BackwardCall call =
      reparameterize_glue::prepare_backward(to_device(grad_z), to_device(z), to_device(mu), DeviceMemory());
  reparameterize_backward_cuda(call.params, nullptr);
  return {call.grad_mu, call.grad_logvar};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vae_ext_emu, m) {
  m.def(
      "reparameterize_forward(Tensor mu, Tensor logvar, Tensor? eps, int num_samples, int seed, int offset=0, "
      "bool seed_in_device_memory=False) -> Tensor",
      &reparameterize_forward);
  m.def("reparameterize_backward(Tensor grad_z, Tensor z, Tensor mu) -> (Tensor, Tensor)", &reparameterize_backward);
}

}  // namespace vae_ext::emu_glue::reparameterize
