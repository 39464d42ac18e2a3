"""Training of the multi-scale VQ-VAE tokenizer from scratch on any dataset folder.

Loss = image reconstruction (pixel MSE on [-1, 1], optionally + L1, optionally + a perceptual distance on a local
vision model's features, :mod:`vargpt.training.perceptual`) + the quantizer loss of SPEC 1.10, optionally +
VQGAN's adversarial term (a patch discriminator trained beside the tokenizer, :mod:`vargpt.training.adversarial`).
The perceptual and adversarial terms are off in every preset.
The pixel terms can be weighted by the target's local contrast (:func:`contrast_weights`), so that edges and thin
strokes, a small share of the pixels, get a larger share of the loss. Against codebook collapse the
codebook is initialised from encoder residuals of the first batch and codes left unused for
``restart_every`` steps are restarted on random residuals (:meth:`MultiScaleQuantizer.restart_codes_`).
An optional second phase (:attr:`TokenizerRecipe.finetune`) then trains the decoder alone on the frozen
codes, so that images are drawn sharper without the codes changing.

The images are every distinct image path of the split's records, loaded once into memory at the
preset's resolution. There is no augmentation: a horizontal flip would break "left"/"right" captions,
and the held-out numbers show no overfitting at these sizes.

    >>> metrics = train_tokenizer(data_dir="data/shapesworld", out_dir="runs/tok", preset="tiny")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vargpt.config import ConfigError, TrainConfig, VARGPTConfig, VQVAEConfig, _fail, _positive
from vargpt.data.records import DatasetError, image_to_tensor, load_image, load_records, unique_images
from vargpt.tokenizer.quantizer import usage_fraction
from vargpt.tokenizer.vqvae import MultiScaleVQVAE, vqvae_config_from_dict
from vargpt.training.adversarial import Adversary
from vargpt.training.checkpoint import (
    CheckpointError,
    is_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vargpt.training.loop import ReplaySampler
from vargpt.training.optim import build_optimizer, build_scheduler
from vargpt.training.perceptual import PerceptualLoss

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TokenizerRecipe:
    """Optimiser settings plus the tokenizer-specific loss weights and codebook remedy."""

    train: TrainConfig
    """Optimiser, schedule, batch size and steps."""
    l2_weight: float = 1.0
    """Weight of the pixel MSE."""
    l1_weight: float = 0.0
    """Weight of the pixel L1 (off: on ShapesWorld L2 alone learns faster, measured)."""
    vq_weight: float = 1.0
    """Weight of the quantizer loss (SPEC 1.10)."""
    edge_weight: float = 0.0
    """Strength of the contrast weighting of the pixel terms (:func:`contrast_weights`; 0 = plain means)."""
    data_init: bool = True
    """Initialise the codebook from encoder residuals of the first batch."""
    restart_every: int = 25
    """Restart codes unused (at every scale) over this many steps (0 = never)."""
    restart_until: float = 0.9
    """Stop restarting after this fraction of the steps, so late restarts get trained."""
    eval_images: int = 1024
    """Held-out images used for the final PSNR / usage numbers (0 = all)."""
    finetune: TrainConfig | None = None
    """Decoder finetuning after the main phase (None = off): the encoder, ``quant_conv``
    and codebook are frozen, so the codes, which are all that the visual decoder and the VARGPT stages
    ever see, are final; ``post_quant_conv`` and the decoder go on training alone on the cached ``f_hat``
    of every training image (``_finetune_decoder``), with the pixel loss contrast-weighted by
    ``finetune_edge_weight``. It sharpens what the codes already hold without making the codes harder to
    predict, which contrast weighting in the main phase does."""
    finetune_edge_weight: float = 0.0
    """Strength of the contrast weighting (:func:`contrast_weights`) of the finetuning's pixel loss."""
    adv_weight: float = 0.0
    """Weight of the adversarial (VQGAN) term in the main phase (0 = off: no discriminator is built). With
    ``adv_adaptive`` it multiplies VQGAN's adaptive weight (:mod:`vargpt.training.adversarial`)."""
    adv_start: int = 0
    """Main-phase step from which the discriminator trains and the adversarial term counts (VQGAN's
    ``disc_start``: let the autoencoder learn to reconstruct first)."""
    adv_adaptive: bool = True
    """Balance the adversarial gradient against the pixel loss's at the decoder's last layer."""
    adv_disc_channels: int = 64
    """Width of the discriminator's first layer (:class:`~vargpt.training.adversarial.PatchDiscriminator`)."""
    adv_disc_layers: int = 3
    """Stride-2 layers of the discriminator (3: 70 px patches)."""
    adv_disc_lr: float | None = None
    """The discriminator's (constant) learning rate; None = the main phase's peak ``train.lr``."""
    perceptual_weight: float = 0.0
    """Weight of the perceptual distance (:class:`~vargpt.training.perceptual.PerceptualLoss`) added to the
    pixel terms of both phases (0 = off)."""
    perceptual_model: str | None = None
    """Local folder of the transformers vision model the perceptual distance is measured with (needed when
    ``perceptual_weight`` > 0; never downloaded)."""

    def __post_init__(self) -> None:
        for name in ("l2_weight", "l1_weight", "vq_weight", "edge_weight", "finetune_edge_weight", "adv_weight",
                     "adv_start", "perceptual_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TokenizerRecipe.{name}={getattr(self, name)}: must be >= 0")
        _positive(self, "adv_disc_channels", "adv_disc_layers")
        if self.adv_disc_lr is not None and self.adv_disc_lr <= 0:
            _fail(self, "adv_disc_lr", self.adv_disc_lr, "must be > 0 (or None)")
        if self.perceptual_weight > 0 and not self.perceptual_model:
            raise ConfigError(f"TokenizerRecipe.perceptual_weight={self.perceptual_weight} needs perceptual_model, "
                              "the local folder of a transformers vision model (nothing is downloaded)")


