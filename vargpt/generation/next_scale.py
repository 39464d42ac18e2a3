"""The KV-cached next-scale sampling loop (SPEC 2.10 for VAR, 3.8 for VARGPT).

Rows are always ``2B``: the first B are the conditional half, the last B the unconditional half of
classifier-free guidance; both halves share the image sampled so far.

The seam for VARGPT is the *step function* ``step(si, x_BlC) -> h_BlC``. It receives the decoder-space
inputs of the current scale (2B rows: SOS at scale 0, else word_embed(next-scale input) + level/pos
embeddings) and returns the per-token inputs of the decoder blocks (2B rows), or a pair
``(h_BlC, cond_BC)`` that also replaces the AdaLN condition from this scale on (a step conditioning the
decoder on the prompt does so at scale 0, before any block has run):

* class-conditional VAR: :func:`identity_step`;
* VARGPT (SPEC 3.8): gen-projector-in -> LLM (holding its own KV cache across calls) -> final-normed
  hidden states -> gen-projector-out for the conditional half, and N(0, 1) noise in LLM space through
  gen-projector-out for the unconditional half. Such a step is a small stateful callable built per
  generation by the caller; this loop never sees the LLM.

The loop is a Python generator yielding a :class:`ScaleEvent` after every scale, so callers can decode
progressive previews; :func:`generate_images` consumes it and decodes the final images. Nothing here
writes files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from PIL import Image

from vargpt.config import SamplingConfig
from vargpt.generation.cache import DecoderKVCache
from vargpt.generation.sampling import (
    cfg_mix,
    cfg_scale,
    filter_logits,
    gumbel_softmax_embed,
    sample,
    sample_per_row,
)

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One RNG for the whole batch, one per row (row b draws only from its own), or None (global RNG)."""

