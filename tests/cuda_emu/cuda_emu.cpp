// The runtime of the CPU emulation of the CUDA execution model (see
// tests/cuda_emu/cuda_emu.h for the model). Built only into emulation builds
// (tests/cuda_emu/), never into the extension.
#include "cuda_emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <unordered_map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(VAE_EXT_EMU_UCONTEXT)
#include <ucontext.h>
#endif

namespace vae_ext::emu {

namespace detail {
ThreadState* g_state = nullptr;
}  // namespace detail

namespace {

// ---------------------------------------------------------------- the emulated device (an H100 SXM)

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535, 65535};
constexpr size_t kDefaultMaxDynamicSmem = 48 << 10;   // without cudaFuncSetAttribute
constexpr size_t kMaxDynamicSmemOptin = 227 << 10;    // 232448 bytes per block
constexpr unsigned char kPoison = 0xFF;   // fresh shared / device memory: NaN for every float type
constexpr unsigned char kCanary = 0xA5;   // guard bytes around shared / device memory
constexpr size_t kCanaryBytes = 256;

std::string format(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return buf;
}

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

char* map_pages(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("vae_ext CUDA emulation: out of memory (mmap)");
  return static_cast<char*>(p);
}

// "0-15,17,20-23"
std::string lane_set(unsigned mask) {
  std::string s;
  for (int l = 0; l < 32;) {
    if (!(mask >> l & 1u)) {
      ++l;
      continue;
    }
    int e = l;
    while (e + 1 < 32 && (mask >> (e + 1) & 1u)) ++e;
    if (!s.empty()) s += ",";
    s += e == l ? format("%d", l) : format("%d-%d", l, e);
    l = e + 1;
  }
  return s.empty() ? "none" : s;
}

// ---------------------------------------------------------------- execution contexts

#if defined(__x86_64__) && !defined(VAE_EXT_EMU_UCONTEXT)
// Cooperative context switch (System V x86-64): saves the callee-saved registers
// on the current stack, swaps stack pointers, restores. A new context starts in
// vae_ext_emu_trampoline, which calls r13(r12).
extern "C" void vae_ext_emu_switch(void** save_sp, void* load_sp) __attribute__((visibility("hidden")));
extern "C" void vae_ext_emu_trampoline() __attribute__((visibility("hidden")));
asm(R"(
    .text
    .p2align 4
    .globl vae_ext_emu_switch
    .hidden vae_ext_emu_switch
    .type vae_ext_emu_switch, @function
vae_ext_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size vae_ext_emu_switch, .-vae_ext_emu_switch

    .p2align 4
    .globl vae_ext_emu_trampoline
    .hidden vae_ext_emu_trampoline
    .type vae_ext_emu_trampoline, @function
vae_ext_emu_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size vae_ext_emu_trampoline, .-vae_ext_emu_trampoline
)");

struct Context {
  void* sp = nullptr;
};

inline void switch_context(Context& from, Context& to) { vae_ext_emu_switch(&from.sp, to.sp); }

void make_context(Context& ctx, char* stack_lo, size_t stack_bytes, void (*fn)(void*), void* arg) {
  auto top = reinterpret_cast<uintptr_t>(stack_lo + stack_bytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top - 7 * sizeof(uint64_t));
  sp[0] = 0;                                                    // r15
  sp[1] = 0;                                                    // r14
  sp[2] = reinterpret_cast<uint64_t>(fn);                       // r13
  sp[3] = reinterpret_cast<uint64_t>(arg);                      // r12
  sp[4] = 0;                                                    // rbx
  sp[5] = 0;                                                    // rbp
  sp[6] = reinterpret_cast<uint64_t>(&vae_ext_emu_trampoline);  // return address; rsp = top after it
  ctx.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void (*g_ucontext_fn)(void*) = nullptr;
void ucontext_entry(unsigned hi, unsigned lo) {
  g_ucontext_fn(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}

void make_context(Context& ctx, char* stack_lo, size_t stack_bytes, void (*fn)(void*), void* arg) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack_lo;
  ctx.uc.uc_stack.ss_size = stack_bytes;
  ctx.uc.uc_link = nullptr;
  g_ucontext_fn = fn;
  const auto p = reinterpret_cast<uintptr_t>(arg);
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p));
}
#endif

// ---------------------------------------------------------------- state

struct PendingCopy {
  void* dst;
  const char* file;  // the cp.async's source position
  int line;
  uint64_t group;  // commit group: the number of groups committed before it was issued
  unsigned char data[16];
};

enum class FiberState : uint8_t { kRunnable, kBlocked, kDone };

struct Fiber {
  ThreadState st{};
  Context ctx;
  char* stack_map = nullptr;  // [stack_map, +page) guard page, then the stack
  size_t stack_map_bytes = 0;
  int index = 0, warp = 0, lane = 0;
  FiberState state = FiberState::kDone;
  const char* wait_what = nullptr;  // where it is blocked (diagnostics)
  const char* wait_file = nullptr;
  int wait_line = 0;
  int barrier_result = 0;
  bool yielded = false;                 // its last run ended in __nanosleep (livelock detection)
  std::vector<PendingCopy> cp_pending;  // issued cp.async copies not yet written, oldest first
  size_t cp_head = 0;                   // cp_pending[0, cp_head) were written
  uint64_t cp_committed = 0;            // cp.async.commit_group count
  std::unordered_map<uintptr_t, uint32_t> executions;  // counters: how often it ran each memory instruction
  // Counters: the thread's latest access, not yet given to its warp's request: the host compiler may split
  // a 16-byte access (float4, uint4) into scalar ones, which are put back together here.
  struct {
    bool valid = false, write = false;
    uint8_t kind = 0, bytes = 0;
    uintptr_t site = 0, addr = 0;
  } pending;

  ~Fiber() {
    if (stack_map != nullptr) munmap(stack_map, stack_map_bytes);
  }
};

enum class Kind : uint8_t { kSyncWarp, kShfl, kVote, kReduce, kLdmatrix, kMma };

struct Collective {
  bool active = false;
  Kind kind = Kind::kSyncWarp;
  int param = 0;
  unsigned mask = 0;
  unsigned arrived = 0;
  const char* file = nullptr;
  int line = 0;
};

struct LaneIO {
  uint64_t in = 0;
  int src = -1;  // shuffle source lane, -1: keep the own value
  uint64_t out = 0;
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
  float* d = nullptr;
  uint32_t* r = nullptr;
  const void* addr = nullptr;
};

// Counters: one warp-level memory request being gathered from its lanes.
enum class ReqKind : uint8_t { kGlobal, kShared, kCpAsync };
struct Request {
  ReqKind kind = ReqKind::kGlobal;
  uint8_t bytes = 0;  // access size of each lane
  unsigned lanes = 0;
  uintptr_t addr[32] = {};
};

struct Warp {
  unsigned existing = 0;  // lanes the block has
  unsigned exited = 0;
  std::vector<Collective> colls;
  LaneIO io[32];
  // Race detection: the lane masks of the __syncwarp calls completed since the last block barrier.
  std::vector<unsigned> sync_masks;
  // Counters: requests by (instruction, execution index), until every lane that can has joined.
  std::map<std::pair<uintptr_t, uint32_t>, Request> requests;
};

struct Barrier {
  unsigned arrived = 0;
  int op = 0;
  const char* file = nullptr;
  int line = 0;
  int count = 0;
  bool all = true, any = false;
  std::vector<Fiber*> waiters;
};

struct Buffer {
  char* map = nullptr;
  size_t map_bytes = 0;
  char* data = nullptr;
  size_t bytes = 0;
  char* guard = nullptr;  // the inaccessible page after the data
};

// Race detection: who last touched a byte of shared memory. `epoch` is the block-barrier epoch of the
// access (0: none), `wsync` the number of __syncwarp of the thread's warp completed since that barrier,
// `site` the instruction (a code address, or a Site* tagged with the top bit for the emulator's own accesses).
struct Access {
  uint64_t epoch = 0;
  uintptr_t site = 0;
  uint32_t wsync = 0;
  int32_t thread = -1;
};
struct ShadowByte {
  Access write, read1, read2;  // the last write; the first and the latest other reader since it
};
struct Site {
  const char* what;
  const char* file;
  int line;
};

struct Device {
  std::mutex launch_mutex;
  std::mutex buffers_mutex;
  Config cfg;
  Stats stats;
  std::map<const void*, size_t> max_dynamic_smem;  // cudaFuncSetAttribute
  std::map<uintptr_t, Buffer> buffers;             // by data address
  cudaError_t last_error = cudaSuccess;

  // The launch in progress.
  bool active = false;
  pthread_t owner{};
  std::string kernel;
  dim3 grid, block;
  unsigned nthreads = 0;
  detail::Entry entry = nullptr;
  void* job = nullptr;
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::vector<Warp> warps;
  Barrier barrier;
  unsigned exited = 0;
  Context sched;
  Fiber* current = nullptr;
  const char* in_op = nullptr;  // what the emulator itself is doing for the current thread (fault reports)
  bool failed = false;
  std::string error;
  Fiber* fault_fiber = nullptr;
  char fault_msg[512] = {};

