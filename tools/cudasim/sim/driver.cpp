// driver.cpp - a simulated CUDA driver: the part of libcuda.so.1's API that cudarc and the engine call, over one
// simulated device whose memory is host memory and whose kernels are the ones compiled into this library
// (runtime.cpp runs them). Every call takes one lock: the device does one thing at a time, in call order, so
// streams are in order by construction and an asynchronous call has finished when it returns.
//
// What it checks, as the driver documents (returning the driver's error codes):
//   * modules: an image names a kernel file; it must come from the sources this library was built from (an nvcc
//     fatbin or a cubin holding that file's kernels, or an image from the simulated NVRTC carrying the source
//     hash), else CUDA_ERROR_INVALID_IMAGE;
//   * launches: grid and block within the device limits and the kernel's __launch_bounds__, no dynamic shared
//     memory, every pointer argument null or inside a live allocation (the driver API passes no argument count:
//     an argument missing or out of place shows up as a pointer that is not one);
//   * memory: copies and sets inside live allocations, frees of live allocations only, an out-of-memory error
//     past the simulated capacity (CUDASIM_MEMORY_MIB, default 8192);
//   * capture: launches, copies, sets and event records on a capturing stream become graph nodes, replayed in
//     order by cuGraphLaunch; synchronising a capturing stream or the context fails with
//     CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates the capture, whose end then fails with
//     CUDA_ERROR_STREAM_CAPTURE_INVALIDATED. Allocating, freeing or a synchronous copy does the same where the
//     driver forbids it: from any thread during a global-mode capture, from the capturing thread during a
//     thread-local one, never during a relaxed one.
// A kernel that stops in the simulator (deadlock, divergent collective, bad shared-memory address...) fails its
// launch with CUDA_ERROR_LAUNCH_FAILED, prints why on stderr, and, as on a GPU, the context stays failed.
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "runtime.h"

#define API extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : CUresult {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_IMAGE = 200,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_ILLEGAL_STATE = 401,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_NOT_READY = 600,
  CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
  CUDA_ERROR_LAUNCH_FAILED = 719,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
  CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
  CUDA_ERROR_UNKNOWN = 999,
};

