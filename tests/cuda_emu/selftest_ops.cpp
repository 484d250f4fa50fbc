// Glue of tests/cuda_emu/selftest.cu: the emulator's own test kernels as vae_ext_emu ops.
#include <string>
#include <tuple>

#include "emu_glue.h"
#include "selftest.h"

namespace vae_ext::emu_glue::selftest {
namespace {

namespace st = vae_ext::emu_selftest;

at::Tensor mma_matmul(const at::Tensor& a, const at::Tensor& b, bool b_nk) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.scalar_type() == b.scalar_type(), "mma_matmul: 2-d, same dtype");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf, "mma_matmul: bf16 or f16");
  const int64_t M = a.size(0), K = a.size(1), N = b_nk ? b.size(0) : b.size(1);
  TORCH_CHECK((b_nk ? b.size(1) : b.size(0)) == K, "mma_matmul: inner dims differ");
  TORCH_CHECK(M % 64 == 0 && N % 32 == 0 && K % 32 == 0, "mma_matmul: M % 64, N % 32, K % 32 must be 0");
  const at::Tensor da = to_device(a.contiguous()), db = to_device(b.contiguous());
  at::Tensor c = device_empty({M, N}, at::kFloat);
  st::mma_matmul(da.const_data_ptr(), db.const_data_ptr(), c.mutable_data_ptr<float>(), static_cast<int>(M),
                 static_cast<int>(N), static_cast<int>(K), a.scalar_type() == at::kBFloat16, b_nk);
  return c;
}

at::Tensor pack(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() % 2 == 0, "pack: float32 with an even number of elements");
  const at::Tensor dx = to_device(x.contiguous());
  at::Tensor out = device_empty({x.numel()}, at::kInt);  // uint32 words: bf16 pair, f16 pair, ...
  st::pack(dx.const_data_ptr<float>(), reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int>()),
           static_cast<int>(x.numel() / 2));
  return out;
}

// Returns (per-thread results, [float sum, int count, ull sum, double sum, int max, cas counter] as float64).
std::tuple<at::Tensor, at::Tensor> warp_ops(const at::Tensor& x, int64_t blocks, at::IntArrayRef block) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && block.size() == 3, "warp_ops: float32 x, block of 3 dims");
  const int64_t n = x.numel();
  const at::Tensor dx = to_device(x.contiguous());
  at::Tensor out = device_empty({n, st::kWarpOpsCols}, at::kFloat);
  at::Tensor fsum = to_device(at::zeros({1}, at::kFloat));
  at::Tensor isum = to_device(at::zeros({1}, at::kInt));
  at::Tensor usum = to_device(at::zeros({1}, at::kLong));
  at::Tensor dsum = to_device(at::zeros({1}, at::kDouble));
  at::Tensor imax = to_device(at::full({1}, -1000000, at::kInt));
  at::Tensor cas = to_device(at::zeros({1}, at::kInt));
  st::warp_ops(dx.const_data_ptr<float>(), out.mutable_data_ptr<float>(), fsum.mutable_data_ptr<float>(),
               isum.mutable_data_ptr<int>(), reinterpret_cast<unsigned long long*>(usum.mutable_data_ptr<int64_t>()),
               dsum.mutable_data_ptr<double>(), imax.mutable_data_ptr<int>(),
               reinterpret_cast<unsigned*>(cas.mutable_data_ptr<int>()), static_cast<int>(blocks),
               static_cast<int>(block[0]), static_cast<int>(block[1]), static_cast<int>(block[2]));
  const at::Tensor totals = at::cat({fsum.to(at::kDouble), isum.to(at::kDouble), usum.to(at::kDouble), dsum,
                                     imax.to(at::kDouble), cas.to(at::kDouble)});
  return {out, totals};
}

