// runtime.cpp - runs one kernel launch on the calling OS thread: every CUDA thread of a block is a fiber, switched
// cooperatively at barriers, warp collectives and exit; blocks run one after another, in order (deterministic).
//
// What stops a launch (with a message naming the block, warp, lanes, op and kernel line):
//   * a deadlock: no thread can run (a barrier some threads never reach, a collective missing lanes);
//   * lanes of one warp at different collectives, or one at a collective while a lane of its mask is at
//     __syncthreads or has exited; a mask that leaves out the calling lane or names lanes the block lacks;
//     a shuffle reading a lane outside its mask;
//   * ldmatrix / cp.async on an address that is misaligned or not in the block's shared memory;
//   * a thread exiting with cp.async copies it never waited for.
// cp.async reads its source at issue and writes its destination only at cp.async.wait_group (poisoned with NaN
// until then), so a missing wait reads NaN.
//
// Sanitizer builds (-fsanitize=address / thread on the kernels and this file): fiber switches are announced to
// ASan; under TSan each CUDA thread is a TSan fiber and only __syncthreads, __syncwarp, the start and end of a
// launch order memory between threads, so TSan reports what racecheck would (shared memory) and more (global
// memory shared by two blocks of one launch).
#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cudasim.h"
#include "runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#define CUDASIM_ASAN 1
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__) && !defined(CUDASIM_TSAN)
#define CUDASIM_TSAN 1
#endif
#ifdef CUDASIM_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#endif

// Context switch (x86-64 System V): pushes the callee-saved registers, stores the stack pointer in *save and resumes
// the context whose stack pointer is `next`. No system call (swapcontext makes one to save the signal mask, about
// 30x slower); no MXCSR or x87 control word either, since no kernel changes the rounding mode.
extern "C" void cudasim_switch(void** save, void* next);
__asm__(
    ".text\n.globl cudasim_switch\n.hidden cudasim_switch\n.type cudasim_switch,@function\ncudasim_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size cudasim_switch, .-cudasim_switch\n");

namespace cudasim {
namespace {

enum class State { Runnable, AtCollective, AtBarrier, Exited };
enum class Op { None, Shuffle, Syncwarp, Ldmatrix, Mma };

const char* op_name(Op op) {
  switch (op) {
    case Op::Shuffle: return "shuffle";
    case Op::Syncwarp: return "__syncwarp";
    case Op::Ldmatrix: return "ldmatrix";
    case Op::Mma: return "mma.sync";
    default: return "none";
  }
}

struct PendingCopy {
  void* dst;
  unsigned char data[16];
};

struct Thread {
  uint3 tid;
  int linear, lane, warp;
  State state;
  Site site;  // where it waits (or exited)
  void* sp;   // saved stack pointer while switched out
  char* stack;
  std::vector<PendingCopy> open;                 // issued, not yet committed
  std::vector<std::vector<PendingCopy>> groups;  // committed, not yet waited for
#ifdef CUDASIM_TSAN
  void* fiber;
#endif
};

// One warp collective in progress: the lanes that arrived wrote their inputs to `in`; the last to arrive computes
// every lane's `out`.
struct Warp {
  unsigned present;  // lanes that exist in this block
  unsigned at_barrier, exited;  // lanes waiting at __syncthreads, lanes that have exited
  unsigned arrived, mask;
  Op op;
  Site site;
  uint64_t in[32][10];
  uint64_t out[32][4];
  unsigned generation;
  char tsan_sync[2];  // __syncwarp's happens-before objects, by generation parity
  bool mma_f16;       // the input type of the warp's mma.sync: f16, else bf16
};

struct SharedVar {
  const void* key;
  char* ptr;
  size_t size;
  const char* name;
};

struct Block {
  const Kernel* kernel;
  void** params;
  uint3 idx;
  dim3 dim, grid;
  int nthreads, live, at_barrier;
  unsigned barrier_generation;
  Site barrier_site;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<SharedVar> shared;
  void* scheduler_sp;
  std::string error;  // why the launch stopped
  char tsan_barrier[2], tsan_launch, tsan_end;
  bool warned_exit_at_barrier;
#ifdef CUDASIM_TSAN
  void* scheduler_fiber;
#endif
#ifdef CUDASIM_ASAN
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  bool scheduler_stack_known = false;
#endif
};

// Initial-exec TLS: read with one instruction, where the default model for a shared library calls __tls_get_addr
// (a tenth of the run time otherwise).
__attribute__((tls_model("initial-exec"))) thread_local Block* g_block = nullptr;
__attribute__((tls_model("initial-exec"))) thread_local Thread* g_thread = nullptr;

#if defined(CUDASIM_ASAN) || defined(CUDASIM_TSAN)
constexpr size_t kStackSize = 512 << 10;
#else
constexpr size_t kStackSize = 128 << 10;
#endif

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

std::string where(Site s) { return format("%s:%d", s.file ? s.file : "?", s.line); }
bool same_site(Site a, Site b) { return a.line == b.line && (a.file == b.file || !strcmp(a.file, b.file)); }

std::string block_name() {
  const Block* b = g_block;
  return format("%s block (%u,%u,%u)", b->kernel->name, b->idx.x, b->idx.y, b->idx.z);
}

std::string describe(const Thread& t) {
  switch (t.state) {
    case State::AtBarrier: return "at __syncthreads " + where(t.site);
    case State::AtCollective: return format("at %s ", op_name(g_block->warps[t.warp].op)) + where(t.site);
    case State::Exited: return "exited";
    default: return "running";
  }
}

// "3-5,9": the lanes set in `mask`.
std::string lane_list(unsigned mask) {
  std::string list;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1)) continue;
    int last = l;
    while (last + 1 < 32 && ((mask >> (last + 1)) & 1)) ++last;
    if (!list.empty()) list += ",";
    list += last > l ? format("%d-%d", l, last) : format("%d", l);
    l = last;
  }
  return list;
}

