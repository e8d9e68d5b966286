"""Training memory: how much one micro-batch's activations take, and whether to recompute them instead.

`use_checkpointing` turns `train.gradient_checkpointing` (true | false | auto) into the trainer's switch, from
an estimate of the activations (`activation_bytes`) and the free memory (`available_memory`).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Bytes of saved activations per token, per layer and per unit of hidden size, without gradient checkpointing
# (measured: grounded steps of the embedded default on the shared FAQ, 2.57 GB peak RSS without it vs 1.70 GB
# with it, packed micro-batches of ~640 tokens, 30 layers x 576, bf16 compute; fp32 keeps about twice as much).
ACTIVATION_BYTES = {torch.bfloat16: 80, torch.float16: 80, torch.float32: 160}


def activation_bytes(model_config, tokens: int, dtype: torch.dtype) -> int:
    """Rough peak of the activations kept for the backward pass of one micro-batch of `tokens` tokens."""
    layers = getattr(model_config, "num_hidden_layers", 1)
    hidden = getattr(model_config, "hidden_size", 1)
    return ACTIVATION_BYTES.get(dtype, 128) * tokens * layers * hidden


def available_memory() -> int | None:
    """Bytes of memory this process can still take (Linux: MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# On CPU `auto` checkpoints a micro-batch whose activations would pass this: then they, not the 4-bit base,
# the adapters and their optimizer states (~0.5 GB for the embedded default at r 64), are most of the memory.
ACTIVATION_BUDGET = 512 * 2**20


def use_checkpointing(setting: str, activations: int | None = None, free: int | None = None) -> bool:
    """`auto`: on where accelerator memory is the limit (GPU); on CPU on when the longest micro-batch's
    activations (`activations`, bytes) would pass ACTIVATION_BUDGET or a quarter of the `free` memory (bytes,
    as `available_memory` measures it), else off. Measured on the grounded default, 8 steps side by side
    (benchmarks/README.md): with `lora.dropout` 0, peak RSS 2.60 -> 1.79 GB for 1.24x the step time (1.30x
    with dropout 0.1, whose masks are drawn again in the recomputation)."""
    if setting != "auto":
        return setting == "true"
    if torch.cuda.is_available():
        return True
    if activations is None:
        return False
    return activations > ACTIVATION_BUDGET or (free is not None and activations > free / 4)
