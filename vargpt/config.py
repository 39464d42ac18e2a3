"""Configuration: frozen, keyword-only dataclasses per component, composed into :class:`VARGPTConfig`.

Every component of VARGPT (arXiv 2501.12327) has its own config. Derived values are properties, never
stored fields, so a config cannot contradict itself. Validation happens in ``__post_init__`` and raises
:class:`ConfigError` naming the field and the bad value.

Presets (``PRESETS``): ``tiny`` (trains through every stage on 2 CPU cores in minutes) and
``vargpt-v1-7b`` (the released model's sizes: Vicuna-7B, CLIP ViT-L/14-336, VQ-VAE ch160/V4096/Z32,
VAR-d30, patch_nums 1..16; SPEC sections 1-4).

    >>> cfg = VARGPTConfig.from_name("tiny")
    >>> VARGPTConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _fail(cls: object, name: str, value: object, why: str) -> None:
    raise ConfigError(f"{type(cls).__name__}.{name}={value!r}: {why}")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(obj, name, value, "must be a positive integer")


def _unit_interval(obj: object, *names: str, closed_right: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
        if not ok:
            _fail(obj, name, value, "must be in [0, 1]" if closed_right else "must be in [0, 1)")


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VQVAEConfig:
    """Multi-scale residual VQ-VAE (VAR tokenizer, SPEC section 1)."""

    image_size: int = 256
    """Side of the (square) input image in pixels."""
    ch: int = 160
    """Base channel count of the convolutional encoder/decoder."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per resolution level; len(ch_mult)-1 stride-2 downsamples."""
    num_res_blocks: int = 2
    """ResnetBlocks per encoder level (the decoder uses one more, as VAR)."""
    use_attn: bool = True
    """Self-attention at the lowest-resolution level and in the middle block."""
    dropout: float = 0.0
    """Dropout inside ResnetBlocks."""
    z_channels: int = 32
    """Latent/codebook dimension (VAR's Cvae)."""
    vocab_size: int = 4096
    """Number of codebook entries (K in the shape key)."""
    beta: float = 0.25
    """Commitment weight of the quantizer loss (SPEC 1.10)."""
    quant_resi: float = 0.5
    """Mixing ratio r of the phi convs: phi(h) = (1-r) h + r conv(h)."""
    share_quant_resi: int = 4
    """Number of shared phi convs (0 = one per scale)."""
    norm_groups: int = 32
    """GroupNorm groups of the encoder/decoder (capped at channels // 4 per layer, as VAR); 0 = no norm
    layers (no parameters either, so only for models trained from scratch)."""
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    """Side of the token map at each scale; the last equals the latent side."""

    def __post_init__(self) -> None:
        _positive(self, "image_size", "ch", "num_res_blocks", "z_channels", "vocab_size")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            _fail(self, "ch_mult", self.ch_mult, "must be a non-empty tuple of positive ints")
        if self.image_size % self.downsample != 0:
            _fail(self, "image_size", self.image_size,
                  f"must be divisible by the downsampling factor {self.downsample}")
        pn = self.patch_nums
        if not pn or any(p <= 0 for p in pn) or list(pn) != sorted(set(pn)):
            _fail(self, "patch_nums", pn, "must be strictly increasing positive ints")
        if pn[-1] != self.latent_size:
            _fail(self, "patch_nums", pn,
                  f"the last scale must equal the latent side {self.latent_size} "
                  f"(image_size {self.image_size} / downsample {self.downsample})")
        if not 0.0 <= self.quant_resi <= 1.0:
            _fail(self, "quant_resi", self.quant_resi, "must be in [0, 1]")
        if self.share_quant_resi < 0:
            _fail(self, "share_quant_resi", self.share_quant_resi, "must be >= 0")
        if self.norm_groups < 0:
            _fail(self, "norm_groups", self.norm_groups, "must be >= 0")
        _unit_interval(self, "dropout")
        if self.beta < 0:
            _fail(self, "beta", self.beta, "must be >= 0")

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor from pixels to latent."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent map (equals ``patch_nums[-1]``)."""
        return self.image_size // self.downsample

    @property
    def num_scales(self) -> int:
        """Number of scales S."""
        return len(self.patch_nums)

    @property
    def tokens_total(self) -> int:
        """Image tokens over all scales, L = sum(pn^2)."""
        return sum(p * p for p in self.patch_nums)


