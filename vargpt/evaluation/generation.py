"""Generation metrics: oracle instruction-following accuracy (ShapesWorld) and FID (any data).

**Oracle accuracy** (the toy counterpart of GenEval, ARCHITECTURE section 3). A *generation item* is a
record with an ``<image_gen>`` placeholder; its prompt is the last user turn, its reference image the
record's generated image. For ShapesWorld records (``meta["objects"]``) the expected attributes are
those the prompt states: colour and shape for the stage-1 class prompts (``meta["task"] ==
"class_gen"``), colour, shape, size and position for caption-based prompts. Each generated image is
read back by :func:`vargpt.data.shapesworld.judge`; accuracy per attribute (``colour``, ``shape``,
``colour+shape``, ``position``, ``size``) is reported overall, on prompts whose colour x shape
combination was seen in training (``meta["combo_seen"]``) and on held-out combinations.

**FID** (Heusel et al. 2017): the Frechet distance between Gaussians fitted to features of real and
generated images, ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. Features come from any
extractor ``extractor(images) -> (N, D) array``: the project's own network trained on the dataset
(:mod:`vargpt.evaluation.feature_net`, offline), or Inception / CLIP from local weight files
(:mod:`vargpt.evaluation.pretrained_features`). FID from a few hundred images is biased upwards;
compare runs at the same sample count and feature network (``fid_reference`` in
:func:`vargpt.evaluation.run.evaluate_model` gives the real-vs-real value at that count).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.linalg
from PIL import Image

from vargpt.data.records import Record
from vargpt.data.shapesworld.world import World
from vargpt.evaluation.understanding import strip_image_placeholders
from vargpt.special_tokens import IMAGE_GEN

logger = logging.getLogger(__name__)

__all__ = [
    "ORACLE_KEYS",
    "FeatureExtractor",
    "GenerationItem",
    "Generator",
    "compute_fid",
    "evaluate_generation",
    "evaluate_replies",
    "reply_names",
    "expected_attributes",
    "fid_from_features",
    "fid_from_stats",
    "gaussian_stats",
    "generation_items",
]

ORACLE_KEYS: tuple[str, ...] = ("colour", "shape", "colour+shape", "position", "size")
"""Attributes the oracle judges (``judge`` output keys), in report order."""
_CLASS_PROMPT_ATTRIBUTES = ("colour", "shape")
"""What a stage-1 class prompt ("Please generate an image of a red circle.") asks for."""

FeatureExtractor = Callable[[Sequence[Image.Image | str | Path]], np.ndarray]
"""``extractor(images) -> features (N, D)``; images are PIL images or paths."""


class Generator(Protocol):
    """What :func:`evaluate_generation` needs (a ``Pipeline`` works)."""

    def generate_images(self, prompts: list[str], *, n_per_prompt: int = 1, sampling: Any = None,
                        batch_size: int = 16, previews: bool = False, lead_in: bool = False,
                        finish_reply: bool = False) -> list[Any]:
        """``n_per_prompt`` results per prompt, prompt-major; each has ``.image`` (PIL) and
        optionally ``.prompt``, ``.previews`` (list of PIL, one per scale, when asked) and ``.seed``.
        ``lead_in=True``: the model writes its own reply text before the image (``.text``) instead of
        being forced into the image; ``finish_reply=True``: the reply goes on after the image until the
        model ends it or the text budget does (``.finish_reason`` ``"stop"`` / ``"length"``). Only
        :func:`evaluate_replies` asks for either."""
        ...


@dataclass(frozen=True)
class GenerationItem:
    """One generation prompt: its record, prompt text, reference image and expected attributes."""

    record: Record
    prompt: str
    reference: Path | None
    expected: dict[str, str] | None

    @property
    def combo_seen(self) -> bool | None:
        """``meta["combo_seen"]`` when present."""
        seen = self.record.meta.get("combo_seen")
        return None if seen is None else bool(seen)

    @property
    def task(self) -> str | None:
        """``meta["task"]`` when present."""
        t = self.record.meta.get("task")
        return None if t is None else str(t)


def expected_attributes(record: Record) -> dict[str, str] | None:
    """The attributes a ShapesWorld generation prompt asks for (None when the record has no ShapesWorld
    objects: other data may carry any ``meta``)."""
    objects = record.meta.get("objects")
    if not objects or not isinstance(objects, list) or not isinstance(objects[0], Mapping):
        return None
    obj = dict(objects[0])
    if record.meta.get("task") == "class_gen":
        return {k: obj[k] for k in _CLASS_PROMPT_ATTRIBUTES if k in obj}
    return {k: str(v) for k, v in obj.items() if k in ("colour", "shape", "position", "size")}


def generation_items(records: Sequence[Record]) -> list[GenerationItem]:
    """The generation items of ``records`` (records with ``<image_gen>`` and a user turn), in order."""
    items = []
    for r in records:
        users = [m for m in r.messages if m.role == "user"]
        if not r.is_generation or not users:
            continue
        refs = r.generated_images
        items.append(GenerationItem(r, strip_image_placeholders(users[-1].content), refs[0] if refs else None,
                                    expected_attributes(r)))
    return items


def _rates(hits: Mapping[str, list[bool]]) -> dict[str, float]:
    return {k: round(sum(hits[k]) / len(hits[k]), 4) for k in ORACLE_KEYS if hits.get(k)}


def _generate(generator: Generator, items: Sequence[GenerationItem], n_per_prompt: int, sampling: Any,
              batch_size: int, previews: bool) -> list[Any]:
    prompts = [it.prompt for it in items]
    results = generator.generate_images(prompts, n_per_prompt=n_per_prompt, sampling=sampling,
                                        batch_size=batch_size, previews=previews)
    if len(results) != len(prompts) * n_per_prompt:
        raise RuntimeError(f"the generator returned {len(results)} images for {len(prompts)} prompts x "
                           f"{n_per_prompt}")
    for k, res in enumerate(results):
        got = getattr(res, "prompt", None)
        if got is not None and got != prompts[k // n_per_prompt]:
            raise RuntimeError(f"generated image {k} is for prompt {got!r}, expected {prompts[k // n_per_prompt]!r} "
                               "(results must be prompt-major)")
    return results


def evaluate_generation(
    generator: Generator, records: Sequence[Record], world: World | None, *, n_per_prompt: int = 1,
    sampling: Any = None, max_prompts: int | None = None, batch_size: int = 16, previews: bool = True,
) -> dict[str, Any]:
    """Generate an image for every generation prompt of ``records`` and judge it with the oracle.

    Args:
        generator: see :class:`Generator`.
        records: e.g. ``load_records(data_dir, "test")``.
        world: the ShapesWorld world (``load_world(data_dir)``); None = no oracle (other data): images
            are generated and returned for FID and the report, accuracies are None.
        n_per_prompt: images per prompt (each judged separately).
        sampling: a :class:`vargpt.config.SamplingConfig` (None = the generator's default).
        max_prompts: use only the first N prompts.
        batch_size: prompts per generator batch.
        previews: ask for the per-scale previews (for the report).

    Returns:
        ``{"n_prompts", "n_images", "accuracy": {key: acc}, "accuracy_n": {key: n}, "seen": {key: acc},
        "unseen": {key: acc}, "n_seen", "n_unseen", "per_task": {task: {key: acc}}, "per_size": {size: {key: acc}}
        over the prompts that ask for a size (ShapesWorld captions), "per_size_n": {size: images},
        "samples": [{"prompt", "image", "previews", "expected", "judged", "combo_seen", "task", "reference",
        "seed"}]}`` with accuracies over judged images (keys in :data:`ORACLE_KEYS`; a key is absent
        when no prompt asked for it; None everywhere without a world).
    """
    from vargpt.data.shapesworld import judge

    items = generation_items(records)[:max_prompts]
    results = _generate(generator, items, n_per_prompt, sampling, batch_size, previews) if items else []
    overall: dict[str, list[bool]] = defaultdict(list)
    by_combo: dict[bool, dict[str, list[bool]]] = {True: defaultdict(list), False: defaultdict(list)}
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    by_size: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    samples = []
    for k, res in enumerate(results):
        it = items[k // n_per_prompt]
        judged = judge(res.image, it.expected, world) if world is not None and it.expected else None
        for key, ok in (judged or {}).items():
            overall[key].append(ok)
            if it.combo_seen is not None:
                by_combo[it.combo_seen][key].append(ok)
            by_task[it.task or "all"][key].append(ok)
            if it.expected.get("size"):
                by_size[it.expected["size"]][key].append(ok)
        samples.append({"prompt": it.prompt, "image": res.image, "previews": list(getattr(res, "previews", []) or []),
                        "expected": it.expected, "judged": judged, "combo_seen": it.combo_seen, "task": it.task,
                        "reference": str(it.reference) if it.reference else None, "seed": getattr(res, "seed", None)})
    judged_any = world is not None and bool(overall)
    return {
        "n_prompts": len(items), "n_images": len(results),
        "accuracy": _rates(overall) if judged_any else None,
        "accuracy_n": {k: len(overall[k]) for k in ORACLE_KEYS if overall.get(k)} if judged_any else None,
        "seen": _rates(by_combo[True]) if judged_any else None,
        "unseen": _rates(by_combo[False]) if judged_any else None,
        "n_seen": sum(s["combo_seen"] is True for s in samples if s["judged"]),
        "n_unseen": sum(s["combo_seen"] is False for s in samples if s["judged"]),
        "per_task": {t: _rates(h) for t, h in sorted(by_task.items())} if judged_any else None,
        "per_size": {z: _rates(h) for z, h in sorted(by_size.items())} if judged_any else None,
        "per_size_n": {z: len(h["size"]) for z, h in sorted(by_size.items())} if judged_any else None,
        "samples": samples,
    }


REPLY_KEYS: tuple[str, ...] = ("colour", "shape", "size", "position", "all")
"""Attributes :func:`evaluate_replies` checks in the reply text (``all``: every one the reply names)."""


def reply_names(text: str, expected: Mapping[str, str], world: World) -> dict[str, bool]:
    """How ``text`` states each of ``expected``'s attributes that it names at all: True when the only word of
    that attribute's vocabulary in it is the expected one ("a red circle" for red/circle), False when
    another one is there ("a red cross": shape False; "red or blue": colour False). An attribute the text
    does not name is left out (a reply may just say "Sure."). ``all``: every named attribute right
    (absent when none is named)."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    vocab = world.vocabularies()
    named = {k: not (words & vocab[k]) - {v} for k, v in expected.items() if k in vocab and words & vocab[k]}
    return {**named, "all": all(named.values())} if named else {}


def evaluate_replies(
    generator: Generator, records: Sequence[Record], world: World, *, sampling: Any = None,
    max_prompts: int | None = 128, batch_size: int = 16, finish_reply: bool = True,
) -> dict[str, Any]:
    """Does the model's own reply to a generation prompt say what it was asked to draw, and does it end?

    Each prompt is run as a chat would run it (``lead_in=True``: the model writes its reply text and
    starts the image itself; ``finish_reply=True``: after the image it goes on until it writes ``</s>``
    or the text budget ends), and the text before the image is checked with :func:`reply_names` against
    the attributes the prompt states. The image-accuracy evaluation forces the image right after the
    prompt and stops there, so it never sees this text; a user does ("Here is a red diamond." for a red
    circle, or "... <image_gen> ring ring ring ..." to the token limit after a good image).
    Replies need not restate the request (ShapesWorld's own replies are sometimes just "Sure."), so
    accuracies are over the replies that name the attribute, and ``named`` says how many did.

    Args:
        finish_reply: let each reply go on after its image (the ``runaway`` and ``after_image`` rates);
            False stops at the image, as before (only the text before it is generated).

    Returns:
        ``{"n", "accuracy": {key: rate}, "named": {key: share of replies naming it}, "seen", "unseen"
        (accuracies over prompts whose colour x shape combination was / was not in training),
        "runaway" (share of replies still going when the text budget ran out: the model did not end its
        reply; None without ``finish_reply``), "after_image" (share with any text after the image;
        ShapesWorld's own replies have none; None without ``finish_reply``), "forced_image" (share of replies
        that had not started the image when their text budget ran out: asked to draw, the model wrote text
        instead; its image was then forced), "samples": [{"prompt",
        "reply", "expected", "named", "combo_seen", "finish_reason"}]}``; keys in :data:`REPLY_KEYS`
        (``all``: every named attribute right); a key is absent when no reply names it.
    """
    items = [it for it in generation_items(records) if it.expected][:max_prompts]
    extra = {"finish_reply": True} if finish_reply else {}
    results = generator.generate_images([it.prompt for it in items], sampling=sampling, batch_size=batch_size,
                                        lead_in=True, **extra) if items else []
    if len(results) != len(items):
        raise RuntimeError(f"the generator returned {len(results)} replies for {len(items)} prompts")
    overall: dict[str, list[bool]] = defaultdict(list)
    by_combo: dict[bool, dict[str, list[bool]]] = {True: defaultdict(list), False: defaultdict(list)}
    samples = []
    runaway = after_image = forced = 0
    for it, res in zip(items, results, strict=True):
        text = str(getattr(res, "text", "") or "")
        lead_in, _, tail = text.partition(IMAGE_GEN)
        reason = getattr(res, "finish_reason", None)
        runaway += reason == "length"
        forced += bool(getattr(res, "image_forced", False))
        after_image += bool(tail.strip())
        named = reply_names(lead_in, it.expected, world)
        for key, ok in named.items():
            overall[key].append(ok)
            if it.combo_seen is not None:
                by_combo[it.combo_seen][key].append(ok)
        samples.append({"prompt": it.prompt, "reply": text, "expected": it.expected, "named": named,
                        "combo_seen": it.combo_seen, "finish_reason": reason})

    def rates(hits: Mapping[str, list[bool]]) -> dict[str, float]:
        return {k: round(sum(hits[k]) / len(hits[k]), 4) for k in REPLY_KEYS if hits.get(k)}

    def share(count: int, *, needs_finish: bool = True) -> float | None:
        return round(count / len(items), 4) if items and (finish_reply or not needs_finish) else None

    return {"n": len(items), "accuracy": rates(overall),
            "named": {k: round(len(overall[k]) / len(items), 4) for k in REPLY_KEYS if overall.get(k)},
            "seen": rates(by_combo[True]), "unseen": rates(by_combo[False]), "runaway": share(runaway),
            "after_image": share(after_image), "forced_image": share(forced, needs_finish=False),
            "samples": samples}


# --------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------


def gaussian_stats(feats_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of features ``(N, D)``, N >= 2."""
    feats = np.asarray(feats_ND, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # A singular product (rank-deficient covariances) makes scipy warn; the caller checks the result
    # instead (non-finite -> retry with eps * I; complex -> checked), as pytorch-fid's disp=False does.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def fid_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, *,
                   eps: float = 1e-6) -> float:
    """Frechet distance ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` between two Gaussians.

    Numerics as in the reference implementations (TTUR, pytorch-fid): when ``sqrtm`` of the product
    is not finite (near-singular covariances, e.g. fewer samples than dimensions), ``eps * I`` is
    added to both covariances; a complex result whose diagonal has imaginary parts above 1e-3 is an
    error, smaller imaginary parts (round-off) are dropped.

    Raises:
        ValueError: mismatched shapes, or a significantly complex matrix square root.
    """
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != (mu_a.size, mu_a.size):
        raise ValueError(f"mismatched statistics: mu {mu_a.shape} vs {mu_b.shape}, sigma {sigma_a.shape} vs "
                         f"{sigma_b.shape}")
    diff = mu_a - mu_b
    covmean = _sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        logger.warning("FID: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = _sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(f"FID: matrix square root has imaginary component {max_imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray, *, eps: float = 1e-6) -> float:
    """FID between two feature sets ``(N_a, D)`` and ``(N_b, D)`` (see :func:`fid_from_stats`)."""
    return fid_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b), eps=eps)


def compute_fid(extractor: FeatureExtractor, real: Sequence[Image.Image | str | Path],
                generated: Sequence[Image.Image | str | Path]) -> float:
    """FID between ``real`` and ``generated`` images under ``extractor``."""
    return fid_from_features(extractor(list(real)), extractor(list(generated)))
