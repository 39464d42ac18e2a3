"""VARGPT stages end to end on a tiny random model and a small ShapesWorld: each stage trains, saves, reloads."""

import dataclasses
import json

import pytest
import torch

from vargpt.config import VARGPTConfig
from vargpt.data.shapesworld import write_dataset
from vargpt.model import VARGPT
from vargpt.pretrained import load_pretrained, save_pretrained
from vargpt.special_tokens import SpecialTokenIds
from vargpt.training.vargpt_trainer import train_stage


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_tokenizer):
    root = tmp_path_factory.mktemp("stages")
    write_dataset(root / "data", n_train=24, n_test=8, seed=0, progress=False)
    torch.manual_seed(0)
    model = VARGPT.from_config(VARGPTConfig.from_name("tiny"), SpecialTokenIds.from_tokenizer(hf_tokenizer))
    save_pretrained(model, hf_tokenizer, root / "stage0")
    return root


def test_three_stages_train_only_their_parameters(setup):
    root = setup
    before, _ = load_pretrained(root / "stage0")
    prev = root / "stage0"
    for n in (1, 2, 3):
        out = root / f"stage{n}"
        metrics = train_stage(f"stage{n}", from_dir=prev, data_dir=root / "data", out_dir=out, max_steps=2,
                              max_eval=8, progress=False)
        assert metrics["steps"] == 2 and metrics["heldout_loss_after"] is not None
        assert json.loads((out / "metrics.json").read_text())["stage"] == f"stage{n}"
        after, _ = load_pretrained(out)
        changed = {k for k, v in after.state_dict().items()
                   if v.dtype.is_floating_point and not torch.equal(v, before.state_dict()[k])}
        prefix = {1: ("image_gen_projector", "vargpt_gen.class_", "vargpt_gen.pos_start"),
                  2: ("language_model", "multi_modal_projector"),
                  3: ("vargpt_gen", "image_gen_projector")}[n]
        assert changed and all(k.startswith(prefix) for k in changed), (n, sorted(changed)[:5])
        before, prev = after, out
    # An interrupted-and-resumed stage ends at the same step count.
    res = train_stage("stage3", from_dir=root / "stage2", data_dir=root / "data", out_dir=root / "stage3",
                      max_steps=3, resume=True, max_eval=8, progress=False)
    assert res["steps"] == 3


def test_generated_images_carry_their_decoder_class(setup, hf_tokenizer):
    """VARGPTDataset labels each generated image with its record's class index in the decoder's
    ``class_names`` (-1 when absent), and the collated batch keeps them in generation-slot order."""
    from vargpt.data.datasets import VARGPTDataset, collate_vargpt
    from vargpt.data.records import load_records

    recs = [r for r in load_records(setup / "data", "train") if r.is_generation][:6]
    names = sorted({r.cls for r in recs if r.cls})[:-1]  # leave one class out -> label -1
    cfg = VARGPTConfig.from_name("tiny")
    cfg = dataclasses.replace(cfg, visual_decoder=dataclasses.replace(cfg.visual_decoder, class_names=tuple(names)))
    model = VARGPT.from_config(cfg, SpecialTokenIds.from_tokenizer(hf_tokenizer))
    ds = VARGPTDataset(recs, hf_tokenizer, model, progress=False)
    want = [names.index(r.cls) if r.cls in names else -1 for r in recs]
    assert [int(s.gen_labels[0]) for s in ds] == want and -1 in want
    batch = collate_vargpt([ds[i] for i in range(len(ds))], model.token_ids.pad)
    assert batch.gen_labels.tolist() == want
    out = model(batch, text_weight=0.0, image_weight=0.0, align_weight=1.0)
    assert out.align_loss > 0 and torch.isfinite(out.loss)