  // Dynamic shared memory: [smem, smem + smem_bytes) ends within 16 bytes of smem_guard (a PROT_NONE page).
  char* smem_map = nullptr;
  size_t smem_map_bytes = 0;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  char* smem_guard = nullptr;

  // Memory-access checks (race detection, counters) while a kernel runs.
  bool checking = false;
  uint64_t epoch = 0;  // advances at every block start and every completed __syncthreads
  std::vector<ShadowByte> dyn_shadow, static_shadow;
  std::map<std::string, KernelCounters> counters;
  KernelCounters* kc = nullptr;  // the running kernel's
};

Device& device() {
  static Device* d = new Device;  // never destroyed: fibers may outlive static destruction order
  return *d;
}

std::string thread_name(const Fiber& f) {
  const ThreadState& s = f.st;
  return format("block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]", s.block_idx.x, s.block_idx.y,
                s.block_idx.z, s.thread_idx.x, s.thread_idx.y, s.thread_idx.z, f.warp, f.lane);
}

std::string site(const char* file, int line) {
  if (file == nullptr) return "";
  const char* base = std::strrchr(file, '/');
  return format(" (%s:%d)", base ? base + 1 : file, line);
}

const char* kind_name(Kind kind, int param) {
  switch (kind) {
    case Kind::kSyncWarp: return "__syncwarp";
    case Kind::kShfl: {
      static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
      return names[param & 3];
    }
    case Kind::kVote: {
      static const char* names[] = {"__ballot_sync", "__any_sync", "__all_sync"};
      return names[param % 3];
    }
    case Kind::kReduce: return "__reduce_*_sync";
    case Kind::kLdmatrix: {
      static const char* names[] = {"?", "ldmatrix.x1", "ldmatrix.x2", "?", "ldmatrix.x4",
                                    "?", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "?", "ldmatrix.x4.trans"};
      const int i = (param & 7) + ((param >> 4) ? 5 : 0);
      return names[i < 10 ? i : 0];
    }
    case Kind::kMma: return param ? "mma.m16n8k16 (bf16)" : "mma.m16n8k16 (f16)";
  }
  return "?";
}

Fiber* current_fiber(const char* what) {
  Device& D = device();
  if (D.current == nullptr || !D.active || !pthread_equal(D.owner, pthread_self())) {
    throw std::logic_error(std::string("vae_ext CUDA emulation: ") + what + " called outside an emulated kernel");
  }
  return D.current;
}

// Ends the running thread's part in the launch with an error; never returns.
[[noreturn]] void fail(const std::string& msg) {
  Device& D = device();
  Fiber* f = D.current;
  if (!D.failed) {
    D.failed = true;
    D.error = thread_name(*f) + ": " + msg;
  }
  switch_context(f->ctx, D.sched);
  std::abort();  // a failed thread is never resumed
}

void flush_access(Fiber& f);

void block_current(Fiber* f, const char* what, const char* file, int line) {
  Device& D = device();
  if (D.checking && D.cfg.counters) flush_access(*f);  // the lanes of a warp meet here
  f->state = FiberState::kBlocked;
  f->wait_what = what;
  f->wait_file = file;
  f->wait_line = line;
  switch_context(f->ctx, D.sched);
  f->wait_what = nullptr;
}

Fiber& fiber_of(int warp, int lane) { return *device().fibers[static_cast<size_t>(warp) * 32 + lane]; }

// ---------------------------------------------------------------- memory checks

bool in_dynamic_smem(const void* p, size_t bytes) {
  const Device& D = device();
  const char* c = static_cast<const char*>(p);
  return D.smem != nullptr && c >= D.smem && c + bytes <= D.smem + D.smem_bytes;
}

const Buffer* find_buffer(const void* p) {  // the device buffer whose mapping contains p
  Device& D = device();
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto it = D.buffers.upper_bound(a + page_size() * 2);
  while (it != D.buffers.begin()) {
    --it;
    const Buffer& b = it->second;
    if (a >= reinterpret_cast<uintptr_t>(b.map) && a < reinterpret_cast<uintptr_t>(b.guard) + page_size()) return &b;
    if (reinterpret_cast<uintptr_t>(b.guard) + page_size() < a) break;
  }
  return nullptr;
}

bool canaries_intact(const char* begin, const char* end) {
  for (const char* p = begin; p < end; ++p) {
    if (static_cast<unsigned char>(*p) != kCanary) return false;
  }
  return true;
}

// Reports (once: the canaries are restored) a write before or after a device buffer.
std::string check_buffer_canaries() {
  Device& D = device();
  std::string error;
  for (const auto& [addr, b] : D.buffers) {
    char* front = std::max(b.map, b.data - kCanaryBytes);
    const char* where = !canaries_intact(front, b.data)                 ? "before the start"
                        : !canaries_intact(b.data + b.bytes, b.guard) ? "past the end"
                                                                        : nullptr;
    if (where == nullptr) continue;
    if (error.empty()) {
      error = format("a kernel wrote %s of a device buffer of %zu bytes at %p", where, b.bytes,
                     static_cast<void*>(b.data));
    }
    std::memset(front, kCanary, static_cast<size_t>(b.data - front));
    std::memset(b.data + b.bytes, kCanary, static_cast<size_t>(b.guard - (b.data + b.bytes)));
  }
  return error;
}

// ---------------------------------------------------------------- faults inside kernels

constexpr int kNumSignals = 4;
const int kSignals[kNumSignals] = {SIGSEGV, SIGBUS, SIGFPE, SIGABRT};
struct sigaction g_old_action[kNumSignals];
stack_t g_old_altstack;
char* g_altstack = nullptr;
constexpr size_t kAltstackBytes = 1 << 16;

void describe_fault(int sig, const void* addr) {
  Device& D = device();
  const char* op = D.in_op ? D.in_op : "an access of the kernel";
  const auto a = reinterpret_cast<uintptr_t>(addr);
  const size_t page = page_size();
  if (sig == SIGABRT) {  // a failed assert() prints its message, then aborts
    snprintf(D.fault_msg, sizeof(D.fault_msg), "abort() in a kernel (a failed assert? its message is on stderr)");
    return;
  }
  if (sig == SIGFPE) {
    snprintf(D.fault_msg, sizeof(D.fault_msg), "arithmetic exception (integer division by zero?)%s%s",
             D.in_op ? " in " : "", D.in_op ? D.in_op : "");
    return;
  }
  if (D.smem_guard != nullptr && a >= reinterpret_cast<uintptr_t>(D.smem_guard) - 16 &&
      a < reinterpret_cast<uintptr_t>(D.smem_guard) + page) {
    snprintf(D.fault_msg, sizeof(D.fault_msg),
             "out-of-bounds shared memory access: %s touched byte %td of dynamic shared memory, which has %zu bytes",
             op, static_cast<const char*>(addr) - D.smem, D.smem_bytes);
    return;
  }
  for (const auto& f : D.fibers) {
    if (f->stack_map != nullptr && a >= reinterpret_cast<uintptr_t>(f->stack_map) &&
        a < reinterpret_cast<uintptr_t>(f->stack_map) + page) {
      snprintf(D.fault_msg, sizeof(D.fault_msg),
               "stack overflow of an emulated thread (%zu KB stacks; raise vae_ext::emu::config().stack_bytes)",
               D.cfg.stack_bytes >> 10);
      return;
    }
  }
  if (const Buffer* b = find_buffer(addr)) {
    const ptrdiff_t off = static_cast<const char*>(addr) - b->data;
    snprintf(D.fault_msg, sizeof(D.fault_msg),
             "out-of-bounds global memory access: %s touched byte %td of a device buffer of %zu bytes at %p", op, off,
             b->bytes, static_cast<void*>(b->data));
    return;
  }
  snprintf(D.fault_msg, sizeof(D.fault_msg), "illegal memory access at address %p in %s (signal %d)", addr, op, sig);
}

void on_signal(int sig, siginfo_t* info, void* uctx) {
  Device& D = device();
  if (D.active && D.current != nullptr && pthread_equal(D.owner, pthread_self())) {
    describe_fault(sig, info->si_addr);
    D.fault_fiber = D.current;
    D.failed = true;
    switch_context(D.current->ctx, D.sched);  // abandon the faulting thread; never returns
  }
  // Not a fault of an emulated thread: hand it to whoever handled it before.
  int i = 0;
  while (i + 1 < kNumSignals && kSignals[i] != sig) ++i;
  const struct sigaction& old = g_old_action[i];
  if (old.sa_flags & SA_SIGINFO) {
    if (old.sa_sigaction != nullptr) {
      old.sa_sigaction(sig, info, uctx);
      return;
    }
  } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
    old.sa_handler(sig);
    return;
  }
  signal(sig, SIG_DFL);  // returning re-executes the access, now with the default action
}

