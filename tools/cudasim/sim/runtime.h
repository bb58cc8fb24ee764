// runtime.h - what the simulated driver (driver.cpp) needs of the runtime (runtime.cpp).
#pragma once
#include <string>
#include <vector>

#include "cudasim.h"

namespace cudasim {
// Every kernel compiled into this library, registered at load time.
std::vector<const Kernel*>& kernel_table();
// Runs `k` over `grid` x `block` with cuLaunchKernel-style parameters (params[i] points at argument i); returns
// the reason it stopped (empty when every block ran to the end).
std::string run_launch(const Kernel* k, dim3 grid, dim3 block, void** params);
}  // namespace cudasim