RECIPES: dict[str, TokenizerRecipe] = {
    # Measured on ShapesWorld 32 px, 2 CPU threads: see benchmarks/tokenizer.py.
    "tiny": TokenizerRecipe(
        train=TrainConfig(name="tokenizer-tiny", lr=2e-3, weight_decay=0.0, betas=(0.9, 0.99),
                          warmup_ratio=0.02, schedule="cosine", min_lr_ratio=0.05, batch_size=16,
                          max_steps=1600, grad_clip=1.0, save_every=400),
        # Contrast weighting (edge_weight) stays off: at 4 the reconstructions are better (oracle 0.893 ->
        # 0.948 / 0.926 on 1842 held-out images) but the whole recipe generated worse in every run (colour+shape
        # 0.641 -> 0.543 at 2 threads, 0.496 -> 0.375 at 1; with layout classes and no GroupNorm, session 19,
        # 0.801 -> 0.473): the decoder predicts the sharper codes less well. Decoder finetuning does not
        # touch the codes. On run AE's tokenizer (session 20, lr 3e-3, contrast weighting 4, batch 32), oracle
        # on the 250 test reconstructions 0.924 -> 0.936 / 0.968 / 0.980 / 0.976 after 200 / 400 / 600 / 800
        # steps (1842 fresh images: 0.894 -> 0.919 / 0.954 / 0.965 / 0.971); what counts is images seen
        # (800 steps of 16 = 400 of 32), and a CPU decoder step costs ~5.5 ms per image at any batch size.
        # 600 steps in this trainer at 2 threads read 0.964 / 0.964 (the 250 are noisy) for 133 s; 400 cost ~88 s.
        # Hard-example replay (finetune replay_fraction) stays off: at 0.5 the 400 steps reconstruct like 1200
        # (pipeline's 250: 0.936 -> 0.976; 2000 fresh images 0.945 -> 0.962, two orders) but the model's own
        # samples decode worse (VARGPT FID 15.9 -> 18.1 over 3 sampling seeds, generation 0.763 -> 0.760; the
        # class-conditional decoder's samples 0.868 -> 0.853), session 24.
        finetune=TrainConfig(name="tokenizer-tiny-decoder", lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99),
                             warmup_ratio=0.05, schedule="cosine", min_lr_ratio=0.05, batch_size=32,
                             max_steps=400, grad_clip=1.0, save_every=200),
        finetune_edge_weight=4.0,
    ),
    # Released-size tokenizer (SPEC 1.1); only meaningful on a GPU and with a large image corpus.
    "vargpt-v1-7b": TokenizerRecipe(
        train=TrainConfig(name="tokenizer-ch160", lr=1e-4, weight_decay=0.0, betas=(0.5, 0.9),
                          warmup_ratio=0.01, schedule="cosine", min_lr_ratio=0.1, batch_size=16,
                          max_steps=100_000, grad_clip=1.0, save_every=2_000),
        restart_every=200,
    ),
}
"""Training recipe per model preset."""


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """Indices of the batch at optimiser step ``step``: a fresh seeded permutation per epoch.

    Depends only on its arguments, so a resumed run sees exactly the batches it would have seen.
    """
    start = step * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, num_items)
        out.append((epoch, offset))
    perms: dict[int, torch.Tensor] = {}
    idx = []
    for epoch, offset in out:
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_items, generator=g)
        idx.append(int(perms[epoch][offset]))
    return torch.tensor(idx, dtype=torch.long)


def psnr(recon_B3HW: torch.Tensor, target_B3HW: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2) -> (B,)."""
    mse_B = (recon_B3HW.clamp(-1, 1) - target_B3HW).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse_B.clamp_min(1e-10))


def contrast_weights(x_B3HW: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W) that grow with the local contrast of the target image.

    Contrast ``c`` of a pixel = the largest absolute difference between it and any of its 8 neighbours,
    over channels (images in [-1, 1], so ``c`` in [0, 2]; borders replicate). The weight is
    ``1 + strength * c / 2``, rescaled to mean 1 over each image, so the loss keeps its scale while flat
    regions (most of a simple image) give part of their share to edges and thin strokes. ``strength`` 0
    gives all ones.
    """
    if strength == 0:
        return x_B3HW.new_ones(x_B3HW.shape[0], 1, *x_B3HW.shape[2:])
    padded = F.pad(x_B3HW, (1, 1, 1, 1), mode="replicate")
    # The 3x3 window includes the pixel itself, so max - x and x - min are both >= 0.
    above = F.max_pool2d(padded, 3, stride=1) - x_B3HW
    below = x_B3HW + F.max_pool2d(-padded, 3, stride=1)
    contrast_B1HW = torch.maximum(above, below).amax(1, keepdim=True)
    w_B1HW = 1 + strength * contrast_B1HW / 2
    return w_B1HW / w_B1HW.mean((2, 3), keepdim=True)