// "lanes 3-5,9 at __syncthreads kernels/attention.cu:160; lanes 10-31 exited": the lanes of `lanes` by state.
std::string describe_lanes(int warp, unsigned lanes) {
  std::string out;
  unsigned left = lanes;
  while (left) {
    const int first = __builtin_ctz(left);
    const std::string what = describe(g_block->threads[warp * 32 + first]);
    unsigned same = 0;
    for (int l = first; l < 32; ++l)
      if (((left >> l) & 1) && describe(g_block->threads[warp * 32 + l]) == what) same |= 1u << l;
    left &= ~same;
    if (!out.empty()) out += "; ";
    out += "lanes " + lane_list(same) + " " + what;
  }
  return out;
}

// Leaves the running fiber for good (it exited or the launch stopped) and returns to the scheduler.
[[noreturn]] void leave_for_scheduler() {
  Block* b = g_block;
#ifdef CUDASIM_TSAN
  __tsan_switch_to_fiber(b->scheduler_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CUDASIM_ASAN
  __sanitizer_start_switch_fiber(nullptr, b->scheduler_stack_bottom, b->scheduler_stack_size);
#endif
  void* left;
  cudasim_switch(&left, b->scheduler_sp);
  __builtin_unreachable();
}

// Ends the launch from inside a fiber: records why and returns to the scheduler for good.
[[noreturn]] void stop(const std::string& why) {
  g_block->error = block_name() + ": " + why;
  leave_for_scheduler();
}

// The next runnable lane of the running thread's warp after it, or null: a collective's lanes hand the OS thread
// straight to each other, without a round trip through the scheduler.
Thread* next_in_warp() {
  Block* b = g_block;
  const Thread* t = g_thread;
  const int base = t->warp * 32, lanes = std::min(32, b->nthreads - base);
  for (int i = 1, l = t->lane + 1; i < lanes; ++i, ++l) {
    if (l == lanes) l = 0;  // no modulo: a division here costs more than the rest of the search
    Thread* o = &b->threads[base + l];
    if (o->state == State::Runnable) return o;
  }
  return nullptr;
}

// Gives the OS thread to another runnable lane of the warp, else to the scheduler, until this fiber is resumed.
void yield() {
  Block* b = g_block;
  Thread* t = g_thread;
  Thread* next = next_in_warp();
#ifdef CUDASIM_TSAN
  __tsan_switch_to_fiber(next ? next->fiber : b->scheduler_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CUDASIM_ASAN
  void* fake_stack;
  if (next)
    __sanitizer_start_switch_fiber(&fake_stack, next->stack, kStackSize);
  else
    __sanitizer_start_switch_fiber(&fake_stack, b->scheduler_stack_bottom, b->scheduler_stack_size);
#endif
  if (next) g_thread = next;  // a fiber starting for the first time finds itself here
  cudasim_switch(&t->sp, next ? next->sp : b->scheduler_sp);
#ifdef CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  g_thread = t;
}

void check_mask(unsigned mask, Op op, Site site) {
  const Thread* t = g_thread;
  const Warp& w = g_block->warps[t->warp];
  if (!((mask >> t->lane) & 1))
    stop(format("warp %d lane %d calls %s at %s with mask %08x, which leaves the caller out", t->warp, t->lane,
                op_name(op), where(site).c_str(), mask));
  if (mask & ~w.present)
    stop(format("warp %d: %s at %s has mask %08x, naming lanes the block does not have (present %08x)", t->warp,
                op_name(op), where(site).c_str(), mask, w.present));
}

[[noreturn]] void diverged(int warp, const std::string& what) {
  const Warp& w = g_block->warps[warp];
  stop(format("warp %d: %s: lanes wait at %s %s (mask %08x) while %s", warp, what.c_str(), op_name(w.op),
              where(w.site).c_str(), w.mask, describe_lanes(warp, w.mask & ~w.arrived).c_str()));
}

// The rendezvous behind every warp collective: waits until every lane of `mask` has arrived at the same op and
// line, then the last lane runs `compute` once for all of them.
template <class F>
void collective(unsigned mask, Op op, Site site, F compute) {
  Thread* t = g_thread;
  Block* b = g_block;
  Warp& w = b->warps[t->warp];
  check_mask(mask, op, site);
  t->site = site;
  if (w.arrived == 0) {
    w.mask = mask;
    w.op = op;
    w.site = site;
  } else if (w.mask != mask || w.op != op || !same_site(w.site, site)) {
    t->state = State::AtCollective;
    diverged(t->warp, format("lanes of one warp reach different collectives (lane %d: %s at %s, mask %08x)", t->lane,
                             op_name(op), where(site).c_str(), mask));
  }
  w.arrived |= 1u << t->lane;
  t->state = State::AtCollective;
  if (mask & (w.at_barrier | w.exited)) diverged(t->warp, "divergent collective");
#ifdef CUDASIM_TSAN
  const unsigned generation = w.generation;
  if (op == Op::Syncwarp) __tsan_release(&w.tsan_sync[generation & 1]);
#endif
  if ((w.arrived & mask) == mask) {
    compute(w);
    w.arrived = 0;
    ++w.generation;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l) & 1) b->threads[t->warp * 32 + l].state = State::Runnable;
  } else {
    yield();
  }
#ifdef CUDASIM_TSAN
  if (op == Op::Syncwarp) __tsan_acquire(&w.tsan_sync[generation & 1]);
#endif
}