struct SignalGuard {
  SignalGuard() {
    if (g_altstack == nullptr) g_altstack = map_pages(kAltstackBytes);
    stack_t ss{};
    ss.ss_sp = g_altstack;
    ss.ss_size = kAltstackBytes;
    sigaltstack(&ss, &g_old_altstack);
    struct sigaction sa {};
    sa.sa_sigaction = &on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < kNumSignals; ++i) sigaction(kSignals[i], &sa, &g_old_action[i]);
  }
  ~SignalGuard() {
    for (int i = 0; i < kNumSignals; ++i) sigaction(kSignals[i], &g_old_action[i], nullptr);
    sigaltstack(&g_old_altstack, nullptr);
  }
};

// ---------------------------------------------------------------- memory-access checks
// The kernels are compiled with -fsanitize=thread (tests/cuda_emu/__init__.py), so each of their loads and
// stores calls a __tsan_read*/__tsan_write* hook (the end of this file). While a kernel runs, the hooks
// pass shared-memory accesses to the race detector and, with Config::counters, every access to the
// counters. The emulator's own accesses (ldmatrix, cp.async) are reported from where it makes them.

}  // namespace
}  // namespace vae_ext::emu

// Static __shared__ variables live in this section (tests/cuda_emu/cuda_emu.h), so they can be told apart.
extern "C" char __start_vae_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_vae_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace vae_ext::emu {
namespace {

// Sites of the emulator's own accesses carry the top bit (user-space code addresses never do).
constexpr uintptr_t kEmuSiteTag = uintptr_t(1) << 63;

uintptr_t emu_site(const char* what, const char* file, int line) {
  static std::map<std::tuple<const char*, const char*, int>, std::unique_ptr<Site>> sites;
  auto& s = sites[{what, file, line}];
  if (!s) s.reset(new Site{what, file, line});
  return reinterpret_cast<uintptr_t>(s.get()) | kEmuSiteTag;
}

// addr2line's lines for a code address of this library: pairs of (function, file:line), innermost
// inlined frame first. Slow (a process): for error messages and once per kernel.
std::vector<std::string> addr2line(const void* pc, Dl_info* info) {
  std::vector<std::string> lines;
  if (dladdr(pc, info) == 0 || info->dli_fname == nullptr) return lines;
  const auto offset = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info->dli_fbase);
  const std::string cmd = format("addr2line -C -f -i -e '%s' 0x%zx 2>/dev/null", info->dli_fname, offset);
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char line[4096];
    while (fgets(line, sizeof(line), p) != nullptr) {
      std::string l(line);
      while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
      lines.push_back(l);
    }
    pclose(p);
  }
  if (!lines.empty() && lines[0] == "??") lines.clear();
  return lines;
}

// "file:line (function)" of a code address in an instrumented kernel, or the emulator's own site.
std::string describe_site(uintptr_t site_id) {
  if (site_id & kEmuSiteTag) {
    const Site* s = reinterpret_cast<const Site*>(site_id & ~kEmuSiteTag);
    return std::string(s->what) + site(s->file, s->line);
  }
  const void* pc = reinterpret_cast<const void*>(site_id - 1);  // inside the call instruction
  Dl_info info{};
  const std::vector<std::string> lines = addr2line(pc, &info);
  std::string where;
  {
    if (lines.size() >= 2) {
      std::string fn = lines[0], loc = lines[1];
      for (size_t a; (a = fn.find("(anonymous namespace)::")) != std::string::npos;) fn.erase(a, 23);
      const size_t paren = fn.find('(');
      if (paren != std::string::npos) fn = fn.substr(0, paren);
      const size_t slash = loc.rfind('/');
      if (slash != std::string::npos) loc = loc.substr(slash + 1);
      const size_t disc = loc.find(" (discriminator");
      if (disc != std::string::npos) loc = loc.substr(0, disc);
      where = loc + " in " + fn;
    }
  }
  if (where.empty()) {
    where = format("pc %p", pc);
    if (info.dli_sname != nullptr) where += std::string(" in ") + info.dli_sname;
  }
  return where;
}

// Whether access `a` (of another thread) and the running thread's access now have no barrier between them.
bool unordered(const Access& a, const Fiber& f) {
  const Device& D = device();
  if (a.epoch != D.epoch || a.thread < 0 || a.thread == f.index) return false;
  const Fiber& o = *D.fibers[static_cast<size_t>(a.thread)];
  if (o.warp != f.warp) return true;
  const unsigned both = (1u << o.lane) | (1u << f.lane);
  const std::vector<unsigned>& masks = D.warps[f.warp].sync_masks;
  for (size_t i = a.wsync; i < masks.size(); ++i) {
    if ((masks[i] & both) == both) return false;
  }
  return true;
}

[[noreturn]] void report_race(const char* hazard, const char* region, size_t offset, const Access& earlier,
                              const char* earlier_did, const char* now_did, uintptr_t now_site) {
  Device& D = device();
  const Fiber& o = *D.fibers[static_cast<size_t>(earlier.thread)];
  fail(format("shared-memory race (%s) on byte %zu of %s shared memory: thread (%u,%u,%u) [warp %d lane %d] %s it "
              "at %s, then this thread %s it at %s, with no __syncthreads%s between them",
              hazard, offset, region, o.st.thread_idx.x, o.st.thread_idx.y, o.st.thread_idx.z, o.warp, o.lane,
              earlier_did, describe_site(earlier.site).c_str(), now_did, describe_site(now_site).c_str(),
              o.warp == D.current->warp ? " or __syncwarp of both lanes" : ""));
}

// Race detection for an access of `bytes` bytes at p by fiber f (the running one, or a lane of its warp
// for a warp-wide instruction completed by the running lane).
void check_shared(Fiber& f, const char* p, size_t bytes, bool write, uintptr_t site_id) {
  Device& D = device();
  ShadowByte* shadow = nullptr;
  const char* region = nullptr;
  size_t offset = 0;
  if (p >= D.smem && p + bytes <= D.smem + D.smem_bytes) {
    shadow = D.dyn_shadow.data();
    region = "dynamic";
    offset = static_cast<size_t>(p - D.smem);
  } else if (__start_vae_emu_shared != nullptr && p >= __start_vae_emu_shared && p + bytes <= __stop_vae_emu_shared) {
    shadow = D.static_shadow.data();
    region = "static";
    offset = static_cast<size_t>(p - __start_vae_emu_shared);
  } else {
    return;
  }
  Fiber* running = D.current;
  D.current = &f;  // unordered() and the report see the accessing lane
  const Access now{D.epoch, site_id, static_cast<uint32_t>(D.warps[f.warp].sync_masks.size()), f.index};
  for (size_t i = 0; i < bytes; ++i) {
    ShadowByte& s = shadow[offset + i];
    if (unordered(s.write, f)) {
      report_race(write ? "write after write" : "read after write", region, offset + i, s.write, "wrote",
                  write ? "wrote" : "read", site_id);
    }
    if (write) {
      for (const Access* r : {&s.read1, &s.read2}) {
        if (unordered(*r, f)) report_race("write after read", region, offset + i, *r, "read", "wrote", site_id);
      }
      s.write = now;
      s.read1.epoch = s.read2.epoch = 0;
    } else if (s.read1.epoch != D.epoch || s.read1.thread == f.index) {
      s.read1 = now;
    } else {
      s.read2 = now;
    }
  }
  D.current = running;
}

// ---------------------------------------------------------------- counters

// Bank-conflict passes of one shared-memory request: lanes are served in phases (a quarter warp for
// 16-byte accesses, half a warp for 8-byte ones, the whole warp otherwise); within a phase, each bank
// serves one distinct 4-byte word per pass.
uint64_t shared_wavefronts(const Request& r, uint64_t* ideal) {
  const int phases = r.bytes > 8 ? 4 : r.bytes > 4 ? 2 : 1;
  const int per_phase = 32 / phases;
  uint64_t total = 0;
  *ideal = 0;
  for (int ph = 0; ph < phases; ++ph) {
    std::map<int, std::vector<uintptr_t>> words;  // bank -> distinct words
    bool any = false;
    for (int l = ph * per_phase; l < (ph + 1) * per_phase; ++l) {
      if (!(r.lanes >> l & 1u)) continue;
      any = true;
      for (uintptr_t w = r.addr[l] / 4; w <= (r.addr[l] + r.bytes - 1) / 4; ++w) {
        auto& v = words[static_cast<int>(w % 32)];
        if (std::find(v.begin(), v.end(), w) == v.end()) v.push_back(w);
      }
    }
    if (!any) continue;
    size_t worst = 0;
    for (const auto& [bank, v] : words) worst = std::max(worst, v.size());
    total += worst;
    *ideal += 1;
  }
  return total;
}

