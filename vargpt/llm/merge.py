"""Placing image features at ``<image>`` slots of the LLM input (LLaVA-1.5, SPEC 3.3 / 3.5 step 3).

Each input image occupies exactly P consecutive ``<image>`` ids in the LLM input (P = vision patches,
CLS dropped). A dataset writes one ``<image>`` per image; :func:`expand_image_tokens` turns each into
P. :func:`merge_image_features` then replaces the embeddings at those slots with the projected
features, images in order (row-major over the batch, then left to right).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ImageCountMismatchError", "expand_image_tokens", "merge_image_features"]


class ImageCountMismatchError(ValueError):
    """The number of ``<image>`` slots does not match the number of image features given."""


def expand_image_tokens(
    ids: Sequence[int], image_id: int, num_slots: int, labels: Sequence[int] | None = None,
    *, ignore_index: int = -100,
) -> list[int] | tuple[list[int], list[int]]:
    """Replace every ``image_id`` in ``ids`` by ``num_slots`` copies of it.

    Args:
        ids: token ids with one ``image_id`` per image.
        image_id: id of ``<image>``.
        num_slots: P, the feature vectors per image.
        labels: optional per-token labels aligned with ``ids``; expanded slots get ``ignore_index``.

    Returns:
        The expanded ids, or ``(ids, labels)`` when ``labels`` is given.
    """
    if num_slots <= 0:
        raise ValueError(f"num_slots must be positive, got {num_slots}")
    if labels is not None and len(labels) != len(ids):
        raise ValueError(f"labels ({len(labels)}) and ids ({len(ids)}) differ in length")
    out_ids: list[int] = []
    out_labels: list[int] = []
    for i, t in enumerate(ids):
        t = int(t)
        if t == image_id:
            out_ids.extend([image_id] * num_slots)
            out_labels.extend([ignore_index] * num_slots)
        else:
            out_ids.append(t)
            out_labels.append(int(labels[i]) if labels is not None else ignore_index)
    return out_ids if labels is None else (out_ids, out_labels)


def merge_image_features(
    embeds_BTD: torch.Tensor, ids_BT: torch.Tensor, image_id: int, feats_NPD: torch.Tensor,
) -> torch.Tensor:
    """Return ``embeds_BTD`` with rows at ``<image>`` slots replaced by the image features, in order.

    Out of place; differentiable with respect to both ``embeds_BTD`` and ``feats_NPD``.

    Args:
        embeds_BTD: text embeddings of ``ids_BT``.
        ids_BT: input ids, every image expanded to P consecutive ``image_id``.
        image_id: id of ``<image>``.
        feats_NPD: projected features of the N images (N may be 0).

    Raises:
        ImageCountMismatchError: the slot count is not N * P, or a run of slots is not a multiple of P.
    """
    slots_BT = ids_BT == image_id
    num_images, num_patches = feats_NPD.shape[0], feats_NPD.shape[1]
    num_slots = int(slots_BT.sum())
    if num_slots != num_images * num_patches:
        raise ImageCountMismatchError(
            f"the input has {num_slots} <image> slots but {num_images} image(s) x {num_patches} features "
            f"= {num_images * num_patches} were given (expand each <image> to {num_patches} slots with "
            "expand_image_tokens and pass one image per <image>)")
    if num_slots == 0:
        return embeds_BTD
    _check_runs(slots_BT, num_patches)
    feats_SD = feats_NPD.reshape(-1, feats_NPD.shape[-1]).to(embeds_BTD.dtype)
    return embeds_BTD.masked_scatter(slots_BT[..., None], feats_SD)


def _check_runs(slots_BT: torch.Tensor, num_patches: int) -> None:
    """Every maximal run of consecutive slots must hold a whole number of images."""
    padded = torch.nn.functional.pad(slots_BT.int(), (1, 1))
    edges = padded.diff(dim=1)
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
    lengths = ends[:, 1] - starts[:, 1]
    bad = lengths % num_patches != 0
    if bad.any():
        raise ImageCountMismatchError(
            f"a run of {int(lengths[bad][0])} consecutive <image> slots is not a multiple of "
            f"P={num_patches}")