// A lane leaving for __syncthreads (at `site`) or exit (site.file null) must not be awaited by its warp-mates at a
// collective.
void check_not_awaited(Site site) {
  const Thread* t = g_thread;
  const Warp& w = g_block->warps[t->warp];
  if (!w.arrived || !((w.mask >> t->lane) & 1) || ((w.arrived >> t->lane) & 1)) return;
  const std::string leaving = site.file ? "reaches __syncthreads at " + where(site) : std::string("exits");
  stop(format("warp %d: lane %d %s while lanes %s wait for it at %s %s (mask %08x): a warp collective in divergent "
              "code",
              t->warp, t->lane, leaving.c_str(), lane_list(w.arrived).c_str(), op_name(w.op), where(w.site).c_str(),
              w.mask));
}

void release_barrier(Block* b) {
  b->at_barrier = 0;
  ++b->barrier_generation;
  for (auto& o : b->threads)
    if (o.state == State::AtBarrier) o.state = State::Runnable;
  for (auto& w : b->warps) w.at_barrier = 0;
}

SharedVar* find_shared(const void* p, size_t n) {
  for (auto& v : g_block->shared)
    if ((const char*)p >= v.ptr && (const char*)p + n <= v.ptr + v.size) return &v;
  return nullptr;
}

void check_shared_row(const void* p, const char* op, Site site) {
  if ((uintptr_t)p & 15) stop(format("%s at %s: address %p is not 16-byte aligned", op, where(site).c_str(), p));
  if (!find_shared(p, 16))
    stop(format("%s at %s: address %p is not in the block's shared memory", op, where(site).c_str(), p));
}