// Distinct 32-byte sectors of a global request, and the fewest its bytes could occupy.
uint64_t sectors(const Request& r, uint64_t* ideal) {
  std::vector<uintptr_t> secs, bytes_seen;
  for (int l = 0; l < 32; ++l) {
    if (!(r.lanes >> l & 1u)) continue;
    for (uintptr_t s = r.addr[l] / 32; s <= (r.addr[l] + r.bytes - 1) / 32; ++s) {
      if (std::find(secs.begin(), secs.end(), s) == secs.end()) secs.push_back(s);
    }
    for (uintptr_t b = r.addr[l]; b < r.addr[l] + r.bytes; ++b) bytes_seen.push_back(b);
  }
  std::sort(bytes_seen.begin(), bytes_seen.end());
  const size_t distinct = static_cast<size_t>(std::unique(bytes_seen.begin(), bytes_seen.end()) - bytes_seen.begin());
  *ideal = (distinct + 31) / 32;
  return secs.size();
}

void finish_request(const Request& r) {
  KernelCounters& k = *device().kc;
  uint64_t ideal = 0;
  switch (r.kind) {
    case ReqKind::kGlobal:
      ++k.global_requests;
      k.global_sectors += sectors(r, &ideal);
      k.global_ideal_sectors += ideal;
      break;
    case ReqKind::kCpAsync:
      ++k.cp_async_requests;
      k.cp_async_sectors += sectors(r, &ideal);
      k.cp_async_ideal_sectors += ideal;
      break;
    case ReqKind::kShared:
      ++k.shared_requests;
      k.shared_wavefronts += shared_wavefronts(r, &ideal);
      k.shared_ideal_wavefronts += ideal;
      break;
  }
}

// Adds fiber f's pending access to its warp's request for this execution of the instruction.
void flush_access(Fiber& f) {
  if (!f.pending.valid) return;
  f.pending.valid = false;
  Device& D = device();
  Warp& w = D.warps[f.warp];
  const uint32_t k = f.executions[f.pending.site]++;
  Request& r = w.requests[{f.pending.site, k}];
  r.kind = static_cast<ReqKind>(f.pending.kind);
  r.bytes = f.pending.bytes;
  r.lanes |= 1u << f.lane;
  r.addr[f.lane] = f.pending.addr;
  if ((r.lanes | w.exited) == w.existing) {  // every lane still running has joined
    finish_request(r);
    w.requests.erase({f.pending.site, k});
  }
}

// The running lane's access, merged with its previous one when together they are one naturally aligned
// access of at most 16 bytes (what nvcc issues for a float4 or a 16-byte copy).
void count_access(ReqKind kind, uintptr_t site_id, const void* p, size_t bytes, bool write) {
  Fiber& f = *device().current;
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto& q = f.pending;
  if (q.valid && q.write == write && q.kind == static_cast<uint8_t>(kind) &&
      (a == q.addr + q.bytes || a + bytes == q.addr)) {  // adjacent, in either order
    const uintptr_t lo = std::min(a, q.addr);
    const size_t total = q.bytes + bytes;
    if (total <= 16 && lo / 16 == (lo + total - 1) / 16) {  // within one aligned 16-byte chunk
      q.addr = lo;
      q.bytes = static_cast<uint8_t>(total);
      return;
    }
  }
  flush_access(f);
  q.valid = true;
  q.write = write;
  q.kind = static_cast<uint8_t>(kind);
  q.bytes = static_cast<uint8_t>(std::min<size_t>(bytes, 255));
  q.site = site_id;
  q.addr = a;
}

void finish_block_counters() {
  Device& D = device();
  for (auto& f : D.fibers) flush_access(*f);
  for (Warp& w : D.warps) {
    for (const auto& [key, r] : w.requests) finish_request(r);
    w.requests.clear();
  }
  for (auto& f : D.fibers) f->executions.clear();
}

bool is_device_memory(const void* p) {
  const Buffer* b = find_buffer(p);
  return b != nullptr && static_cast<const char*>(p) >= b->data && static_cast<const char*>(p) < b->data + b->bytes;
}

// A load or store of an instrumented kernel.
inline void on_access(const void* p, size_t bytes, bool write, uintptr_t site_id) {
  Device& D = device();
  if (!D.checking || D.current == nullptr || !pthread_equal(D.owner, pthread_self())) return;
  const char* c = static_cast<const char*>(p);
  const bool dyn = c >= D.smem && c < D.smem + D.smem_bytes;
  const bool stat = !dyn && __start_vae_emu_shared != nullptr && c >= __start_vae_emu_shared && c < __stop_vae_emu_shared;
  if (dyn || stat) {
    if (D.cfg.racecheck) check_shared(*D.current, c, bytes, write, site_id);
    if (D.cfg.counters) count_access(ReqKind::kShared, site_id, p, bytes, write);
  } else if (D.cfg.counters && is_device_memory(p)) {
    count_access(ReqKind::kGlobal, site_id, p, bytes, write);
  }
}

// ---------------------------------------------------------------- cp.async

// Writes the thread's pending cp.async copies of the groups before `group_end` to shared memory.
void apply_copies(Fiber* f, uint64_t group_end) {
  Device& D = device();
  D.in_op = "the shared-memory write of a cp.async";
  while (f->cp_head < f->cp_pending.size() && f->cp_pending[f->cp_head].group < group_end) {
    const PendingCopy& c = f->cp_pending[f->cp_head++];
    if (D.checking && D.cfg.racecheck) {
      check_shared(*f, static_cast<const char*>(c.dst), 16, true, emu_site("the shared-memory write of a cp.async", c.file, c.line));
    }
    std::memcpy(c.dst, c.data, 16);
  }
  D.in_op = nullptr;
  if (f->cp_head == f->cp_pending.size()) {
    f->cp_pending.clear();
    f->cp_head = 0;
  }
}

void flush_copies(Fiber* f) { apply_copies(f, UINT64_MAX); }  // at exit, uncommitted copies land too

// ---------------------------------------------------------------- warp collectives