namespace {

using cudasim::Kernel;

constexpr const char* kDeviceName = "cudasim (simulated CUDA device on the CPU, sm_90)";
constexpr int kCaptureGlobal = 0, kCaptureThreadLocal = 1, kCaptureRelaxed = 2;  // CUstreamCaptureMode's values

struct Event;

// One recorded operation of a graph.
struct Node {
  enum Kind { Launch, Copy, Set, Record } kind;
  const Kernel* kernel = nullptr;
  dim3 grid, block;
  std::vector<std::vector<unsigned char>> args;  // each argument's bytes, copied at capture
  CUdeviceptr dst = 0;
  const void* src = nullptr;
  size_t bytes = 0;
  unsigned value = 0;
  int elem = 0;
  Event* event = nullptr;
};

struct Graph {
  std::vector<Node> nodes;
};

struct Stream {
  bool capturing = false, invalidated = false;
  int mode = kCaptureGlobal;
  std::thread::id captured_by;  // the thread that began the capture: thread-local mode restricts only it
  std::unique_ptr<Graph> graph;
};

struct Event {
  unsigned flags = 0;
  bool recorded = false;
  std::chrono::steady_clock::time_point at;
};

struct Module {
  std::string file;
  std::vector<const Kernel*> kernels;
};

struct Context {};  // the primary context: only its address is handed out

struct Device {
  std::recursive_mutex lock;
  bool initialised = false;
  CUresult sticky = CUDA_SUCCESS;  // a failed kernel fails every later call, as on a GPU
  std::map<CUdeviceptr, size_t> allocations;
  size_t allocated = 0, capacity = 0;
  std::set<Stream*> streams;
  std::set<Event*> events;
  std::set<Module*> modules;
  std::set<Graph*> graphs, execs;
  Stream null_stream;  // the legacy default stream (handle 0)
  Context primary;
  Context* current = nullptr;
};

Device& device() {
  static Device* d = new Device;  // never destroyed: calls may come from other libraries' destructors
  return *d;
}

#define LOCKED std::lock_guard<std::recursive_mutex> guard(device().lock)

void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void say(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "cudasim: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
}

CUresult ready() {
  Device& d = device();
  if (!d.initialised) return CUDA_ERROR_NOT_INITIALIZED;
  return d.sticky;
}
#define READY                     \
  LOCKED;                         \
  if (CUresult rc_ = ready()) return rc_

Stream* stream_of(void* handle) {
  Device& d = device();
  if (!handle) return &d.null_stream;
  Stream* s = (Stream*)handle;
  return d.streams.count(s) ? s : nullptr;
}

// The allocation that holds [p, p + n), or none.
const std::pair<const CUdeviceptr, size_t>* allocation_of(CUdeviceptr p, size_t n) {
  Device& d = device();
  auto it = d.allocations.upper_bound(p);
  if (it == d.allocations.begin()) return nullptr;
  --it;
  if (p < it->first || p + n > it->first + it->second) return nullptr;
  return &*it;
}

bool device_range(CUdeviceptr p, size_t n, const char* what) {
  if (n == 0 || allocation_of(p, n)) return true;
  say("%s: [0x%llx, +%zu) is not inside one live allocation", what, p, n);
  return false;
}

// Whether a capture on `s` forbids the calling thread a potentially unsafe call (allocating, freeing, a
// synchronous copy): a global-mode capture forbids it to every thread, a thread-local one to its own thread.
bool forbids_unsafe_calls(const Stream* s) {
  if (s->mode == kCaptureGlobal) return true;
  return s->mode == kCaptureThreadLocal && s->captured_by == std::this_thread::get_id();
}

// A call that a capture forbids: a potentially unsafe call (`unsafe_call`) where `forbids_unsafe_calls` says so,
// or, in any mode, a call that synchronises the device. The captures that forbid it are invalidated.
bool forbidden_in_capture(const char* call, bool unsafe_call) {
  Device& d = device();
  bool hit = false;
  auto check = [&](Stream* s) {
    if (!s->capturing || (unsafe_call && !forbids_unsafe_calls(s))) return;
    say("%s during stream capture: the capture is invalidated", call);
    s->invalidated = true;
    hit = true;
  };
  check(&d.null_stream);
  for (Stream* s : d.streams) check(s);
  return hit;
}

// ---- kernels ---------------------------------------------------------------------------------------------------
std::string launch_problem(const Kernel* k, dim3 grid, dim3 block, unsigned shared_bytes, void** params) {
  char buf[512];
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (!grid.x || !grid.y || !grid.z || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    snprintf(buf, sizeof buf, "grid (%u,%u,%u) is outside the device's limits", grid.x, grid.y, grid.z);
    return buf;
  }
  if (!block.x || !block.y || !block.z || block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024) {
    snprintf(buf, sizeof buf, "block (%u,%u,%u) is outside the device's limits", block.x, block.y, block.z);
    return buf;
  }
  if (k->max_threads && threads > (unsigned long long)k->max_threads) {
    snprintf(buf, sizeof buf, "block of %llu threads exceeds __launch_bounds__(%d)", threads, k->max_threads);
    return buf;
  }
  if (shared_bytes) {
    snprintf(buf, sizeof buf, "%u bytes of dynamic shared memory asked for; the kernels declare theirs statically",
             shared_bytes);
    return buf;
  }
  if (!params && k->nparams) return "no kernel parameters given";
  for (int i = 0; i < k->nparams; ++i) {
    if (!k->param_is_pointer[i]) continue;
    CUdeviceptr p;
    memcpy(&p, params[i], sizeof p);
    if (p && !allocation_of(p, 0) && !allocation_of(p - 1, 1)) {
      snprintf(buf, sizeof buf, "argument %d is a pointer (0x%llx) to no live device allocation", i, p);
      return buf;
    }
  }
  return "";
}

// CUDASIM_PROFILE=1: launches, blocks and host time per kernel, printed to stderr at exit (what the simulator
// spends its time on; says nothing of a GPU's speed).
struct KernelTotals {
  long long launches = 0, blocks = 0;
  double seconds = 0;
};
std::map<std::string, KernelTotals>* profile() {
  static std::map<std::string, KernelTotals>* totals = [] {
    if (!getenv("CUDASIM_PROFILE")) return (std::map<std::string, KernelTotals>*)nullptr;
    atexit([] {
      for (auto& [name, t] : *profile())
        fprintf(stderr, "cudasim profile: %-28s %8lld launches %10lld blocks %9.3f s\n", name.c_str(), t.launches,
                t.blocks, t.seconds);
    });
    return new std::map<std::string, KernelTotals>;
  }();
  return totals;
}

CUresult run_kernel(const Kernel* k, dim3 grid, dim3 block, void** params) {
  const auto started = std::chrono::steady_clock::now();
  const std::string why = cudasim::run_launch(k, grid, block, params);
  if (auto* totals = profile()) {
    KernelTotals& t = (*totals)[k->name];
    ++t.launches;
    t.blocks += (long long)grid.x * grid.y * grid.z;
    t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  }
  if (why.empty()) return CUDA_SUCCESS;
  say("error: kernel %s (kernels/%s) stopped: %s", k->name, k->file, why.c_str());
  device().sticky = CUDA_ERROR_LAUNCH_FAILED;
  return CUDA_ERROR_LAUNCH_FAILED;
}

CUresult run_node(const Node& n) {
  switch (n.kind) {
    case Node::Launch: {
      std::vector<void*> params;
      for (auto& a : n.args) params.push_back((void*)a.data());
      return run_kernel(n.kernel, n.grid, n.block, params.data());
    }
    case Node::Copy:
      memmove((void*)n.dst, n.src, n.bytes);
      return CUDA_SUCCESS;
    case Node::Set:
      for (size_t i = 0; i < n.bytes; ++i) {
        unsigned char* p = (unsigned char*)n.dst + (size_t)i * n.elem;
        memcpy(p, &n.value, n.elem);  // little endian: the low `elem` bytes
      }
      return CUDA_SUCCESS;
    case Node::Record:
      n.event->recorded = true;
      n.event->at = std::chrono::steady_clock::now();
      return CUDA_SUCCESS;
  }
  return CUDA_ERROR_UNKNOWN;
}

// Runs `n` now, or appends it to the stream's capture.
CUresult submit(void* stream_handle, Node n) {
  Stream* s = stream_of(stream_handle);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  if (s->capturing) {
    if (s->invalidated) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    s->graph->nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
  }
  return run_node(n);
}

CUresult copy(CUdeviceptr dst, const void* src, size_t n, void* stream, bool dst_device, bool src_device) {
  if (dst_device && !device_range(dst, n, "copy destination")) return CUDA_ERROR_INVALID_VALUE;
  if (src_device && !device_range((CUdeviceptr)src, n, "copy source")) return CUDA_ERROR_INVALID_VALUE;
  Node node{Node::Copy};
  node.dst = dst;
  node.src = src;
  node.bytes = n;
  return submit(stream, std::move(node));
}

CUresult set(CUdeviceptr dst, unsigned value, int elem, size_t count, void* stream) {
  if (!device_range(dst, count * elem, "memset")) return CUDA_ERROR_INVALID_VALUE;
  Node node{Node::Set};
  node.dst = dst;
  node.value = value;
  node.elem = elem;
  node.bytes = count;
  return submit(stream, std::move(node));
}

// ---- module images ---------------------------------------------------------------------------------------------
bool image_names(const unsigned char* image, size_t size, const char* name) {
  const size_t n = strlen(name);
  for (size_t i = 0; i + n < size; ++i)
    if (image[i] == (unsigned char)name[0] && !memcmp(image + i, name, n) && !image[i + n] &&
        (i == 0 || !image[i - 1] || image[i - 1] == '.' || image[i - 1] == ' '))
      return true;
  return false;
}

// The size of an image cuModuleLoadData is given (it takes no length): a fatbin header states it, an ELF its
// section headers; a simulated NVRTC image or PTX is NUL-terminated text.
size_t image_size(const unsigned char* image) {
  uint32_t magic;
  memcpy(&magic, image, 4);
  if (magic == 0xBA55ED50u) {  // fatbin: 16-byte header, then `size` bytes
    uint64_t size;
    memcpy(&size, image + 8, 8);
    return 16 + size;
  }
  if (!memcmp(image, "\x7f" "ELF", 4)) {
    uint64_t shoff;
    uint16_t shentsize, shnum;
    memcpy(&shoff, image + 0x28, 8);
    memcpy(&shentsize, image + 0x3a, 2);
    memcpy(&shnum, image + 0x3c, 2);
    return shoff + (size_t)shentsize * shnum;
  }
  return strlen((const char*)image);
}

constexpr const char* kNvrtcImage = "cudasim-image ";  // the simulated NVRTC's "cubin": "cudasim-image <file> <hash>"

CUresult load_module(Module* m, const unsigned char* image) {
  auto& table = cudasim::kernel_table();
  if (!memcmp(image, kNvrtcImage, strlen(kNvrtcImage))) {
    char file[256];
    unsigned long long hash;
    if (sscanf((const char*)image + strlen(kNvrtcImage), "%255s %llx", file, &hash) != 2) return CUDA_ERROR_INVALID_IMAGE;
    for (const Kernel* k : table)
      if (m->file.empty() ? !strcmp(k->file, file) : m->file == k->file) {
        if (k->source_hash != hash) {
          say("module image of %s was compiled from other sources (hash %016llx) than this simulator (%016llx): "
              "rebuild tools/cudasim",
              file, hash, (unsigned long long)k->source_hash);
          return CUDA_ERROR_INVALID_IMAGE;
        }
        m->file = k->file;
        m->kernels.push_back(k);
      }
    if (m->kernels.empty()) {
      say("module image names kernels/%s, which this simulator was not built with", file);
      return CUDA_ERROR_INVALID_IMAGE;
    }
    return CUDA_SUCCESS;
  }
  // An nvcc fatbin or a cubin: the kernel file whose every kernel the image defines.
  const size_t size = image_size(image);
  std::map<std::string, std::vector<const Kernel*>> by_file;
  for (const Kernel* k : table) by_file[k->file].push_back(k);
  for (auto& [file, kernels] : by_file) {
    bool all = true;
    for (const Kernel* k : kernels) all = all && image_names(image, size, k->name);
    if (all) {
      m->file = file;
      m->kernels = kernels;
      return CUDA_SUCCESS;
    }
  }
  say("module image (%zu bytes) holds the kernels of no file this simulator was built from", size);
  return CUDA_ERROR_INVALID_IMAGE;
}

size_t capacity_bytes() {
  const char* mib = getenv("CUDASIM_MEMORY_MIB");
  return (size_t)(mib ? strtoull(mib, nullptr, 10) : 8192) << 20;
}

}  // namespace

