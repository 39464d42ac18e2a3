"""Understanding projector: vision features -> LLM embeddings (LLaVA-1.5 2-layer MLP, SPEC 3.1).

``linear_1`` (F -> D, bias) -> GELU (exact erf by default) -> ``linear_2`` (D -> D, bias); parameter
names match HF LLaVA's ``multi_modal_projector`` so weights convert by prefix only.
"""

from __future__ import annotations

import torch
from torch import nn

from vargpt.config import ProjectorConfig

__all__ = ["UnderstandingProjector"]

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(approximate="none"),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}


class UnderstandingProjector(nn.Module):
    """``feats_BPF -> embeds_BPD`` with Linear-GELU-Linear."""

    def __init__(self, vision_width: int, llm_width: int, cfg: ProjectorConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ProjectorConfig()
        self.linear_1 = nn.Linear(vision_width, llm_width, bias=True)
        self.act = _ACTIVATIONS[cfg.hidden_act]()
        self.linear_2 = nn.Linear(llm_width, llm_width, bias=True)

    def forward(self, feats_BPF: torch.Tensor) -> torch.Tensor:
        """Project vision features of width F to LLM width D."""
        return self.linear_2(self.act(self.linear_1(feats_BPF)))