def test_shuffled_prompt_metric_is_zero_gap_only_when_the_prompt_is_unused(setup, hf_tokenizer):
    from vargpt.data.datasets import VARGPTDataset
    from vargpt.data.records import load_records
    from vargpt.training.vargpt_trainer import heldout_metrics

    model, tok = load_pretrained(setup / "stage0")
    recs = [r for r in load_records(setup / "data", "train") if r.is_generation][:6]
    ds = VARGPTDataset(recs, tok, model, progress=False)
    with torch.no_grad():  # residual input, fixed condition, zero out-projector: the decoder ignores the LLM
        model.image_gen_projector_out.mlp[2].weight.zero_()
        model.image_gen_projector_out.mlp[2].bias.zero_()
    model.cfg = dataclasses.replace(
        model.cfg, gen_projector=dataclasses.replace(model.cfg.gen_projector, decoder_condition="fixed"))
    true, shuf = heldout_metrics(model, ds), heldout_metrics(model, ds, shuffle_prompts=True)
    assert abs(true["image_loss"] - shuf["image_loss"]) < 1e-5
    with torch.no_grad():
        model.image_gen_projector_out.mlp[2].weight.normal_(0.0, 0.5)
        if model.image_gen_input_gate is not None:  # the tiny preset's token-path gate starts closed
            model.image_gen_input_gate.fill_(1.0)
    true, shuf = heldout_metrics(model, ds), heldout_metrics(model, ds, shuffle_prompts=True)
    assert abs(true["image_loss"] - shuf["image_loss"]) > 1e-4


def test_grouped_mixed_batch_gives_the_whole_batch_loss_and_gradients(setup):
    """Stage 2's mixed batch collated as two sub-batches (understanding / generation, each padded to its own
    length) gives the same loss terms and the same gradients as one padded batch."""
    from vargpt.data.datasets import VARGPTDataset, collate_vargpt, collate_vargpt_groups
    from vargpt.data.records import load_records
    from vargpt.training.vargpt_trainer import stage_loss_fn

    model, tok = load_pretrained(setup / "stage0")
    model.train()
    # no random condition drops (the decoder's class dropout, the model's noise-CFG counterpart)
    model.vargpt_gen.cfg = dataclasses.replace(model.vargpt_gen.cfg, cond_drop_rate=0.0)
    model.cfg = dataclasses.replace(model.cfg, visual_decoder=model.vargpt_gen.cfg)
    recs = load_records(setup / "data", "train")
    und = [r for r in recs if not r.is_generation][:5]
    gen = [r for r in recs if r.is_generation][:3]
    ds = VARGPTDataset([und[0], gen[0], *und[1:3], gen[1], *und[3:], gen[2]], tok, model, progress=False)
    samples = [ds[i] for i in range(len(ds))]
    groups = collate_vargpt_groups(samples, model.token_ids.pad)
    whole = collate_vargpt(samples, model.token_ids.pad)
    assert len(groups) == 2 and groups[0].gen_codes is None and groups[1].gen_codes[0].shape[0] == 3
    assert groups[0].input_ids.shape[1] < whole.input_ids.shape[1]  # the understanding group is shorter
    loss_fn = stage_loss_fn(1.0, 1.0, 1.0)
    results = []
    for batch in (whole, groups):
        model.zero_grad(set_to_none=True)
        out = loss_fn(model, batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: float(v.detach()) for k, v in out.items()}, grads))
    (m1, g1), (m2, g2) = results
    assert m1.keys() == m2.keys()
    for k in m1:
        assert abs(m1[k] - m2[k]) < 1e-5, (k, m1[k], m2[k])
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="one"):
        loss_fn(model, [collate_vargpt(samples[1:2], model.token_ids.pad),
                        collate_vargpt(samples[4:5], model.token_ids.pad)])


