"""Generation projectors between the visual decoder's width C and the LLM's width D (SPEC 3.1).

* in-projector  (``image_gen_projector``):     Linear(C->C) - GELU - Linear(C->D): decoder-space token
  embeddings -> LLM input embeddings at the generation slots;
* out-projector (``image_gen_projector_out``): Linear(D->D) - GELU - Linear(D->C): the LLM's final-normed
  hidden states at the generation slots -> per-token inputs of the decoder blocks.

Parameter names ``mlp.0`` / ``mlp.2`` match VARGPT's ``GenPatchMerger``; its never-used ``ln_q`` is left
out (the converter drops it). Official init: weights N(0, 0.02^2), zero biases (SPEC 3.9).
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(approximate="none"),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}


class GenProjector(nn.Module):
    """``x_..I -> y_..O`` through Linear(I->I) - act - Linear(I->O), over any leading axes."""

    def __init__(self, in_width: int, out_width: int, *, hidden_act: str = "gelu", init_std: float = 0.02) -> None:
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r}: choose one of {sorted(_ACTIVATIONS)}")
        self.mlp = nn.Sequential(nn.Linear(in_width, in_width), _ACTIVATIONS[hidden_act](),
                                 nn.Linear(in_width, out_width))
        with torch.no_grad():
            for layer in (self.mlp[0], self.mlp[2]):
                layer.weight.normal_(0.0, init_std)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project the last axis from ``in_width`` to ``out_width``."""
        return self.mlp(x)
