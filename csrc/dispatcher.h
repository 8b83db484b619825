#pragma once

#include <memory>
#include <string>

#include "op_plan.h"

namespace fla_aot {

// Defines `schema` in the fla_aot namespace and serves its CUDA kernel from `plan`: validates the
// arguments against the plan, picks the variant, allocates outputs and launches the cubin.
void register_op(std::unique_ptr<OpPlan> plan, const std::string& schema);

// Names of the variants compiled for the op on the given arch ("sm_90"), for error messages and tests.
std::vector<std::string> variant_keys(const std::string& op, int major, int minor);

}  // namespace fla_aot
