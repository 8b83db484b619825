#include "dispatcher.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <unordered_map>

#include <ATen/ATen.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_driver.h"
#include "message.h"

namespace fla_aot {

namespace {

// Registered plans, never freed; looked up by qualified name (dispatcher path) or index (eager path).
std::vector<std::unique_ptr<OpPlan>>& plans() {
  static std::vector<std::unique_ptr<OpPlan>> p;
  return p;
}

const OpPlan& plan_named(const std::string& name) {
  for (const auto& p : plans())
    if (p->name == name) return *p;
  TORCH_CHECK(false, "fla_aot: no op named " + name);
}

// The shape an argument or output must have, after its optional transpose of the last two dims.
std::vector<Dim> effective_shape(const std::vector<Dim>& shape, int transposed_if, c10::ArrayRef<c10::IValue> args) {
  std::vector<Dim> dims = shape;
  if (transposed_if >= 0 && args[transposed_if].toBool() && dims.size() >= 2) std::swap(dims[dims.size() - 1], dims[dims.size() - 2]);
  return dims;
}

std::string expected_str(const OpPlan& plan, const std::vector<Dim>& dims, const std::vector<int64_t>& sym) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    s += (i ? ", " : "") + plan.symbols[dims[i].symbol];
    if (dims[i].offset) s += "+" + std::to_string(dims[i].offset);
    if (sym[dims[i].symbol] >= 0) s += "=" + std::to_string(sym[dims[i].symbol] + dims[i].offset);
  }
  return s + "]";
}

// Binds shape symbols from the present tensors; every mismatch is a ValueError naming the argument.
std::vector<int64_t> bind_symbols(const OpPlan& plan, c10::ArrayRef<c10::IValue> args, const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> sym(plan.symbols.size(), -1);
  for (size_t s = 0; s < sym.size(); ++s)  // a symbol that is a number is that fixed size
    if (!plan.symbols[s].empty() && std::all_of(plan.symbols[s].begin(), plan.symbols[s].end(), ::isdigit))
      sym[s] = std::stoll(plan.symbols[s]);
  const std::string& op = plan.name;
  for (size_t i = 0; i < plan.args.size(); ++i) {
    const Arg& a = plan.args[i];
    if (a.kind != ArgKind::Tensor || !tensors[i].defined()) continue;
    auto dims = effective_shape(a.shape, a.transposed_if, args);
    auto sizes = tensors[i].sizes();
    TORCH_CHECK_VALUE(sizes.size() == dims.size(), cat(op, ": ", a.name, " must have ", dims.size(), " dims ",
                      expected_str(plan, dims, sym), ", got shape ", shape_text(sizes)));
    for (size_t d = 0; d < dims.size(); ++d) {
      int64_t& v = sym[dims[d].symbol];
      if (v < 0) {
        TORCH_CHECK_VALUE(sizes[d] - dims[d].offset >= 0, cat(op, ": ", a.name, " has shape ", shape_text(sizes),
                          ", expected ", expected_str(plan, dims, sym)));
        v = sizes[d] - dims[d].offset;
      } else {
        TORCH_CHECK_VALUE(sizes[d] == v + dims[d].offset, cat(op, ": ", a.name, " must have shape ",
                          expected_str(plan, dims, sym), ", got ", shape_text(sizes)));
      }
    }
  }
  bool varlen = false;
  std::string varlen_name = "a varlen argument";
  for (size_t i = 0; i < plan.args.size(); ++i) {
    varlen |= plan.args[i].varlen && tensors[i].defined();
    if (plan.args[i].varlen) varlen_name = plan.args[i].name;
  }
  for (auto [s, from] : plan.symbol_defaults) {
    if (varlen) continue;  // the varlen tensor binds s (the number of sequences)
    if (sym[s] < 0) sym[s] = sym[from];
    if (sym[s] == sym[from]) continue;
    std::string who;  // the first tensor that bound s
    for (size_t i = 0; i < plan.args.size() && who.empty(); ++i)
      for (const Dim& d : plan.args[i].shape)
        if (d.symbol == s && tensors[i].defined()) who = plan.args[i].name;
    TORCH_CHECK_VALUE(false, cat(op, ": ", who, " has ", plan.symbols[s], "=", sym[s], ", but without ", varlen_name, " ",
                                 plan.symbols[s], " must equal ", plan.symbols[from], "=", sym[from]));
  }
  for (size_t i = 0; i < plan.args.size(); ++i) {
    if (!plan.args[i].varlen || !tensors[i].defined()) continue;
    int b = std::find(plan.symbols.begin(), plan.symbols.end(), "B") - plan.symbols.begin();
    TORCH_CHECK_VALUE(b == (int)plan.symbols.size() || sym[b] == 1, cat(op, ": with ", plan.args[i].name,
                      " the batch size B must be 1 (sequences are packed along T), got B=", sym[b]));
  }
  for (auto [a, b] : plan.divisible)
    TORCH_CHECK_VALUE(sym[b] > 0 && sym[a] % sym[b] == 0, cat(op, ": ", plan.symbols[a], "=", sym[a],
                      " must be a multiple of ", plan.symbols[b], "=", sym[b]));
  for (size_t s = 0; s < sym.size(); ++s)
    TORCH_CHECK_VALUE(sym[s] <= std::numeric_limits<int32_t>::max(), cat(op, ": ", plan.symbols[s], "=", sym[s],
                      " exceeds the kernels' 32-bit sizes"));
  return sym;
}

