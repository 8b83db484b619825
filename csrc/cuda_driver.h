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
  decltype(&::cuDeviceGet) cuDeviceGet;
  decltype(&::cuCtxGetCurrent) cuCtxGetCurrent;
  decltype(&::cuCtxSetCurrent) cuCtxSetCurrent;
  decltype(&::cuDevicePrimaryCtxRetain) cuDevicePrimaryCtxRetain;
};

// Loads libcuda.so.1 once; throws a c10::Error naming what is missing.
const CudaDriver& driver();

// Makes the device's primary context (the one torch uses) current on this thread if none is. A thread that
// has made no CUDA runtime call yet, such as autograd's device thread running a backward, has no context,
// and driver calls (module loads, launches) would fail with CUDA_ERROR_INVALID_CONTEXT.
void ensure_context(int device);

// Throws a c10::Error with the driver's message when `result` is not CUDA_SUCCESS.
void check_cu(CUresult result, const char* what);

}  // namespace fla_aot