def load_image_tensor(paths: list[Path], size: int) -> torch.Tensor:
    """Load images, resized/centre-cropped to ``size``, as one float tensor (N, 3, size, size) in [-1, 1]."""
    if not paths:
        raise DatasetError("no images to load")
    return torch.stack([image_to_tensor(load_image(p, size)) for p in paths])


def split_images(data_dir: str | Path, split: str, size: int) -> torch.Tensor | None:
    """All distinct images of ``split`` as (N, 3, size, size), or None if the split does not exist or its
    records name no image.

    Raises:
        DatasetError: ``data_dir`` is not a folder, or a record or image is invalid.
    """
    root = Path(data_dir)
    if root.is_dir() and not any((root / f"{split}.{ext}").is_file() for ext in ("jsonl", "json")):
        return None
    paths = unique_images(load_records(root, split))  # a missing folder: load_records' DatasetError
    return load_image_tensor(paths, size) if paths else None


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_tokenizer(model: MultiScaleVQVAE, images_N3HW: torch.Tensor, batch_size: int = 128) -> dict:
    """Held-out reconstruction PSNR (mean over images, dB) and codebook usage (overall and per scale)."""
    was_training = model.training
    model.eval()
    S, V = model.cfg.num_scales, model.cfg.vocab_size
    hits_SV = torch.zeros(S, V)
    psnrs = []
    for i in range(0, images_N3HW.shape[0], batch_size):
        x = images_N3HW[i:i + batch_size]
        idx_list = model.encode(x)
        for si, idx_Bl in enumerate(idx_list):
            hits_SV[si] += torch.bincount(idx_Bl.flatten(), minlength=V).float()
        psnrs.append(psnr(model.decode(idx_list), x))
    model.train(was_training)
    overall, per_scale = usage_fraction(hits_SV)
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "codebook_usage": {"overall": overall, "per_scale": per_scale},
        "images": int(images_N3HW.shape[0]),
    }


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Mutable loop state saved in ``trainer_state.pt``."""

    step: int = 0
    window_hits_V: torch.Tensor | None = None
    train_seconds: float = 0.0
    restarted: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    replay: dict[str, Any] | None = None
    """:meth:`ReplaySampler.state_dict` when the recipe replays hard examples."""
    finetune: dict[str, Any] | None = None
    """Decoder finetuning's progress: ``step``, ``optimizer``, ``scheduler``, ``seconds``, ``initial_loss``,
    ``loss`` (None until it starts)."""
    adversary: dict[str, Any] | None = None
    """:meth:`Adversary.state_dict` (discriminator and its optimiser) when the recipe has an adversarial term."""


def _weighted_pixel_terms(err_B3HW: torch.Tensor, w_B1HW: torch.Tensor, recipe: TokenizerRecipe,
                          dims: tuple[int, ...] | None) -> torch.Tensor:
    """The recipe's L2 + L1 pixel terms, each pixel weighted by ``w_B1HW``, averaged over ``dims`` (None = all)."""
    return (recipe.l2_weight * (err_B3HW.square() * w_B1HW).mean(dims)
            + recipe.l1_weight * (err_B3HW.abs() * w_B1HW).mean(dims))


