#include "cuda_driver.h"
#include "message.h"

#include <dlfcn.h>

#include <c10/util/Exception.h>

namespace fla_aot {

namespace {

template <typename Fn>
void resolve(void* lib, const char* name, Fn& fn) {
  fn = reinterpret_cast<Fn>(dlsym(lib, name));
  TORCH_CHECK(fn != nullptr, cat("fla_aot: libcuda.so.1 has no symbol ", name));
}

CudaDriver load_driver() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  TORCH_CHECK(lib != nullptr, cat("fla_aot: cannot load the CUDA driver (libcuda.so.1): ", dlerror()));
  CudaDriver d{};
  resolve(lib, "cuGetErrorString", d.cuGetErrorString);
  resolve(lib, "cuModuleLoadData", d.cuModuleLoadData);
  resolve(lib, "cuModuleGetFunction", d.cuModuleGetFunction);
  resolve(lib, "cuFuncSetAttribute", d.cuFuncSetAttribute);
  resolve(lib, "cuLaunchKernel", d.cuLaunchKernel);
  resolve(lib, "cuDeviceGetAttribute", d.cuDeviceGetAttribute);
  resolve(lib, "cuDeviceGet", d.cuDeviceGet);
  resolve(lib, "cuCtxGetCurrent", d.cuCtxGetCurrent);
  resolve(lib, "cuCtxSetCurrent", d.cuCtxSetCurrent);
  resolve(lib, "cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain);
  return d;
}

}  // namespace

const CudaDriver& driver() {
  static const CudaDriver d = load_driver();  // thread-safe one-time init
  return d;
}

void ensure_context(int device) {
  const CudaDriver& cu = driver();
  CUcontext ctx = nullptr;
  check_cu(cu.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  if (ctx != nullptr) return;
  CUdevice dev;
  check_cu(cu.cuDeviceGet(&dev, device), "cuDeviceGet");
  check_cu(cu.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  check_cu(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
}

void check_cu(CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return;
  const char* msg = nullptr;
  driver().cuGetErrorString(result, &msg);
  TORCH_CHECK(false, cat("fla_aot: ", what, " failed: ", msg ? msg : "unknown CUDA driver error", " (", int(result), ")"));
}

}  // namespace fla_aot
