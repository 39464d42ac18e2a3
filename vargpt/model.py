"""VARGPT: one model that understands (next-token) and generates (next-scale) images (arXiv 2501.12327).

Composition (attribute names follow the released checkpoint, SPEC section 4):

    vision_tower            CLIP ViT (tiny: ResNet)          pixels -> feats_BPF
    multi_modal_projector   Linear-GELU-Linear               feats_BPF -> embeds_BPD at <image> slots
    language_model          HF causal LM                     embeds_BTD -> final-normed hidden_BTD
    vae_local               multi-scale VQ-VAE (frozen)      image <-> codes per scale
    vargpt_gen              VAR visual decoder               per-token inputs_BLC -> code logits_BLK
    image_gen_projector     Linear-GELU-Linear (C -> D)      decoder-space embeddings -> LLM slots
    image_gen_projector_out Linear-GELU-Linear (D -> C)      LLM states at the slots -> decoder blocks

``forward(batch)`` is one teacher-forced pass over a mixed batch (understanding and generation samples,
both in one sequence, several images per sample) returning the losses (SPEC 3.5, with the fixes of
SPEC 3.10: text loss on assistant tokens only; the same decoder condition in training and inference;
the Gaussian-noise unconditional branch used at inference gets a training counterpart by replacing
the LLM states of an image with noise with probability ``cond_drop_rate``). No sampling loops and no
file IO here: generation lives in :mod:`vargpt.generation`, files in the pipeline and CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import VARGPTConfig
from vargpt.data.collate import IGNORE_INDEX
from vargpt.llm.backbone import LLMBackbone, additive_mask, causal_allowed, separate_image_tokens
from vargpt.llm.merge import merge_image_features
from vargpt.special_tokens import SpecialTokenIds
from vargpt.tokenizer.vqvae import MultiScaleVQVAE
from vargpt.understanding.projector import UnderstandingProjector
from vargpt.understanding.vision_tower import VisionTower
from vargpt.visual_decoder.decoder import VisualDecoder
from vargpt.visual_decoder.loss import code_loss
from vargpt.visual_decoder.projectors import GenProjector


class GenerationSlotError(ValueError):
    """The generation slots of a batch do not match the generation targets given."""


@dataclass
class VARGPTBatch:
    """A collated mixed batch (see :mod:`vargpt.data.collate` for the sequence layout).

    Attributes:
        input_ids: (B, T) ids with P ``<image>`` slots per input image and L ``<image_gen_pad>`` slots
            per generated image.
        labels: (B, T) text targets aligned with ids (IGNORE_INDEX elsewhere; the loss shifts them).
        attention_mask: (B, T) 1 = token, 0 = padding.
        pixel_values: (N_in, 3, H, W) input images for the vision tower, in slot order, or None.
        image_feats: (N_in, P, F) precomputed vision-tower features (the tower is frozen in every
            stage, so data pipelines may cache them), or None.
        gen_codes: per scale, (N_gen, pn^2) ground-truth codes of the generated images, or None.
        gen_labels: (N_gen,) the visual decoder's class of each generated image (-1: none), or None;
            only the condition-alignment loss reads it.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_feats: torch.Tensor | None = None
    gen_codes: list[torch.Tensor] | None = None
    gen_labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> VARGPTBatch:
        """Move every tensor to ``device``."""
        mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return VARGPTBatch(mv(self.input_ids), mv(self.labels), mv(self.attention_mask), mv(self.pixel_values),
                           mv(self.image_feats), None if self.gen_codes is None else [mv(c) for c in self.gen_codes],
                           mv(self.gen_labels))