void thread_main() {
  Block* b = g_block;
  Thread* t = g_thread;
#ifdef CUDASIM_ASAN
  // The launch's first fiber is started by the scheduler: its stack is what fibers switch back to.
  const void* from_bottom;
  size_t from_size;
  __sanitizer_finish_switch_fiber(nullptr, &from_bottom, &from_size);
  if (!b->scheduler_stack_known) {
    b->scheduler_stack_bottom = from_bottom;
    b->scheduler_stack_size = from_size;
    b->scheduler_stack_known = true;
  }
#endif
#ifdef CUDASIM_TSAN
  __tsan_acquire(&b->tsan_launch);
#endif
  b->kernel->invoke(b->kernel->fn, b->params);
  t = g_thread;
  if (!t->open.empty() || !t->groups.empty())
    stop(format("thread %d exits with cp.async copies it never waited for (cp.async.wait_group 0 missing)",
                t->linear));
  check_not_awaited(Site{nullptr, 0});
#ifdef CUDASIM_TSAN
  __tsan_release(&b->tsan_end);
#endif
  t->state = State::Exited;
  t->site = Site{"exit", 0};
  b->warps[t->warp].exited |= 1u << t->lane;
  --b->live;
  if (b->at_barrier > 0) {
    // Divergent __syncthreads (some threads exited first) is undefined on the GPU; the barrier then counts the
    // threads still running, as sm_70+ hardware does in practice.
    if (!b->warned_exit_at_barrier) {
      fprintf(stderr, "cudasim: warning: %s: a thread exits while others wait at __syncthreads %s\n",
              block_name().c_str(), where(b->barrier_site).c_str());
      b->warned_exit_at_barrier = true;
    }
    if (b->at_barrier == b->live) release_barrier(b);
  }
  leave_for_scheduler();
}

#ifdef CUDASIM_TSAN
// The TSan fiber of thread `i` of every block of every launch, created once: TSan allocates a whole thread state
// per fiber (creating them per block was most of the run). Thread i of one block therefore comes after thread i
// of the block before it in TSan's eyes, the one ordering besides barriers and launch boundaries: it also keeps
// the stack memory those two share from reading as a race, and hides races between just those two threads.
void* tsan_fiber(int i) {
  static std::vector<void*> fibers;
  while ((int)fibers.size() <= i) fibers.push_back(__tsan_create_fiber(0));
  return fibers[i];
}
#endif

void start_thread(Block& b, int i) {
  Thread& t = b.threads[i];
  t.linear = i;
  t.tid = {i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y)};
  t.lane = i & 31;
  t.warp = i >> 5;
  t.state = State::Runnable;
  t.site = Site{"start", 0};
  t.open.clear();
  t.groups.clear();
  b.warps[t.warp].present |= 1u << t.lane;
  // The first switch to it "returns" into thread_main with the stack 16-byte aligned as at a call.
  uint64_t* top = (uint64_t*)(((uintptr_t)t.stack + kStackSize) & ~(uintptr_t)15);
  top[-1] = 0;                                    // thread_main's (never used) return address
  top[-2] = (uint64_t)(uintptr_t)&thread_main;    // popped by cudasim_switch's ret
  for (int r = 3; r <= 8; ++r) top[-r] = 0;       // rbp rbx r12 r13 r14 r15
  t.sp = &top[-8];
#ifdef CUDASIM_TSAN
  t.fiber = tsan_fiber(i);
#endif
}

