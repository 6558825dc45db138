// Pinned (page-locked, CUDA-registered) host memory without a CUDA toolkit.
//
// The extension builds on machines with no CUDA headers or libraries, so the
// CUDA runtime is reached at run time with dlopen: the copy of libcudart
// that torch already loaded when there is one (RTLD_NOLOAD), else any
// libcudart the loader finds. Registering an arena with cudaHostRegister makes
// device<->host copies into it truly asynchronous (DMA, no staging).

#pragma once

#include <cstdint>
#include <string>

namespace lohan {
namespace host {

// Whether cudaHostRegister can be called in this process; `why` says why not.
bool cuda_runtime_available(std::string* why = nullptr);
// Registers [p, p + n) as pinned memory. Throws Error(System) on failure.
void cuda_host_register(void* p, uint64_t n);
// Unregisters memory registered above; errors are ignored (the memory is being unmapped).
void cuda_host_unregister(void* p);

}  // namespace host
}  // namespace lohan
