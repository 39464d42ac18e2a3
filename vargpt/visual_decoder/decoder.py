"""The VAR transformer used as VARGPT's visual decoder (SPEC sections 2 and 3.5-3.6).

The module is split at the seam VARGPT needs (SPEC 3.6)::

    embed side   condition(labels) -> cond_BC
                 embed_tokens(cond_BC, x_BlZ) -> x_BLC         (teacher forcing, all scales)
                 embed_start(cond_BC) / embed_scale(si, next_BlZ) (inference, one scale at a time)
    ......................  class-conditional VAR: identity  |  VARGPT: gen-proj-in -> LLM -> gen-proj-out
    block side   forward_blocks(h_BLC, cond_BC, attn_bias=..., cache=...) -> logits_BLK

``forward(labels_B, x_BlZ)`` composes both sides for class-conditional teacher forcing.

Parameter and buffer names mirror upstream's state dict (SPEC section 4, prefix ``vargpt_gen.``), so a
VAR / VARGPT checkpoint loads strictly: ``word_embed``, ``class_emb``, ``pos_start``, ``pos_1LC``,
``lvl_embed``, buffers ``lvl_1L`` and ``attn_bias_for_masking``, ``blocks.{i}.*``, ``head_nm.ada_lin.1``,
``head``. Both buffers are persistent (as upstream) and fully determined by ``patch_nums``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from vargpt.config import ConfigError, VisualDecoderConfig, VQVAEConfig
from vargpt.tokenizer.scales import scale_ids, scale_offsets
from vargpt.visual_decoder.blocks import AdaLNBeforeHead, AdaLNSelfAttn
from vargpt.visual_decoder.loss import token_weights
from vargpt.visual_decoder.masks import block_causal_bias

if TYPE_CHECKING:
    from vargpt.generation.cache import DecoderKVCache


def sincos_positions(patch_nums: tuple[int, ...], width: int, *, std: float) -> torch.Tensor:
    """2D sine-cosine position codes of every token of every scale, (L, width), RMS ``std``.

    A token (i, j) of scale pn sits at ((i + 0.5) / pn, (j + 0.5) / pn) in the unit square; each axis gets
    width/4 sine and width/4 cosine channels with angular frequencies from pi to pn_max * pi (wavelengths
    from two image widths down to two finest-scale cells), so nearby positions, at any scale, get
    similar codes.
    """
    if width % 4:
        raise ValueError(f"sincos positions need a width divisible by 4, got {width}")
    n = width // 4
    omega_n = math.pi * torch.logspace(0, math.log10(max(patch_nums[-1], 2)), n, dtype=torch.float64)
    rows = []
    for pn in patch_nums:
        c = (torch.arange(pn, dtype=torch.float64) + 0.5) / pn
        y, x = torch.meshgrid(c, c, indexing="ij")
        ay, ax = y.reshape(-1, 1) * omega_n, x.reshape(-1, 1) * omega_n
        rows.append(torch.cat((ay.sin(), ay.cos(), ax.sin(), ax.cos()), dim=1))
    codes_LC = torch.cat(rows)
    return (codes_LC * (std / codes_LC.pow(2).mean().sqrt())).float()


def rope_2d_angles(patch_nums: tuple[int, ...], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, head_dim) of a 2D rotary position code over every token of every scale.

    A token (i, j) of scale pn sits at ((i + 0.5) / pn, (j + 0.5) / pn) * pn_max, in finest-scale cells,
    so tokens of all scales share one coordinate frame. Channel pairs (i, i + c/2) of a head (c channels,
    n = c/4): pairs 0..n-1 turn with the row coordinate, pairs n..2n-1 with the column; pair k of each
    group at angular frequency (pi / 2) * 16 ** (-k / (n - 1)), wavelengths from 4 cells to 64, so
    attention can depend on the offset between two tokens, at every position alike.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
    n = head_dim // 4
    omega_n = (math.pi / 2) * torch.pow(torch.tensor(16.0, dtype=torch.float64),
                                        -torch.arange(n, dtype=torch.float64) / max(n - 1, 1))
    rows = []
    for pn in patch_nums:
        c = (torch.arange(pn, dtype=torch.float64) + 0.5) * (patch_nums[-1] / pn)
        y, x = torch.meshgrid(c, c, indexing="ij")
        rows.append(torch.cat((y.reshape(-1, 1) * omega_n, x.reshape(-1, 1) * omega_n), dim=1))
    angles_Lp = torch.cat(rows)
    angles_Lc = torch.cat((angles_Lp, angles_Lp), dim=1)  # pair i = channels i and i + c/2 (rotate half)
    return angles_Lc.cos().float(), angles_Lc.sin().float()


class VisualDecoder(nn.Module):
    """Class-conditional VAR transformer: next-scale logits over the VQ codebook.

    Args:
        cfg: transformer sizes and init (width C, depth, heads, num_classes ...).
        vq: the tokenizer's config (patch_nums -> L and S; z_channels Z; vocab_size K).
    """

    def __init__(self, cfg: VisualDecoderConfig, vq: VQVAEConfig) -> None:
        super().__init__()
        self.cfg, self.vq = cfg, vq
        self.patch_nums = tuple(vq.patch_nums)
        self.offsets = scale_offsets(self.patch_nums)
        C, L = cfg.width, vq.tokens_total
        first_l = self.patch_nums[0] ** 2

        # Embeddings (SPEC 2.2); the class table's last row is the unconditional class.
        self.word_embed = nn.Linear(vq.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        if cfg.class_embed == "words":
            # Word table (its last row is padding, kept at zero) and each class's word ids, derived from
            # cfg.class_names (so not saved); a class without a name (or an empty one) keeps its table row.
            words = sorted({w for name in cfg.class_names for w in name.split()})
            ids = [[words.index(w) for w in name.split()] for name in cfg.class_names]
            table = torch.full((cfg.num_classes + 1, max((len(i) for i in ids), default=1)), len(words))
            for row, word_ids in enumerate(ids):
                table[row, : len(word_ids)] = torch.tensor(word_ids)
            self.class_word_emb = nn.Embedding(len(words) + 1, C, padding_idx=len(words))
            self.register_buffer("class_words_NW", table, persistent=False)
            has_words = torch.zeros(cfg.num_classes + 1, dtype=torch.bool)
            has_words[: len(ids)] = torch.tensor([bool(i) for i in ids], dtype=torch.bool)
            self.register_buffer("class_has_words_N", has_words, persistent=False)
        self.pos_start = nn.Parameter(torch.empty(1, first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(vq.num_scales, C)
        self.register_buffer("lvl_1L", scale_ids(self.patch_nums).view(1, L))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(self.patch_nums).view(1, 1, L, L))
        # Per-token weights of the code cross-entropy (cfg.loss_weighting); derived, so not saved.
        self.register_buffer("loss_weights_L", self.code_loss_weights(), persistent=False)
        if cfg.rope_2d:  # derived from patch_nums, so not saved
            cos_Lc, sin_Lc = rope_2d_angles(self.patch_nums, cfg.head_dim)
            self.register_buffer("rope_cos_Lc", cos_Lc, persistent=False)
            self.register_buffer("rope_sin_Lc", sin_Lc, persistent=False)

        # Blocks with a linear stochastic-depth ramp 0 .. drop_path_rate (SPEC 2.1).
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, cfg.num_heads, cfg.mlp_hidden, l2_norm=cfg.attn_l2_norm,
                          norm_eps=cfg.norm_eps, drop_path_rate=rate)
            for rate in rates
        )
        self.head_nm = AdaLNBeforeHead(C, norm_eps=cfg.norm_eps)
        self.head = nn.Linear(C, vq.vocab_size)
        self.init_weights()

    # ---- properties ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of real classes; the label ``num_classes`` is the unconditional class."""
        return self.cfg.num_classes

    @property
    def uncond_label(self) -> int:
        """Index of the unconditional row of ``class_emb``."""
        return self.cfg.num_classes

    def with_composed_classes(self, names: Sequence[str]) -> tuple[VisualDecoder, torch.Tensor]:
        """A copy of this decoder that also knows the classes ``names``, composed of words it already has.

        Only for ``class_embed="words"``: a class is the sum of its words' embeddings, so a combination of
        known words that no training class had (ShapesWorld's held-out colour x shape pairs, "red star") has
        a condition too; this makes such classes sampleable by label. The existing labels keep their meaning;
        the copy has the same weights, device, dtype and train/eval mode.

        Returns:
            ``(decoder, labels_B)``: the copy and the labels of ``names`` in it.

        Raises:
            ConfigError: the decoder has a class table (``class_embed="table"``), a name is empty or uses a
                word no class of this decoder has, or the classes would exceed ``num_classes``.
        """
        if self.cfg.class_embed != "words":
            raise ConfigError("with_composed_classes needs a decoder with class_embed='words' (classes as sums "
                              f"of word embeddings); this one has class_embed={self.cfg.class_embed!r}")
        known = {w for name in self.cfg.class_names for w in name.split()}
        for name in names:
            unknown = [w for w in name.split() if w not in known]
            if not name.split() or unknown:
                raise ConfigError(f"class name {name!r}: " + (f"words {unknown} are in no class of this decoder "
                                  f"(known: {sorted(known)})" if unknown else "is empty"))
        all_names = (*self.cfg.class_names, *names)
        cfg = dataclasses.replace(self.cfg, class_names=all_names)  # the config refuses more than num_classes
        ref = next(self.parameters())
        copy = VisualDecoder(cfg, self.vq)
        copy.load_state_dict(self.state_dict(), strict=True)
        copy = copy.to(device=ref.device, dtype=ref.dtype).train(self.training)
        labels_B = torch.arange(len(self.cfg.class_names), len(all_names), device=ref.device)
        return copy, labels_B

    def code_loss_weights(self, min_scale_share: float | None = None) -> torch.Tensor:
        """Per-token weights ``(L,)`` of the code cross-entropy under the config's weighting, with every
        scale's share floored at ``min_scale_share`` (default: ``cfg.loss_min_scale_share``)."""
        floor = self.cfg.loss_min_scale_share if min_scale_share is None else min_scale_share
        return token_weights(self.patch_nums, self.cfg.loss_weighting, self.cfg.loss_power, floor)

    # ---- init (SPEC 2.9) -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter of this module as VAR's ``init_weights`` (SPEC 2.9).

        Acts on this module only (no process-wide patching). ``trunc_normal_``'s bounds are absolute
        (+-2), i.e. effectively untruncated at these stds, as upstream.
        """
        std, C = self.cfg.resolved_init_std, self.cfg.width
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.fill_(1.0)
                module.bias.zero_()
        # Upstream initialises the position parameters in its constructor with sqrt(1/(3C)) whatever
        # init_std is (init_weights never touches them).
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=math.sqrt(1 / (3 * C)), generator=generator)
        if self.cfg.pos_init == "sincos":
            self.pos_1LC.copy_(sincos_positions(self.patch_nums, C, std=math.sqrt(1 / (3 * C)))[None])
        self.head.weight.mul_(self.cfg.init_head)
        self.head_nm.ada_lin[1].weight.mul_(self.cfg.init_adaln)
        residual_div = math.sqrt(2 * self.cfg.depth)
        for block in self.blocks:
            block.attn.proj.weight.div_(residual_div)
            block.ffn.fc2.weight.div_(residual_div)
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if block.attn.l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
            ada_w = block.ada_lin[1].weight
            ada_w[: 2 * C].mul_(self.cfg.init_adaln_gamma)  # gamma1, gamma2
            ada_w[2 * C:].mul_(self.cfg.init_adaln)  # scale1, scale2, shift1, shift2

    # ---- embedding side --------------------------------------------------------------------------
    def condition(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Class labels (B,) in [0, num_classes] -> condition vectors cond_BC (SOS and AdaLN input).

        ``cfg.class_embed == "words"``: the summed word embeddings of a named class's name; the table row
        for the unconditional class and unnamed classes.
        """
        if self.cfg.class_embed == "table":
            return self.class_emb(labels_B)
        named_B1 = self.class_has_words_N[labels_B][:, None]
        words_BC = self.class_word_emb(self.class_words_NW[labels_B]).sum(1)
        return torch.where(named_B1, words_BC, self.class_emb(labels_B))

    def lvl_pos_1LC(self) -> torch.Tensor:
        """Level + absolute position embedding of every token, (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def embed_start(self, cond_BC: torch.Tensor) -> torch.Tensor:
        """Scale-0 tokens: cond + pos_start + lvl/pos of scale 0 -> x_BlC with l = pn_0^2 (SPEC 2.2)."""
        begin, end = self.offsets[0]
        return cond_BC[:, None, :] + self.pos_start + self.lvl_pos_1LC()[:, begin:end]

    def embed_scale(self, si: int, next_BlZ: torch.Tensor) -> torch.Tensor:
        """Tokens of scale ``si`` >= 1 from their VQ-space input (B, pn_si^2, Z) -> x_BlC."""
        begin, end = self.offsets[si]
        return self.word_embed(next_BlZ) + self.lvl_pos_1LC()[:, begin:end]

    def embed_tokens(self, cond_BC: torch.Tensor, x_BlZ: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing input of all scales.

        Args:
            cond_BC: condition vectors (B, C).
            x_BlZ: VQ-space inputs of scales 1..S-1, (B, L - pn_0^2, Z) (``teacher_forcing_input``).

        Returns:
            x_BLC: [cond + pos_start ; word_embed(x)] + lvl_embed + pos_1LC (SPEC 2.2).
        """
        start_BlC = cond_BC[:, None, :] + self.pos_start
        x_BLC = torch.cat((start_BlC, self.word_embed(x_BlZ)), dim=1)
        return x_BLC + self.lvl_pos_1LC()

    # ---- block side ------------------------------------------------------------------------------
    def forward_blocks(
        self,
        h_BLC: torch.Tensor,
        cond_BC: torch.Tensor,
        *,
        attn_bias: torch.Tensor | None = None,
        cache: DecoderKVCache | None = None,
    ) -> torch.Tensor:
        """Blocks + head_nm + head over per-token inputs.

        Args:
            h_BLC: per-token inputs (B, L, C): this module's own embeddings (class-conditional VAR) or
                external ones (VARGPT: the LLM's states through the generation projector).
            cond_BC: AdaLN condition (B, C).
            attn_bias: additive bias broadcastable to (B, H, L, L_total); pass the block-causal
                ``attn_bias_for_masking`` for several scales at once, None for one scale with a cache.
            cache: per-block KV caches; keys/values of ``h_BLC`` are appended to them.

        Returns:
            logits_BLK over the codebook.
        """
        x_BLC, rope = h_BLC, None
        if self.cfg.rope_2d:  # these tokens follow the cached ones (or start the sequence)
            begin = 0 if cache is None else cache.length
            end = begin + h_BLC.shape[1]
            rope = (self.rope_cos_Lc[begin:end], self.rope_sin_Lc[begin:end])
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, cond_BC, attn_bias=attn_bias, cache=None if cache is None else cache[i], rope=rope)
        return self.head(self.head_nm(x_BLC, cond_BC))

    def causal_bias(self, length: int | None = None) -> torch.Tensor:
        """Block-causal bias (1, 1, length, length) of the first ``length`` tokens (default all L)."""
        bias = self.attn_bias_for_masking
        return bias if length is None else bias[:, :, :length, :length]

    # ---- class-conditional teacher forcing -------------------------------------------------------
    def forward(self, labels_B: torch.Tensor, x_BlZ: torch.Tensor) -> torch.Tensor:
        """Class-conditional teacher forcing over all scales (SPEC 2.8).

        In training mode each label is replaced by the unconditional class with probability
        ``cond_drop_rate`` (for classifier-free guidance); unlike upstream, never in eval mode.

        Args:
            labels_B: class indices (B,) in [0, num_classes].
            x_BlZ: teacher-forcing inputs (B, L - pn_0^2, Z).

        Returns:
            logits_BLK, to be compared with the concatenated ground-truth codes gt_BL.
        """
        if self.training and self.cfg.cond_drop_rate > 0:
            drop_B = torch.rand(labels_B.shape, device=labels_B.device) < self.cfg.cond_drop_rate
            labels_B = torch.where(drop_B, torch.full_like(labels_B, self.uncond_label), labels_B)
        cond_BC = self.condition(labels_B)
        x_BLC = self.embed_tokens(cond_BC, x_BlZ)
        return self.forward_blocks(x_BLC, cond_BC, attn_bias=self.attn_bias_for_masking)

    def extra_repr(self) -> str:
        return (f"depth={self.cfg.depth}, width={self.cfg.width}, heads={self.cfg.num_heads}, "
                f"patch_nums={self.patch_nums}, vocab={self.vq.vocab_size}")
