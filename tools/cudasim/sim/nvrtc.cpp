// nvrtc.cpp - a simulated NVRTC (libnvrtc.so.13) for builds without nvcc: "compiling" a kernel file gives the image
// `cudasim-image <file> <hash>`, the hash taken over the source and headers exactly as tools/cudasim/build.rs took
// it, so the simulated driver can refuse an image of sources other than the ones it was built from. It reports
// version 0.0, which keeps its images out of the real NVRTC's entries in the engine's kernel cache.
#include <cstdio>
#include <cstring>
#include <string>

#define API extern "C" __attribute__((visibility("default")))

typedef int nvrtcResult;
enum : nvrtcResult { NVRTC_SUCCESS = 0, NVRTC_ERROR_INVALID_INPUT = 3, NVRTC_ERROR_INVALID_PROGRAM = 4 };

namespace {
struct Program {
  std::string name, image, log;
  unsigned long long hash;
};

unsigned long long fnv(unsigned long long h, const char* s, size_t n) {
  for (size_t i = 0; i < n; ++i) h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
  return h;
}
constexpr unsigned long long kFnvBasis = 0xcbf29ce484222325ull;
}  // namespace

API nvrtcResult nvrtcVersion(int* major, int* minor) {
  *major = 0;
  *minor = 0;
  return NVRTC_SUCCESS;
}

API const char* nvrtcGetErrorString(nvrtcResult rc) {
  switch (rc) {
    case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
    case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
    case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
    default: return "NVRTC_ERROR (simulated NVRTC)";
  }
}

API nvrtcResult nvrtcCreateProgram(Program** prog, const char* src, const char* name, int n_headers,
                                   const char* const* headers, const char* const* header_names) {
  if (!prog || !src || !name || n_headers < 0) return NVRTC_ERROR_INVALID_INPUT;
  Program* p = new Program;
  p->name = name;
  unsigned long long headers_hash = 0;
  for (int i = 0; i < n_headers; ++i) {
    unsigned long long h = fnv(kFnvBasis, header_names[i], strlen(header_names[i]));
    h = fnv(h, "", 1);
    headers_hash ^= fnv(h, headers[i], strlen(headers[i]));
  }
  p->hash = fnv(kFnvBasis, src, strlen(src)) ^ headers_hash;
  *prog = p;
  return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcCompileProgram(Program* p, int n_options, const char* const* options) {
  if (!p) return NVRTC_ERROR_INVALID_PROGRAM;
  bool arch = false;
  for (int i = 0; i < n_options; ++i) arch = arch || !strncmp(options[i], "--gpu-architecture=sm_", 22);
  if (!arch) {
    p->log = "simulated NVRTC: only --gpu-architecture=sm_XX (a cubin) is supported";
    return NVRTC_ERROR_INVALID_INPUT;
  }
  char buf[512];
  snprintf(buf, sizeof buf, "cudasim-image %s %016llx", p->name.c_str(), p->hash);
  p->image = buf;
  return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetCUBINSize(Program* p, size_t* size) {
  if (!p || p->image.empty()) return NVRTC_ERROR_INVALID_PROGRAM;
  *size = p->image.size() + 1;
  return NVRTC_SUCCESS;
}
API nvrtcResult nvrtcGetCUBIN(Program* p, char* out) {
  if (!p || p->image.empty()) return NVRTC_ERROR_INVALID_PROGRAM;
  memcpy(out, p->image.c_str(), p->image.size() + 1);
  return NVRTC_SUCCESS;
}
API nvrtcResult nvrtcGetProgramLogSize(Program* p, size_t* size) {
  if (!p) return NVRTC_ERROR_INVALID_PROGRAM;
  *size = p->log.size() + 1;
  return NVRTC_SUCCESS;
}
API nvrtcResult nvrtcGetProgramLog(Program* p, char* out) {
  if (!p) return NVRTC_ERROR_INVALID_PROGRAM;
  memcpy(out, p->log.c_str(), p->log.size() + 1);
  return NVRTC_SUCCESS;
}
API nvrtcResult nvrtcDestroyProgram(Program** p) {
  if (!p) return NVRTC_ERROR_INVALID_PROGRAM;
  delete *p;
  *p = nullptr;
  return NVRTC_SUCCESS;
}