std::string describe_request(const OpPlan& plan, const ArchVariants& arch, c10::ArrayRef<c10::IValue> args,
                             const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& sym) {
  std::string s;
  for (const Guard& g : arch.variants.front()->guards) {
    if (g.kind == GuardKind::Aligned) continue;  // alignment only chooses between variants
    if (!s.empty()) s += ", ";
    if (g.kind == GuardKind::Dtype) s += cat(plan.args[g.index].name, " dtype=", tensors[g.index].scalar_type());
    if (g.kind == GuardKind::Bucket) s += cat(plan.symbols[g.index], "=", sym[g.index]);
    if (g.kind == GuardKind::Bool) s += cat(plan.args[g.index].name, "=", args[g.index].toBool() ? "True" : "False");
  }
  return s;
}

struct ComputeCapability {
  int major, minor;
};

ComputeCapability compute_capability(int device) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};  // major * 10 + minor, 0 = not read yet
  TORCH_CHECK(device < kMaxDevices, cat("fla_aot: device index ", device, " exceeds ", kMaxDevices));
  int cc = cache[device].load(std::memory_order_relaxed);
  if (cc == 0) {
    int major = 0, minor = 0;
    check_cu(driver().cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "cuDeviceGetAttribute");
    check_cu(driver().cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "cuDeviceGetAttribute");
    cc = major * 10 + minor;
    cache[device].store(cc, std::memory_order_relaxed);
  }
  return {cc / 10, cc % 10};
}

const ArchVariants& arch_for_device(const OpPlan& plan, int device) {
  const ComputeCapability cc = compute_capability(device);
  // A cubin runs on GPUs of its major version with an equal or newer minor version.
  const ArchVariants* best = nullptr;
  for (const auto& a : plan.archs)
    if (a->major == cc.major && a->minor <= cc.minor && (!best || a->minor > best->minor)) best = a.get();
  if (!best) {
    std::string have;
    for (const auto& a : plan.archs) have += cat(" sm_", a->major, a->minor);
    TORCH_CHECK_NOT_IMPLEMENTED(false, cat(plan.name, ": fla_aot was built without kernels for this GPU (sm_", cc.major,
                                cc.minor, "); compiled:", have, ". Rebuild with `python tools/compile_kernels.py --arch ",
                                cc.major, cc.minor, "` and reinstall."));
  }
  return *best;
}

