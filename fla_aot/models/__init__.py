"""fla_aot.models: Hugging Face models (config / model / causal LM) of GLA, RetNet, DeltaNet and Gated DeltaNet
on fla_aot's layers, checkpoint-compatible with fla-core 0.6.0's `fla.models` (same config fields,
model_type strings, module and parameter names).

Importing this registers them with AutoConfig / AutoModel / AutoModelForCausalLM under fla's model_type
strings ('gla', 'retnet', 'delta_net', 'gated_deltanet') with exist_ok=True: fla registers the same
names, so with both imported in one process the Auto classes build whichever was imported last. Use the
classes directly (e.g. `fla_aot.models.GLAForCausalLM.from_pretrained(path)`) to be explicit.
"""
from fla_aot.models.delta_net import DeltaNetConfig, DeltaNetForCausalLM, DeltaNetModel
from fla_aot.models.gated_deltanet import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, GatedDeltaNetModel
from fla_aot.models.gla import GLAConfig, GLAForCausalLM, GLAModel
from fla_aot.models.retnet import RetNetConfig, RetNetForCausalLM, RetNetModel
from fla_aot.models.utils import register

for _classes in ((GLAConfig, GLAModel, GLAForCausalLM), (RetNetConfig, RetNetModel, RetNetForCausalLM),
                 (DeltaNetConfig, DeltaNetModel, DeltaNetForCausalLM),
                 (GatedDeltaNetConfig, GatedDeltaNetModel, GatedDeltaNetForCausalLM)):
    register(*_classes)
del _classes

__all__ = [
    "DeltaNetConfig", "DeltaNetForCausalLM", "DeltaNetModel",
    "GLAConfig", "GLAForCausalLM", "GLAModel",
    "GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", "GatedDeltaNetModel",
    "RetNetConfig", "RetNetForCausalLM", "RetNetModel",
]
