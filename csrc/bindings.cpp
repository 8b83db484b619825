// Python entry points of fla_aot._C: fla_aot/_registry.py hands each op of the manifest to
// register_op at import; after that every launch stays in C++ (dispatcher.cpp).
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include "dispatcher.h"

namespace fla_aot {
namespace {

c10::ScalarType dtype_from_name(const std::string& name) {
  static const std::unordered_map<std::string, c10::ScalarType> names = {
      {"float32", c10::kFloat}, {"bfloat16", c10::kBFloat16}, {"float16", c10::kHalf},
      {"int64", c10::kLong},    {"int32", c10::kInt},
  };
  auto it = names.find(name);
  TORCH_CHECK(it != names.end(), "fla_aot manifest: unknown dtype " + name);
  return it->second;
}

std::vector<Dim> dims_from(const py::handle& shape) {
  std::vector<Dim> dims;
  for (auto d : shape) {
    auto pair = d.cast<std::vector<int>>();
    dims.push_back({pair[0], pair[1]});
  }
  return dims;
}

std::unique_ptr<Variant> variant_from(const py::dict& v) {
  auto out = std::make_unique<Variant>();
  out->key = v["key"].cast<std::string>();
  out->cubin_path = v["cubin"].cast<std::string>();
  out->kernel_name = v["kernel_name"].cast<std::string>();
  out->num_warps = v["num_warps"].cast<int>();
  out->shared = v["shared"].cast<int>();
  out->global_scratch_size = v["global_scratch_size"].cast<int64_t>();
  out->global_scratch_align = v["global_scratch_align"].cast<int64_t>();
  out->profile_scratch_size = v["profile_scratch_size"].cast<int64_t>();
  out->profile_scratch_align = v["profile_scratch_align"].cast<int64_t>();
  out->num_scratch_params = v["num_scratch_params"].cast<int>();
  for (auto g : v["guards"]) {
    auto gd = g.cast<py::dict>();
    auto kind = gd["kind"].cast<std::string>();
    Guard guard{};
    if (kind == "dtype") {
      guard.kind = GuardKind::Dtype;
      guard.index = gd["arg"].cast<int>();
      guard.dtype = dtype_from_name(gd["dtype"].cast<std::string>());
    } else if (kind == "bucket") {
      guard.kind = GuardKind::Bucket;
      guard.index = gd["symbol"].cast<int>();
      guard.above = gd["above"].cast<int64_t>();
      guard.value = gd["value"].cast<int64_t>();
    } else if (kind == "bool") {
      guard.kind = GuardKind::Bool;
      guard.index = gd["arg"].cast<int>();
      guard.value = gd["value"].cast<bool>() ? 1 : 0;
    } else if (kind == "aligned") {
      guard.kind = GuardKind::Aligned;
      guard.value = gd["value"].cast<int64_t>();
      guard.expect = gd["expect"].cast<bool>();
      guard.symbols = gd["symbols"].cast<std::vector<int>>();
    } else {
      TORCH_CHECK(false, "fla_aot manifest: unknown guard kind " + kind);
    }
    out->guards.push_back(guard);
  }
  auto grid = v["grid"].cast<py::list>();
  for (int d = 0; d < 3; ++d)
    for (auto f : grid[d]) {
      auto pair = f.cast<std::vector<int64_t>>();
      out->grid[d].emplace_back(static_cast<int>(pair[0]), pair[1]);
    }
  return out;
}

// `entry` is one op of manifest.json (see tools/kernel_spec.py: OpSpec.manifest_entry).
int register_from_manifest(const py::dict& entry, const std::string& schema, const std::string& kernels_dir) {
  auto plan = std::make_unique<OpPlan>();
  plan->name = "fla_aot::" + entry["name"].cast<std::string>();
  plan->kernels_dir = kernels_dir;
  plan->symbols = entry["symbols"].cast<std::vector<std::string>>();
  for (auto a : entry["args"]) {
    auto ad = a.cast<py::dict>();
    Arg arg;
    arg.name = ad["name"].cast<std::string>();
    auto kind = ad["kind"].cast<std::string>();
    arg.kind = kind == "tensor" ? ArgKind::Tensor : kind == "float" ? ArgKind::Float : ArgKind::Bool;
    if (arg.kind == ArgKind::Tensor) {
      arg.optional = ad["optional"].cast<bool>();
      for (auto d : ad["dtypes"]) arg.dtypes.push_back(dtype_from_name(d.cast<std::string>()));
      arg.same_dtype_as = ad["same_dtype_as"].cast<int>();
      arg.shape = dims_from(ad["shape"]);
      arg.transposed_if = ad["transposed_if"].cast<int>();
      arg.varlen = ad["varlen"].cast<bool>();
    }
    plan->args.push_back(std::move(arg));
  }
  for (auto o : entry["outputs"]) {
    auto od = o.cast<py::dict>();
    Output out;
    out.name = od["name"].cast<std::string>();
    out.shape = dims_from(od["shape"]);
    out.dtype_of = od["dtype_of"].cast<int>();
    if (out.dtype_of < 0) out.dtype = dtype_from_name(od["dtype"].cast<std::string>());
    out.when = od["when"].cast<int>();
    out.transposed_if = od["transposed_if"].cast<int>();
    out.zeros = od["zeros"].cast<bool>();
    plan->outputs.push_back(std::move(out));
  }
  for (auto p : entry["symbol_defaults"]) {
    auto pair = p.cast<std::vector<int>>();
    plan->symbol_defaults.emplace_back(pair[0], pair[1]);
  }
  for (auto p : entry["divisible"]) {
    auto pair = p.cast<std::vector<int>>();
    plan->divisible.emplace_back(pair[0], pair[1]);
  }
  static const std::unordered_map<std::string, ParamKind> param_kinds = {
      {"tensor", ParamKind::Tensor}, {"output", ParamKind::Output}, {"dtype_code", ParamKind::DtypeCode},
      {"symbol", ParamKind::Symbol}, {"float", ParamKind::Float},   {"bool", ParamKind::Bool},
  };
  for (auto p : entry["params"]) {
    auto pd = p.cast<py::dict>();
    plan->params.push_back({param_kinds.at(pd["kind"].cast<std::string>()), pd["index"].cast<int>()});
  }
  plan->dtype_codes.assign(static_cast<int>(c10::ScalarType::NumOptions), 0);
  for (auto item : entry["dtype_codes"].cast<py::dict>())
    plan->dtype_codes[static_cast<int>(dtype_from_name(item.first.cast<std::string>()))] = item.second.cast<int>();
  for (auto item : entry["variants"].cast<py::dict>()) {
    auto arch_name = item.first.cast<std::string>();  // "sm_90"
    int cc = std::stoi(arch_name.substr(3));
    auto arch = std::make_unique<ArchVariants>();
    arch->major = cc / 10;
    arch->minor = cc % 10;
    for (auto v : item.second) arch->variants.push_back(variant_from(v.cast<py::dict>()));
    plan->archs.push_back(std::move(arch));
  }
  return register_op(std::move(plan), schema);
}

// The eager path, fla_aot._C.launch(index, *args): run_op straight from Python arguments, skipping the
// dispatcher's boxing and pybind's argument handling (microseconds for ops of many arguments; this is
// the per-token call of decoding). Returns None, leaving the call to torch.ops, for anything but plain
// tensors (subclasses such as fake tensors need the dispatcher) and when autograd must see the call
// (an input requires grad).
PyObject* launch(PyObject* /*module*/, PyObject* const* argv, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS  // c10 errors become their Python exceptions (ValueError, TypeError, ...)
  TORCH_CHECK(nargs >= 1 && PyLong_Check(argv[0]), "fla_aot._C.launch(index, *args): index must be an int");
  const OpPlan& plan = plan_at(static_cast<int>(PyLong_AsLong(argv[0])));
  const bool grad_mode = c10::GradMode::is_enabled();
  torch::jit::Stack stack;
  stack.reserve(nargs - 1);
  for (Py_ssize_t i = 1; i < nargs; ++i) {
    PyObject* obj = argv[i];
    if (obj == Py_None) {
      stack.emplace_back();
    } else if (THPVariable_CheckExact(obj)) {
      const at::Tensor& t = THPVariable_Unpack(obj);
      if (grad_mode && t.requires_grad()) Py_RETURN_NONE;
      stack.emplace_back(t);
    } else if (PyBool_Check(obj)) {
      stack.emplace_back(obj == Py_True);
    } else if (PyFloat_Check(obj)) {
      stack.emplace_back(PyFloat_AS_DOUBLE(obj));
    } else {
      Py_RETURN_NONE;
    }
  }
  run_op(plan, &stack);  // a few microseconds: not worth releasing the GIL for
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(stack.size()));
  for (size_t i = 0; i < stack.size(); ++i) PyTuple_SET_ITEM(out, i, THPVariable_Wrap(stack[i].toTensor()));
  return out;
  END_HANDLE_TH_ERRORS
}

PyMethodDef fast_methods[] = {
    {"launch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&launch)), METH_FASTCALL,
     "launch(index, *args): run a registered op eagerly (see fla_aot/_registry.py)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace fla_aot

PYBIND11_MODULE(_C, m) {
  m.doc() = "fla_aot's C++ dispatcher: launches precompiled Triton cubins for the ops of manifest.json";
  m.def("register_op", &fla_aot::register_from_manifest, py::arg("entry"), py::arg("schema"), py::arg("kernels_dir"));
  PyModule_AddFunctions(m.ptr(), fla_aot::fast_methods);
}
