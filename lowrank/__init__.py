"""lowrank: LoRA adapters for PyTorch models, with fused Triton kernels underneath.

model = add_lora(model, LoRAConfig(rank=8, alpha=16, targets=("q", "v")))
optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
...
save_adapter(model, "adapter/");  merge_lora(model)  # plain-GEMM inference;  remove_lora(model) undoes add_lora
fold_lora(model)  # the adapters become part of the weights for good (a plain model again)
export_peft(model, "peft_adapter/")  # the same adapter for peft + transformers; import_peft reads one back
add_adapter_bank(base, ["a/", "b/"]);  with selected_adapters(ids): base(x)  # adapter ids[b] for sample b
"""

from lowrank.adapter_io import load_adapter, save_adapter
from lowrank.bank import LoRABank, add_adapter_bank, selected_adapters
from lowrank.config import LoRAConfig
from lowrank.inject import TARGET_PATTERNS, add_lora, fold_lora, remove_lora
from lowrank.layer import LoRALayer
from lowrank.linear import LoRALinear
from lowrank.peft_io import export_peft, import_peft
from lowrank.qkv import LoRAQKVLinear
from lowrank.state import (
    lora_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)

__all__ = [
    "TARGET_PATTERNS",
    "LoRABank",
    "LoRAConfig",
    "LoRALayer",
    "LoRALinear",
    "LoRAQKVLinear",
    "add_adapter_bank",
    "add_lora",
    "export_peft",
    "fold_lora",
    "import_peft",
    "load_adapter",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "selected_adapters",
    "unmerge_lora",
]