def test_encoder_cache_reuses_only_what_the_same_encoders_computed(setup, hf_tokenizer):
    """Datasets built with one EncoderCache encode each image once; the cached features and codes equal
    freshly computed ones; other encoder weights or a rewritten file are encoded anew."""
    import os

    from vargpt.data.datasets import EncoderCache, VARGPTDataset
    from vargpt.data.records import load_records

    model, tok = load_pretrained(setup / "stage0")
    recs = load_records(setup / "data", "train")
    und = [r for r in recs if r.is_understanding][:5]
    gen = [r for r in recs if r.is_generation][:5]
    mixed = und[:3] + gen[:3]
    # one entry per (encoder, image): an image can be both an input (vision) and a target (VQ)
    n_images = len({p for r in mixed for p in r.input_images}) + len({p for r in mixed for p in r.generated_images})
    cache = EncoderCache()
    first = VARGPTDataset(mixed, tok, model, progress=False, cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, n_images, n_images)
    second = VARGPTDataset(und + gen, tok, model, progress=False, cache=cache)
    assert cache.hits == n_images  # the first dataset's images are not encoded again
    fresh = VARGPTDataset(und + gen, tok, model, progress=False)
    for a, b in zip(second, fresh, strict=True):
        for x, y in ((a.image_feats, b.image_feats), *zip(a.gen_codes or (), b.gen_codes or (), strict=True)):
            assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, atol=1e-5))
    for a, b in zip(first, [second[i] for i in (0, 1, 2, 5, 6, 7)], strict=True):  # same records, same tensors
        assert a.encoded == b.encoded
        assert (a.image_feats is None and b.image_feats is None) or torch.equal(a.image_feats, b.image_feats)
        assert all(torch.equal(x, y) for x, y in zip(a.gen_codes or (), b.gen_codes or (), strict=True))
    # Another VQ-VAE: its codes are computed, not served from the cache (the tower's features still are).
    hits, misses = cache.hits, cache.misses
    with torch.no_grad():
        model.vae_local.quantize.embedding.weight.mul_(-1.0)
    VARGPTDataset(gen[:3], tok, model, progress=False, cache=cache)
    assert cache.misses - misses == len({p for r in gen[:3] for p in r.generated_images}) and cache.hits == hits
    # A rewritten file (new modification time) is encoded anew.
    path = und[0].images[0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    misses = cache.misses
    VARGPTDataset(und[:1], tok, model, progress=False, cache=cache)
    assert cache.misses == misses + 1
    # A file deleted since its split was read is a named error, not a raw OSError.
    from vargpt.data.records import DatasetError

    with pytest.raises(DatasetError, match="image file not found"):
        cache.get("vision:x", [path.with_name("gone.png")], lambda ps: {})


def test_heldout_metrics_are_token_means_whatever_the_batching(setup):
    """heldout_metrics is the stage's evaluation: token-weighted means (the same for any batch size, mixed
    batches padded per group), and with weights a ``loss`` that combines them as the stage does."""
    from vargpt.data.datasets import VARGPTDataset
    from vargpt.data.records import load_records
    from vargpt.training.vargpt_trainer import heldout_metrics

    _, tok = load_pretrained(setup / "stage0")
    recs = load_records(setup / "data", "test")
    mixed = [r for r in recs if r.is_understanding][:5] + [r for r in recs if r.is_generation][:4]
    cfg = VARGPTConfig.from_name("tiny")  # the generated images' classes are decoder classes: alignment loss
    names = tuple(sorted({r.cls for r in mixed if r.cls}))
    cfg = dataclasses.replace(cfg, visual_decoder=dataclasses.replace(cfg.visual_decoder, class_names=names))
    torch.manual_seed(0)
    model = VARGPT.from_config(cfg, SpecialTokenIds.from_tokenizer(tok))
    ds = VARGPTDataset(mixed, tok, model, progress=False)
    whole = heldout_metrics(model, ds, batch_size=len(ds), weights=(1.0, 2.0, 0.5))
    small = heldout_metrics(model, ds, batch_size=2, weights=(1.0, 2.0, 0.5))
    for k in ("text_loss", "image_loss", "image_code_accuracy", "align_loss", "loss"):
        assert small[k] == pytest.approx(whole[k], rel=1e-5), k
    assert whole["loss"] == pytest.approx(whole["text_loss"] + 2 * whole["image_loss"] + 0.5 * whole["align_loss"])
    assert whole["align_loss"] > 0 and "loss" not in heldout_metrics(model, ds)


def test_a_stage_reports_the_heldout_metrics_of_the_model_it_saved(setup, tmp_path):
    """The stage's final held-out metrics come from the training loop's last evaluation; they are those of
    the saved model, recomputed from scratch."""
    import random

    from vargpt.data.datasets import VARGPTDataset
    from vargpt.data.records import load_records
    from vargpt.training.stages import vargpt_stages
    from vargpt.training.vargpt_trainer import heldout_metrics

    m = train_stage("stage2", from_dir=setup / "stage0", data_dir=setup / "data", out_dir=tmp_path / "s2",
                    max_steps=2, max_eval=8, progress=False)
    model, tok = load_pretrained(tmp_path / "s2")
    test = vargpt_stages("tiny")["stage2"].select(load_records(setup / "data", "test"), 0)
    test = random.Random(0).sample(test, min(8, len(test)))
    # Resuming a finished stage whose checkpoint log predates eval_fn (losses only) recomputes the metrics.
    from vargpt.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = tmp_path / "s2" / "train" / "checkpoint"
    state, config, trainer = load_checkpoint(ckpt)
    trainer["log"] = [{k: v for k, v in r.items() if not k.startswith("eval_") or k == "eval_loss"}
                      for r in trainer["log"]]
    save_checkpoint(ckpt, model_state=state, config=config, trainer_state=trainer)
    resumed = train_stage("stage2", from_dir=setup / "stage0", data_dir=setup / "data", out_dir=tmp_path / "s2",
                          max_steps=2, max_eval=8, progress=False, resume=True)
    for k, v in m["heldout"].items():
        assert resumed["heldout"][k] == pytest.approx(v, rel=1e-5), k
    cfg = vargpt_stages("tiny")["stage2"].train
    again = heldout_metrics(model, VARGPTDataset(test, tok, model, progress=False),
                            weights=(cfg.text_loss_weight, cfg.image_loss_weight, cfg.cond_align_weight))
    assert m["heldout_loss_after"] == pytest.approx(again.pop("loss"), rel=1e-4)
    for k, v in again.items():
        assert m["heldout"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_tiny_stage3_floors_the_scale_shares_of_its_code_loss(setup, tmp_path, monkeypatch):
    """The tiny stage 3 trains with every scale's share of the code loss clamped at >= 0.1 before
    renormalisation (``TrainConfig.image_min_scale_share``; 7.5% for each of the first four scales instead of
    0.02-4.5%); the saved model keeps the decoder's own weighting."""
    import vargpt.model as model_module
    from vargpt.tokenizer.scales import scale_ids
    from vargpt.visual_decoder.loss import token_weights

    seen = []
    real = model_module.code_loss
    monkeypatch.setattr(model_module, "code_loss", lambda lg, gt, w: seen.append(w.clone()) or real(lg, gt, w))
    m = train_stage("stage3", from_dir=setup / "stage0", data_dir=setup / "data", out_dir=tmp_path / "s3",
                    max_steps=1, max_eval=4, progress=False)
    patch_nums = VARGPTConfig.from_name("tiny").vqvae.patch_nums

    def shares(w):
        return torch.zeros(len(patch_nums)).index_add(0, scale_ids(patch_nums), w.float())

    assert m["image_min_scale_share"] == 0.1 and seen
    trained = shares(seen[0])
    assert torch.equal(seen[0], token_weights(patch_nums, "power", 2.0, min_share=0.1))
    assert abs(float(trained.sum()) - 1) < 1e-5 and float(trained[:4].min()) > 0.07
    saved, _ = load_pretrained(tmp_path / "s3")
    own = shares(saved.vargpt_gen.loss_weights_L)
    assert float(own.min()) < 0.01 and torch.allclose(own, shares(saved.vargpt_gen.code_loss_weights()))


def test_tiny_stage3_text_loss_reaches_the_llm_only_through_the_image_slots(setup):
    """Tiny stage 3 keeps the text loss (the paper's preset does not). With the LLM frozen, its gradient reaches
    generation parameters only through the generated image's slots, i.e. the </s> after ``<image_gen_end>``
    trains the projector that feeds the LLM those slots (without it, a stage 3 that trained that projector
    moved them until the LLM kept talking after the image) and the decoder's input embeddings the slots are
    made from; the decoder's blocks and head and the output projector get nothing from it. (The recipe's tiny
    stage 3 freezes that projector and those embeddings; stage-3 runs with other trainable sets train them.)"""
    from vargpt.data.datasets import VARGPTDataset, collate_vargpt
    from vargpt.data.records import load_records
    from vargpt.training.stages import vargpt_stages
    from vargpt.training.vargpt_trainer import stage_loss_fn

    assert vargpt_stages("tiny")["stage3"].train.text_loss_weight == 1.0
    assert vargpt_stages("vargpt-v1-7b")["stage3"].train.text_loss_weight == 0.0
    model, tok = load_pretrained(setup / "stage0")
    model.eval()
    gen = [r for r in load_records(setup / "data", "train") if r.is_generation][:2]
    ds = VARGPTDataset(gen, tok, model, progress=False)
    batch = collate_vargpt([ds[i] for i in range(len(ds))], model.token_ids.pad)
    ends = (batch.input_ids == model.token_ids.image_gen_end).nonzero()
    assert len(ends) == 2 and all(int(batch.labels[b, t + 1]) == tok.eos_token_id for b, t in ends.tolist())
    stage_loss_fn(1.0, 0.0, 0.0)(model, batch)["loss"].backward()

    touched = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert any(n.startswith("image_gen_projector.") for n in touched)
    # stage-3 parameters downstream of the LLM (decoder blocks and head, output projector) get nothing
    assert not any(n.startswith(("image_gen_projector_out.", "vargpt_gen.blocks.", "vargpt_gen.head")) for n in touched)