// The variant compiled with divisibility hints: its symbols are multiples of g.value and every
// tensor starts on a 16-byte boundary (slices may not).
bool aligned(const Guard& g, const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& sym) {
  for (int s : g.symbols)
    if (sym[s] % g.value != 0) return false;
  for (const auto& t : tensors)
    if (t.defined() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  return true;
}

bool matches(const Variant& v, c10::ArrayRef<c10::IValue> args, const std::vector<at::Tensor>& tensors,
             const std::vector<int64_t>& sym) {
  for (const Guard& g : v.guards) {
    bool ok = true;
    if (g.kind == GuardKind::Dtype) ok = tensors[g.index].scalar_type() == g.dtype;
    if (g.kind == GuardKind::Bucket) ok = g.above < sym[g.index] && sym[g.index] <= g.value;
    if (g.kind == GuardKind::Bool) ok = args[g.index].toBool() == (g.value != 0);
    if (g.kind == GuardKind::Aligned) ok = aligned(g, tensors, sym) == g.expect;
    if (!ok) return false;
  }
  return true;
}

const Variant& pick_variant(const OpPlan& plan, const ArchVariants& arch, c10::ArrayRef<c10::IValue> args,
                            const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& sym) {
  // At most one variant matches; a decode loop repeats one request, so try the last pick first.
  const Variant* last = arch.last_pick.load(std::memory_order_relaxed);
  if (last && matches(*last, args, tensors, sym)) return *last;
  for (const auto& v : arch.variants) {
    if (matches(*v, args, tensors, sym)) {
      arch.last_pick.store(v.get(), std::memory_order_relaxed);
      return *v;
    }
  }
  std::string have;
  for (const auto& v : arch.variants) have += "\n  " + v->key;
  TORCH_CHECK_NOT_IMPLEMENTED(false, cat(plan.name, ": no compiled kernel variant for sm_", arch.major, arch.minor, " matches (",
                              describe_request(plan, arch, args, tensors, sym), "). Compiled variants:", have));
}

CUfunction function_for_device(const Variant& cv, const std::string& kernels_dir, int device) {
  auto& v = const_cast<Variant&>(cv);
  TORCH_CHECK(device < kMaxDevices, cat("fla_aot: device index ", device, " exceeds ", kMaxDevices));
  void* fn = v.function[device].load(std::memory_order_acquire);
  if (fn) return static_cast<CUfunction>(fn);
  std::lock_guard<std::mutex> lock(v.load_mutex);
  fn = v.function[device].load(std::memory_order_relaxed);
  if (fn) return static_cast<CUfunction>(fn);
  std::string path = kernels_dir + "/" + v.cubin_path;
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, cat("fla_aot: cannot read kernel ", path, " (is the package installed completely?)"));
  std::string image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const CudaDriver& cu = driver();
  CUmodule module;  // owned by the primary context for the life of the process
  check_cu(cu.cuModuleLoadData(&module, image.data()), ("cuModuleLoadData(" + path + ")").c_str());
  CUfunction f;
  check_cu(cu.cuModuleGetFunction(&f, module, v.kernel_name.c_str()), "cuModuleGetFunction");
  if (v.shared > 48 * 1024) {  // above 48 KB a kernel must opt in to dynamic shared memory
    // sm_80 cubins also serve sm_86/89 GPUs, which have less shared memory than the build allowed for
    int optin = 0;
    check_cu(cu.cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device),
             "cuDeviceGetAttribute");
    TORCH_CHECK_NOT_IMPLEMENTED(v.shared <= optin, cat("fla_aot: kernel variant ", v.key, " (", v.kernel_name, ") needs ",
                                v.shared, " bytes of shared memory; this GPU allows ", optin,
                                ". Build the kernels for its arch: FLA_AOT_ARCHS=<major><minor> pip install (README)"));
    check_cu(cu.cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v.shared), "cuFuncSetAttribute");
  }
  v.function[device].store(f, std::memory_order_release);
  return f;
}

}  // namespace

