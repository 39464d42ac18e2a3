"""Training data for the VARGPT stages: records -> encoded samples with cached image inputs and codes.

The vision tower and the VQ-VAE are frozen in every VARGPT stage (SPEC 3.9), so their outputs are
computed once per distinct image, batched, and reused every epoch: vision features for ``<image>``
inputs and multi-scale codes for ``<image_gen>`` targets. On 2 CPU cores this removes most of the
per-step cost of the image paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vargpt.data.collate import EncodedSample, encode_record, pad_samples
from vargpt.data.records import DatasetError, Record, image_to_tensor, load_image
from vargpt.special_tokens import SpecialTokenIds
from vargpt.understanding.vision_tower import ImageProcessor


@dataclass(frozen=True)
class VARGPTSample:
    """One encoded record plus its images' cached tensors."""

    encoded: EncodedSample
    image_feats: torch.Tensor | None  # (N_in, P, F)
    gen_codes: tuple[torch.Tensor, ...] | None  # per scale (N_gen, pn^2)
    gen_labels: torch.Tensor | None = None  # (N_gen,) decoder class of each generated image, -1 if none


def weights_fingerprint(module: torch.nn.Module, extra: object = None) -> str:
    """A digest of ``module``'s parameters and buffers (names, dtypes, shapes, values) and ``extra`` (JSON).

    Two modules with the same fingerprint compute the same function, so their outputs may be shared.
    Hashes every byte once (a few milliseconds for the tiny preset's encoders).
    """
    h = hashlib.sha1(json.dumps(extra, sort_keys=True, default=_jsonable).encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EncoderCache:
    """Vision features and VQ codes of image files, shared by the :class:`VARGPTDataset` s of one process.

    The stages of a run (and the variants of an ablation) encode the same images with the same frozen
    vision tower and VQ-VAE; with a cache each image is encoded once per run instead of once per stage.
    An entry is keyed by the encoder's :func:`weights_fingerprint` (with its input settings) and by the
    file's path, size and modification time, so a different encoder or a rewritten image is encoded
    anew, never served stale. Values are kept in memory for the cache's lifetime (the tiny preset's
    4,400 images: a few MB).
    """

    def __init__(self) -> None:
        self._store: dict[tuple, object] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def get(self, encoder: str, paths: Sequence[Path],
            compute: Callable[[Sequence[Path]], dict[Path, object]]) -> dict[Path, object]:
        """``{path: value}`` for ``paths``; ``compute(missing_paths)`` fills what the cache lacks.

        ``encoder`` names the encoder and its state, e.g. ``"vq:" + weights_fingerprint(vae)``.
        """
        keys = {}
        for p in paths:
            try:
                st = os.stat(p)
            except FileNotFoundError as e:  # the split was read (and its files checked) earlier in the process
                raise DatasetError(f"image file not found: {p}") from e
            keys[p] = (encoder, str(p), st.st_size, st.st_mtime_ns)
        missing = [p for p in paths if keys[p] not in self._store]
        if missing:
            for p, value in compute(missing).items():
                self._store[keys[p]] = value
        self.misses += len(missing)
        self.hits += len(paths) - len(missing)
        return {p: self._store[keys[p]] for p in paths}


def _jsonable(obj: object) -> object:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else repr(obj)


def _processor_key(processor: object) -> object:
    """What an image processor's output depends on (a foreign processor: its identity, never shared)."""
    if isinstance(processor, ImageProcessor):
        return [processor.image_size, processor.mean_3.tolist(), processor.std_3.tolist()]
    return f"{type(processor).__qualname__}@{id(processor)}"


def _batched(paths: Sequence[Path], fn: Callable[[torch.Tensor], object], load: Callable[[Path], torch.Tensor],
             batch_size: int, desc: str, progress: bool) -> dict[Path, object]:
    out: dict[Path, object] = {}
    for i in tqdm(range(0, len(paths), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = paths[i:i + batch_size]
        result = fn(torch.stack([load(p) for p in chunk]))
        for j, p in enumerate(chunk):
            out[p] = result[j] if torch.is_tensor(result) else [r[j] for r in result]
    return out


class VARGPTDataset(torch.utils.data.Dataset):
    """Encoded records of one stage with vision features and VQ codes cached per image.

    Args:
        records: the stage's records.
        tokenizer: HF text tokenizer with the special tokens.
        model: a :class:`vargpt.model.VARGPT` (its frozen vision tower and VQ-VAE fill the caches).
        image_processor: pixels for the vision tower; default ``ImageProcessor.from_config(cfg.vision_tower)``.
        progress: show progress bars while caching.
        batch_size: images per encoder call.
        cache: an :class:`EncoderCache` to reuse (and fill with) features and codes computed for earlier
            datasets of the same encoders; None computes everything here.
    """

    def __init__(self, records: Sequence[Record], tokenizer, model, *, image_processor=None,  # noqa: ANN001
                 progress: bool = True, batch_size: int = 64, cache: EncoderCache | None = None) -> None:
        cfg = model.cfg
        self.token_ids: SpecialTokenIds = model.token_ids
        size = cfg.vqvae.image_size
        self.samples: list[VARGPTSample] = []
        memo: dict[str, list[int]] = {}
        enc = [encode_record(r, tokenizer, self.token_ids, image_tokens=cfg.vision_tower.tokens_per_image,
                             gen_tokens=cfg.vqvae.tokens_total, system_prompt=cfg.chat.system_prompt,
                             max_length=cfg.llm.max_position_embeddings, memo=memo) for r in records]
        inputs = list(dict.fromkeys(p for e in enc for p in e.input_images))
        targets = list(dict.fromkeys(p for e in enc for p in e.gen_images))
        with torch.no_grad():
            tower = model.vision_tower.eval()
            processor = image_processor or ImageProcessor.from_config(cfg.vision_tower)
            load_in = lambda p: processor.process_one(load_image(p))  # noqa: E731
            encode_in = lambda ps: _batched(ps, tower, load_in, batch_size, "vision features", progress)  # noqa: E731
            encode_gen = lambda ps: _batched(ps, model.vae_local.encode,  # noqa: E731
                                             lambda p: image_to_tensor(load_image(p, size)),
                                             batch_size, "VQ codes", progress)

            def through_cache(kind: str, encoder: torch.nn.Module, settings: dict, paths: list[Path],
                              encode: Callable[[Sequence[Path]], dict[Path, object]]) -> dict[Path, object]:
                if cache is None or not paths:  # nothing to share (or nothing to fingerprint for)
                    return encode(paths)
                return cache.get(f"{kind}:{weights_fingerprint(encoder, settings)}", paths, encode)

            feats = through_cache("vision", tower, {"cfg": cfg.vision_tower, "processor": _processor_key(processor)},
                                  inputs, encode_in)
            codes = through_cache("vq", model.vae_local, {"cfg": cfg.vqvae}, targets, encode_gen)
        # A record's class labels its generated images when it is one of the decoder's classes.
        class_index = {name: i for i, name in enumerate(cfg.visual_decoder.class_names)}
        for rec, e in zip(records, enc, strict=True):
            f = torch.stack([feats[p] for p in e.input_images]) if e.input_images else None
            c = (tuple(torch.stack([codes[p][s] for p in e.gen_images]) for s in range(cfg.vqvae.num_scales))
                 if e.gen_images else None)
            self.samples.append(VARGPTSample(e, f, c, torch.full((len(e.gen_images),), class_index.get(rec.cls, -1))
                                             if e.gen_images else None))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> VARGPTSample:
        return self.samples[i]


def collate_vargpt(samples: Sequence[VARGPTSample], pad_id: int):  # noqa: ANN201 - VARGPTBatch
    """Right-pad a list of samples into a :class:`vargpt.model.VARGPTBatch`."""
    from vargpt.model import VARGPTBatch

    tb = pad_samples([s.encoded for s in samples], pad_id)
    feats = [s.image_feats for s in samples if s.image_feats is not None]
    codes = [s.gen_codes for s in samples if s.gen_codes is not None]
    gen = [torch.cat([c[k] for c in codes]) for k in range(len(codes[0]))] if codes else None
    labels = None
    if codes:
        labels = torch.cat([s.gen_labels if s.gen_labels is not None else torch.full((s.gen_codes[0].shape[0],), -1)
                            for s in samples if s.gen_codes is not None])
    return VARGPTBatch(tb.input_ids, tb.labels, tb.attention_mask, image_feats=torch.cat(feats) if feats else None,
                       gen_codes=gen, gen_labels=labels)


def collate_vargpt_groups(samples: Sequence[VARGPTSample], pad_id: int) -> list:  # list[VARGPTBatch]
    """Collate a mixed batch as two padded sub-batches: samples without generated images, then those with.

    Understanding samples are a few dozen tokens, generation samples carry L generation slots each; one
    padded batch would pad every understanding sample to a generation sample's length (stage 2's 80/20 mix
    spent most of its LLM time on padding). Empty groups are left out. ``vargpt_trainer.stage_loss_fn``
    combines the groups' losses into exactly the loss of the whole batch.
    """
    groups = ([s for s in samples if s.gen_codes is None], [s for s in samples if s.gen_codes is not None])
    return [collate_vargpt(g, pad_id) for g in groups if g]

