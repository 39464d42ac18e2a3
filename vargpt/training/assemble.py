"""Build the initial VARGPT from its base models, as the paper does (section 3.2, SPEC 3.9).

VARGPT starts from a LLaVA-1.5 (LLM + vision tower + understanding projector), a multi-scale VQ-VAE
and a class-conditionally pretrained VAR used as the visual decoder; the two generation projectors
are new. :func:`assemble_vargpt` joins the tiny preset's own base models (or any in the same formats)
into one model directory, the input of stage 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vargpt.config import LLMConfig, VARGPTConfig
from vargpt.model import VARGPT
from vargpt.pretrained import save_pretrained
from vargpt.special_tokens import SpecialTokenIds
from vargpt.tokenizer.vqvae import MultiScaleVQVAE
from vargpt.training.base_llava import load_llava
from vargpt.training.decoder_trainer import load_decoder


def llm_config_from_hf(hf_config: Any, base: LLMConfig) -> LLMConfig:
    """The :class:`LLMConfig` describing an HF Llama/Qwen2 config (fields not in HF keep ``base``'s)."""
    arch = {"llama": "llama", "qwen2": "qwen2"}.get(hf_config.model_type)
    if arch is None:
        raise ValueError(f"LLM type {hf_config.model_type!r} is not supported; use a Llama or Qwen2 model")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return dataclasses.replace(
        base, architecture=arch, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
        max_position_embeddings=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", base.rope_theta)), rms_norm_eps=hf_config.rms_norm_eps,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings))


def assemble_vargpt(
    *, llava_dir: str | Path, vqvae_dir: str | Path, decoder_dir: str | Path, out_dir: str | Path,
    preset: str = "tiny", seed: int = 0,
) -> dict[str, Any]:
    """Join LLaVA + VQ-VAE + visual decoder (+ new generation projectors) and save a model directory.

    Returns:
        Parameter counts per component.
    """
    llava, tokenizer, _, vt_cfg = load_llava(llava_dir)
    vqvae = MultiScaleVQVAE.from_pretrained(vqvae_dir)
    decoder, _classes = load_decoder(decoder_dir)
    base = VARGPTConfig.from_name(preset)
    cfg = dataclasses.replace(base, vqvae=vqvae.cfg, visual_decoder=decoder.cfg, vision_tower=vt_cfg,
                              llm=dataclasses.replace(llm_config_from_hf(llava.llm.model.config, base.llm),
                                                      image_attention=llava.image_attention))
    torch.manual_seed(seed)  # the generation projectors' init
    model = VARGPT(cfg, SpecialTokenIds.from_tokenizer(tokenizer), language_model=llava.llm,
                   vision_tower=llava.vision_tower, multi_modal_projector=llava.projector, vae_local=vqvae,
                   vargpt_gen=decoder)
    save_pretrained(model, tokenizer, out_dir)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
