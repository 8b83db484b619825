// The few CUDA driver entry points fla_aot needs, resolved from libcuda at first use.
// dlopen rather than linking keeps `import fla_aot` working on machines without a driver.
#pragma once

#include <cuda.h>

namespace fla_aot {

struct CudaDriver {
  decltype(&::cuGetErrorString) cuGetErrorString;
  decltype(&::cuModuleLoadData) cuModuleLoadData;
  decltype(&::cuModuleGetFunction) cuModuleGetFunction;
  decltype(&::cuFuncSetAttribute) cuFuncSetAttribute;
  decltype(&::cuLaunchKernel) cuLaunchKernel;
  decltype(&::cuDeviceGetAttribute) cuDeviceGetAttribute;
};

// Loads libcuda.so.1 once; throws a c10::Error naming what is missing.
const CudaDriver& driver();

// Throws a c10::Error with the driver's message when `result` is not CUDA_SUCCESS.
void check_cu(CUresult result, const char* what);

}  // namespace fla_aot