at::Tensor partial_warp(const at::Tensor& x) {
  const at::Tensor dx = to_device(x.contiguous());
  at::Tensor out = device_empty({48, 3}, at::kFloat);
  st::partial_warp(dx.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  return out;
}

at::Tensor exited_lanes(const at::Tensor& x) {
  const at::Tensor dx = to_device(x.contiguous());
  at::Tensor out = device_empty({32, 2}, at::kFloat);
  st::exited_lanes(dx.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  return out;
}

int64_t spin_wait() {
  at::Tensor flag = to_device(at::zeros({1}, at::kInt));
  at::Tensor out = to_device(at::zeros({1}, at::kInt));
  st::spin_wait(flag.mutable_data_ptr<int>(), out.mutable_data_ptr<int>());
  return out.item<int>();
}

at::Tensor neighbours(int64_t blocks, int64_t threads, bool barrier) {
  at::Tensor out = device_empty({blocks * threads}, at::kFloat);
  st::neighbours(out.mutable_data_ptr<float>(), static_cast<int>(blocks), static_cast<int>(threads), barrier);
  return out;
}

at::Tensor cp_async_copy(const at::Tensor& x, bool wait, bool pred) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() % 4 == 0, "cp_async_copy: float32, 4 per thread");
  const at::Tensor dx = to_device(x.contiguous());
  at::Tensor out = device_empty({x.numel()}, at::kFloat);
  st::cp_async_copy(dx.const_data_ptr<float>(), out.mutable_data_ptr<float>(), static_cast<int>(x.numel() / 4), wait,
                    pred);
  return out;
}

double big_smem(int64_t floats, bool opt_in) {
  at::Tensor out = to_device(at::zeros({1}, at::kFloat));
  st::big_smem(out.mutable_data_ptr<float>(), static_cast<int>(floats), opt_in);
  return out.item<float>();
}

int64_t noop(int64_t blocks, at::IntArrayRef block, int64_t smem) {
  at::Tensor out = to_device(at::zeros({1}, at::kInt));
  st::noop(out.mutable_data_ptr<int>(), static_cast<int>(blocks), static_cast<int>(block[0]),
           static_cast<int>(block[1]), static_cast<int>(block[2]), static_cast<int>(smem));
  return out.item<int>();
}

// Runs a kernel that breaks rule `what` on small device buffers of n elements.
at::Tensor race(int64_t what, bool fixed) {
  at::Tensor out = to_device(at::arange(256, at::kFloat));
  st::race(static_cast<int>(what), fixed, out.mutable_data_ptr<float>());
  return out.narrow(0, 0, 64);
}

at::Tensor pattern(int64_t which) {
  const at::Tensor in = to_device(at::arange(128, at::kFloat));
  at::Tensor out = device_empty({32}, at::kFloat);
  st::pattern(static_cast<int>(which), in.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  return out;
}

void misbehave(const std::string& what, int64_t n) {
  at::Tensor out = device_empty({n}, at::kFloat);
  at::Tensor in = to_device(at::ones({n}, at::kFloat));
  at::Tensor iout = to_device(at::zeros({std::max<int64_t>(n, 32)}, at::kInt));
  at::Tensor iin = to_device(at::zeros({32}, at::kInt));
  st::misbehave(what.c_str(), out.mutable_data_ptr<float>(), in.const_data_ptr<float>(), iout.mutable_data_ptr<int>(),
                iin.const_data_ptr<int>(), static_cast<int>(n));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vae_ext_emu, m) {
  m.def("selftest_mma_matmul(Tensor a, Tensor b, bool b_nk=False) -> Tensor", &mma_matmul);
  m.def("selftest_pack(Tensor x) -> Tensor", &pack);
  m.def("selftest_warp_ops(Tensor x, int blocks, int[] block) -> (Tensor, Tensor)", &warp_ops);
  m.def("selftest_partial_warp(Tensor x) -> Tensor", &partial_warp);
  m.def("selftest_exited_lanes(Tensor x) -> Tensor", &exited_lanes);
  m.def("selftest_spin_wait() -> int", &spin_wait);
  m.def("selftest_neighbours(int blocks, int threads, bool barrier) -> Tensor", &neighbours);
  m.def("selftest_cp_async_copy(Tensor x, bool wait, bool pred=True) -> Tensor", &cp_async_copy);
  m.def("selftest_big_smem(int floats, bool opt_in) -> float", &big_smem);
  m.def("selftest_noop(int blocks, int[] block, int smem=0) -> int", &noop);
  m.def("selftest_misbehave(str what, int n) -> ()", &misbehave);
  m.def("selftest_race(int what, bool fixed) -> Tensor", &race);
  m.def("selftest_pattern(int which) -> Tensor", &pattern);
}

}  // namespace vae_ext::emu_glue::selftest
