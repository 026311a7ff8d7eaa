"""Which layers quantization touches: the one rule shared by PTQ, QAT and merge-into-quantized."""

from __future__ import annotations

import torch

# Output heads stay in full precision: they are small next to the body, and quantizing the vocabulary projection
# (often tied to the input embedding) costs far more quality than it saves.
HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "output"})


def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """Every ``nn.Linear`` of the model body, in module order.

    Output heads (``HEAD_NAMES``) and LoRA's own adapter matrices are left out; under PEFT the wrapped
    ``...base_layer`` linears are included, so QAT with LoRA fake-quantizes the frozen base, not the adapter.
    """
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        # PEFT keeps a head it trains in full (modules_to_save) as `head.original_module` and
        # `head.modules_to_save.<adapter>`: judge such copies by the wrapped module's own name.
        if "modules_to_save" in parts:
            parts = parts[: parts.index("modules_to_save")]
        elif parts[-1] == "original_module":
            parts = parts[:-1]
        if parts[-1] in HEAD_NAMES or any(p.startswith("lora_") for p in parts):
            continue
        chosen.append((name, module))
    return chosen