void resume(Block& b, Thread& t) {
  g_thread = &t;
#ifdef CUDASIM_TSAN
  __tsan_switch_to_fiber(t.fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CUDASIM_ASAN
  void* fake_stack;
  __sanitizer_start_switch_fiber(&fake_stack, t.stack, kStackSize);
#endif
  cudasim_switch(&b.scheduler_sp, t.sp);
#ifdef CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

std::string deadlock(Block& b) {
  std::string why = "deadlock: no thread can run";
  for (int w = 0; w < (int)b.warps.size(); ++w)
    if (b.warps[w].arrived) {
      const Warp& wp = b.warps[w];
      why += format("; warp %d: lanes wait at %s %s (mask %08x) while %s", w, op_name(wp.op), where(wp.site).c_str(),
                    wp.mask, describe_lanes(w, wp.mask & ~wp.arrived).c_str());
    }
  if (b.at_barrier) why += format("; %d of %d live threads at __syncthreads %s", b.at_barrier, b.live,
                                  where(b.barrier_site).c_str());
  return format("%s block (%u,%u,%u): ", b.kernel->name, b.idx.x, b.idx.y, b.idx.z) + why;
}

void free_shared(Block& b) {
  for (auto& v : b.shared) free(v.ptr);
  b.shared.clear();
}

// Runs one block to the end; false (with b.error set) if it stopped.
bool run_block(Block& b) {
  b.live = b.nthreads;
  b.at_barrier = 0;
  b.warned_exit_at_barrier = false;
  for (auto& w : b.warps) {  // the operand arrays need no clearing: every lane writes its own before it arrives
    w.present = w.at_barrier = w.exited = w.arrived = w.mask = 0;
    w.op = Op::None;
    w.generation = 0;
  }
  for (int i = 0; i < b.nthreads; ++i) start_thread(b, i);
  bool ok = true;
  while (b.live > 0 && ok) {
    bool progress = false;
    for (auto& t : b.threads) {
      if (t.state != State::Runnable) continue;
      progress = true;
      resume(b, t);
      if (!b.error.empty()) {
        ok = false;
        break;
      }
    }
    if (ok && !progress) {
      b.error = deadlock(b);
      ok = false;
    }
  }
  free_shared(b);
  return ok;
}

}  // namespace

// ---- the calls the kernels make -------------------------------------------------------------------------------
uint3 thread_idx() { return g_thread->tid; }
uint3 block_idx() { return g_block->idx; }
dim3 block_dim() { return g_block->dim; }
dim3 grid_dim() { return g_block->grid; }

void syncthreads(Site site) {
  Thread* t = g_thread;
  Block* b = g_block;
  check_not_awaited(site);
  if (b->at_barrier == 0) b->barrier_site = site;
  t->site = site;
#ifdef CUDASIM_TSAN
  const unsigned generation = b->barrier_generation;
  __tsan_release(&b->tsan_barrier[generation & 1]);
#endif
  if (++b->at_barrier == b->live) {
    release_barrier(b);
  } else {
    t->state = State::AtBarrier;
    b->warps[t->warp].at_barrier |= 1u << t->lane;
    yield();
  }
#ifdef CUDASIM_TSAN
  __tsan_acquire(&b->tsan_barrier[generation & 1]);
#endif
}

void syncwarp(unsigned mask, Site site) { collective(mask, Op::Syncwarp, site, [](Warp&) {}); }

uint64_t shuffle(unsigned mask, uint64_t bits, int kind, int arg, int width, Site site) {
  Thread* t = g_thread;
  Warp& w = g_block->warps[t->warp];
  if (width < 1 || width > 32 || (width & (width - 1)))
    stop(format("shuffle at %s: width %d is not a power of two up to 32", where(site).c_str(), width));
  w.in[t->lane][0] = bits;
  w.in[t->lane][1] = (uint64_t)(uint32_t)kind | ((uint64_t)(uint32_t)width << 8);
  w.in[t->lane][2] = (uint64_t)(int64_t)arg;
  collective(mask, Op::Shuffle, site, [](Warp& w) {
    for (int l = 0; l < 32; ++l) {
      if (!((w.mask >> l) & 1)) continue;
      const int kind = (int)(w.in[l][1] & 0xff), width = (int)(w.in[l][1] >> 8);
      const int arg = (int)(int64_t)w.in[l][2];
      const int seg = l & ~(width - 1);
      int src;
      switch (kind) {
        case 0: src = l ^ arg; if (src < seg || src >= seg + width) src = l; break;
        case 1: src = l - arg; if (src < seg) src = l; break;
        case 2: src = l + arg; if (src >= seg + width) src = l; break;
        default: src = seg + (arg & (width - 1)); break;
      }
      if (!((w.mask >> src) & 1))
        stop(format("shuffle at %s: lane %d reads lane %d, which is not in mask %08x", where(w.site).c_str(), l, src,
                    w.mask));
      w.out[l][0] = w.in[src][0];
    }
  });
  return w.out[t->lane][0];
}

void* shared_var(size_t size, size_t align, const void* key, const char* name, Site site) {
  Block* b = g_block;
  for (auto& v : b->shared)
    if (v.key == key) return v.ptr;
  if (align < 16) align = 16;
  void* p = nullptr;
  if (posix_memalign(&p, align, size ? size : 1)) stop(format("__shared__ %s at %s: out of memory", name, where(site).c_str()));
  // NaN in bf16 and f32: what was never written reads as NaN. Byte by byte under TSan, where memset is
  // intercepted and would count the fill as this thread's write, racing with every other thread's first one.
#ifdef CUDASIM_TSAN
  for (volatile char *q = (char*)p, *end = (char*)p + size; q < end; ++q) *q = (char)0xff;
#else
  memset(p, 0xff, size);
#endif
  b->shared.push_back(SharedVar{key, (char*)p, size, name});
  return p;
}

void cp_async16(void* dst, const void* src, int src_bytes, Site site) {
  if (src_bytes < 0 || src_bytes > 16) stop(format("cp.async at %s: src-size %d", where(site).c_str(), src_bytes));
  check_shared_row(dst, "cp.async destination", site);
  if ((uintptr_t)src & 15) stop(format("cp.async at %s: source %p is not 16-byte aligned", where(site).c_str(), src));
  PendingCopy c;
  c.dst = dst;
  memset(c.data, 0, 16);
  if (src_bytes == 16) {
    memcpy(c.data, src, 16);  // the global read (checked by ASan here); inlined, so TSan sees only the range below
  } else {
    for (int i = 0; i < src_bytes; ++i) ((volatile unsigned char*)c.data)[i] = ((const unsigned char*)src)[i];
  }
  if (src_bytes) {
#ifdef CUDASIM_TSAN
    __tsan_read_range((void*)src, src_bytes);
#endif
  }
  memset(dst, 0xff, 16);  // in flight: NaN until the wait
#ifdef CUDASIM_TSAN
  __tsan_write_range(dst, 16);
#endif
  g_thread->open.push_back(c);
}

void cp_async_commit() {
  Thread* t = g_thread;
  t->groups.push_back(std::move(t->open));
  t->open.clear();
}

void cp_async_wait(int pending, Site) {
  Thread* t = g_thread;
  while ((int)t->groups.size() > pending) {
    for (auto& c : t->groups.front()) {
      memcpy(c.dst, c.data, 16);
#ifdef CUDASIM_TSAN
      __tsan_write_range(c.dst, 16);
#endif
    }
    t->groups.erase(t->groups.begin());
  }
}

// Lane 8i + r names row r of matrix i (16 bytes). Lane l receives, of each matrix i, row l/4 elements 2(l%4) and
// 2(l%4)+1, or transposed, elements [2(l%4)][l/4] and [2(l%4)+1][l/4] (PTX ISA, ldmatrix fragment layout).
void load_matrices(unsigned (&r)[4], const void* row, bool trans, Site site) {
  check_shared_row(row, trans ? "ldmatrix.trans" : "ldmatrix", site);
  Thread* t = g_thread;
  Warp& w = g_block->warps[t->warp];
  memcpy(w.in[t->lane], row, 16);  // this lane's row, read on its behalf
#ifdef CUDASIM_TSAN
  __tsan_read_range((void*)row, 16);
#endif
  w.in[t->lane][2] = trans;
  collective(0xffffffffu, Op::Ldmatrix, site, [](Warp& w) {
    const bool trans = w.in[0][2];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, q = l & 3;
      for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {
          const uint16_t* e = (const uint16_t*)w.in[8 * i + g];
          lo = e[2 * q];
          hi = e[2 * q + 1];
        } else {
          lo = ((const uint16_t*)w.in[8 * i + 2 * q])[g];
          hi = ((const uint16_t*)w.in[8 * i + 2 * q + 1])[g];
        }
        w.out[l][i] = (uint64_t)lo | ((uint64_t)hi << 16);
      }
    }
  });
  for (int i = 0; i < 4; ++i) r[i] = (unsigned)w.out[t->lane][i];
}

