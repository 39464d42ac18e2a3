"""Tokenizer ceiling: the oracle on reconstructions, with stand-in tokenizers that are perfect or useless."""

from types import SimpleNamespace

import torch

from vargpt.data.shapesworld import load_world
from vargpt.evaluation.tokenizer import one_object_images, tokenizer_oracle_scores


class _StandIn:
    """``reconstruct`` = identity (a perfect tokenizer) or a flat grey image (one that keeps nothing)."""

    def __init__(self, perfect: bool) -> None:
        self.perfect, self.cfg = perfect, SimpleNamespace(image_size=32)

    def reconstruct(self, x):
        return x.clone() if self.perfect else torch.zeros_like(x)


def test_one_object_images_are_distinct_and_single(test_records):
    items = one_object_images(test_records)
    assert items and len({p for p, _ in items}) == len(items)
    assert all({"colour", "shape"} <= set(obj) for _, obj in items)


def test_perfect_tokenizer_scores_like_the_originals_and_a_useless_one_scores_zero(shapes_dir, test_records):
    world = load_world(shapes_dir)
    perfect = tokenizer_oracle_scores(_StandIn(True), test_records, world)
    assert perfect["tokenizer_oracle_n"] > 0
    assert perfect["tokenizer_oracle_accuracy"] == perfect["tokenizer_oracle_original"] >= 0.95
    assert perfect["tokenizer_psnr"] > 90  # exact reconstruction: MSE clamped at 1e-10
    useless = tokenizer_oracle_scores(_StandIn(False), test_records, world)
    assert useless["tokenizer_oracle_accuracy"] == 0.0 and useless["tokenizer_psnr"] < 15


def test_records_without_objects_give_null_accuracy(test_records, shapes_dir):
    bare = [r for r in test_records if not r.meta.get("objects")][:3]
    scores = tokenizer_oracle_scores(_StandIn(True), bare, load_world(shapes_dir))
    assert scores["tokenizer_oracle_n"] == 0 and scores["tokenizer_oracle_accuracy"] is None


def test_psnr_by_scales_ends_at_the_full_reconstruction():
    from vargpt.config import VARGPTConfig
    from vargpt.evaluation.tokenizer import psnr_by_scales
    from vargpt.tokenizer.vqvae import MultiScaleVQVAE

    vq = MultiScaleVQVAE(VARGPTConfig.from_name("tiny").vqvae).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    curve = psnr_by_scales(vq, x)
    assert len(curve) == len(vq.cfg.patch_nums)
    with torch.no_grad():
        mse = float(((vq.reconstruct(x).clamp(-1, 1) - x) ** 2).mean())
    assert abs(curve[-1] - 10 * torch.log10(torch.tensor(4.0 / mse)).item()) < 0.01
    assert len(set(curve)) > 1  # partial f_hats decode to different images
