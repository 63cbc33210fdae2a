"""LoRA adapters on a frozen decoder (and optionally the image encoder).

`LoRAConfig` is a stage's setting (`stage3.lora.rank=8`); rank 0 leaves the model as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoRAConfig:
    rank: int = 0  # adapter rank r; 0 = no adapters
    alpha: float = 16.0  # scale of the update: alpha / rank
    dropout: float = 0.0  # on the adapter's input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # names of the linears
    #   inside the LLM that get adapters (LLaMA family: q_proj k_proj v_proj o_proj gate_proj up_proj
    #   down_proj)

    @property
    def enabled(self) -> bool:
        return self.rank > 0