namespace {
// The two 16-bit inputs of a register as floats: index 0 is the low half.
struct Pair {
  float v[2];
};
Pair unpack_inputs(unsigned u, bool f16) {
  if (!f16) return {{__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u)}};
  __half lo, hi;
  lo.__x = (unsigned short)(u & 0xffffu);
  hi.__x = (unsigned short)(u >> 16);
  return {{__half2float(lo), __half2float(hi)}};
}
}  // namespace

// D = A (16x16, row major) * B (16x8, column major) + D. Fragments (g = lane/4, q = lane%4): a0 A[g][2q..],
// a1 A[g+8][2q..], a2 A[g][2q+8..], a3 A[g+8][2q+8..]; b0 B[2q..][g], b1 B[2q+8..][g]; d0,d1 D[g][2q..],
// d2,d3 D[g+8][2q..]; the low half of a register is the lower index. Products are exact and each sum (16 products
// and D) is rounded once, in double: tensor cores round differently, so compare with tolerances, never bitwise.
void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, const char* type, Site site) {
  if (strcmp(type, "bf16") != 0 && strcmp(type, "f16") != 0)
    stop(format("mma.sync at %s with input type %s (the simulator has bf16 and f16)", where(site).c_str(), type));
  Thread* t = g_thread;
  Warp& w = g_block->warps[t->warp];
  uint64_t* in = w.in[t->lane];
  for (int i = 0; i < 4; ++i) in[i] = a[i];
  in[4] = b0;
  in[5] = b1;
  for (int i = 0; i < 4; ++i) memcpy(&in[6 + i], &d[i], 4);
  // The block's threads all run the same kernel, so the type is the same for the whole warp.
  w.mma_f16 = strcmp(type, "f16") == 0;
  collective(0xffffffffu, Op::Mma, site, [](Warp& w) {
    const bool f16 = w.mma_f16;
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, q = l & 3;
      const uint64_t* in = w.in[l];
      const unsigned a0 = (unsigned)in[0], a1 = (unsigned)in[1], a2 = (unsigned)in[2], a3 = (unsigned)in[3];
      const unsigned b0 = (unsigned)in[4], b1 = (unsigned)in[5];
      for (int h = 0; h < 2; ++h) {
        A[g][2 * q + h] = unpack_inputs(a0, f16).v[h];
        A[g + 8][2 * q + h] = unpack_inputs(a1, f16).v[h];
        A[g][2 * q + 8 + h] = unpack_inputs(a2, f16).v[h];
        A[g + 8][2 * q + 8 + h] = unpack_inputs(a3, f16).v[h];
        B[2 * q + h][g] = unpack_inputs(b0, f16).v[h];
        B[2 * q + 8 + h][g] = unpack_inputs(b1, f16).v[h];
      }
      float c[4];
      for (int i = 0; i < 4; ++i) memcpy(&c[i], &in[6 + i], 4);
      C[g][2 * q] = c[0], C[g][2 * q + 1] = c[1], C[g + 8][2 * q] = c[2], C[g + 8][2 * q + 1] = c[3];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, q = l & 3;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
        double s = C[row][col];
        for (int k = 0; k < 16; ++k) s += (double)A[row][k] * (double)B[k][col];
        const float r = (float)s;
        w.out[l][e] = 0;
        memcpy(&w.out[l][e], &r, 4);
      }
    }
  });
  for (int i = 0; i < 4; ++i) memcpy(&d[i], &w.out[t->lane][i], 4);
}