def _loss(model: MultiScaleVQVAE, x_B3HW: torch.Tensor, recipe: TokenizerRecipe,
          adversary: Adversary | None = None, perceptual: PerceptualLoss | None = None) -> tuple[torch.Tensor, dict]:
    """The main phase's loss and its logged terms. With ``perceptual`` its distance (weighted by
    ``recipe.perceptual_weight``) joins the pixel terms; with ``adversary`` (past ``adv_start``) the adversarial
    term is added and the detached reconstructions are returned as ``"recon"`` for the discriminator's step."""
    recon_B3HW, hits_SV, vq_loss = model(x_B3HW)
    l2w, l1w = recipe.l2_weight, recipe.l1_weight

    def per_image(err_B3HW: torch.Tensor) -> torch.Tensor:
        """Each image's (contrast-weighted) pixel terms: their batch mean is the weighted pixel loss."""
        return _weighted_pixel_terms(err_B3HW, contrast_weights(x_B3HW, recipe.edge_weight), recipe, (1, 2, 3))

    l2, l1 = F.mse_loss(recon_B3HW, x_B3HW), F.l1_loss(recon_B3HW, x_B3HW)  # unweighted: logged either way
    pixel_B = per_image(recon_B3HW - x_B3HW) if recipe.edge_weight > 0 else None
    # Unweighted, the loss is the plain means themselves (the same floating-point sums as before the weighting).
    pixel = pixel_B.mean() if pixel_B is not None else l2w * l2 + l1w * l1
    out: dict[str, Any] = {"hits_SV": hits_SV}
    perc_B = None
    if perceptual is not None:  # the reconstruction loss is then pixel + perceptual, as VQGAN's
        perc_B = perceptual(recon_B3HW, x_B3HW)
        pixel = pixel + recipe.perceptual_weight * perc_B.mean()
        out["perceptual"] = float(perc_B.mean().detach())
    loss = pixel + recipe.vq_weight * vq_loss
    if adversary is not None:
        adv_term, adv_logs = adversary.generator_term(recon_B3HW, pixel, model.decoder.conv_out.weight)
        loss = loss + adv_term
        out |= adv_logs | {"recon": recon_B3HW.detach()}
    with torch.no_grad():
        out["psnr"] = float(psnr(recon_B3HW.detach(), x_B3HW).mean())
        if recipe.train.replay_fraction > 0:  # the replay score: each image's own reconstruction loss
            out["per_image"] = pixel_B.detach() if pixel_B is not None else per_image(recon_B3HW.detach() - x_B3HW)
            if perc_B is not None:
                out["per_image"] = out["per_image"] + recipe.perceptual_weight * perc_B.detach()
    terms = {"loss": loss, "l2": l2, "l1": l1, "vq": vq_loss}
    return loss, {k: float(v.detach()) for k, v in terms.items()} | out


def _finetune_loss(recon_B3HW: torch.Tensor, x_B3HW: torch.Tensor, recipe: TokenizerRecipe,
                   dims: tuple[int, ...] | None = None, perceptual: PerceptualLoss | None = None) -> torch.Tensor:
    """The finetuning's loss: the recipe's L2 + L1 terms, contrast-weighted by ``finetune_edge_weight``
    (averaged over ``dims``; None = one number, ``(1, 2, 3)`` = one per image), plus the perceptual distance
    weighted by ``perceptual_weight`` when ``perceptual`` is given."""
    w_B1HW = contrast_weights(x_B3HW, recipe.finetune_edge_weight)
    loss = _weighted_pixel_terms(recon_B3HW - x_B3HW, w_B1HW, recipe, dims)
    if perceptual is not None:
        perc_B = perceptual(recon_B3HW, x_B3HW)
        loss = loss + recipe.perceptual_weight * (perc_B if dims is not None else perc_B.mean())
    return loss


@torch.no_grad()
def _finetune_scores(model: MultiScaleVQVAE, f_NZhw: torch.Tensor, images_N3HW: torch.Tensor,
                     recipe: TokenizerRecipe, batch_size: int = 64,
                     perceptual: PerceptualLoss | None = None) -> torch.Tensor:
    """Each training image's finetuning loss under the current decoder: the replay's starting scores."""
    was_training = model.training
    model.eval()
    scores = torch.cat([
        _finetune_loss(model.decoder(model.post_quant_conv(f_NZhw[i:i + batch_size])),
                       images_N3HW[i:i + batch_size].contiguous(memory_format=torch.channels_last), recipe,
                       (1, 2, 3), perceptual)
        for i in range(0, images_N3HW.shape[0], batch_size)])
    model.train(was_training)
    return scores


