// The emulator's own ops: device memory for Python tests, device settings, counters.
#include <string>
#include <vector>

#include "emu_glue.h"

namespace vae_ext::emu_glue::core {
namespace {

// Sets the SM count the emulated device reports (grid_size() of grid-stride kernels scales with it);
// returns the previous one.
int64_t set_num_sms(int64_t n) {
  TORCH_CHECK(n >= 1, "set_num_sms: n must be >= 1");
  const int64_t old = emu::config().num_sms;
  emu::config().num_sms = static_cast<int>(n);
  return old;
}

std::vector<int64_t> stats() {
  const emu::Stats s = emu::stats();
  return {static_cast<int64_t>(s.launches), static_cast<int64_t>(s.blocks), static_cast<int64_t>(s.threads),
          static_cast<int64_t>(s.context_switches)};
}

// Turns the race detector and the counters on or off; returns the previous settings.
std::vector<int64_t> set_checks(bool racecheck, bool counters) {
  const std::vector<int64_t> old{emu::config().racecheck, emu::config().counters};
  emu::config().racecheck = racecheck;
  emu::config().counters = counters;
  return old;
}

void reset_counters() { emu::reset_counters(); }

std::string counters() { return emu::counters_report(); }

at::Tensor to_device_op(const at::Tensor& t) { return to_device(t); }

at::Tensor device_empty_op(at::IntArrayRef sizes, at::ScalarType dtype, int64_t misalign) {
  return device_empty(sizes, dtype, static_cast<size_t>(misalign));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vae_ext_emu, m) {
  m.def("set_num_sms(int n) -> int", &set_num_sms);
  m.def("stats() -> int[]", &stats);  // launches, blocks, threads, context switches
  m.def("set_checks(bool racecheck, bool counters) -> int[]", &set_checks);
  m.def("reset_counters() -> ()", &reset_counters);
  m.def("counters() -> str", &counters);  // one line per kernel: name, then tab-separated field=value
  m.def("to_device(Tensor t) -> Tensor", &to_device_op);
  m.def("device_empty(int[] sizes, ScalarType dtype, int misalign=0) -> Tensor", &device_empty_op);
}

}  // namespace vae_ext::emu_glue::core