void complete_ldmatrix(Warp& w, const Collective& c) {
  Device& D = device();
  const int num = c.param & 7;
  const bool trans = (c.param >> 4) != 0;
  uint16_t m[4][8][8];
  for (int i = 0; i < num; ++i) {
    for (int row = 0; row < 8; ++row) {
      const int lane = 8 * i + row;
      const void* p = w.io[lane].addr;
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        fail(format("%s%s: lane %d gives row address %p, which is not 16-byte aligned", kind_name(c.kind, c.param),
                    site(c.file, c.line).c_str(), lane, p));
      }
      if (find_buffer(p) != nullptr) {
        fail(format("%s%s: lane %d gives row address %p in global memory; ldmatrix reads shared memory",
                    kind_name(c.kind, c.param), site(c.file, c.line).c_str(), lane, p));
      }
      if (D.checking && D.cfg.racecheck) {
        check_shared(fiber_of(static_cast<int>(&w - D.warps.data()), lane), static_cast<const char*>(p), 16, false,
                     emu_site(kind_name(c.kind, c.param), c.file, c.line));
      }
      D.in_op = "ldmatrix";
      std::memcpy(m[i][row], p, 16);
      D.in_op = nullptr;
    }
    if (D.checking && D.cfg.counters) {
      // The 8 rows of a matrix (16 bytes each, 128 in all) are one pass unless two of them share a bank.
      Request r;
      r.kind = ReqKind::kShared;
      r.bytes = 16;
      for (int row = 0; row < 8; ++row) {
        r.lanes |= 1u << row;
        r.addr[row] = reinterpret_cast<uintptr_t>(w.io[8 * i + row].addr);
      }
      uint64_t ideal = 0;  // lanes 0-7 form the first of the four 16-byte phases; the others are empty
      D.kc->ldmatrix_wavefronts += shared_wavefronts(r, &ideal);
      D.kc->ldmatrix_ideal_wavefronts += ideal;
    }
  }
  if (D.checking && D.cfg.counters) ++D.kc->ldmatrix;
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < num; ++i) {
      const uint16_t lo = trans ? m[i][2 * t][g] : m[i][g][2 * t];
      const uint16_t hi = trans ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
      w.io[l].r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

float decode_16bit(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

void complete_mma(Warp& w, const Collective& c) {
  if (device().checking && device().cfg.counters) ++device().kc->mma;
  const bool bf16 = c.param != 0;
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const LaneIO& io = w.io[l];
    // A (row-major 16x16): a[0] (g, 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..).
    for (int r = 0; r < 4; ++r) {
      const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
      A[row][col] = decode_16bit(static_cast<uint16_t>(io.a[r] & 0xffff), bf16);
      A[row][col + 1] = decode_16bit(static_cast<uint16_t>(io.a[r] >> 16), bf16);
    }
    // B (16x8, k-major): b[0] (k 2t..2t+1, n g), b[1] (k 2t+8..2t+9, n g).
    for (int r = 0; r < 2; ++r) {
      const int k = 2 * t + 8 * r;
      B[k][g] = decode_16bit(static_cast<uint16_t>(io.b[r] & 0xffff), bf16);
      B[k + 1][g] = decode_16bit(static_cast<uint16_t>(io.b[r] >> 16), bf16);
    }
    // C (16x8 fp32): c[0], c[1] (g, 2t..2t+1); c[2], c[3] (g+8, 2t..2t+1).
    C[g][2 * t] = io.c[0];
    C[g][2 * t + 1] = io.c[1];
    C[g + 8][2 * t] = io.c[2];
    C[g + 8][2 * t + 1] = io.c[3];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      double acc = 0.0;  // products of 16-bit floats are exact; one rounding at the end
      for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
      D[i][j] = static_cast<float>(acc + C[i][j]);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float* d = w.io[l].d;
    d[0] = D[g][2 * t];
    d[1] = D[g][2 * t + 1];
    d[2] = D[g + 8][2 * t];
    d[3] = D[g + 8][2 * t + 1];
  }
}

void complete(int warp_index, Collective& c) {
  Device& D = device();
  Warp& w = D.warps[warp_index];
  const unsigned arrived = c.arrived;
  switch (c.kind) {
    case Kind::kSyncWarp:
      w.sync_masks.push_back(arrived);
      if (D.checking && D.cfg.counters) ++D.kc->syncwarps;
      break;
    case Kind::kShfl:
      for (int l = 0; l < 32; ++l) {
        if (!(arrived >> l & 1u)) continue;
        const int s = w.io[l].src;
        // A source lane that did not take part (not in the mask, exited) gives an undefined value on the
        // device: all ones bits here (NaN), so a result that uses it shows.
        w.io[l].out = (s < 0 || s == l) ? w.io[l].in : (arrived >> s & 1u) ? w.io[s].in : ~uint64_t(0);
      }
      break;
    case Kind::kVote: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l) {
        if ((arrived >> l & 1u) && w.io[l].in != 0) ballot |= 1u << l;
      }
      const uint64_t result = c.param == 0 ? ballot : c.param == 1 ? (ballot != 0) : (ballot == arrived);
      for (int l = 0; l < 32; ++l) {
        if (arrived >> l & 1u) w.io[l].out = result;  // other lanes may wait at another collective
      }
      break;
    }
    case Kind::kReduce: {
      const auto mode = static_cast<detail::ReduceMode>(c.param);
      bool first = true;
      uint32_t acc = 0;
      for (int l = 0; l < 32; ++l) {
        if (!(arrived >> l & 1u)) continue;
        const auto v = static_cast<uint32_t>(w.io[l].in);
        if (first) {
          acc = v;
          first = false;
          continue;
        }
        switch (mode) {
          case detail::ReduceMode::kAddU:
          case detail::ReduceMode::kAddI: acc += v; break;
          case detail::ReduceMode::kMinU: acc = std::min(acc, v); break;
          case detail::ReduceMode::kMaxU: acc = std::max(acc, v); break;
          case detail::ReduceMode::kMinI:
            acc = static_cast<uint32_t>(std::min(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
            break;
          case detail::ReduceMode::kMaxI:
            acc = static_cast<uint32_t>(std::max(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
            break;
          case detail::ReduceMode::kAnd: acc &= v; break;
          case detail::ReduceMode::kOr: acc |= v; break;
          case detail::ReduceMode::kXor: acc ^= v; break;
        }
      }
      for (int l = 0; l < 32; ++l) {
        if (arrived >> l & 1u) w.io[l].out = acc;
      }
      break;
    }
    case Kind::kLdmatrix: complete_ldmatrix(w, c); break;
    case Kind::kMma: complete_mma(w, c); break;
  }
  c.active = false;
  for (int l = 0; l < 32; ++l) {
    if (!(arrived >> l & 1u)) continue;
    Fiber& f = fiber_of(warp_index, l);
    if (&f != D.current) f.state = FiberState::kRunnable;
  }
}

unsigned required_lanes(const Warp& w, const Collective& c) {
  const bool aligned = c.kind == Kind::kLdmatrix || c.kind == Kind::kMma;
  return aligned ? 0xffffffffu : (c.mask & w.existing & ~w.exited);
}

// The calling lane joins the collective (kind, param, mask) of its warp; returns once it completed. The
// lane's operands are in its LaneIO, and so are its results afterwards.
void arrive(Fiber* f, Kind kind, int param, unsigned mask, const char* file, int line) {
  Device& D = device();
  Warp& w = D.warps[f->warp];
  const unsigned bit = 1u << f->lane;
  if (kind == Kind::kLdmatrix || kind == Kind::kMma) {
    if (w.existing != 0xffffffffu) {
      fail(format("%s%s needs all 32 lanes of the warp, but the block of %u threads gives warp %d only lanes %s",
                  kind_name(kind, param), site(file, line).c_str(), D.nthreads, f->warp, lane_set(w.existing).c_str()));
    }
    if (w.exited != 0) {
      fail(format("%s%s is executed by warp %d after its lanes %s exited; all 32 lanes must execute it",
                  kind_name(kind, param), site(file, line).c_str(), f->warp, lane_set(w.exited).c_str()));
    }
    mask = 0xffffffffu;
  } else if (!(mask & bit)) {
    fail(format("%s%s with mask 0x%08x, which does not include the calling lane %d", kind_name(kind, param),
                site(file, line).c_str(), mask, f->lane));
  }
  Collective* c = nullptr;
  for (Collective& x : w.colls) {
    if (x.active && x.kind == kind && x.param == param && x.mask == mask && !(x.arrived & bit)) {
      c = &x;
      break;
    }
  }
  if (c == nullptr) {
    for (Collective& x : w.colls) {
      if (!x.active) {
        c = &x;
        break;
      }
    }
    if (c == nullptr) c = &w.colls.emplace_back();
    *c = Collective{true, kind, param, mask, 0, file, line};
  }
  c->arrived |= bit;
  const unsigned required = required_lanes(w, *c);
  if ((c->arrived & required) == required) {
    complete(f->warp, *c);
    return;
  }
  block_current(f, kind_name(kind, param), file, line);
}

// ---------------------------------------------------------------- threads and blocks

void thread_exit(Fiber* f) {
  Device& D = device();
  if (D.checking && D.cfg.counters) flush_access(*f);
  flush_copies(f);
  ++D.exited;
  if (D.barrier.arrived > 0) {
    fail(format("exited while %u threads of the block wait at __syncthreads%s: every thread must reach it",
                D.barrier.arrived, site(D.barrier.file, D.barrier.line).c_str()));
  }
  Warp& w = D.warps[f->warp];
  w.exited |= 1u << f->lane;
  for (size_t i = 0; i < w.colls.size(); ++i) {
    Collective& c = w.colls[i];
    if (!c.active) continue;
    if (c.kind == Kind::kLdmatrix || c.kind == Kind::kMma) {
      fail(format("exited while lanes %s of its warp wait at %s%s, which needs all 32 lanes",
                  lane_set(c.arrived).c_str(), kind_name(c.kind, c.param), site(c.file, c.line).c_str()));
    }
    const unsigned required = required_lanes(w, c);
    if ((c.arrived & required) == required) complete(f->warp, c);
  }
}

void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Device& D = device();
  std::string error;
  try {
    D.entry(D.job);
  } catch (const std::exception& e) {
    error = std::string("the kernel threw: ") + e.what();
  } catch (...) {
    error = "the kernel threw a non-standard exception";
  }
  if (!error.empty()) fail(error);
  thread_exit(f);
  f->state = FiberState::kDone;
  switch_context(f->ctx, D.sched);
  std::abort();  // a finished thread is never resumed
}

std::string deadlock_report() {
  Device& D = device();
  std::string s = "deadlock: no thread of the block can continue.";
  if (D.barrier.arrived > 0) {
    s += format(" %u of %u threads wait at __syncthreads%s;", D.barrier.arrived, D.nthreads,
                site(D.barrier.file, D.barrier.line).c_str());
  }
  if (D.exited > 0) s += format(" %u threads have exited;", D.exited);
  int reported = 0;
  for (size_t wi = 0; wi < D.warps.size(); ++wi) {
    const Warp& w = D.warps[wi];
    for (const Collective& c : w.colls) {
      if (!c.active) continue;
      if (++reported > 4) {
        s += " ...";
        return s;
      }
      const unsigned missing = required_lanes(w, c) & ~c.arrived;
      s += format(" warp %zu: lanes %s wait at %s%s (mask 0x%08x) for lanes %s", wi, lane_set(c.arrived).c_str(),
                  kind_name(c.kind, c.param), site(c.file, c.line).c_str(), c.mask, lane_set(missing).c_str());
      std::map<std::string, unsigned> where;
      for (int l = 0; l < 32; ++l) {
        if (!(missing >> l & 1u)) continue;
        const Fiber& f = fiber_of(static_cast<int>(wi), l);
        std::string what = f.state == FiberState::kDone
                               ? "exited"
                               : (f.state == FiberState::kBlocked && f.wait_what != nullptr
                                      ? std::string("at ") + f.wait_what + site(f.wait_file, f.wait_line)
                                      : "running");
        where[what] |= 1u << l;
      }
      std::string parts;
      for (const auto& [what, lanes] : where) parts += (parts.empty() ? "" : "; ") + lane_set(lanes) + " " + what;
      s += " (" + parts + ");";
    }
  }
  return s;
}

void prepare_fibers(unsigned n) {
  Device& D = device();
  const size_t page = page_size();
  const size_t stack_bytes = round_up(std::max<size_t>(D.cfg.stack_bytes, 16 << 10), page);
  for (auto& f : D.fibers) {
    if (f->stack_map_bytes != stack_bytes + page) f.reset(new Fiber);
  }
  while (D.fibers.size() < n) D.fibers.emplace_back(new Fiber);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = *D.fibers[i];
    if (f.stack_map == nullptr) {
      f.stack_map_bytes = stack_bytes + page;
      f.stack_map = map_pages(f.stack_map_bytes);
      mprotect(f.stack_map, page, PROT_NONE);  // overflow faults (reported as a stack overflow)
    }
  }
}

void prepare_smem(size_t bytes) {
  Device& D = device();
  const size_t page = page_size();
  const size_t rounded = round_up(bytes, 16);
  const size_t need = round_up(rounded + kCanaryBytes, page) + page;
  if (D.smem_map_bytes < need) {
    if (D.smem_map != nullptr) munmap(D.smem_map, D.smem_map_bytes);
    D.smem_map = map_pages(need);
    D.smem_map_bytes = need;
    mprotect(D.smem_map + need - page, page, PROT_NONE);
  }
  D.smem_guard = D.smem_map + D.smem_map_bytes - page;
  D.smem = D.smem_guard - rounded;
  D.smem_bytes = bytes;
  std::memset(D.smem - kCanaryBytes, kCanary, kCanaryBytes);
  std::memset(D.smem + bytes, kCanary, rounded - bytes);
}

void run_block(uint3 block_idx, uint64_t block_linear) {
  Device& D = device();
  const unsigned n = D.nthreads;
  D.barrier = Barrier{};
  D.exited = 0;
  for (size_t wi = 0; wi < D.warps.size(); ++wi) {
    Warp& w = D.warps[wi];
    const unsigned lanes = std::min<unsigned>(32, n - static_cast<unsigned>(wi) * 32);
    w.existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    w.exited = 0;
    w.colls.clear();
    w.sync_masks.clear();
    w.requests.clear();
  }
  ++D.epoch;  // blocks run one after another: nothing of an earlier block races with this one
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = *D.fibers[i];
    f.index = static_cast<int>(i);
    f.warp = static_cast<int>(i / 32);
    f.lane = static_cast<int>(i % 32);
    f.st.thread_idx = uint3{i % D.block.x, (i / D.block.x) % D.block.y, i / (D.block.x * D.block.y)};
    f.st.block_idx = block_idx;
    f.st.block_dim = D.block;
    f.st.grid_dim = D.grid;
    f.state = FiberState::kRunnable;
    f.wait_what = nullptr;
    f.cp_pending.clear();
    f.cp_head = 0;
    f.cp_committed = 0;
    f.pending.valid = false;
    make_context(f.ctx, f.stack_map + page_size(), f.stack_map_bytes - page_size(), &fiber_main, &f);
  }
  if (D.smem_bytes > 0) std::memset(D.smem, kPoison, D.smem_bytes);

  const bool reverse = (block_linear & 1) != 0;
  unsigned remaining = n;
  uint64_t idle_sweeps = 0;  // sweeps in which every thread that ran only went back to __nanosleep
  while (remaining > 0) {
    bool ran = false, progress = false;
    for (unsigned k = 0; k < n; ++k) {
      Fiber& f = *D.fibers[reverse ? n - 1 - k : k];
      if (f.state != FiberState::kRunnable) continue;
      D.current = &f;
      detail::g_state = &f.st;
      f.yielded = false;
      switch_context(D.sched, f.ctx);
      D.current = nullptr;
      D.stats.context_switches += 2;
      ran = true;
      progress = progress || !f.yielded;
      if (D.failed) {
        if (D.fault_fiber != nullptr && D.error.empty()) D.error = thread_name(*D.fault_fiber) + ": " + D.fault_msg;
        return;
      }
      if (f.state == FiberState::kDone) --remaining;
    }
    if (!ran) {
      D.failed = true;
      D.error = format("block (%u,%u,%u): ", block_idx.x, block_idx.y, block_idx.z) + deadlock_report();
      return;
    }
    idle_sweeps = progress ? 0 : idle_sweeps + 1;
    if (idle_sweeps > (1u << 20)) {
      D.failed = true;
      D.error = format("block (%u,%u,%u): livelock: for %llu rounds every running thread only went back to "
                       "__nanosleep (waiting for another block? blocks run one after another here)",
                       block_idx.x, block_idx.y, block_idx.z, static_cast<unsigned long long>(idle_sweeps)) +
                (D.barrier.arrived > 0 || D.exited > 0 ? std::string(" ") + deadlock_report() : std::string());
      return;
    }
  }
  if (!canaries_intact(D.smem - kCanaryBytes, D.smem)) {
    D.failed = true;
    D.error = format("block (%u,%u,%u): a thread wrote before the start of dynamic shared memory", block_idx.x,
                     block_idx.y, block_idx.z);
  } else if (!canaries_intact(D.smem + D.smem_bytes, D.smem_guard)) {
    D.failed = true;
    D.error = format("block (%u,%u,%u): a thread wrote past the end of dynamic shared memory (%zu bytes)",
                     block_idx.x, block_idx.y, block_idx.z, D.smem_bytes);
  }
}