// ---- initialisation, device, context --------------------------------------------------------------------------
API CUresult cuInit(unsigned) {
  LOCKED;
  device().initialised = true;
  device().capacity = capacity_bytes();
  return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* v) {
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = 13000;
  return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* n) {
  READY;
  if (!n) return CUDA_ERROR_INVALID_VALUE;
  *n = 1;
  return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
  READY;
  if (!dev) return CUDA_ERROR_INVALID_VALUE;
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *dev = 0;
  return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
  READY;
  if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  snprintf(name, len, "%s", kDeviceName);
  return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
  READY;
  if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = device().capacity;
  return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice dev) {
  READY;
  if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
  memcpy(uuid, "cudasim-device-0", 16);
  return CUDA_SUCCESS;
}

// The attributes the engine and cudarc ask for, as an H200 reports them (memory pools off: cudarc then allocates
// with cuMemAlloc, which the simulator tracks).
API CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice dev) {
  READY;
  if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
  switch (attribute) {
    case 1: *v = 1024; break;            // max threads per block
    case 2: *v = 1024; break;            // max block dim x
    case 3: *v = 1024; break;            // max block dim y
    case 4: *v = 64; break;              // max block dim z
    case 5: *v = 0x7fffffff; break;      // max grid dim x
    case 6: case 7: *v = 65535; break;   // max grid dim y, z
    case 8: *v = 48 << 10; break;        // max shared memory per block
    case 10: *v = 32; break;             // warp size
    case 13: *v = 1980000; break;        // clock rate, kHz
    case 16: *v = 132; break;            // multiprocessors
    case 36: *v = 2619000; break;        // memory clock rate, kHz
    case 37: *v = 6144; break;           // memory bus width, bits
    case 39: *v = 2048; break;           // max threads per multiprocessor
    case 75: *v = 9; break;              // compute capability major
    case 76: *v = 0; break;              // compute capability minor
    case 81: *v = 228 << 10; break;      // max shared memory per multiprocessor
    case 82: *v = 65536; break;          // registers per multiprocessor
    case 97: *v = 227 << 10; break;      // max shared memory per block (opt-in)
    case 106: *v = 32; break;            // max blocks per multiprocessor
    case 115: *v = 0; break;             // memory pools supported
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice dev) {
  READY;
  if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
  *ctx = &device().primary;
  return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
  LOCKED;
  return dev == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}
API CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned* flags, int* active) {
  LOCKED;
  if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
  *flags = 0;
  *active = 1;
  return CUDA_SUCCESS;
}
API CUresult cuCtxSetCurrent(void* ctx) {
  LOCKED;
  if (ctx && ctx != &device().primary) return CUDA_ERROR_INVALID_CONTEXT;
  device().current = (Context*)ctx;
  return CUDA_SUCCESS;
}
API CUresult cuCtxGetCurrent(void** ctx) {
  LOCKED;
  *ctx = device().current;
  return CUDA_SUCCESS;
}
API CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
API CUresult cuCtxPopCurrent_v2(void** ctx) {
  LOCKED;
  if (ctx) *ctx = device().current;
  return CUDA_SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* dev) {
  READY;
  *dev = 0;
  return CUDA_SUCCESS;
}
API CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
API CUresult cuCtxSynchronize() {
  READY;
  if (forbidden_in_capture("cuCtxSynchronize", false)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return CUDA_SUCCESS;
}

// ---- memory ----------------------------------------------------------------------------------------------------
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  READY;
  *free_bytes = device().capacity - device().allocated;
  *total = device().capacity;
  return CUDA_SUCCESS;
}

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  READY;
  Device& d = device();
  if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  if (forbidden_in_capture("cuMemAlloc", true)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  if (bytes > d.capacity - d.allocated) return CUDA_ERROR_OUT_OF_MEMORY;
  void* mem = nullptr;
  if (posix_memalign(&mem, 256, bytes)) return CUDA_ERROR_OUT_OF_MEMORY;
  memset(mem, 0xff, bytes);  // fresh device memory is garbage: NaN here, so reading it before writing shows
  *p = (CUdeviceptr)mem;
  d.allocations[*p] = bytes;
  d.allocated += bytes;
  return CUDA_SUCCESS;
}