void run_op(const OpPlan& plan, torch::jit::Stack* stack) {
  const size_t n_args = plan.args.size();
  TORCH_CHECK_VALUE(stack->size() >= n_args, cat(plan.name, ": expected ", n_args, " arguments, got ", stack->size()));
  auto args = torch::jit::last(*stack, n_args);

  // Gather tensors; everything must live on the device of the first tensor.
  std::vector<at::Tensor> tensors(n_args);
  c10::Device device = c10::kCPU;
  for (size_t i = 0; i < n_args; ++i) {
    const Arg& a = plan.args[i];
    if (a.kind != ArgKind::Tensor) continue;
    if (args[i].isNone()) {
      TORCH_CHECK_VALUE(a.optional, cat(plan.name, ": ", a.name, " is required"));
      continue;
    }
    const at::Tensor& t = args[i].toTensor();
    if (device.is_cpu()) device = t.device();
    TORCH_CHECK_VALUE(t.device() == device, cat(plan.name, ": ", a.name, " is on ", t.device(), ", expected ", device,
                      " like ", plan.args[0].name));
    if (a.same_dtype_as >= 0) {
      TORCH_CHECK_TYPE(t.scalar_type() == tensors[a.same_dtype_as].scalar_type(), cat(plan.name, ": ", a.name, " has dtype ",
                       t.scalar_type(), ", expected ", tensors[a.same_dtype_as].scalar_type(), " like ",
                       plan.args[a.same_dtype_as].name));
    } else if (!a.dtypes.empty()) {
      bool ok = std::find(a.dtypes.begin(), a.dtypes.end(), t.scalar_type()) != a.dtypes.end();
      if (!ok) {
        std::string allowed;
        for (auto d : a.dtypes) allowed += cat(" ", d);
        TORCH_CHECK_TYPE(false, cat(plan.name, ": ", a.name, " has dtype ", t.scalar_type(), ", expected one of:", allowed));
      }
    }
    tensors[i] = t.is_contiguous() ? t : t.contiguous();  // contiguous() alone costs a dispatch
  }
  TORCH_CHECK_VALUE(device.is_cuda(), cat(plan.name, ": expected CUDA tensors"));
  std::vector<int64_t> sym = bind_symbols(plan, args, tensors);

  c10::cuda::CUDAGuard guard(device);
  ensure_context(device.index());
  const ArchVariants& arch = arch_for_device(plan, device.index());
  const Variant& v = pick_variant(plan, arch, args, tensors, sym);

  std::vector<at::Tensor> outputs;
  outputs.reserve(plan.outputs.size());
  for (const Output& o : plan.outputs) {
    auto dtype = o.dtype_of >= 0 ? tensors[o.dtype_of].scalar_type() : o.dtype;
    std::vector<int64_t> sizes;
    if (o.when >= 0 && !args[o.when].toBool())
      sizes = {0};
    else
      for (const Dim& d : effective_shape(o.shape, o.transposed_if, args)) sizes.push_back(sym[d.symbol] + d.offset);
    // empty_cuda skips the dispatcher that at::empty goes through: it matters at decode sizes.
    outputs.emplace_back(at::detail::empty_cuda(sizes, dtype, device, std::nullopt));
    if (o.zeros) outputs.back().zero_();
  }

  int64_t grid[3];
  for (int d = 0; d < 3; ++d) {
    grid[d] = 1;
    for (auto [s, div] : v.grid[d]) grid[d] *= (sym[s] + div - 1) / div;
  }
  TORCH_CHECK_VALUE(grid[0] <= std::numeric_limits<int32_t>::max() && grid[1] <= 65535 && grid[2] <= 65535, cat(plan.name,
                    ": launch grid (", grid[0], ", ", grid[1], ", ", grid[2], ") exceeds the CUDA limits"));

  if (grid[0] * grid[1] * grid[2] > 0) {
    CUfunction fn = function_for_device(v, plan.kernels_dir, device.index());

    // One 8-byte slot per parameter; the kernel reads pointers, int32 and float32 from them.
    std::vector<uint64_t> slots(plan.params.size() + v.num_scratch_params, 0);
    std::vector<void*> ptrs(slots.size());
    for (size_t i = 0; i < plan.params.size(); ++i) {
      const Param& p = plan.params[i];
      void* slot = &slots[i];
      switch (p.kind) {
        case ParamKind::Tensor:
          *static_cast<void**>(slot) = tensors[p.index].defined() ? tensors[p.index].data_ptr() : nullptr;
          break;
        case ParamKind::Output:
          *static_cast<void**>(slot) = outputs[p.index].numel() ? outputs[p.index].data_ptr() : nullptr;
          break;
        case ParamKind::DtypeCode:
          *static_cast<int32_t*>(slot) =
              tensors[p.index].defined() ? plan.dtype_codes[static_cast<int>(tensors[p.index].scalar_type())] : 0;
          break;
        case ParamKind::Symbol:
          *static_cast<int32_t*>(slot) = static_cast<int32_t>(sym[p.index]);
          break;
        case ParamKind::Float:
          *static_cast<float*>(slot) = static_cast<float>(args[p.index].toDouble());
          break;
        case ParamKind::Bool:
          *static_cast<int32_t*>(slot) = args[p.index].toBool() ? 1 : 0;
          break;
      }
      ptrs[i] = slot;
    }
    // Triton's hidden trailing scratch pointers: global, then profile (3.6). Sized per program.
    std::vector<at::Tensor> scratch;
    const int64_t programs = grid[0] * grid[1] * grid[2];
    const int64_t sizes[2] = {v.global_scratch_size, v.profile_scratch_size};
    const int64_t aligns[2] = {v.global_scratch_align, v.profile_scratch_align};
    for (int i = 0; i < v.num_scratch_params; ++i) {
      size_t k = plan.params.size() + i;
      if (i < 2 && sizes[i] > 0) {
        // the caching allocator hands out 512-byte aligned blocks
        TORCH_CHECK(512 % aligns[i] == 0, cat(plan.name, ": scratch alignment ", aligns[i], " is not supported"));
        scratch.push_back(at::empty({sizes[i] * programs}, at::TensorOptions().dtype(at::kByte).device(device)));
        *reinterpret_cast<void**>(&slots[k]) = scratch.back().data_ptr();
      }
      ptrs[k] = &slots[k];
    }
    auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    check_cu(driver().cuLaunchKernel(fn, grid[0], grid[1], grid[2], 32 * v.num_warps, 1, 1, v.shared, stream.stream(),
                                     ptrs.data(), nullptr),
             "cuLaunchKernel");
  }

  torch::jit::drop(*stack, n_args);
  for (auto& o : outputs) torch::jit::push(*stack, std::move(o));
}

namespace {

void launch_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  // The dispatcher gives no per-op payload, so find the plan by name (a handful of ops).
  run_op(plan_named(op.schema().name()), stack);
}

}  // namespace

int register_op(std::unique_ptr<OpPlan> plan, const std::string& schema) {
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  std::string op_name = plan->name.substr(plan->name.find("::") + 2);
  auto def = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "fla_aot", std::nullopt, __FILE__, __LINE__);
  def->def(schema.c_str());
  auto impl = std::make_unique<torch::Library>(torch::Library::IMPL, "fla_aot", c10::DispatchKey::CUDA, __FILE__, __LINE__);
  std::string name = plan->name;
  plans().push_back(std::move(plan));
  impl->impl(op_name.c_str(), torch::CppFunction::makeFromBoxedFunction<&launch_boxed>());
  libraries.push_back(std::move(def));
  libraries.push_back(std::move(impl));
  return static_cast<int>(plans().size()) - 1;
}

const OpPlan& plan_at(int index) {
  TORCH_CHECK(index >= 0 && index < static_cast<int>(plans().size()), "fla_aot: bad op index");
  return *plans()[index];
}

}  // namespace fla_aot
