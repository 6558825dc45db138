#include "cuda_pin.h"

#include <dlfcn.h>

#include <mutex>

#include "host_common.h"

namespace lohan {
namespace host {
namespace {

// The three entry points we need, declared by hand (cudaError_t is an int enum).
using RegisterFn = int (*)(void*, size_t, unsigned int);
using UnregisterFn = int (*)(void*);
using ErrorStringFn = const char* (*)(int);
constexpr unsigned int kCudaHostRegisterPortable = 1;  // pinned for every CUDA context

struct Cudart {
  void* handle = nullptr;
  RegisterFn reg = nullptr;
  UnregisterFn unreg = nullptr;
  ErrorStringFn err = nullptr;
  std::string why;
};

const Cudart& cudart() {
  static Cudart rt;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* names[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"};
    // Prefer the runtime torch already loaded: one runtime, one set of contexts.
    for (const char* n : names) {
      rt.handle = dlopen(n, RTLD_NOW | RTLD_NOLOAD);
      if (rt.handle) break;
    }
    for (const char* n : names) {
      if (rt.handle) break;
      rt.handle = dlopen(n, RTLD_NOW | RTLD_LOCAL);
    }
    if (!rt.handle) {
      rt.why = "no CUDA runtime library (libcudart.so) could be loaded";
      return;
    }
    rt.reg = reinterpret_cast<RegisterFn>(dlsym(rt.handle, "cudaHostRegister"));
    rt.unreg = reinterpret_cast<UnregisterFn>(dlsym(rt.handle, "cudaHostUnregister"));
    rt.err = reinterpret_cast<ErrorStringFn>(dlsym(rt.handle, "cudaGetErrorString"));
    if (!rt.reg || !rt.unreg) {
      rt.why = "the CUDA runtime library has no cudaHostRegister";
      rt.reg = nullptr;
    }
  });
  return rt;
}

}  // namespace

bool cuda_runtime_available(std::string* why) {
  const Cudart& rt = cudart();
  if (why) *why = rt.why;
  return rt.reg != nullptr;
}

void cuda_host_register(void* p, uint64_t n) {
  const Cudart& rt = cudart();
  if (!rt.reg)
    throw Error(ErrorKind::System,
                "lohan host tier: cannot pin host memory: " + rt.why +
                    ". Create the HostTier with pin=False on a machine without CUDA.");
  int rc = rt.reg(p, static_cast<size_t>(n), kCudaHostRegisterPortable);
  if (rc != 0) {
    std::string msg = rt.err ? rt.err(rc) : ("error " + std::to_string(rc));
    throw Error(ErrorKind::System,
                "lohan host tier: cudaHostRegister of " + format_bytes(n) + " failed: " + msg +
                    ". Lower host_memory_budget (pinned memory is limited by the OS and driver) "
                    "or use smaller arenas.");
  }
}

void cuda_host_unregister(void* p) {
  const Cudart& rt = cudart();
  if (rt.unreg) rt.unreg(p);
}

}  // namespace host
}  // namespace lohan
