"""The VARGPT step of the next-scale loop: decoder-space inputs -> LLM -> decoder block inputs (SPEC 3.8).

:func:`vargpt.generation.next_scale.next_scale_steps` calls ``step(si, x_2BlC)`` once per scale. For
VARGPT the conditional half goes through ``image_gen_projector`` into the LLM, whose KV cache already
holds the text prefix (up to and including ``<image_gen_start>``) and every earlier scale; the LLM's
final-normed states go through ``image_gen_projector_out``. The unconditional half is, by default,
standard Gaussian noise in LLM space (the paper's CFG; trained for by :meth:`VARGPT._image_loss`),
drawn from the explicit generator(s), a fresh draw every scale. Alternatively (``uncond`` given) it
is the LLM's states on a second, prompt-free context ("draw something", no description) that receives
the same image tokens: classifier-free guidance against the model's own unconditional prediction.

Inside the LLM the new block is causal token by token (the paper's mask, as in training) or fully
visible (``llm_attention="block_causal"``), matching :meth:`VARGPT.llm_attention_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vargpt.generation.text import LLMContext


class VARGPTScaleStep:
    """Stateful step function for one batch of generations.

    Args:
        model: a :class:`vargpt.model.VARGPT`.
        context: the LLM context after the prefix (an :class:`LLMContext`, extended in place scale by
            scale), or a bare KV cache together with ``padding_mask_BK``.
        padding_mask_BK: (B, past) 1/0 mask of a bare cache's prefix (left padding), or None.
        generator: RNG of the unconditional noise; one for the batch or one per row.
        active_B: bool (B,): rows that generate an image now. Other rows get masked (invisible) LLM
            slots, so a batch whose rows reach ``<image_gen_start>`` at different times can share one
            context; their decoder outputs are garbage and must be ignored by the caller.
        uncond: the prompt-free :class:`LLMContext` (same B) for the unconditional half, instead of noise.
    """

    def __init__(
        self,
        model,  # noqa: ANN001 - VARGPT (avoids an import cycle)
        context,  # noqa: ANN001 - LLMContext or transformers Cache
        padding_mask_BK: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        *,
        active_B: torch.Tensor | None = None,
        uncond: LLMContext | None = None,
    ) -> None:
        self.model, self.generator, self.active_B, self.uncond = model, generator, active_B, uncond
        if isinstance(context, LLMContext):
            self.context = context
        else:
            self.context = LLMContext(model.language_model, context, padding_mask_BK)

    @property
    def padding_mask_BK(self) -> torch.Tensor | None:
        """Key mask of everything cached so far."""
        return self.context.mask_BK

    def __call__(self, si: int, x_2BlC: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-token decoder inputs (2B, l, C) of scale ``si``: [LLM states ; unconditional] projected out.

        In ``decoder_condition="prompt"`` mode, scale 0 also returns the AdaLN condition of both halves.
        """
        m = self.model
        B = x_2BlC.shape[0] // 2
        block = m.cfg.gen_projector.llm_attention == "block_causal"
        hidden_BnD = self.context.extend(m.image_gen_projector(x_2BlC[:B]), self.active_B, block=block).hidden_BTD
        if self.uncond is not None:
            uncond_embeds_BnD = m.image_gen_projector(x_2BlC[B:])
            uncond_BnD = self.uncond.extend(uncond_embeds_BnD, self.active_B, block=block).hidden_BTD
        else:
            uncond_BnD = self._noise(hidden_BnD)
        hidden_2BnD = torch.cat([hidden_BnD, uncond_BnD])
        h_2BlC = m.decoder_inputs(hidden_2BnD, x_2BlC)
        if si == 0 and m.cfg.gen_projector.decoder_condition == "prompt":
            return h_2BlC, m.decoder_condition(m.gen_condition(2 * B, x_2BlC.device), hidden_2BnD[:, 0])
        return h_2BlC

    def _noise(self, like_BnD: torch.Tensor) -> torch.Tensor:
        kw = dict(device=like_BnD.device, dtype=like_BnD.dtype)
        if isinstance(self.generator, Sequence):  # row b draws from its own generator only
            return torch.stack([torch.randn(like_BnD.shape[1:], generator=g, **kw) for g in self.generator])
        return torch.randn(like_BnD.shape, generator=self.generator, **kw)