std::string kernel_description(const void* kernel, const char* signature) {
  std::string name;
  Dl_info info{};
  if (dladdr(kernel, &info) != 0 && info.dli_sname != nullptr && info.dli_saddr == kernel) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
    std::free(demangled);
  }
  if (name.empty()) {  // a kernel in an anonymous namespace has no dynamic symbol: its debug-info name
    static std::map<const void*, std::string> cache;
    auto it = cache.find(kernel);
    if (it == cache.end()) {
      Dl_info dl{};
      const std::vector<std::string> lines = addr2line(kernel, &dl);
      std::string fn = lines.size() >= 2 ? lines[lines.size() - 2] : std::string();  // the outermost function
      for (size_t a; (a = fn.find("(anonymous namespace)::")) != std::string::npos;) fn.erase(a, 23);
      it = cache.emplace(kernel, fn).first;
    }
    name = it->second;
  }
  if (name.empty()) {
    // "... [with KernelArgs = {vae_ext::ReparameterizeParams, bool}; ...]" -> "kernel(vae_ext::ReparameterizeParams, bool)"
    std::string sig = signature;
    const std::string key = "KernelArgs = {";
    const size_t b = sig.find(key);
    const size_t e = b == std::string::npos ? b : sig.find('}', b);
    name = b == std::string::npos ? std::string("kernel")
                                  : "kernel(" + sig.substr(b + key.size(), e - b - key.size()) + ")";
    name += format(" at %p", kernel);  // a kernel in an anonymous namespace has no dynamic symbol
  }
  return name;
}

