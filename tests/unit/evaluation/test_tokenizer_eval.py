"""Tokenizer ceiling: the oracle on reconstructions, with stand-in tokenizers that are perfect or useless."""

from types import SimpleNamespace

import pytest
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


class _ProbeStandIn:
    """A "tokenizer" whose latent is the image itself, rearranged losslessly into an 8x8 map of 48 channels (a
    tokenizer's latent size), and whose quantizer keeps everything or nothing."""

    def __init__(self, keep: bool) -> None:
        self.cfg = SimpleNamespace(image_size=32)
        self.quantize = SimpleNamespace(f_to_idx_and_fhat=lambda f: (None, [f if keep else torch.zeros_like(f)]))

    def encode_f(self, x):
        return torch.nn.functional.pixel_unshuffle(x, 4)


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    from vargpt.data.shapesworld import write_dataset

    d = tmp_path_factory.mktemp("probe_world")
    write_dataset(d, n_train=400, n_test=200, seed=1, progress=False)
    return d


def test_shape_probe_reads_what_the_latent_keeps_and_nothing_once_quantization_drops_it(probe_dir):
    from vargpt.data.records import load_records
    from vargpt.evaluation.tokenizer import shape_probe_scores

    train, test = load_records(probe_dir, "train"), load_records(probe_dir, "test")
    keep = shape_probe_scores(_ProbeStandIn(True), train, test, size=None, steps=300)
    assert keep["probe_size"] is None and keep["probe_train_n"] > 100 and keep["probe_test_n"] > 50
    assert len(keep["probe_shapes"]) == 8
    assert keep["probe_latent"] == keep["probe_quantized"] >= 0.5  # the image shows the shape (chance 0.125)
    drop = shape_probe_scores(_ProbeStandIn(False), train, test, size=None, steps=300)
    assert drop["probe_latent"] == keep["probe_latent"]  # seeded: the same probe on the same maps
    # Nothing left after quantization: one guess for every image, right for one shape only.
    per_shape = sorted(drop["probe_quantized_per_shape"].values())
    assert per_shape[-1] == 1.0 and set(per_shape[:-1]) == {0.0}
    assert drop["probe_quantized"] <= 0.35


def test_shape_probe_without_such_images_gives_null(probe_dir, test_records):
    from vargpt.data.records import load_records
    from vargpt.evaluation.tokenizer import shape_probe_scores

    none = shape_probe_scores(_ProbeStandIn(True), load_records(probe_dir, "train"), test_records, size="huge")
    assert none["probe_latent"] is None and none["probe_train_n"] == 0