// ---- launches ---------------------------------------------------------------------------------------------------
std::string run_launch(const Kernel* k, dim3 grid, dim3 block, void** params) {
  const long long nt = (long long)block.x * block.y * block.z;
  Block b;
  b.kernel = k;
  b.params = params;
  b.dim = block;
  b.grid = grid;
  b.nthreads = (int)nt;
  b.threads.resize(nt);
  b.warps.resize((nt + 31) / 32);
  for (auto& t : b.threads) t.stack = (char*)malloc(kStackSize);
#ifdef CUDASIM_TSAN
  b.scheduler_fiber = __tsan_get_current_fiber();
  __tsan_release(&b.tsan_launch);
#endif
  Block* outer_block = g_block;
  Thread* outer_thread = g_thread;
  g_block = &b;
  for (unsigned z = 0; z < grid.z && b.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && b.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && b.error.empty(); ++x) {
        b.idx = {x, y, z};
        if (!run_block(b)) break;
      }
#ifdef CUDASIM_TSAN
  __tsan_acquire(&b.tsan_end);
#endif
  g_block = outer_block;
  g_thread = outer_thread;
  for (auto& t : b.threads) free(t.stack);
  return b.error;
}

std::vector<const Kernel*>& kernel_table() {
  static std::vector<const Kernel*> table;
  return table;
}

void register_kernel(const Kernel* k) { kernel_table().push_back(k); }

}  // namespace cudasim
