// An op as the manifest describes it: arguments with symbolic shapes, outputs, kernel parameter
// bindings and, per arch, the compiled variants with their guards. Built once at registration
// (from fla_aot/_registry.py), read-only afterwards.
#pragma once

#include <array>
#include <memory>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>

namespace fla_aot {

constexpr int kMaxDevices = 64;

struct Dim {
  int symbol;  // index into OpPlan::symbols
  int offset;  // the dim's size is symbol + offset ("N+1")
};

enum class ArgKind { Tensor, Float, Bool };

struct Arg {
  std::string name;
  ArgKind kind;
  bool optional = false;
  std::vector<c10::ScalarType> dtypes;  // allowed (empty: any)
  int same_dtype_as = -1;               // arg index
  std::vector<Dim> shape;
  int transposed_if = -1;  // Bool arg index: swaps the last two dims
  bool varlen = false;     // when present, B must be 1
};

struct Output {
  std::string name;
  std::vector<Dim> shape;
  int dtype_of = -1;  // arg index, else `dtype`
  c10::ScalarType dtype = c10::ScalarType::Float;
  int when = -1;  // Bool arg index; when false, an empty tensor
  int transposed_if = -1;
  bool zeros = false;  // the kernel accumulates into it
};

enum class ParamKind { Tensor, Output, DtypeCode, Symbol, Float, Bool };

struct Param {
  ParamKind kind;
  int index;
};

enum class GuardKind { Dtype, Bucket, Bool, Aligned };

// One condition of a variant. The guards of different variants exclude each other, so a request
// matches at most one variant.
struct Guard {
  GuardKind kind;
  int index;                 // arg index (Dtype, Bool) or symbol index (Bucket)
  c10::ScalarType dtype{};   // Dtype
  int64_t value = 0;         // Bucket upper bound, Bool value or Aligned divisor
  int64_t above = -1;        // Bucket: exclusive lower bound
  bool expect = true;        // Aligned: whether the request must be aligned
  std::vector<int> symbols;  // Aligned: symbols that must be multiples of value (pointers: 16 bytes)
};

struct Variant {
  std::string key;
  std::string cubin_path;
  std::string kernel_name;
  int num_warps = 4;
  int shared = 0;
  int64_t global_scratch_size = 0, global_scratch_align = 1;
  int64_t profile_scratch_size = 0, profile_scratch_align = 1;
  int num_scratch_params = 0;
  std::vector<Guard> guards;
  std::array<std::vector<std::pair<int, int64_t>>, 3> grid;  // per dim: product of cdiv(symbol, divisor)
  std::array<std::atomic<void*>, kMaxDevices> function{};   // CUfunction per device, loaded lazily
  std::mutex load_mutex;
};

struct ArchVariants {
  int major = 0, minor = 0;
  std::vector<std::unique_ptr<Variant>> variants;
  mutable std::atomic<const Variant*> last_pick{nullptr};  // a decode loop repeats one request
};

struct OpPlan {
  std::string name;         // "fla_aot::<op>"
  std::string kernels_dir;  // folder the manifest's cubin paths are relative to
  std::vector<Arg> args;
  std::vector<Output> outputs;
  std::vector<std::string> symbols;
  std::vector<std::pair<int, int>> symbol_defaults;  // symbol a == symbol b unless a varlen tensor is given
  std::vector<std::pair<int, int>> divisible;        // symbol a must be a multiple of symbol b
  std::vector<Param> params;
  std::vector<int> dtype_codes;  // indexed by c10::ScalarType; 0 = not a kernel dtype
  std::vector<std::unique_ptr<ArchVariants>> archs;
};

}  // namespace fla_aot