@torch.no_grad()
def cached_fhat(model: MultiScaleVQVAE, images_N3HW: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The quantized latent ``f_hat`` (N, Z, h, w) of every image: what the decoder sees of it."""
    return torch.cat([model.quantize.idx_to_fhat(model.encode(images_N3HW[i:i + batch_size]))
                      for i in range(0, images_N3HW.shape[0], batch_size)])


def _restart_dead_codes(
    model: MultiScaleVQVAE, opt: torch.optim.Optimizer, dead_V: torch.Tensor, x_B3HW: torch.Tensor, seed: int,
    step: int,
) -> int:
    """Restart dead codes on residuals of this batch and clear their Adam moments."""
    g = torch.Generator().manual_seed(seed * 7_919 + step)
    with torch.no_grad():
        f_BZhw = model.encode_f(x_B3HW)
    n = model.quantize.restart_codes_(dead_V, f_BZhw, generator=g)
    param = model.quantize.embedding.weight
    for buf in opt.state.get(param, {}).values():
        if torch.is_tensor(buf) and buf.shape == param.shape:
            buf[dead_V] = 0
    return n


def _maybe_restart(
    model: MultiScaleVQVAE, opt: torch.optim.Optimizer, st: _State, hits_SV: torch.Tensor,
    x_B3HW: torch.Tensor, recipe: TokenizerRecipe, total: int, seed: int,
) -> None:
    hits_V = hits_SV.sum(0)
    st.window_hits_V = hits_V if st.window_hits_V is None else st.window_hits_V + hits_V
    every = recipe.restart_every
    if every <= 0 or (st.step + 1) % every != 0:
        return
    if st.step + 1 <= recipe.restart_until * total:
        dead_V = st.window_hits_V == 0
        st.restarted += _restart_dead_codes(model, opt, dead_V, x_B3HW, seed, st.step)
    st.window_hits_V = None


def _replay_state(replay: ReplaySampler | None) -> dict[str, Any] | None:
    return replay.state_dict() if replay is not None else None


def _adversary_state(adversary: Adversary | None, st: _State) -> dict[str, Any] | None:
    """What to checkpoint of the discriminator: its live state, or what the run loaded (finetuning only)."""
    return adversary.state_dict() if adversary is not None else st.adversary


def _replay_entry(replay: ReplaySampler | None) -> dict[str, Any]:
    return {"replay": replay.state_dict()} if replay is not None else {}


def _checkpoint(out_dir: Path, model: MultiScaleVQVAE, opt, sched, st: _State, recipe: TokenizerRecipe,
                seed: int) -> None:
    save_checkpoint(
        out_dir,
        model_state=model.state_dict(),
        config=dataclasses.asdict(model.cfg),
        trainer_state={
            "step": st.step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": rng_state(), "window_hits_V": st.window_hits_V, "train_seconds": st.train_seconds,
            "restarted": st.restarted, "history": st.history, "seed": seed, "replay": st.replay,
            "finetune": st.finetune, "adversary": st.adversary, "recipe": dataclasses.asdict(recipe),
        },
    )


def _setup(
    out_dir: Path, preset: str, recipe: TokenizerRecipe, resume: bool, seed: int, total: int,
    init_from: Path | None = None,
) -> tuple[MultiScaleVQVAE, torch.optim.Optimizer, Any, _State]:
    state = config = trainer = None
    src = out_dir if resume and is_checkpoint(out_dir) else init_from
    if src is not None:
        if not is_checkpoint(src):
            raise CheckpointError(f"init_from={src}: not a tokenizer checkpoint (train one with "
                                  "`vargpt train tokenizer` first)")
        state, config, trainer = load_checkpoint(src)
    elif resume:
        logger.info("resume requested but %s holds no checkpoint; starting from scratch", out_dir)
    cfg: VQVAEConfig = vqvae_config_from_dict(config) if config else VARGPTConfig.from_name(preset).vqvae
    torch.manual_seed(seed)
    # channels_last: ~20% faster CPU convolutions at these sizes (measured, 1 thread, B=16).
    model = MultiScaleVQVAE(cfg).to(memory_format=torch.channels_last)
    opt = build_optimizer(model.named_parameters(), recipe.train)
    sched = build_scheduler(opt, recipe.train, total)
    st = _State()
    if state is not None:
        model.load_state_dict(state, strict=True)
        if trainer is not None:
            opt.load_state_dict(trainer["optimizer"])
            sched.load_state_dict(trainer["scheduler"])
            set_rng_state(trainer["rng"])
            st = _State(step=trainer["step"], window_hits_V=trainer["window_hits_V"],
                        train_seconds=trainer["train_seconds"], restarted=trainer["restarted"],
                        history=trainer["history"], replay=trainer.get("replay"),
                        finetune=trainer.get("finetune"), adversary=trainer.get("adversary"))
        logger.info("resumed from %s at step %d", src, st.step)
    model.train()
    return model, opt, sched, st


def _finetune_decoder(
    model: MultiScaleVQVAE, train_N3HW: torch.Tensor, recipe: TokenizerRecipe, st: _State, *, out: Path,
    opt: torch.optim.Optimizer, sched: Any, seed: int, progress: bool, time_budget_s: float | None,
    perceptual: PerceptualLoss | None = None,
) -> None:
    """Second phase (:attr:`TokenizerRecipe.finetune`): train ``post_quant_conv`` + decoder on frozen codes.

    With ``recipe.finetune.replay_fraction`` > 0 that share of every batch is re-drawn in proportion to each
    image's last finetuning loss (:class:`~vargpt.training.loop.ReplaySampler`), starting from the loss of
    every image under the main phase's decoder (one forward pass over them): the images the decoder still
    draws worst, small stars and crosses whose thin arms blur, get the steps. Resumable like the main phase:
    its step, optimiser, schedule and replay scores live in ``st.finetune`` and are checkpointed every
    ``save_every`` steps and at the end; ``st.finetune["seconds"]`` counts its time (the ``f_hat`` cache and
    the scoring pass included) towards the time budget.
    """
    ft = recipe.finetune
    assert ft is not None
    fs: dict[str, Any] = dict(st.finetune or {"step": 0, "seconds": 0.0, "initial_loss": math.nan,
                                              "loss": math.nan})
    if fs["step"] >= ft.max_steps:
        return
    frozen = [p for m in (model.encoder, model.quant_conv, model.quantize) for p in m.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    t_start = time.perf_counter()
    try:
        f_NZhw = cached_fhat(model, train_N3HW)
        trainable = [*model.post_quant_conv.named_parameters("post_quant_conv"),
                     *model.decoder.named_parameters("decoder")]
        ft_opt = build_optimizer(trainable, ft)
        ft_sched = build_scheduler(ft_opt, ft, ft.max_steps)
        if "optimizer" in fs:
            ft_opt.load_state_dict(fs["optimizer"])
            ft_sched.load_state_dict(fs["scheduler"])
        params = [p for _, p in trainable]
        # Its own data order: the main phase's permutations shifted by a constant seed offset.
        replay = None
        if ft.replay_fraction > 0:
            replay = ReplaySampler(train_N3HW.shape[0], global_batch=ft.batch_size, fraction=ft.replay_fraction,
                                   power=ft.replay_power, seed=seed + 7_919, start_batch=fs["step"])
            if "replay" in fs:
                replay.load_state_dict(fs["replay"])
            else:
                scores = _finetune_scores(model, f_NZhw, train_N3HW, recipe, perceptual=perceptual)
                replay.update(torch.arange(train_N3HW.shape[0]), scores)
        bar = tqdm(total=ft.max_steps, initial=fs["step"], disable=not progress, desc="tokenizer decoder",
                   dynamic_ncols=True)
        while fs["step"] < ft.max_steps:
            idx = (torch.tensor(replay.next_batch()) if replay is not None
                   else batch_indices(fs["step"], ft.batch_size, train_N3HW.shape[0], seed + 7_919))
            x = train_N3HW[idx].contiguous(memory_format=torch.channels_last)
            recon = model.decoder(model.post_quant_conv(f_NZhw[idx]))
            if replay is not None:
                loss_B = _finetune_loss(recon, x, recipe, (1, 2, 3), perceptual)
                replay.update(idx, loss_B)
                loss = loss_B.mean()
            else:
                loss = _finetune_loss(recon, x, recipe, perceptual=perceptual)
            ft_opt.zero_grad(set_to_none=True)
            loss.backward()
            if ft.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, ft.grad_clip)
            ft_opt.step()
            ft_sched.step()
            fs["step"] += 1
            fs["loss"] = float(loss.detach())
            if math.isnan(fs["initial_loss"]):
                fs["initial_loss"] = fs["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{fs['loss']:.4f}")
            elapsed = fs["seconds"] + time.perf_counter() - t_start
            if ft.save_every and fs["step"] % ft.save_every == 0 and fs["step"] < ft.max_steps:
                st.finetune = fs | {"seconds": elapsed, "optimizer": ft_opt.state_dict(),
                                    "scheduler": ft_sched.state_dict()} | _replay_entry(replay)
                _checkpoint(out, model, opt, sched, st, recipe, seed)
            if time_budget_s is not None and st.train_seconds + elapsed >= time_budget_s:  # checkpointed below
                logger.info("time budget of %.0fs reached at decoder finetuning step %d", time_budget_s,
                            fs["step"])
                break
        bar.close()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    st.finetune = fs | {"seconds": fs["seconds"] + time.perf_counter() - t_start,
                        "optimizer": ft_opt.state_dict(), "scheduler": ft_sched.state_dict()} | _replay_entry(replay)
    _checkpoint(out, model, opt, sched, st, recipe, seed)


def train_tokenizer(
    *,
    data_dir: str | Path,
    out_dir: str | Path,
    preset: str = "tiny",
    max_steps: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    time_budget_s: float | None = None,
    replay_fraction: float | None = None,
    edge_weight: float | None = None,
    finetune_steps: int | None = None,
    finetune_replay_fraction: float | None = None,
    init_from: str | Path | None = None,
    adv_weight: float | None = None,
    adv_start: int | None = None,
    perceptual_weight: float | None = None,
    perceptual_model: str | Path | None = None,
) -> dict[str, Any]:
    """Train the preset's multi-scale VQ-VAE on the images of ``data_dir`` and checkpoint it to ``out_dir``.

    Args:
        data_dir: dataset folder (``train.jsonl`` + images; ``test.jsonl`` if present is the held-out set).
        out_dir: checkpoint directory (``model.safetensors``, ``config.json`` = the VQVAEConfig dict,
            ``trainer_state.pt``); loadable with ``MultiScaleVQVAE.from_pretrained(out_dir)``.
        preset: model preset name (``VARGPTConfig.from_name``) selecting the VQ-VAE sizes and recipe.
        max_steps: optimiser steps (default: the recipe's).
        batch_size: images per step (default: the recipe's).
        resume: continue from the checkpoint in ``out_dir`` (weights, optimiser, schedule, step, RNG).
        seed: seed of initialisation, data order and code restarts.
        progress: show a tqdm bar with loss / PSNR / codebook usage.
        time_budget_s: stop (and checkpoint) once this many seconds of training have elapsed.
        replay_fraction: hard-example replay (default: the recipe's ``TrainConfig.replay_fraction``): this
            share of every batch is re-drawn from the images already trained on, by their last
            reconstruction loss (:class:`~vargpt.training.loop.ReplaySampler`).
        edge_weight: strength of the contrast-weighted pixel loss (default: the recipe's
            :attr:`TokenizerRecipe.edge_weight`; see :func:`contrast_weights`).
        finetune_steps: steps of the decoder finetuning after the main phase (default: the recipe's
            :attr:`TokenizerRecipe.finetune`; 0 = none). It runs once the main phase has all its steps.
        finetune_replay_fraction: hard-example replay in the decoder finetuning (default: the recipe's
            ``finetune.replay_fraction``; see :func:`_finetune_decoder`).
        init_from: start from this checkpoint (weights, optimiser, step, finetuning state) when ``out_dir``
            holds none; ``out_dir`` gets its own copy and ``init_from`` is never written. The recipe uses
            it to finetune the decoder of a finished main phase (run with ``finetune_steps=0``) in another
            folder, while the main phase's codes already feed the visual decoder's pretraining.
        adv_weight: weight of the adversarial (VQGAN) term of the main phase (default: the recipe's
            :attr:`TokenizerRecipe.adv_weight`, 0 = off); see :mod:`vargpt.training.adversarial`.
        adv_start: main-phase step from which the adversarial term counts (default: the recipe's).
        perceptual_weight: weight of the perceptual distance in both phases (default: the recipe's, 0 = off).
        perceptual_model: local folder of the transformers vision model that distance is measured with
            (:class:`~vargpt.training.perceptual.PerceptualLoss`; default: the recipe's).

    Raises:
        ConfigError: ``finetune_steps`` is negative, or positive for a recipe without finetuning; ``adv_weight``,
            ``adv_start`` or ``perceptual_weight`` is negative; a perceptual weight without a perceptual model.
        CheckpointError: ``init_from`` is not a checkpoint, or ``perceptual_model`` holds no transformers model.
        DatasetError: ``data_dir`` is missing, holds no training images, or a record or image is invalid.

    Returns:
        Metrics: steps, train_seconds, images_per_second, final training loss terms, held-out ``psnr``
        and ``codebook_usage`` (overall and per scale; computed on the training images if there is no
        test split), codes restarted.
    """
    if preset not in RECIPES:
        raise ValueError(f"no tokenizer recipe for preset {preset!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[preset]
    overrides = {k: v for k, v in (("max_steps", max_steps), ("batch_size", batch_size),
                                   ("replay_fraction", replay_fraction)) if v is not None}
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=seed, **overrides))
    if edge_weight is not None:
        recipe = dataclasses.replace(recipe, edge_weight=edge_weight)
    if finetune_steps is not None:
        if finetune_steps < 0:
            raise ConfigError(f"finetune_steps={finetune_steps}: must be >= 0 (0 = no decoder finetuning)")
        if finetune_steps > 0 and recipe.finetune is None:
            raise ConfigError(f"the {preset!r} tokenizer recipe has no decoder finetuning to run "
                              f"{finetune_steps} steps of; pass finetune_steps=0 or None")
        finetune = (None if finetune_steps == 0
                    else dataclasses.replace(recipe.finetune, max_steps=finetune_steps))
        recipe = dataclasses.replace(recipe, finetune=finetune)
    if perceptual_model is not None:
        recipe = dataclasses.replace(recipe, perceptual_model=str(perceptual_model))
    for name, value in (("adv_weight", adv_weight), ("adv_start", adv_start),
                        ("perceptual_weight", perceptual_weight)):
        if value is not None:  # TokenizerRecipe refuses a negative one with a ConfigError
            recipe = dataclasses.replace(recipe, **{name: value})
    perceptual = PerceptualLoss(recipe.perceptual_model) if recipe.perceptual_weight > 0 else None
    if finetune_replay_fraction is not None and recipe.finetune is not None:
        recipe = dataclasses.replace(recipe, finetune=dataclasses.replace(
            recipe.finetune, replay_fraction=finetune_replay_fraction))
    tc, out = recipe.train, Path(out_dir)

    model, opt, sched, st = _setup(out, preset, recipe, resume, seed, tc.max_steps,
                                   init_from=Path(init_from) if init_from is not None else None)
    t0 = time.perf_counter()
    train_N3HW = split_images(data_dir, "train", model.cfg.image_size)
    if train_N3HW is None:
        raise DatasetError(f"{data_dir}: no training images (train.jsonl or train.json with image records); "
                           "the tokenizer learns from the train split's images")
    replay = None
    if tc.replay_fraction > 0:
        replay = ReplaySampler(train_N3HW.shape[0], global_batch=tc.batch_size, fraction=tc.replay_fraction,
                               power=tc.replay_power, seed=seed, start_batch=st.step)
        if st.replay is not None:
            replay.load_state_dict(st.replay)
    test_N3HW = split_images(data_dir, "test", model.cfg.image_size)
    load_seconds = time.perf_counter() - t0
    adversary = None
    if recipe.adv_weight > 0:
        if model.cfg.image_size < 3 * 2 ** recipe.adv_disc_layers:
            raise ConfigError(f"adv_disc_layers={recipe.adv_disc_layers} needs images of at least "
                              f"{3 * 2 ** recipe.adv_disc_layers} px; this tokenizer's are {model.cfg.image_size} "
                              "px: use fewer discriminator layers")
        adversary = Adversary(weight=recipe.adv_weight, adaptive=recipe.adv_adaptive,
                              channels=recipe.adv_disc_channels, num_layers=recipe.adv_disc_layers,
                              lr=recipe.adv_disc_lr or tc.lr, seed=seed + 104_729)
        if st.adversary is not None:
            adversary.load_state_dict(st.adversary)
    logger.info("loaded %d train images (%d px) in %.1fs", train_N3HW.shape[0], model.cfg.image_size,
                load_seconds)

    last: dict = {}
    initial_loss = math.nan
    bar = tqdm(total=tc.max_steps, initial=st.step, disable=not progress, desc="tokenizer", dynamic_ncols=True)
    t_start, start_step = time.perf_counter(), st.step
    while st.step < tc.max_steps:
        idx = (torch.tensor(replay.next_batch()) if replay is not None
               else batch_indices(st.step, tc.batch_size, train_N3HW.shape[0], seed))
        x = train_N3HW[idx].contiguous(memory_format=torch.channels_last)
        if st.step == 0 and recipe.data_init:
            _restart_dead_codes(model, opt, torch.ones(model.cfg.vocab_size, dtype=torch.bool), x, seed, -1)
        adv_on = adversary is not None and st.step >= recipe.adv_start
        loss, last = _loss(model, x, recipe, adversary if adv_on else None, perceptual)
        recon = last.pop("recon", None)
        if replay is not None:
            replay.update(idx, last.pop("per_image"))
        if math.isnan(initial_loss):
            initial_loss = last["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        if recon is not None:  # the discriminator learns from this step's reconstructions
            last["d_loss"] = adversary.discriminator_step(x, recon)
        _maybe_restart(model, opt, st, last["hits_SV"], x, recipe, tc.max_steps, seed)
        st.step += 1
        elapsed = st.train_seconds + time.perf_counter() - t_start
        usage, _ = usage_fraction(last["hits_SV"])
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.1f}", usage=f"{usage:.2f}",
                        **({"d_loss": f"{last['d_loss']:.3f}"} if "d_loss" in last else {}))
        if tc.save_every and st.step % tc.save_every == 0 and st.step < tc.max_steps:
            st.history.append({k: v for k, v in last.items() if k != "hits_SV"} | {"step": st.step})
            snapshot = dataclasses.replace(st, train_seconds=elapsed, replay=_replay_state(replay),
                                           adversary=_adversary_state(adversary, st))
            _checkpoint(out, model, opt, sched, snapshot, recipe, seed)
        if time_budget_s is not None and elapsed >= time_budget_s:
            logger.info("time budget of %.0fs reached at step %d", time_budget_s, st.step)
            break
    bar.close()
    loop_seconds = time.perf_counter() - t_start
    st.train_seconds += loop_seconds
    steps_run = st.step - start_step
    st.replay = _replay_state(replay)
    st.adversary = _adversary_state(adversary, st)
    _checkpoint(out, model, opt, sched, st, recipe, seed)
    ft = recipe.finetune
    budget_left = time_budget_s is None or st.train_seconds < time_budget_s
    if ft is not None and st.step >= tc.max_steps and budget_left:
        _finetune_decoder(model, train_N3HW, recipe, st, out=out, opt=opt, sched=sched, seed=seed,
                          progress=progress, time_budget_s=time_budget_s, perceptual=perceptual)
    fs = st.finetune
    finetune_done = ft is None or (fs is not None and fs["step"] >= ft.max_steps)

    held_out = test_N3HW if test_N3HW is not None else train_N3HW
    if recipe.eval_images:
        held_out = held_out[: recipe.eval_images]
    ev = evaluate_tokenizer(model, held_out)
    return {
        "steps": st.step,
        "batch_size": tc.batch_size,
        "train_seconds": round(st.train_seconds + (fs["seconds"] if fs else 0.0), 2),
        "images_per_second": round(steps_run * tc.batch_size / loop_seconds, 1) if steps_run else None,
        "load_seconds": round(load_seconds, 2),
        "threads": torch.get_num_threads(),
        "initial_loss": None if math.isnan(initial_loss) else round(initial_loss, 5),  # None: no step run now
        "train_loss": {k: round(v, 5) for k, v in last.items() if k != "hits_SV"},
        "psnr": round(ev["psnr"], 3),
        "codebook_usage": ev["codebook_usage"],
        "eval_split": "test" if test_N3HW is not None else "train",
        "eval_images": ev["images"],
        "codes_restarted": st.restarted,
        "edge_weight": recipe.edge_weight,
        "perceptual": None if perceptual is None else {
            "weight": recipe.perceptual_weight, "model": recipe.perceptual_model,
            **({"distance": round(last["perceptual"], 5)} if "perceptual" in last else {}),
        },
        "adversarial": None if adversary is None else {
            "weight": recipe.adv_weight, "start": recipe.adv_start, "adaptive": recipe.adv_adaptive,
            **{k: round(last[k], 5) for k in ("d_loss", "g_loss", "adv_weight") if k in last},
        },
        "finetune": None if fs is None else {
            "steps": fs["step"], "batch_size": ft.batch_size if ft else None,
            "train_seconds": round(fs["seconds"], 2), "initial_loss": round(fs["initial_loss"], 5),
            "loss": round(fs["loss"], 5), "edge_weight": recipe.finetune_edge_weight,
        },
        "stopped_early": st.step < tc.max_steps or not finetune_done,
        "checkpoint": str(out),
    }