API CUresult cuMemFree_v2(CUdeviceptr p) {
  READY;
  Device& d = device();
  auto it = d.allocations.find(p);
  if (it == d.allocations.end()) {
    say("cuMemFree of 0x%llx, which is not a live allocation", p);
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (forbidden_in_capture("cuMemFree", true)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  d.allocated -= it->second;
  d.allocations.erase(it);
  free((void*)p);
  return CUDA_SUCCESS;
}

API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
API CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }

API CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
  READY;
  *p = malloc(bytes ? bytes : 1);
  return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) { return cuMemAllocHost_v2(p, bytes); }
API CUresult cuMemFreeHost(void* p) {
  free(p);
  return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
  READY;
  return copy(dst, src, n, stream, true, false);
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
  READY;
  return copy((CUdeviceptr)dst, (const void*)src, n, stream, false, true);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
  READY;
  return copy(dst, (const void*)src, n, stream, true, true);
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
  READY;
  if (forbidden_in_capture("cuMemcpyHtoD", true)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return copy(dst, src, n, nullptr, true, false);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
  READY;
  if (forbidden_in_capture("cuMemcpyDtoH", true)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return copy((CUdeviceptr)dst, (const void*)src, n, nullptr, false, true);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  READY;
  if (forbidden_in_capture("cuMemcpyDtoD", true)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return copy(dst, (const void*)src, n, nullptr, true, true);
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* stream) {
  READY;
  return set(dst, v, 1, n, stream);
}
API CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, void* stream) {
  READY;
  return set(dst, v, 2, n, stream);
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* stream) {
  READY;
  return set(dst, v, 4, n, stream);
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
  READY;
  return set(dst, v, 1, n, nullptr);
}

// ---- streams and events ----------------------------------------------------------------------------------------
API CUresult cuStreamCreate(void** stream, unsigned) {
  READY;
  Stream* s = new Stream;
  device().streams.insert(s);
  *stream = s;
  return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(void** stream, unsigned flags, int) { return cuStreamCreate(stream, flags); }
API CUresult cuStreamDestroy_v2(void* stream) {
  LOCKED;
  Stream* s = stream_of(stream);
  if (!s || s == &device().null_stream) return CUDA_ERROR_INVALID_HANDLE;
  device().streams.erase(s);
  delete s;
  return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(void* stream) {
  READY;
  Stream* s = stream_of(stream);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  if (s->capturing) {
    say("cuStreamSynchronize on a capturing stream: the capture is invalidated");
    s->invalidated = true;
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  }
  return CUDA_SUCCESS;
}
API CUresult cuStreamQuery(void* stream) {
  READY;
  return stream_of(stream) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
API CUresult cuStreamWaitEvent(void* stream, void* event, unsigned) {
  READY;
  if (!stream_of(stream) || !device().events.count((Event*)event)) return CUDA_ERROR_INVALID_HANDLE;
  return CUDA_SUCCESS;  // everything before the event has run already
}

API CUresult cuEventCreate(void** event, unsigned flags) {
  READY;
  Event* e = new Event;
  e->flags = flags;
  device().events.insert(e);
  *event = e;
  return CUDA_SUCCESS;
}
API CUresult cuEventDestroy_v2(void* event) {
  LOCKED;
  Event* e = (Event*)event;
  if (!device().events.erase(e)) return CUDA_ERROR_INVALID_HANDLE;
  delete e;
  return CUDA_SUCCESS;
}
API CUresult cuEventRecord(void* event, void* stream) {
  READY;
  Event* e = (Event*)event;
  if (!device().events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
  Node n{Node::Record};
  n.event = e;
  return submit(stream, std::move(n));
}
// Every recorded event is complete: the work before it ran when it was submitted.
API CUresult cuEventSynchronize(void* event) {
  READY;
  return device().events.count((Event*)event) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
API CUresult cuEventQuery(void* event) { return cuEventSynchronize(event); }
// Wall-clock time between the two records: on the simulator that is the host time the work between them took.
API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
  READY;
  Event *a = (Event*)start, *b = (Event*)end;
  if (!device().events.count(a) || !device().events.count(b)) return CUDA_ERROR_INVALID_HANDLE;
  if ((a->flags | b->flags) & 2) return CUDA_ERROR_INVALID_HANDLE;  // CU_EVENT_DISABLE_TIMING
  if (!a->recorded || !b->recorded) return CUDA_ERROR_INVALID_HANDLE;
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime(float* ms, void* start, void* end) { return cuEventElapsedTime_v2(ms, start, end); }

// ---- modules and launches --------------------------------------------------------------------------------------
API CUresult cuModuleLoadData(void** module, const void* image) {
  READY;
  if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
  Module* m = new Module;
  if (CUresult rc = load_module(m, (const unsigned char*)image)) {
    delete m;
    return rc;
  }
  device().modules.insert(m);
  *module = m;
  return CUDA_SUCCESS;
}
API CUresult cuModuleUnload(void* module) {
  LOCKED;
  Module* m = (Module*)module;
  if (!device().modules.erase(m)) return CUDA_ERROR_INVALID_HANDLE;
  delete m;
  return CUDA_SUCCESS;
}
API CUresult cuModuleGetFunction(void** fn, void* module, const char* name) {
  READY;
  Module* m = (Module*)module;
  if (!device().modules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
  for (const Kernel* k : m->kernels)
    if (!strcmp(k->name, name)) {
      *fn = (void*)k;
      return CUDA_SUCCESS;
    }
  return CUDA_ERROR_NOT_FOUND;
}
API CUresult cuFuncGetAttribute(int* v, int attribute, void* fn) {
  READY;
  const Kernel* k = (const Kernel*)fn;
  *v = attribute == 0 ? (k->max_threads ? k->max_threads : 1024) : 0;  // 0: max threads per block
  return CUDA_SUCCESS;
}
API CUresult cuFuncSetAttribute(void*, int, int) { return CUDA_SUCCESS; }

API CUresult cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned shared_bytes, void* stream, void** params, void** extra) {
  READY;
  const Kernel* k = (const Kernel*)fn;
  bool known = false;
  for (const Kernel* t : cudasim::kernel_table()) known = known || t == k;
  if (!known) return CUDA_ERROR_INVALID_HANDLE;
  if (extra) {
    say("cuLaunchKernel %s: `extra` parameter passing is not simulated", k->name);
    return CUDA_ERROR_NOT_SUPPORTED;
  }
  const dim3 grid(gx, gy, gz), block(bx, by, bz);
  const std::string problem = launch_problem(k, grid, block, shared_bytes, params);
  if (!problem.empty()) {
    say("error: cuLaunchKernel %s grid (%u,%u,%u) block (%u,%u,%u): %s", k->name, gx, gy, gz, bx, by, bz,
        problem.c_str());
    return problem.find("exceeds") != std::string::npos ? CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
                                                        : CUDA_ERROR_INVALID_VALUE;
  }
  Node n{Node::Launch};
  n.kernel = k;
  n.grid = grid;
  n.block = block;
  for (int i = 0; i < k->nparams; ++i) {
    const unsigned char* a = (const unsigned char*)params[i];
    n.args.emplace_back(a, a + k->param_sizes[i]);
  }
  return submit(stream, std::move(n));
}

// ---- graphs ----------------------------------------------------------------------------------------------------
API CUresult cuStreamBeginCapture_v2(void* stream, int mode) {
  READY;
  Stream* s = stream_of(stream);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  if (s == &device().null_stream) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;  // legacy stream cannot capture
  if (s->capturing) return CUDA_ERROR_ILLEGAL_STATE;
  if (mode != kCaptureGlobal && mode != kCaptureThreadLocal && mode != kCaptureRelaxed) return CUDA_ERROR_INVALID_VALUE;
  s->capturing = true;
  s->invalidated = false;
  s->mode = mode;
  s->captured_by = std::this_thread::get_id();
  s->graph.reset(new Graph);
  return CUDA_SUCCESS;
}
API CUresult cuStreamEndCapture(void* stream, void** graph) {
  READY;
  Stream* s = stream_of(stream);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  if (!s->capturing) return CUDA_ERROR_ILLEGAL_STATE;
  s->capturing = false;
  if (s->invalidated) {
    s->graph.reset();
    *graph = nullptr;
    return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
  }
  Graph* g = s->graph.release();
  device().graphs.insert(g);
  *graph = g;
  return CUDA_SUCCESS;
}
API CUresult cuStreamIsCapturing(void* stream, int* status) {
  READY;
  Stream* s = stream_of(stream);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  *status = !s->capturing ? 0 : s->invalidated ? 2 : 1;
  return CUDA_SUCCESS;
}
API CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
  READY;
  Graph* g = (Graph*)graph;
  if (!device().graphs.count(g)) return CUDA_ERROR_INVALID_HANDLE;
  Graph* e = new Graph(*g);
  device().execs.insert(e);
  *exec = e;
  return CUDA_SUCCESS;
}
API CUresult cuGraphUpload(void* exec, void* stream) {
  READY;
  return device().execs.count((Graph*)exec) && stream_of(stream) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
API CUresult cuGraphLaunch(void* exec, void* stream) {
  READY;
  Graph* e = (Graph*)exec;
  Stream* s = stream_of(stream);
  if (!device().execs.count(e) || !s) return CUDA_ERROR_INVALID_HANDLE;
  if (s->capturing) return CUDA_ERROR_NOT_SUPPORTED;
  for (const Node& n : e->nodes)
    if (CUresult rc = run_node(n)) return rc;
  return CUDA_SUCCESS;
}
API CUresult cuGraphDestroy(void* graph) {
  LOCKED;
  Graph* g = (Graph*)graph;
  if (!device().graphs.erase(g)) return CUDA_ERROR_INVALID_HANDLE;
  delete g;
  return CUDA_SUCCESS;
}
API CUresult cuGraphExecDestroy(void* exec) {
  LOCKED;
  Graph* e = (Graph*)exec;
  if (!device().execs.erase(e)) return CUDA_ERROR_INVALID_HANDLE;
  delete e;
  return CUDA_SUCCESS;
}

// ---- errors ----------------------------------------------------------------------------------------------------
namespace {
const char* error_name(CUresult rc) {
  switch (rc) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
    case CUDA_ERROR_ILLEGAL_STATE: return "CUDA_ERROR_ILLEGAL_STATE";
    default: return "CUDA_ERROR_UNKNOWN";
  }
}
}  // namespace
API CUresult cuGetErrorName(CUresult rc, const char** s) {
  *s = error_name(rc);
  return CUDA_SUCCESS;
}
API CUresult cuGetErrorString(CUresult rc, const char** s) {
  *s = error_name(rc);
  return CUDA_SUCCESS;
}