StepFn = Callable[[int, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
"""``step(si, x_BlC) -> h_BlC | (h_BlC, cond_BC)``: decoder-space inputs of scale ``si`` -> per-token block
inputs (2B rows), optionally with a new AdaLN condition."""


DEFAULT_SAMPLING = SamplingConfig()
"""VAR's README settings (cfg 1.5, top-k 900, top-p 0.96); presets carry their own in ``VARGPTConfig.sampling``."""


def identity_step(si: int, x_BlC: torch.Tensor) -> torch.Tensor:
    """The step of class-conditional VAR: the blocks read the decoder's own embeddings."""
    return x_BlC


@dataclass(frozen=True)
class ScaleEvent:
    """What one scale of the loop produced.

    Attributes:
        si: scale index.
        idx_Bl: codes of this scale (B, pn_si^2), row-major.
        f_hat_BZhw: cumulative VQ feature map after this scale (B, Z, pn_last, pn_last); decode it for a
            preview.
        logits_BlK: guided (CFG-mixed, unfiltered) logits this scale's codes were drawn from.
    """

    si: int
    idx_Bl: torch.Tensor
    f_hat_BZhw: torch.Tensor
    logits_BlK: torch.Tensor


@dataclass(frozen=True)
class GeneratedImages:
    """Result of :func:`generate_images`.

    Attributes:
        idx_list: per-scale codes, S tensors (B, pn^2).
        f_hat_BZhw: final VQ feature map.
        images_B3HW: decoded images in [0, 1].
    """

    idx_list: list[torch.Tensor]
    f_hat_BZhw: torch.Tensor
    images_B3HW: torch.Tensor


def class_condition(decoder: torch.nn.Module, labels_B: torch.Tensor) -> torch.Tensor:
    """AdaLN/SOS conditions for CFG: rows [labels ; unconditional class] -> cond_BC with 2B rows."""
    uncond_B = torch.full_like(labels_B, decoder.uncond_label)
    return decoder.condition(torch.cat((labels_B, uncond_B)))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """An explicit RNG on ``device``: seeded when ``seed`` is given, else from fresh entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@torch.no_grad()
def next_scale_steps(
    decoder: torch.nn.Module,
    quantizer: torch.nn.Module,
    cond_BC: torch.Tensor,
    *,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    step: StepFn = identity_step,
    generator: Generators = None,
    forced_idx: Sequence[torch.Tensor | None] | None = None,
) -> Iterator[ScaleEvent]:
    """Sample an image scale by scale with a KV cache, yielding after every scale.

    Args:
        decoder: a :class:`~vargpt.visual_decoder.decoder.VisualDecoder`.
        quantizer: the tokenizer's ``MultiScaleQuantizer`` (``embed``, ``next_scale_input``, codebook).
        cond_BC: AdaLN/SOS conditions with 2B rows, conditional half first (:func:`class_condition`).
        sampling: cfg, cfg_schedule, top_k, top_p, temperature, more_smooth (``seed`` is ignored here;
            pass ``generator``).
        step: maps the scale's decoder-space inputs to block inputs (see module docstring).
        generator: the explicit RNG of every random draw in the loop, or a sequence of B RNGs (row b's
            codes are drawn from ``generator[b]`` only, so they do not depend on the batch).
        forced_idx: optional per-scale codes (B, pn^2) used instead of sampling, e.g. to score given
            codes or to check the loop against teacher forcing; a None entry samples that scale (e.g.
            given coarse scales, sampled fine ones).

    Yields:
        One :class:`ScaleEvent` per scale, coarse to fine.
    """
    two_b = cond_BC.shape[0]
    if two_b % 2:
        raise ValueError(f"cond_BC must have 2B rows (conditional half, then unconditional), got {two_b}")
    B, patch_nums = two_b // 2, decoder.patch_nums
    S, Z = len(patch_nums), decoder.vq.z_channels
    cache = DecoderKVCache(len(decoder.blocks))
    f_hat_BZhw = cond_BC.new_zeros(B, Z, patch_nums[-1], patch_nums[-1])
    x_BlC = decoder.embed_start(cond_BC)
    for si, pn in enumerate(patch_nums):
        h_BlC = step(si, x_BlC)
        if isinstance(h_BlC, tuple):
            h_BlC, cond_BC = h_BlC
        logits_2BlK = decoder.forward_blocks(h_BlC, cond_BC, cache=cache)
        t = cfg_scale(si, S, sampling.cfg, sampling.cfg_schedule)
        logits_BlK = cfg_mix(logits_2BlK[:B], logits_2BlK[B:], t)
        forced = forced_idx[si] if forced_idx is not None and si < len(forced_idx) else None
        idx_Bl = forced if forced is not None else _draw_codes(logits_BlK, sampling, generator)
        if sampling.more_smooth and forced is None:
            h_BlZ = _smooth_embed(logits_BlK, quantizer.embedding.weight, sampling, si, S, generator)
            h_BZhw = rearrange(h_BlZ, "b (h w) z -> b z h w", h=pn)
        else:
            h_BZhw = quantizer.embed(idx_Bl, pn)
        f_hat_BZhw, next_BlZ = quantizer.next_scale_input(si, f_hat_BZhw, h_BZhw)
        yield ScaleEvent(si, idx_Bl, f_hat_BZhw, logits_BlK)
        if next_BlZ is not None:
            x_BlC = repeat(decoder.embed_scale(si + 1, next_BlZ), "b l c -> (two b) l c", two=2)


def _draw_codes(logits_BlK: torch.Tensor, sampling: SamplingConfig, generator: Generators) -> torch.Tensor:
    kw = dict(top_k=sampling.top_k, top_p=sampling.top_p, temperature=sampling.temperature)
    if isinstance(generator, Sequence):
        return sample_per_row(logits_BlK, generator, **kw)
    return sample(logits_BlK, generator=generator, **kw)


def _smooth_embed(logits_BlK: torch.Tensor, codebook_KZ: torch.Tensor, sampling: SamplingConfig, si: int, S: int,
                  generator: Generators) -> torch.Tensor:
    filtered = filter_logits(logits_BlK, top_k=sampling.top_k, top_p=sampling.top_p, temperature=sampling.temperature)
    if isinstance(generator, Sequence):
        return torch.stack([gumbel_softmax_embed(filtered[b], codebook_KZ, si=si, num_scales=S, generator=g)
                            for b, g in enumerate(generator)])
    return gumbel_softmax_embed(filtered, codebook_KZ, si=si, num_scales=S, generator=generator)


@torch.no_grad()
def generate_images(
    decoder: torch.nn.Module,
    vqvae: torch.nn.Module,
    cond_BC: torch.Tensor,
    *,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    step: StepFn = identity_step,
    generator: torch.Generator | None = None,
) -> GeneratedImages:
    """Run :func:`next_scale_steps` to the end and decode the images.

    Args:
        decoder: the visual decoder.
        vqvae: the ``MultiScaleVQVAE`` (its ``quantize`` drives the loop, ``decode`` makes pixels).
        cond_BC: conditions with 2B rows (conditional half first).
        sampling, step, generator: as :func:`next_scale_steps`; when ``generator`` is None one is made
            from ``sampling.seed``.

    Returns:
        :class:`GeneratedImages` with images_B3HW in [0, 1].
    """
    if generator is None:
        generator = make_generator(sampling.seed, cond_BC.device)
    idx_list, f_hat_BZhw = [], None
    for event in next_scale_steps(decoder, vqvae.quantize, cond_BC, sampling=sampling, step=step,
                                  generator=generator):
        idx_list.append(event.idx_Bl)
        f_hat_BZhw = event.f_hat_BZhw
    images_B3HW = (vqvae.decode(f_hat_BZhw).clamp(-1, 1) + 1) / 2
    return GeneratedImages(idx_list, f_hat_BZhw, images_B3HW)


def generate_class_images(
    decoder: torch.nn.Module,
    vqvae: torch.nn.Module,
    labels_B: torch.Tensor,
    *,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    generator: torch.Generator | None = None,
) -> GeneratedImages:
    """Class-conditional VAR sampling (SPEC 2.10): B images for class indices ``labels_B``."""
    with torch.no_grad():
        cond_BC = class_condition(decoder, labels_B)
    return generate_images(decoder, vqvae, cond_BC, sampling=sampling, generator=generator)


def to_pil(images_B3HW: torch.Tensor) -> list[Image.Image]:
    """Images in [0, 1] (B, 3, H, W) -> list of PIL RGB images (rounded to uint8)."""
    arr_BHW3 = (images_B3HW.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr_BHW3 = rearrange(arr_BHW3, "b c h w -> b h w c").cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr_BHW3]