@dataclass
class VARGPTOutput:
    """Losses and diagnostics of one forward pass."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    image_logits_NLK: torch.Tensor | None
    image_accuracy: torch.Tensor
    text_tokens: int
    image_tokens: int
    align_loss: torch.Tensor | None = None


class VARGPT(nn.Module):
    """The unified model; build with :meth:`from_config` or from trained parts with the constructor."""

    def __init__(
        self,
        cfg: VARGPTConfig,
        token_ids: SpecialTokenIds,
        *,
        language_model: LLMBackbone,
        vision_tower: VisionTower,
        multi_modal_projector: UnderstandingProjector,
        vae_local: MultiScaleVQVAE,
        vargpt_gen: VisualDecoder,
        image_gen_projector: GenProjector | None = None,
        image_gen_projector_out: GenProjector | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.token_ids = cfg, token_ids
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.multi_modal_projector = multi_modal_projector
        self.vae_local = vae_local.eval().requires_grad_(False)
        self.vargpt_gen = vargpt_gen
        C, D = cfg.visual_decoder.width, language_model.hidden_size
        act = cfg.gen_projector.hidden_act
        self.image_gen_projector = image_gen_projector or GenProjector(C, D, hidden_act=act)
        if image_gen_projector_out is None:
            image_gen_projector_out = GenProjector(D, C, hidden_act=act)
            if self.residual_decoder_input:  # start as the pretrained decoder; the LLM's share grows
                with torch.no_grad():
                    image_gen_projector_out.mlp[2].weight.zero_()
        if cfg.gen_projector.input_gate and not hasattr(image_gen_projector_out, "input_gate"):
            # Registered on the out-projector (``image_gen_projector_out.input_gate``), so the stages' projector
            # globs train it; only gated models have the key (the config ensures residual mode).
            image_gen_projector_out.input_gate = nn.Parameter(torch.zeros(C))
        self.image_gen_projector_out = image_gen_projector_out

    @property
    def image_gen_input_gate(self) -> nn.Parameter | None:
        """The token-path gate of ``GenProjectorConfig.input_gate`` (None when off)."""
        return getattr(self.image_gen_projector_out, "input_gate", None)

    @property
    def residual_decoder_input(self) -> bool:
        """Whether decoder blocks get their own token embeddings plus the LLM's (``decoder_input="residual"``)."""
        return self.cfg.gen_projector.decoder_input == "residual"

    def decoder_inputs(self, hidden_NlD: torch.Tensor, tokens_NlC: torch.Tensor | None) -> torch.Tensor:
        """Per-token decoder-block inputs from LLM states (and, in residual mode, the decoder's embeddings)."""
        h_NlC = self.image_gen_projector_out(hidden_NlD)
        if self.residual_decoder_input:
            if tokens_NlC is None:
                raise ValueError("decoder_input='residual' needs the decoder-space token embeddings")
            if self.image_gen_input_gate is not None:
                h_NlC = h_NlC * self.image_gen_input_gate.to(h_NlC.dtype)
            h_NlC = h_NlC + tokens_NlC.to(h_NlC.dtype)
        return h_NlC

    def decoder_condition(self, cond_NC: torch.Tensor, first_hidden_ND: torch.Tensor) -> torch.Tensor:
        """AdaLN condition of the decoder: ``cond_NC`` (``decoder_condition="fixed"``), or that plus the
        out-projected LLM state of the first generation slot (``"prompt"``)."""
        if self.cfg.gen_projector.decoder_condition != "prompt":
            return cond_NC
        return cond_NC + self.image_gen_projector_out(first_hidden_ND).to(cond_NC.dtype)

    @classmethod
    def from_config(cls, cfg: VARGPTConfig, token_ids: SpecialTokenIds) -> VARGPT:
        """Randomly initialised model of ``cfg`` (tests, or the start of a from-scratch run)."""
        llm = LLMBackbone.from_config(cfg.llm)
        tower = VisionTower.from_config(cfg.vision_tower)
        return cls(cfg, token_ids, language_model=llm, vision_tower=tower,
                   multi_modal_projector=UnderstandingProjector(tower.hidden_size, llm.hidden_size, cfg.projector),
                   vae_local=MultiScaleVQVAE(cfg.vqvae), vargpt_gen=VisualDecoder(cfg.visual_decoder, cfg.vqvae))

    def train(self, mode: bool = True) -> VARGPT:
        """Like ``nn.Module.train``, but the VQ-VAE always stays in eval mode (it is frozen)."""
        super().train(mode)
        self.vae_local.eval()
        return self

    # ---- pieces ------------------------------------------------------------------------------------
    def gen_condition(self, n: int, device: torch.device) -> torch.Tensor:
        """Decoder condition (SOS and AdaLN input) of ``n`` generated images, cond_NC.

        VARGPT conditions on the prompt through the LLM, so every image uses one learned condition
        row: the decoder's unconditional class row, in training and at inference alike (the official
        code trains on one row and samples with another, SPEC 3.10 item 2).
        """
        labels = torch.full((n,), self.vargpt_gen.uncond_label, dtype=torch.long, device=device)
        return self.vargpt_gen.condition(labels)

    def image_embeds(self, pixel_values: torch.Tensor | None, image_feats: torch.Tensor | None) -> torch.Tensor:
        """Projected features of input images, (N_in, P, D)."""
        if image_feats is None:
            image_feats = self.vision_tower(pixel_values)
        return self.multi_modal_projector(image_feats)

    def gen_tokens(self, gen_codes: list[torch.Tensor], cond_NC: torch.Tensor) -> torch.Tensor:
        """Decoder-space teacher-forcing embeddings of the target images, (N_gen, L, C) (SPEC 3.5 step 2)."""
        with torch.no_grad():
            x_NlZ = self.vae_local.quantize.teacher_forcing_input(gen_codes)
        return self.vargpt_gen.embed_tokens(cond_NC, x_NlZ)

    def gen_slot_embeds(self, gen_codes: list[torch.Tensor], cond_NC: torch.Tensor) -> torch.Tensor:
        """LLM embeddings of the generation slots (teacher forcing), (N_gen, L, D)."""
        return self.image_gen_projector(self.gen_tokens(gen_codes, cond_NC))

    def llm_attention_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The LLM mask: the 2D padding mask (causal, the paper's default), or a 4D float mask when the
        generation slots are block-causal (``gen_projector.llm_attention``) or input-image slots are kept apart
        (``llm.image_attention="separate"``, :func:`~vargpt.llm.backbone.separate_image_tokens`)."""
        is_image_BT = input_ids == self.token_ids.image
        separate = self.cfg.llm.image_attention == "separate" and bool(is_image_BT.any())
        if self.cfg.gen_projector.llm_attention == "causal":
            if not separate:
                return attention_mask
            allowed = causal_allowed(attention_mask)
        else:
            is_gen = input_ids == self.token_ids.image_gen_pad
            scale_T = self._slot_scale_ids(is_gen)
            same_block = is_gen[:, 1:] & is_gen[:, :-1] & (scale_T[:, 1:] == scale_T[:, :-1])
            new_block = torch.cat([torch.ones_like(is_gen[:, :1]), ~same_block], dim=1)
            allowed = causal_allowed(attention_mask, new_block.long().cumsum(1))
        if separate:
            allowed = separate_image_tokens(allowed, is_image_BT)
        return additive_mask(allowed[:, None], self.language_model.dtype)

    def _slot_scale_ids(self, is_gen_BT: torch.Tensor) -> torch.Tensor:
        lvl_L = self.vargpt_gen.lvl_1L[0]
        L = lvl_L.numel()
        rank_BT = (is_gen_BT.long().cumsum(1) - 1).clamp(min=0) % L  # index of each slot within its image
        return torch.where(is_gen_BT, lvl_L[rank_BT], torch.full_like(rank_BT, -1))

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, batch: VARGPTBatch, *, text_weight: float = 1.0, image_weight: float = 1.0,
                align_weight: float = 0.0) -> VARGPTOutput:
        """Teacher-forced losses of a mixed batch (SPEC 3.5).

        Args:
            batch: ids/labels/mask plus input images (pixels or cached features) and target codes.
            text_weight, image_weight: loss weights; a zero weight skips that head's computation.
            align_weight: weight of :meth:`condition_alignment_loss` over the generated images with a
                class label (``batch.gen_labels``); 0 skips it.

        Returns:
            :class:`VARGPTOutput`; ``loss = text_weight * text CE + image_weight * image CE
            + align_weight * alignment``.
        """
        ids = batch.input_ids
        embeds_BTD = self.language_model.embed(ids)
        if batch.pixel_values is not None or batch.image_feats is not None:
            feats = self.image_embeds(batch.pixel_values, batch.image_feats)
            embeds_BTD = merge_image_features(embeds_BTD, ids, self.token_ids.image, feats)
        gen_slots_BT = ids == self.token_ids.image_gen_pad
        L = self.cfg.vqvae.tokens_total
        n_gen = int(gen_slots_BT.sum()) // L
        if int(gen_slots_BT.sum()) != n_gen * L or n_gen != (0 if batch.gen_codes is None else
                                                               batch.gen_codes[0].shape[0]):
            raise GenerationSlotError(
                f"{int(gen_slots_BT.sum())} generation slots for "
                f"{0 if batch.gen_codes is None else batch.gen_codes[0].shape[0]} target image(s) of L={L} tokens")
        cond_NC = tokens_NLC = None
        if n_gen:
            cond_NC = self.gen_condition(n_gen, ids.device)
            tokens_NLC = self.gen_tokens(batch.gen_codes, cond_NC)
            gen_NLD = self.image_gen_projector(tokens_NLC).to(embeds_BTD.dtype)
            embeds_BTD = embeds_BTD.masked_scatter(gen_slots_BT[..., None], gen_NLD)
        hidden_BTD = self.language_model(embeds_BTD, attention_mask=self.llm_attention_mask(ids, batch.attention_mask),
                                         compute_logits=False).hidden_BTD
        zero = hidden_BTD.sum() * 0.0  # keeps every output connected to the graph (DDP-friendly)
        text_loss, n_text = self._text_loss(hidden_BTD, batch.labels) if text_weight > 0 else (zero, 0)
        gen_hidden_NLD = hidden_BTD[gen_slots_BT].view(n_gen, L, -1) if n_gen else None
        image_loss, acc, logits = zero, zero.detach(), None
        if n_gen and image_weight > 0:
            image_loss, acc, logits = self._image_loss(gen_hidden_NLD, cond_NC, batch.gen_codes, tokens_NLC)
        loss = text_weight * text_loss + image_weight * image_loss
        align_loss = zero
        if n_gen and align_weight > 0 and batch.gen_labels is not None:
            align_loss = self.condition_alignment_loss(gen_hidden_NLD[:, 0], batch.gen_labels)
            loss = loss + align_weight * align_loss
        return VARGPTOutput(loss, text_loss.detach(), image_loss.detach(), logits, acc, n_text, n_gen * L,
                            align_loss.detach())

    def condition_alignment_loss(self, first_hidden_ND: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
        """Pull the prompt's condition towards the decoder's class embedding (``cond_align_weight``).

        For every image whose label is a class (>= 0), the out-projected LLM state of the first
        generation slot (the one that reads the prompt and predicts the first scale; with
        ``decoder_input="residual"`` it is added to the start token (through the gate with ``input_gate``)
        and, with ``decoder_condition="prompt"``, to the AdaLN condition) should equal
        ``condition(label) - condition(uncond)`` (``class_emb`` rows with VAR's table): then the decoder
        sees exactly the condition it was pretrained with for that class. Made for that configuration (the
        tiny preset's); with ``decoder_input="replace"`` the target is not what the decoder expects there.
        Squared error relative to the targets' mean squared norm (1.0 = predicting zero); the targets are
        constants (no gradient into the class table).
        """
        keep = labels_N >= 0
        if not bool(keep.any()):
            return first_hidden_ND.sum() * 0.0
        dec = self.vargpt_gen
        uncond = torch.full((1,), dec.uncond_label, dtype=torch.long, device=labels_N.device)
        target_NC = (dec.condition(labels_N[keep]) - dec.condition(uncond)).detach()
        pred_NC = self.image_gen_projector_out(first_hidden_ND[keep]).float()
        err = (pred_NC - target_NC.float()).pow(2).sum(-1).mean()
        return err / target_NC.float().pow(2).sum(-1).mean().clamp_min(1e-12)

    def _text_loss(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Shifted CE over assistant targets; the LM head runs only where there is a target."""
        targets = labels_BT[:, 1:]
        valid = targets != IGNORE_INDEX
        n = int(valid.sum())
        if n == 0:
            return hidden_BTD.sum() * 0.0, 0
        logits = self.language_model.logits(hidden_BTD[:, :-1][valid])
        return F.cross_entropy(logits.float(), targets[valid]), n

    def decode_image_logits(
        self, hidden_NLD: torch.Tensor, cond_NC: torch.Tensor, tokens_NLC: torch.Tensor | None = None
    ) -> torch.Tensor:
        """LLM states at the generation slots -> code logits over all scales (block-causal decoder).

        ``tokens_NLC`` (the decoder-space embeddings of the slots) is needed in residual mode.
        """
        h_NLC = self.decoder_inputs(hidden_NLD, tokens_NLC)
        cond_NC = self.decoder_condition(cond_NC, hidden_NLD[:, 0])
        return self.vargpt_gen.forward_blocks(h_NLC, cond_NC, attn_bias=self.vargpt_gen.causal_bias())

    def _image_loss(self, hidden_NLD, cond_NC, gen_codes, tokens_NLC):  # noqa: ANN001, ANN202
        rate = self.cfg.visual_decoder.cond_drop_rate
        if self.training and rate > 0:  # the training counterpart of the noise-CFG branch
            drop = torch.rand(hidden_NLD.shape[0], 1, 1, device=hidden_NLD.device) < rate
            hidden_NLD = torch.where(drop, torch.randn_like(hidden_NLD), hidden_NLD)
        logits_NLK = self.decode_image_logits(hidden_NLD, cond_NC, tokens_NLC)
        gt_NL = torch.cat(list(gen_codes), dim=1)
        loss = code_loss(logits_NLK, gt_NL, self.vargpt_gen.loss_weights_L)
        acc = (logits_NLK.argmax(-1) == gt_NL).float().mean()
        return loss, acc.detach(), logits_NLK