@dataclass(frozen=True, kw_only=True)
class VisualDecoderConfig:
    """VAR transformer used as the visual decoder (SPEC section 2)."""

    depth: int = 30
    """Number of AdaLN blocks."""
    width: int = 1920
    """Model width C."""
    num_heads: int = 30
    """Attention heads."""
    mlp_ratio: float = 4.0
    """FFN hidden = round(mlp_ratio * width)."""
    drop_path_rate: float = 0.125
    """Stochastic-depth rate of the last block (linear ramp from 0)."""
    num_classes: int = 1000
    """Class-conditional classes; the class table has one more (unconditional) row."""
    cond_drop_rate: float = 0.1
    """Probability of replacing the class with the unconditional row in training (CFG)."""
    loss_weighting: Literal["token", "scale", "power"] = "token"
    """Code cross-entropy averaged over tokens (VAR), with equal weight per scale, or with scale k's
    total weight proportional to (pn_k^2) ** ``loss_power`` (:mod:`vargpt.visual_decoder.loss`)."""
    loss_power: float = 1.0
    """Exponent of ``loss_weighting="power"`` (0 = per scale, 1 = per token, > 1 favours fine scales)."""
    loss_min_scale_share: float = 0.0
    """Lower bound on every scale's share of the code cross-entropy after the weighting (shares then
    renormalised; 0 = off, at most 0.1). Keeps ``loss_power`` > 1 from starving the first scales, where
    colour and layout are sampled."""
    attn_l2_norm: bool = True
    """Cosine attention with a learnable clamped per-head scale (SPEC 2.5)."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    init_std: float = -1.0
    """Init std; -1 means sqrt(1 / (3 * width)) as VAR."""
    init_head: float = 0.02
    """Head weight multiplier at init."""
    init_adaln: float = 0.5
    """AdaLN scale/shift weight multiplier at init."""
    init_adaln_gamma: float = 1e-5
    """AdaLN gamma weight multiplier at init (VAR's alng)."""
    class_names: tuple[str, ...] = ()
    """Names of the class rows (label i is ``class_names[i]``) when known, e.g. the classes of the
    class-conditional pretraining; used to align prompts with classes (``TrainConfig.cond_align_weight``)."""
    class_embed: Literal["table", "words"] = "table"
    """Class condition: ``"table"``, one learned row per class (VAR); ``"words"``, the sum of learned
    embeddings of the words of the class name (``class_names`` split on whitespace; the unconditional
    class keeps its table row), so "red star" = "red" + "star": a word is learned from every class it
    appears in, and an unseen combination of seen words has a condition. Needs ``class_names`` (a class
    without a name conditions on its table row)."""
    rope_2d: bool = False
    """Also rotate queries and keys by a 2D rotary code of each token's image position (all scales in one
    frame; :func:`vargpt.visual_decoder.decoder.rope_2d_angles`), so attention can depend on the offset
    between tokens wherever they are. Off in VAR (absolute positions only); adds no parameters."""
    pos_init: Literal["trunc_normal", "sincos"] = "trunc_normal"
    """Init of the per-token position embedding ``pos_1LC``: ``"trunc_normal"`` (VAR) or ``"sincos"``: a
    2D sine-cosine code of each token's centre in image coordinates, shared by all scales (a token and
    the tokens under it at finer scales start with similar embeddings), scaled to VAR's std. Only the
    init differs (same parameter, still learned); it gives a short run the spatial locality VAR learns
    over many epochs."""

    def __post_init__(self) -> None:
        _positive(self, "depth", "width", "num_heads", "num_classes")
        if self.width % self.num_heads != 0:
            _fail(self, "width", self.width, f"must be divisible by num_heads={self.num_heads}")
        if self.mlp_ratio <= 0:
            _fail(self, "mlp_ratio", self.mlp_ratio, "must be > 0")
        _unit_interval(self, "drop_path_rate", "cond_drop_rate")
        if self.loss_weighting not in ("token", "scale", "power"):
            _fail(self, "loss_weighting", self.loss_weighting, "must be 'token', 'scale' or 'power'")
        if not 0.0 <= self.loss_power <= 4.0:
            _fail(self, "loss_power", self.loss_power, "must be in [0, 4]")
        if not 0.0 <= self.loss_min_scale_share <= 0.1:
            _fail(self, "loss_min_scale_share", self.loss_min_scale_share, "must be in [0, 0.1]")
        if len(self.class_names) > self.num_classes:
            _fail(self, "class_names", f"<{len(self.class_names)} names>",
                  f"more names than num_classes={self.num_classes}")
        if self.class_embed not in ("table", "words"):
            _fail(self, "class_embed", self.class_embed, "must be 'table' or 'words'")
        if self.pos_init not in ("trunc_normal", "sincos"):
            _fail(self, "pos_init", self.pos_init, "must be 'trunc_normal' or 'sincos'")

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """FFN hidden width."""
        return round(self.mlp_ratio * self.width)

    @property
    def resolved_init_std(self) -> float:
        """The init std actually used."""
        return self.init_std if self.init_std > 0 else math.sqrt(1.0 / (3 * self.width))


@dataclass(frozen=True, kw_only=True)
class VisionTowerConfig:
    """Vision tower of the understanding path: a CLIP ViT (SPEC 3.1, 3.4) or a small HF ResNet.

    ``architecture="resnet"`` (the tiny preset) builds a transformers ``ResNetModel``: a 7x7 stride-2
    stem and a stride-2 max-pool, then ``stage_sizes`` stages (the first at stride 1, each later one
    halving the map), so ``patch_size`` must be the total stride ``4 * 2 ** (len(stage_sizes) - 1)`` and
    ``hidden_size`` the last stage's width; every cell of the last stage's map is one feature vector
    (there is no CLS token: ``drop_cls`` must stay True). ``intermediate_size`` and ``num_heads`` are
    unused there. Why it exists: from scratch on 32 px ShapesWorld a 3-layer ViT learns shape slowly
    (trained as a shape classifier: 0.58 after 60 s) while a 0.3M-parameter ResNet reaches 0.90 in 12 s
    (README, model options).
    """

    architecture: Literal["clip", "resnet"] = "clip"
    """``"clip"``: HF ``CLIPVisionModel`` (the released models); ``"resnet"``: HF ``ResNetModel``."""
    image_size: int = 336
    """Input side in pixels."""
    patch_size: int = 14
    """ViT patch side."""
    hidden_size: int = 1024
    """ViT width F."""
    intermediate_size: int = 4096
    """ViT MLP hidden width."""
    num_layers: int = 24
    """Encoder layers."""
    num_heads: int = 16
    """Attention heads."""
    projection_dim: int = 768
    """CLIP joint embedding width (used only by contrastive pretraining)."""
    feature_layer: int = -2
    """Which hidden state feeds the projector (-2 = penultimate layer, as LLaVA)."""
    drop_cls: bool = True
    """Drop the CLS token ("default" select strategy)."""
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    """Per-channel normalisation mean."""
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    """Per-channel normalisation std."""
    stem_size: int = 32
    """ResNet only: channels of the 7x7 stem convolution."""
    stage_sizes: tuple[int, ...] = ()
    """ResNet only: channels of each stage (the last equals ``hidden_size``)."""
    stage_depths: tuple[int, ...] = ()
    """ResNet only: basic residual blocks per stage (same length as ``stage_sizes``)."""

    def __post_init__(self) -> None:
        if self.architecture not in ("clip", "resnet"):
            _fail(self, "architecture", self.architecture, 'must be "clip" or "resnet"')
        _positive(self, "image_size", "patch_size", "hidden_size", "intermediate_size",
                  "num_layers", "num_heads", "projection_dim")
        if self.image_size % self.patch_size != 0:
            _fail(self, "image_size", self.image_size,
                  f"must be divisible by patch_size={self.patch_size}")
        if self.architecture == "resnet":
            self._check_resnet()
            return
        if self.hidden_size % self.num_heads != 0:
            _fail(self, "hidden_size", self.hidden_size,
                  f"must be divisible by num_heads={self.num_heads}")
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            _fail(self, "feature_layer", self.feature_layer,
                  f"must index one of the {self.num_layers + 1} hidden states")

    def _check_resnet(self) -> None:
        n = len(self.stage_sizes)
        if n == 0 or len(self.stage_depths) != n:
            _fail(self, "stage_sizes", self.stage_sizes,
                  f"a ResNet tower needs >= 1 stage and one depth per stage (stage_depths={self.stage_depths})")
        if min(self.stage_sizes) <= 0 or min(self.stage_depths) <= 0 or self.stem_size <= 0:
            _fail(self, "stage_sizes", self.stage_sizes, "stage sizes, depths and stem_size must be positive")
        if self.stage_sizes[-1] != self.hidden_size:
            _fail(self, "hidden_size", self.hidden_size, f"must equal the last stage size {self.stage_sizes[-1]}")
        stride = 4 * 2 ** (n - 1)
        if self.patch_size != stride:
            _fail(self, "patch_size", self.patch_size,
                  f"must be the ResNet's total stride 4 * 2**({n} - 1) = {stride} for {n} stage(s)")
        if not self.drop_cls:
            _fail(self, "drop_cls", self.drop_cls, "a ResNet tower has no CLS token to keep; leave drop_cls=True")
        if self.feature_layer not in (-1, n):
            _fail(self, "feature_layer", self.feature_layer,
                  f"a ResNet tower's features are its last stage's map: use -1 (or {n})")

    @property
    def num_patches(self) -> int:
        """Patches per image P (the CLS token excluded)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """LLM slots one ``<image>`` expands to."""
        return self.num_patches if self.drop_cls else self.num_patches + 1


@dataclass(frozen=True, kw_only=True)
class ProjectorConfig:
    """Understanding projector: Linear(F->D) - act - Linear(D->D) (LLaVA-1.5)."""

    hidden_act: Literal["gelu", "gelu_tanh", "silu"] = "gelu"
    """Activation between the two linears (exact erf GELU as LLaVA)."""

    def __post_init__(self) -> None:
        if self.hidden_act not in ("gelu", "gelu_tanh", "silu"):
            _fail(self, "hidden_act", self.hidden_act, "must be one of gelu, gelu_tanh, silu")


IMAGE_ATTENTION_MODES: tuple[str, ...] = ("causal", "separate")
"""Values of :attr:`LLMConfig.image_attention`."""


@dataclass(frozen=True, kw_only=True)
class LLMConfig:
    """Causal language model backbone (any HF causal LM; Llama and Qwen2 built from config)."""

    architecture: Literal["llama", "qwen2"] = "llama"
    """HF model family used when building from config."""
    vocab_size: int = 32064
    """Text vocabulary V (including added special tokens)."""
    hidden_size: int = 4096
    """LLM width D."""
    intermediate_size: int = 11008
    """Gated-MLP hidden width."""
    num_layers: int = 32
    """Decoder layers."""
    num_heads: int = 32
    """Attention heads."""
    num_kv_heads: int = 32
    """Key/value heads (GQA when < num_heads)."""
    max_position_embeddings: int = 4096
    """Context length."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share input embedding and LM head."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """HF attention backend (both are exact with our additive float masks)."""
    image_attention: Literal["causal", "separate"] = "causal"
    """Attention between the slots of input images: ``"causal"`` (LLaVA: a slot sees every token before it,
    earlier slots included) or ``"separate"``: a slot sees the text before it and itself, not other slots
    (:func:`vargpt.llm.backbone.separate_image_tokens`); text attends to every slot either way. Not a
    parameter change, so any LLM loads with either; train and infer with the same value."""

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "max_position_embeddings")
        if self.architecture not in ("llama", "qwen2"):
            _fail(self, "architecture", self.architecture, "must be 'llama' or 'qwen2'")
        if self.hidden_size % self.num_heads != 0:
            _fail(self, "hidden_size", self.hidden_size,
                  f"must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads != 0:
            _fail(self, "num_kv_heads", self.num_kv_heads,
                  f"must divide num_heads={self.num_heads}")
        if self.attn_implementation not in ("sdpa", "eager"):
            _fail(self, "attn_implementation", self.attn_implementation, "must be 'sdpa' or 'eager'")
        if self.image_attention not in IMAGE_ATTENTION_MODES:
            _fail(self, "image_attention", self.image_attention, "must be 'causal' or 'separate'")


@dataclass(frozen=True, kw_only=True)
class GenProjectorConfig:
    """Generation projectors: in = Linear(C->C)-GELU-Linear(C->D); out = Linear(D->D)-GELU-Linear(D->C)."""

    hidden_act: Literal["gelu", "gelu_tanh", "silu"] = "gelu"
    """Activation between the two linears (exact erf GELU as VARGPT's GenPatchMerger)."""
    llm_attention: Literal["causal", "block_causal"] = "causal"
    """LLM mask over generation slots: the paper's token-causal, or block-causal by scale."""
    decoder_input: Literal["replace", "residual"] = "replace"
    """What the decoder blocks receive per token: ``"replace"`` (the paper): out-projected LLM states
    only; ``"residual"``: the decoder's own token embedding (class/start, word, level and position
    embeddings, as in class-conditional VAR) plus the out-projected LLM states, with the out-projector's
    last layer zero-initialised, so the assembled model starts as the pretrained decoder and the LLM adds
    the prompt. The residual form keeps what class-conditional pretraining learned; it matters when
    the generation stages are short (the tiny preset)."""
    decoder_condition: Literal["fixed", "prompt"] = "fixed"
    """The decoder's AdaLN condition: ``"fixed"`` (one learned row for every image, as the official
    inference) or ``"prompt"``: that row plus the out-projected LLM state of the first generation slot
    (the state that reads the prompt and predicts the first scale), so every decoder block is modulated by
    the prompt as class-conditional VAR is by its class. No new parameters."""
    input_gate: bool = False
    """With ``decoder_input="residual"``: multiply the out-projected LLM states added to the decoder's
    token inputs by a learned per-channel gate ``image_gen_projector_out.input_gate`` (C values,
    zero-initialised), so training the out-projector for the condition (stage 1's alignment) does not
    disturb the token inputs of the pretrained decoder; the gate opens where the image loss wants the
    LLM's per-token states. Requires ``decoder_input="residual"``."""

    def __post_init__(self) -> None:
        if self.hidden_act not in ("gelu", "gelu_tanh", "silu"):
            _fail(self, "hidden_act", self.hidden_act, "must be one of gelu, gelu_tanh, silu")
        if self.llm_attention not in ("causal", "block_causal"):
            _fail(self, "llm_attention", self.llm_attention, "must be 'causal' or 'block_causal'")
        if self.decoder_input not in ("replace", "residual"):
            _fail(self, "decoder_input", self.decoder_input, "must be 'replace' or 'residual'")
        if self.decoder_condition not in ("fixed", "prompt"):
            _fail(self, "decoder_condition", self.decoder_condition, "must be 'fixed' or 'prompt'")
        if self.input_gate and self.decoder_input != "residual":
            _fail(self, "input_gate", self.input_gate, "gates the residual token path: needs decoder_input='residual'")


@dataclass(frozen=True, kw_only=True)
class ChatConfig:
    """Chat template settings (vicuna style, SPEC 3.3)."""

    system_prompt: str = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    """System text placed before the first turn ("" for none)."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Sampling settings for text and image generation (VAR README defaults for images)."""

    cfg: float = 1.5
    """Classifier-free guidance strength at the last scale."""
    cfg_schedule: Literal["linear", "constant"] = "linear"
    """'linear': t = cfg * k / (S-1) as VAR; 'constant': t = cfg at every scale."""
    cfg_mode: Literal["noise", "uncond_class"] = "noise"
    """Unconditional half of CFG: 'noise' = Gaussian-noise LLM states (paper); 'uncond_class' = the LLM's
    states on a prompt-free context (empty user turn) fed the same image tokens."""
    top_k: int = 900
    """Image-code top-k (0 = off); ties at the threshold are kept."""
    top_p: float = 0.96
    """Image-code nucleus mass (0 or 1 = off); the top code is never dropped."""
    temperature: float = 1.0
    """Image-code temperature."""
    more_smooth: bool = False
    """VAR's Gumbel-softmax smoothing of code embeddings."""
    text_temperature: float = 0.0
    """Text temperature (0 = greedy)."""
    text_top_k: int = 0
    """Text top-k (0 = off)."""
    text_top_p: float = 1.0
    """Text nucleus mass (1 = off)."""
    max_new_tokens: int = 256
    """Maximum text tokens in one reply (image tokens not counted)."""
    max_images: int = 4
    """Maximum images generated in one reply."""
    seed: int | None = None
    """Seed of the explicit generator (None = nondeterministic)."""

    def __post_init__(self) -> None:
        if self.cfg < 0:
            _fail(self, "cfg", self.cfg, "must be >= 0")
        if self.cfg_schedule not in ("linear", "constant"):
            _fail(self, "cfg_schedule", self.cfg_schedule, "must be 'linear' or 'constant'")
        if self.cfg_mode not in ("noise", "uncond_class"):
            _fail(self, "cfg_mode", self.cfg_mode, "must be 'noise' or 'uncond_class'")
        if self.top_k < 0:
            _fail(self, "top_k", self.top_k, "must be >= 0")
        if self.text_top_k < 0:
            _fail(self, "text_top_k", self.text_top_k, "must be >= 0")
        for name in ("top_p", "text_top_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(self, name, getattr(self, name), "must be in [0, 1]")
        if self.temperature <= 0:
            _fail(self, "temperature", self.temperature, "must be > 0")
        if self.text_temperature < 0:
            _fail(self, "text_temperature", self.text_temperature, "must be >= 0 (0 = greedy)")
        _positive(self, "max_new_tokens")
        if self.max_images < 0:
            _fail(self, "max_images", self.max_images, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run (a VARGPT stage or a base-model step): optimiser, schedule, loss weights."""

    name: str = "stage"
    """Human-readable run name."""
    trainable: tuple[str, ...] = ()
    """fnmatch globs over parameter names that train; everything else is frozen."""
    lr: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_ratio: float = 0.1
    """Fraction of steps of linear warm-up."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of the peak."""
    batch_size: int = 16
    """Per-process micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    max_steps: int = 100
    """Optimiser steps."""
    epochs: float = 0.0
    """If > 0, overrides max_steps with epochs over the dataset."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    text_loss_weight: float = 1.0
    """Weight of the text cross-entropy."""
    image_loss_weight: float = 1.0
    """Weight of the image-code cross-entropy."""
    image_min_scale_share: float | None = None
    """Floor on every scale's share of the image-code cross-entropy *in this run* (clamped, then all shares
    renormalised), in place of the visual decoder's own ``loss_min_scale_share`` (None = the decoder's; in
    [0, 0.1]). The tiny preset's stage 3 uses 0.1: the decoder pretrains with most of its loss on the last
    scale, but stage 3 is where the prompt must steer the first scales (colour and layout) too. Not saved
    with the model (its config keeps the decoder's own value)."""
    cond_align_weight: float = 0.0
    """Weight of the condition-alignment loss (:meth:`vargpt.model.VARGPT.forward`): for generated images
    whose record names a class of the visual decoder, the out-projected LLM state of the first generation
    slot is pulled towards that class's embedding minus the unconditional row, i.e. the prompt is mapped
    onto the condition the class-conditionally pretrained decoder already draws from (0 = off, the
    paper's stage 1 trains on the code loss alone)."""
    eval_every: int = 0
    """Held-out loss every N steps (0 = only at start and end)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    seed: int = 0
    """Seed of data order and dropout."""
    replay_fraction: float = 0.0
    """Hard-example replay: this share of every batch is re-drawn from the samples already trained on, in
    proportion to their last loss (``** replay_power``); the rest follow the plain epoch order. 0 = off.
    Needs a loss function that returns per-sample losses (:class:`vargpt.training.loop.ReplaySampler`)."""
    replay_power: float = 1.0
    """Exponent on the last loss in the replay draw (0 = uniform over seen samples)."""
    prefix_pack: int = 0
    """Shared-prefix packing (the base LLaVA steps; 0 = off): up to this many conversations about the same
    images, whose tokens agree up to the first question, become one sequence holding that prefix (system
    prompt, image slots) once and each conversation's rest as a branch that attends only to the prefix and
    itself (:func:`vargpt.training.base_llava.pack_shared_prefixes`). Loss and gradients equal those of the
    conversations fed apart, at fewer tokens; ``batch_size`` then counts packed sequences."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction < 1.0:
            _fail(self, "replay_fraction", self.replay_fraction, "must be in [0, 1)")
        if self.replay_power < 0:
            _fail(self, "replay_power", self.replay_power, "must be >= 0")
        if self.lr <= 0:
            _fail(self, "lr", self.lr, "must be > 0")
        if self.weight_decay < 0:
            _fail(self, "weight_decay", self.weight_decay, "must be >= 0")
        _unit_interval(self, "warmup_ratio", "min_lr_ratio", closed_right=True)
        if self.schedule not in ("cosine", "linear", "constant"):
            _fail(self, "schedule", self.schedule, "must be cosine, linear or constant")
        _positive(self, "batch_size", "grad_accum", "max_steps")
        if self.prefix_pack < 0:
            _fail(self, "prefix_pack", self.prefix_pack, "must be >= 0 (0 = off)")
        for name in ("epochs", "grad_clip", "text_loss_weight", "image_loss_weight", "cond_align_weight"):
            if getattr(self, name) < 0:
                _fail(self, name, getattr(self, name), "must be >= 0")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                _fail(self, name, getattr(self, name), "must be >= 0")
        if self.image_min_scale_share is not None and not 0.0 <= self.image_min_scale_share <= 0.1:
            _fail(self, "image_min_scale_share", self.image_min_scale_share, "must be None or in [0, 0.1]")


# --------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VARGPTConfig:
    """The unified model: LLM + vision tower/projector + VQ-VAE + visual decoder + gen projectors."""

    name: str = "custom"
    """Preset name this config came from."""
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    """Multi-scale VQ-VAE tokenizer."""
    visual_decoder: VisualDecoderConfig = field(default_factory=VisualDecoderConfig)
    """VAR visual decoder."""
    vision_tower: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    """CLIP vision tower."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Understanding projector."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """LLM backbone."""
    gen_projector: GenProjectorConfig = field(default_factory=GenProjectorConfig)
    """Generation projectors."""
    chat: ChatConfig = field(default_factory=ChatConfig)
    """Chat template."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Default sampling settings."""

    def __post_init__(self) -> None:
        need = self.vqvae.tokens_total + self.vision_tower.tokens_per_image + 2
        if self.llm.max_position_embeddings < need:
            _fail(self, "llm.max_position_embeddings", self.llm.max_position_embeddings,
                  f"must hold at least one input image and one generated image ({need} tokens)")

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VARGPTConfig:
        """Return the preset ``name`` with top-level fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name](), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON-serialisable)."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VARGPTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return _from_plain(cls, data, "VARGPTConfig")

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> VARGPTConfig:
        """Read a config from a JSON file path or a JSON string."""
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        try:
            data = json.loads(p.read_text() if p is not None else str(path_or_text))
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path_or_text}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({path_or_text}): {e}") from e
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass (generic, used by every config class)
# --------------------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return _from_plain(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=False))
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_fields(cls: type, keys: Any, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(keys) - names:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")


def _from_plain(cls: type, data: dict[str, Any], where: str) -> Any:
    _check_fields(cls, data, where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def replace_fields(obj: Any, overrides: dict[str, Any], where: str) -> Any:
    """``dataclasses.replace(obj, **overrides)``, raising :class:`ConfigError` (naming ``where`` and the known
    fields) for a key that is no field of ``obj``."""
    _check_fields(type(obj), overrides, where)
    return dataclasses.replace(obj, **overrides)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a plain dict (unknown keys raise)."""
    return _from_plain(TrainConfig, data, "TrainConfig")


def sampling_config_from_dict(data: dict[str, Any]) -> SamplingConfig:
    """Build a :class:`SamplingConfig` from a plain dict (unknown keys raise)."""
    return _from_plain(SamplingConfig, data, "SamplingConfig")


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


def _tiny() -> VARGPTConfig:
    # Sizes chosen from ENVIRONMENT.md measurements: convs dominate CPU time, so the VQ-VAE keeps
    # <= 32-64 channels at 32x32; a ~4M-param transformer trains at ~4k tokens/s on 2 cores.
    return VARGPTConfig(
        name="tiny",
        vqvae=VQVAEConfig(
            image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, use_attn=False,
            z_channels=16, vocab_size=64, share_quant_resi=4, patch_nums=(1, 2, 3, 4, 6, 8),
        ),
        visual_decoder=VisualDecoderConfig(
            # num_classes: the decoder pretrains on ShapesWorld's generation classes "{size} {colour} {shape}
            # {position}" (up to 560 seen; 56 "{colour} {shape}" with --plain-classes); named classes are
            # composed of word embeddings, so the unused table rows cost parameters only.
            depth=4, width=128, num_heads=4, drop_path_rate=0.0, num_classes=1024,
            init_adaln_gamma=1e-3, loss_weighting="power", loss_power=2.0, rope_2d=True,
            class_embed="words",
        ),
        vision_tower=VisionTowerConfig(
            architecture="resnet", image_size=32, patch_size=8, hidden_size=128, stem_size=32,
            stage_sizes=(64, 128), stage_depths=(1, 1), feature_layer=-1,
            projection_dim=128, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        ),
        llm=LLMConfig(
            architecture="llama", vocab_size=1024, hidden_size=192, intermediate_size=512,
            num_layers=4, num_heads=4, num_kv_heads=4, max_position_embeddings=512,
        ),
        gen_projector=GenProjectorConfig(decoder_input="residual", decoder_condition="prompt", input_gate=True),
        chat=ChatConfig(system_prompt=""),
        sampling=SamplingConfig(cfg=2.0, top_k=0, top_p=0.0, max_new_tokens=48),
    )


def _vargpt_v1_7b() -> VARGPTConfig:
    # SPEC sections 1.1, 2.1, 3.1, 3.2: VQ-VAE ch160/V4096/Z32, VAR-d30, CLIP ViT-L/14-336, Vicuna-7B.
    return VARGPTConfig(
        name="vargpt-v1-7b",
        vqvae=VQVAEConfig(),
        visual_decoder=VisualDecoderConfig(
            depth=30, width=1920, num_heads=30, drop_path_rate=0.1 * 30 / 24, num_classes=32003,
            init_adaln_gamma=1e-5,
        ),
        vision_tower=VisionTowerConfig(),
        llm=LLMConfig(),
        sampling=SamplingConfig(cfg=1.5, top_k=900, top_p=0.96),
    )


PRESETS: dict[str, typing.Callable[[], VARGPTConfig]] = {
    "tiny": _tiny,
    "vargpt-v1-7b": _vargpt_v1_7b,
}
"""Named presets; call the value to build the config."""