void check_launch_config(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  Device& D = device();
  const unsigned bd[3] = {block.x, block.y, block.z}, gd[3] = {grid.x, grid.y, grid.z};
  for (int i = 0; i < 3; ++i) {
    if (bd[i] == 0 || bd[i] > kMaxBlockDim[i]) {
      throw std::invalid_argument(format("invalid configuration: blockDim (%u,%u,%u) (at most (1024,1024,64))",
                                         block.x, block.y, block.z));
    }
    if (gd[i] == 0 || gd[i] > kMaxGridDim[i]) {
      throw std::invalid_argument(format("invalid configuration: gridDim (%u,%u,%u) (each at least 1)", grid.x,
                                         grid.y, grid.z));
    }
  }
  if (static_cast<uint64_t>(block.x) * block.y * block.z > kMaxThreadsPerBlock) {
    throw std::invalid_argument(format("invalid configuration: %llu threads per block (at most 1024)",
                                       static_cast<unsigned long long>(block.x) * block.y * block.z));
  }
  if (smem > kMaxDynamicSmemOptin) {
    throw std::invalid_argument(format("%zu bytes of dynamic shared memory (the device allows at most %zu per block)",
                                       smem, kMaxDynamicSmemOptin));
  }
  if (smem > kDefaultMaxDynamicSmem) {
    const auto it = D.max_dynamic_smem.find(kernel);
    const size_t allowed = it == D.max_dynamic_smem.end() ? kDefaultMaxDynamicSmem : it->second;
    if (smem > allowed) {
      throw std::invalid_argument(format(
          "%zu bytes of dynamic shared memory, but the kernel allows %zu: call set_max_dynamic_smem(kernel, bytes) "
          "(cudaFuncSetAttribute MaxDynamicSharedMemorySize) before launching with more than 48 KB",
          smem, allowed));
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- public interface

namespace detail {

void launch(const void* kernel, const char* signature, dim3 grid, dim3 block, size_t smem_bytes, Entry entry,
            void* job) {
  Device& D = device();
  if (D.active && pthread_equal(D.owner, pthread_self())) {
    throw std::runtime_error(
        "vae_ext CUDA emulation: a kernel launched a kernel (dynamic parallelism is not emulated)");
  }
  std::lock_guard<std::mutex> launch_lock(D.launch_mutex);
  std::lock_guard<std::mutex> buffers_lock(D.buffers_mutex);  // device buffers stay put while kernels run
  const std::string name = kernel_description(kernel, signature);
  try {
    check_launch_config(kernel, grid, block, smem_bytes);
  } catch (const std::exception& e) {
    throw std::runtime_error("vae_ext CUDA emulation: launch of " + name + " failed: " + e.what());
  }
  D.kernel = name;
  D.grid = grid;
  D.block = block;
  D.nthreads = block.x * block.y * block.z;
  D.entry = entry;
  D.job = job;
  D.failed = false;
  D.error.clear();
  D.fault_fiber = nullptr;
  D.in_op = nullptr;
  D.warps.assign((D.nthreads + 31) / 32, Warp{});
  prepare_fibers(D.nthreads);
  prepare_smem(smem_bytes);
  ++D.stats.launches;
  D.checking = D.cfg.racecheck || D.cfg.counters;
  if (D.cfg.racecheck) {
    if (D.dyn_shadow.size() < smem_bytes) D.dyn_shadow.resize(smem_bytes);
    const size_t static_bytes = __start_vae_emu_shared != nullptr
                                    ? static_cast<size_t>(__stop_vae_emu_shared - __start_vae_emu_shared) : 0;
    if (D.static_shadow.size() < static_bytes) D.static_shadow.resize(static_bytes);
  }
  D.kc = &D.counters[name];
  if (D.cfg.counters) {
    ++D.kc->launches;
    D.kc->threads = std::max<uint64_t>(D.kc->threads, D.nthreads);
    D.kc->dynamic_smem = std::max<uint64_t>(D.kc->dynamic_smem, smem_bytes);
  }
  {
    SignalGuard signals;
    D.active = true;
    D.owner = pthread_self();
    uint64_t linear = 0;
    for (unsigned z = 0; z < grid.z && !D.failed; ++z) {
      for (unsigned y = 0; y < grid.y && !D.failed; ++y) {
        for (unsigned x = 0; x < grid.x && !D.failed; ++x, ++linear) {
          run_block(uint3{x, y, z}, linear);
          if (D.cfg.counters) finish_block_counters();
          ++D.stats.blocks;
          D.stats.threads += D.nthreads;
        }
      }
    }
    D.active = false;
    D.checking = false;
    D.current = nullptr;
    detail::g_state = nullptr;
  }
  if (!D.failed) {
    const std::string canaries = check_buffer_canaries();
    if (!canaries.empty()) {
      D.failed = true;
      D.error = canaries;
    }
  }
  if (D.failed) {
    throw std::runtime_error(
        format("vae_ext CUDA emulation: %s <<<(%u,%u,%u), (%u,%u,%u), %zu>>> failed: ", name.c_str(), grid.x,
               grid.y, grid.z, block.x, block.y, block.z, smem_bytes) +
        D.error);
  }
}

uint64_t shfl(ShflMode mode, unsigned mask, uint64_t value, int lane_arg, int width, const char* file, int line) {
  Fiber* f = current_fiber("a warp shuffle");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(format("%s%s: width %d is not a power of two in [1, 32]", kind_name(Kind::kShfl, static_cast<int>(mode)),
                site(file, line).c_str(), width));
  }
  const int l = f->lane, seg = l & ~(width - 1);
  int src = -1;
  switch (mode) {
    case ShflMode::kIdx: src = seg + (lane_arg & (width - 1)); break;
    case ShflMode::kUp: src = l - lane_arg >= seg ? l - lane_arg : -1; break;
    case ShflMode::kDown: src = l + lane_arg < seg + width ? l + lane_arg : -1; break;
    case ShflMode::kXor: src = (l ^ lane_arg) < seg + width ? (l ^ lane_arg) : -1; break;
  }
  if (src >= 32 || src < -1) src = -1;
  LaneIO& io = device().warps[f->warp].io[l];
  io.in = value;
  io.src = src;
  arrive(f, Kind::kShfl, static_cast<int>(mode), mask, file, line);
  return device().warps[f->warp].io[l].out;
}

unsigned vote(VoteMode mode, unsigned mask, int predicate, const char* file, int line) {
  Fiber* f = current_fiber("a warp vote");
  LaneIO& io = device().warps[f->warp].io[f->lane];
  io.in = predicate != 0;
  arrive(f, Kind::kVote, static_cast<int>(mode), mask, file, line);
  return static_cast<unsigned>(device().warps[f->warp].io[f->lane].out);
}

uint32_t reduce(ReduceMode mode, unsigned mask, uint32_t value, const char* file, int line) {
  Fiber* f = current_fiber("a warp reduction");
  device().warps[f->warp].io[f->lane].in = value;
  arrive(f, Kind::kReduce, static_cast<int>(mode), mask, file, line);
  return static_cast<uint32_t>(device().warps[f->warp].io[f->lane].out);
}

void syncwarp(unsigned mask, const char* file, int line) {
  Fiber* f = current_fiber("__syncwarp");
  arrive(f, Kind::kSyncWarp, 0, mask, file, line);
}

int syncthreads(int op, int predicate, const char* file, int line) {
  Fiber* f = current_fiber("__syncthreads");
  Device& D = device();
  Barrier& b = D.barrier;
  if (D.exited > 0) {
    fail(format("reached __syncthreads%s after %u threads of the block exited: every thread must reach it",
                site(file, line).c_str(), D.exited));
  }
  if (b.arrived == 0) {
    b.op = op;
    b.file = file;
    b.line = line;
    b.count = 0;
    b.all = true;
    b.any = false;
    b.waiters.clear();
  } else if (b.line != line || b.op != op || std::strcmp(b.file, file) != 0) {
    fail(format("divergent barrier: reached __syncthreads%s while %u threads of the block wait at __syncthreads%s",
                site(file, line).c_str(), b.arrived, site(b.file, b.line).c_str()));
  }
  ++b.arrived;
  b.count += predicate != 0;
  b.all = b.all && predicate != 0;
  b.any = b.any || predicate != 0;
  if (b.arrived == D.nthreads) {
    ++D.epoch;  // every access before the barrier is ordered before every access after it
    for (Warp& w : D.warps) w.sync_masks.clear();
    if (D.checking && D.cfg.counters) ++D.kc->barriers;
    const int result = op == 1 ? b.count : op == 2 ? static_cast<int>(b.all) : op == 3 ? static_cast<int>(b.any) : 0;
    for (Fiber* w : b.waiters) {
      w->barrier_result = result;
      w->state = FiberState::kRunnable;
    }
    b.arrived = 0;
    b.waiters.clear();
    return result;
  }
  b.waiters.push_back(f);
  block_current(f, "__syncthreads", file, line);
  return f->barrier_result;
}

void yield() {
  Fiber* f = current_fiber("__nanosleep");
  f->yielded = true;
  switch_context(f->ctx, device().sched);
}

void trap(const char* what, const char* file, int line) {
  current_fiber(what);
  fail(std::string(what) + site(file, line));
}

}  // namespace detail

cudaError_t set_max_dynamic_smem(const void* kernel, size_t bytes) {
  Device& D = device();
  std::lock_guard<std::mutex> lock(D.launch_mutex);
  if (bytes > kMaxDynamicSmemOptin) {
    D.last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  D.max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

char* dynamic_smem() {
  current_fiber("dynamic_smem()");
  return device().smem;
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16,
                  const char* file, int line) {
  Fiber* f = current_fiber("mma.sync");
  LaneIO& io = device().warps[f->warp].io[f->lane];
  std::memcpy(io.a, a, sizeof(io.a));
  std::memcpy(io.b, b, sizeof(io.b));
  std::memcpy(io.c, c, sizeof(io.c));  // before d is written: d may alias c
  io.d = d;
  arrive(f, Kind::kMma, bf16 ? 1 : 0, 0xffffffffu, file, line);
}

void ldmatrix(uint32_t* r, int num_matrices, const void* row_addr, bool trans, const char* file, int line) {
  Fiber* f = current_fiber("ldmatrix");
  if (num_matrices != 1 && num_matrices != 2 && num_matrices != 4) {
    fail(format("ldmatrix with %d matrices (1, 2 or 4)", num_matrices));
  }
  LaneIO& io = device().warps[f->warp].io[f->lane];
  io.r = r;
  io.addr = row_addr;
  arrive(f, Kind::kLdmatrix, num_matrices | (trans ? 16 : 0), 0xffffffffu, file, line);
}

void cp_async_16(void* smem_dst, const void* gmem_src, bool pred, const char* file, int line) {
  Fiber* f = current_fiber("cp.async");
  Device& D = device();
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0) {
    fail(format("cp.async%s: shared-memory destination %p is not 16-byte aligned", site(file, line).c_str(), smem_dst));
  }
  if (find_buffer(smem_dst) != nullptr) {
    fail(format("cp.async%s: destination %p is global memory; cp.async writes shared memory", site(file, line).c_str(),
                smem_dst));
  }
  PendingCopy copy;
  copy.dst = smem_dst;
  copy.file = file;
  copy.line = line;
  copy.group = f->cp_committed;
  if (D.checking) {
    // The copy may land any time until its wait: a write from its issue on (and again when it lands).
    if (D.cfg.racecheck) {
      check_shared(*f, static_cast<const char*>(smem_dst), 16, true, emu_site("cp.async", file, line));
    }
    if (D.cfg.counters && pred) {
      count_access(ReqKind::kCpAsync, emu_site("cp.async", file, line), gmem_src, 16, false);
      flush_access(*f);
    }
  }
  if (pred) {
    if (reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) {
      fail(format("cp.async%s: global source %p is not 16-byte aligned", site(file, line).c_str(), gmem_src));
    }
    if (in_dynamic_smem(gmem_src, 1)) {
      fail(format("cp.async%s: source %p is shared memory; cp.async reads global memory", site(file, line).c_str(),
                  gmem_src));
    }
    D.in_op = "the global-memory read of a cp.async";
    std::memcpy(copy.data, gmem_src, 16);
    D.in_op = nullptr;
  } else {
    std::memset(copy.data, 0, 16);  // src-size 0: zero fill, nothing read
  }
  f->cp_pending.push_back(copy);
}

void cp_async_commit() {
  Fiber* f = current_fiber("cp.async.commit_group");
  ++f->cp_committed;
}

void cp_async_wait(int pending_groups) {
  Fiber* f = current_fiber("cp.async.wait_group");
  // Complete all but the `pending_groups` most recent committed groups.
  const uint64_t keep = static_cast<uint64_t>(std::max(pending_groups, 0));
  if (f->cp_committed > keep) apply_copies(f, f->cp_committed - keep);
}

uint32_t pack_16bit(float lo, float hi, bool bf16) {
  uint16_t l, h;
  if (bf16) {
    const __nv_bfloat16 a = __float2bfloat16_rn(lo), b = __float2bfloat16_rn(hi);
    std::memcpy(&l, &a, 2);
    std::memcpy(&h, &b, 2);
  } else {
    const __half a = __float2half_rn(lo), b = __float2half_rn(hi);
    std::memcpy(&l, &a, 2);
    std::memcpy(&h, &b, 2);
  }
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

Config& config() { return device().cfg; }

Stats stats() { return device().stats; }

void reset_counters() {
  Device& D = device();
  std::lock_guard<std::mutex> lock(D.launch_mutex);
  D.counters.clear();
}

std::string counters_report() {
  Device& D = device();
  std::lock_guard<std::mutex> lock(D.launch_mutex);
  std::string out;
  for (const auto& [name, k] : D.counters) {
    if (k.launches == 0) continue;
    out += name;
#define VAE_EMU_FIELD(f) out += format("\t" #f "=%llu", static_cast<unsigned long long>(k.f));
    VAE_EMU_FIELD(launches) VAE_EMU_FIELD(threads) VAE_EMU_FIELD(dynamic_smem) VAE_EMU_FIELD(global_requests) VAE_EMU_FIELD(global_sectors)
    VAE_EMU_FIELD(global_ideal_sectors) VAE_EMU_FIELD(shared_requests) VAE_EMU_FIELD(shared_wavefronts)
    VAE_EMU_FIELD(shared_ideal_wavefronts) VAE_EMU_FIELD(ldmatrix) VAE_EMU_FIELD(ldmatrix_wavefronts)
    VAE_EMU_FIELD(ldmatrix_ideal_wavefronts) VAE_EMU_FIELD(cp_async_requests) VAE_EMU_FIELD(cp_async_sectors)
    VAE_EMU_FIELD(cp_async_ideal_sectors) VAE_EMU_FIELD(mma) VAE_EMU_FIELD(barriers) VAE_EMU_FIELD(syncwarps)
#undef VAE_EMU_FIELD
    out += "\n";
  }
  return out;
}

void* device_alloc(size_t bytes, size_t misalign) {
  Device& D = device();
  std::lock_guard<std::mutex> lock(D.buffers_mutex);
  const size_t page = page_size();
  misalign %= 16;
  Buffer b;
  b.bytes = bytes;
  b.map_bytes = round_up(bytes + 2 * kCanaryBytes + 256, page) + page;
  b.map = map_pages(b.map_bytes);
  b.guard = b.map + b.map_bytes - page;
  mprotect(b.guard, page, PROT_NONE);
  auto start = reinterpret_cast<uintptr_t>(b.guard) - bytes;
  start = ((start - misalign) & ~uintptr_t(15)) + misalign;
  b.data = reinterpret_cast<char*>(start);
  std::memset(b.data - kCanaryBytes, kCanary, kCanaryBytes);
  std::memset(b.data, kPoison, bytes);
  std::memset(b.data + bytes, kCanary, static_cast<size_t>(b.guard - (b.data + bytes)));
  D.buffers[start] = b;
  return b.data;
}

void device_free(void* ptr) {
  if (ptr == nullptr) return;
  Device& D = device();
  std::lock_guard<std::mutex> lock(D.buffers_mutex);
  const auto it = D.buffers.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == D.buffers.end()) {
    std::fprintf(stderr, "vae_ext CUDA emulation: device_free of %p, which device_alloc did not return\n", ptr);
    std::abort();
  }
  munmap(it->second.map, it->second.map_bytes);
  D.buffers.erase(it);
}

}  // namespace vae_ext::emu

extern "C" void vae_ext_emu_assert_fail(const char* assertion, const char* file, unsigned int line,
                                        const char* function) noexcept {
  using vae_ext::emu::device;
  if (device().current != nullptr && device().active && pthread_equal(device().owner, pthread_self())) {
    vae_ext::emu::fail(vae_ext::emu::format("assertion `%s' failed%s in %s", assertion,
                                            vae_ext::emu::site(file, static_cast<int>(line)).c_str(), function));
  }
  std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, assertion);
  std::abort();
}

// ---------------------------------------------------------------- the CUDA runtime API (host side)

using vae_ext::emu::device;

namespace {

cudaError_t record(cudaError_t err) {
  if (err != cudaSuccess) device().last_error = err;
  return err;
}

}  // namespace

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t err = device().last_error;
  device().last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError(void) { return device().last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported (by the CUDA emulation)";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int dev) { return record(dev == 0 ? cudaSuccess : cudaErrorInvalidDevice); }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int dev) {
  if (dev != 0) return record(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = vae_ext::emu::config().num_sms; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 << 10; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 << 10; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = 1 << 10; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = 65536; break;
    case cudaDevAttrL2CacheSize: *value = 50 << 20; break;
    case cudaDevAttrTotalConstantMemory: *value = 64 << 10; break;
    default: return record(cudaErrorNotSupported);
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0) return record(cudaErrorInvalidValue);
      return record(vae_ext::emu::set_max_dynamic_smem(func, static_cast<size_t>(value)));
    case cudaFuncAttributePreferredSharedMemoryCarveout:
      return record(value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue);
    default: return record(cudaErrorNotSupported);
  }
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* func, int block_size,
                                                          size_t dynamic_smem) {
  (void)func;
  if (block_size <= 0 || block_size > 1024) return record(cudaErrorInvalidValue);
  const int warps = (block_size + 31) / 32;
  int blocks = std::min(32, 64 / warps);
  const size_t smem = dynamic_smem + (1 << 10);  // 1 KB reserved per block
  blocks = std::min<int>(blocks, static_cast<int>((228 << 10) / smem));
  *num_blocks = blocks;
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  (void)stream;
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind) {
  (void)kind;
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind, cudaStream_t stream) {
  (void)kind;
  (void)stream;
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  (void)stream;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

}  // extern "C"

