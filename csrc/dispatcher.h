#pragma once

#include <memory>
#include <string>

#include <ATen/core/stack.h>

#include "op_plan.h"

namespace fla_aot {

// Defines `schema` in the fla_aot namespace and serves its CUDA kernel from `plan` (see run_op).
// Returns the op's index for plan_at.
int register_op(std::unique_ptr<OpPlan> plan, const std::string& schema);

const OpPlan& plan_at(int index);

// Replaces the op's arguments on `stack` by its outputs: validates the arguments against the plan,
// picks the variant, allocates the outputs and launches the cubin on the current stream.
void run_op(const OpPlan& plan, torch::jit::Stack* stack);

}  // namespace fla_aot
