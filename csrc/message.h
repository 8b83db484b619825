// Error messages as plain std::string. Numbers never go through iostreams in this extension: with
// some torch builds, formatting an integer through std::ostream inside an extension crashed (a
// libstdc++ locale mismatch, seen on torch 2.11 + GCC 13), so every number goes through std::to_string.
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

namespace fla_aot {

inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(const char* s) { return s; }
inline std::string to_text(c10::ScalarType t) { return c10::toString(t); }
inline std::string to_text(const c10::Device& d) { return d.str(); }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string to_text(T v) {
  return std::to_string(v);
}

inline std::string shape_text(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

template <typename... Ts>
std::string cat(const Ts&... parts) {
  std::string s;
  ((s += to_text(parts)), ...);
  return s;
}

}  // namespace fla_aot