// ---------------------------------------------------------------- the instrumentation hooks
// What GCC's -fsanitize=thread calls for each load and store of the (instrumented) kernel translation
// units. The call's return address names the instruction.

#define VAE_EMU_HOOK_RANGE(n)                                                                                  \
  extern "C" void __tsan_read##n(void* p) {                                                                   \
    vae_ext::emu::on_access(p, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));            \
  }                                                                                                            \
  extern "C" void __tsan_write##n(void* p) {                                                                  \
    vae_ext::emu::on_access(p, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));             \
  }                                                                                                            \
  extern "C" void __tsan_unaligned_read##n(void* p) {                                                         \
    vae_ext::emu::on_access(p, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));            \
  }                                                                                                            \
  extern "C" void __tsan_unaligned_write##n(void* p) {                                                        \
    vae_ext::emu::on_access(p, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));             \
  }
VAE_EMU_HOOK_RANGE(1)
VAE_EMU_HOOK_RANGE(2)
VAE_EMU_HOOK_RANGE(4)
VAE_EMU_HOOK_RANGE(8)
VAE_EMU_HOOK_RANGE(16)
#undef VAE_EMU_HOOK_RANGE

extern "C" void __tsan_read_range(void* p, unsigned long n) {
  vae_ext::emu::on_access(p, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  vae_ext::emu::on_access(p, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
