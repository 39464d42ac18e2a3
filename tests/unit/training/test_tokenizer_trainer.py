"""Tokenizer trainer: learns, checkpoints loadably, resumes exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from vargpt.config import ConfigError, TrainConfig, VARGPTConfig
from vargpt.tokenizer.vqvae import MultiScaleVQVAE
from vargpt.training.checkpoint import load_checkpoint
from vargpt.training.tokenizer_trainer import (
    RECIPES,
    TokenizerRecipe,
    _loss,
    batch_indices,
    contrast_weights,
    psnr,
    split_images,
    train_tokenizer,
)


@pytest.fixture
def folder(tmp_path):
    """A dataset in the README format: coloured rectangles on plain backgrounds, 32 px."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "img").mkdir()
    for split, n in (("train", 24), ("test", 6)):
        lines = []
        for i in range(n):
            bg = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
            fg = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, 20, (2,), generator=g))
            img = Image.new("RGB", (32, 32), bg)
            img.paste(fg, (x0, y0, x0 + 10, y0 + 8))
            rel = f"img/{split}{i}.png"
            img.save(tmp_path / rel)
            for q in ("What is it?", "Describe it."):  # two records share each image
                lines.append(json.dumps({"messages": [{"role": "user", "content": f"<image>\n{q}"},
                                                      {"role": "assistant", "content": "a box"}],
                                         "images": [rel]}))
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_batch_indices_cover_each_epoch_once():
    got = torch.cat([batch_indices(s, 4, 10, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(got[:10].tolist()) == list(range(10)) and sorted(got[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, 4, 10, seed=3), got[8:12])


def test_psnr_values():
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(x + 0.2, x), torch.full((2,), 10 * torch.log10(torch.tensor(4 / 0.04))))


def test_contrast_weights_follow_edges():
    x = torch.full((2, 3, 8, 8), -1.0)
    x[0, 1, 2:5, 3:6] = 1.0  # a green box on black; image 1 stays flat
    w = contrast_weights(x, 4.0)
    assert w.shape == (2, 1, 8, 8)
    assert torch.allclose(w.mean((2, 3)), torch.ones(2, 1))
    assert torch.equal(w[1], torch.ones(1, 8, 8))  # no contrast: plain mean
    # Contrast 2 on both sides of the box's outline, 0 elsewhere: two weight levels in ratio 1 + 4.
    edge = torch.zeros(8, 8, dtype=torch.bool)
    edge[1:6, 2:7] = True
    edge[3, 4] = False  # the box's centre: all neighbours equal it
    hi, lo = w[0, 0][edge], w[0, 0][~edge]
    assert torch.allclose(hi, hi[0].expand_as(hi)) and torch.allclose(lo, lo[0].expand_as(lo))
    assert torch.allclose(hi[0] / lo[0], torch.tensor(5.0))
    assert torch.equal(contrast_weights(x, 0.0), torch.ones(2, 1, 8, 8))


def test_edge_weight_weights_the_pixel_loss():
    torch.manual_seed(0)
    model = MultiScaleVQVAE(VARGPTConfig.from_name("tiny").vqvae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    train = TrainConfig(name="t", max_steps=1, replay_fraction=0.5)
    plain, weighted = TokenizerRecipe(train=train), TokenizerRecipe(train=train, edge_weight=3.0)
    loss0, out0 = _loss(model, x, plain)
    loss1, out1 = _loss(model, x, weighted)
    recon, _, vq = model(x)
    w = contrast_weights(x, 3.0)
    per_image = ((recon - x).square() * w).mean((1, 2, 3))
    assert torch.allclose(loss1, per_image.mean() + vq, atol=1e-6)
    assert torch.allclose(out1["per_image"], per_image, atol=1e-6)  # the replay score is weighted too
    assert torch.allclose(loss0, (recon - x).square().mean() + vq, atol=1e-6)
    assert out0["l2"] == pytest.approx(out1["l2"])  # the logged l2 stays the plain MSE
    with pytest.raises(ValueError, match="edge_weight"):
        TokenizerRecipe(train=train, edge_weight=-1.0)


@pytest.mark.parametrize("edge_weight", [None, 4.0])
def test_short_run_learns_and_saves(folder, tmp_path, edge_weight):
    torch.set_num_threads(1)
    out = tmp_path / "tok"
    m = train_tokenizer(data_dir=folder, out_dir=out, max_steps=40, batch_size=8, progress=False,
                        edge_weight=edge_weight, finetune_steps=0)
    assert m["steps"] == 40 and m["eval_split"] == "test" and m["eval_images"] == 6 and m["finetune"] is None
    assert m["edge_weight"] == (RECIPES["tiny"].edge_weight if edge_weight is None else edge_weight)
    assert m["train_loss"]["loss"] < 0.7 * m["initial_loss"]
    assert 0 < m["codebook_usage"]["overall"] <= 1 and len(m["codebook_usage"]["per_scale"]) == 6
    model = MultiScaleVQVAE.from_pretrained(out)
    x = torch.zeros(1, 3, 32, 32)
    assert model.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("replay", [None, 0.5])
def test_resume_continues_exactly(folder, tmp_path, replay):
    torch.set_num_threads(1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_tokenizer(data_dir=folder, out_dir=straight, max_steps=5, batch_size=4, progress=False,
                    replay_fraction=replay, finetune_steps=0)
    # time_budget_s=0 stops (and checkpoints) after the first step, as an interruption would.
    first = train_tokenizer(data_dir=folder, out_dir=split, max_steps=5, batch_size=4, progress=False,
                            time_budget_s=0, replay_fraction=replay, finetune_steps=0)
    assert first["steps"] == 1 and first["stopped_early"]
    _, _, trainer = load_checkpoint(split)
    assert trainer["step"] == 1
    second = train_tokenizer(data_dir=folder, out_dir=split, max_steps=5, batch_size=4, progress=False,
                             resume=True, replay_fraction=replay, finetune_steps=0)
    saved = load_checkpoint(split)[2]["replay"]
    assert saved is None if replay is None else saved["batch"] == 5
    assert second["steps"] == 5 and not second["stopped_early"]
    a_state, _, a_trainer = load_checkpoint(straight)
    b_state, _, b_trainer = load_checkpoint(split)
    assert b_trainer["step"] == 5
    adam_steps = {float(s["step"]) for s in b_trainer["optimizer"]["state"].values()}
    assert adam_steps == {5.0}
    assert b_trainer["scheduler"]["last_epoch"] == a_trainer["scheduler"]["last_epoch"] == 5
    for k, v in a_state.items():
        torch.testing.assert_close(b_state[k], v, rtol=0, atol=1e-6, msg=k)


def test_decoder_finetuning_keeps_the_codes(folder, tmp_path, monkeypatch):
    """The second phase trains post_quant_conv + decoder only: same codes, lower loss, a sharper decoder."""
    torch.set_num_threads(1)
    recipe = RECIPES["tiny"]
    monkeypatch.setitem(RECIPES, "tiny", dataclasses.replace(
        recipe, finetune=dataclasses.replace(recipe.finetune, batch_size=8)))
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    train_tokenizer(data_dir=folder, out_dir=plain, max_steps=20, batch_size=8, progress=False, finetune_steps=0)
    m = train_tokenizer(data_dir=folder, out_dir=tuned, max_steps=20, batch_size=8, progress=False,
                        finetune_steps=30)
    ft = m["finetune"]
    assert ft["steps"] == 30 and ft["edge_weight"] == RECIPES["tiny"].finetune_edge_weight
    assert ft["loss"] < ft["initial_loss"] and not m["stopped_early"]
    assert m["train_seconds"] >= ft["train_seconds"] > 0
    a, b = MultiScaleVQVAE.from_pretrained(plain), MultiScaleVQVAE.from_pretrained(tuned)
    a_state, b_state = a.state_dict(), b.state_dict()
    trained = [k for k in a_state if k.startswith(("decoder.", "post_quant_conv."))]
    assert trained and len(trained) < len(a_state)
    for k, v in a_state.items():
        if k in trained:
            continue
        assert torch.equal(b_state[k], v), k  # encoder, quant_conv, codebook, phi: untouched
    assert all(not torch.equal(b_state[k], a_state[k]) for k in ("decoder.conv_out.weight", "post_quant_conv.weight"))
    x = torch.stack([torch.rand(3, 32, 32) * 2 - 1 for _ in range(4)])
    for ca, cb in zip(a.encode(x), b.encode(x), strict=True):
        assert torch.equal(ca, cb)
    # Its training images, decoded from the same codes, are reconstructed better after finetuning.
    train = split_images(folder, "train", 32)
    assert float(psnr(b.reconstruct(train), train).mean()) > float(psnr(a.reconstruct(train), train).mean())
    _, _, trainer = load_checkpoint(tuned)
    assert trainer["finetune"]["step"] == 30 and trainer["step"] == 20


@pytest.mark.parametrize("replay", [0.0, 0.5])
def test_decoder_finetuning_resumes_exactly(folder, tmp_path, monkeypatch, replay):
    import vargpt.training.tokenizer_trainer as tt

    torch.set_num_threads(1)
    recipe = RECIPES["tiny"]
    monkeypatch.setitem(RECIPES, "tiny", dataclasses.replace(
        recipe, finetune=dataclasses.replace(recipe.finetune, batch_size=4, save_every=2)))
    straight, split = tmp_path / "straight", tmp_path / "split"
    kw = dict(data_dir=folder, max_steps=4, batch_size=4, progress=False, finetune_steps=6,
              finetune_replay_fraction=replay)
    train_tokenizer(out_dir=straight, **kw)

    calls = {"n": 0}
    real_loss = tt._finetune_loss

    def crash_on_fifth(*args, **kwargs):
        calls["n"] += args[0].requires_grad  # training steps only, not the replay's scoring pass
        if calls["n"] == 5:
            raise KeyboardInterrupt  # an interruption after the step-4 checkpoint
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(tt, "_finetune_loss", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(out_dir=split, **kw)
    assert load_checkpoint(split)[2]["finetune"]["step"] == 4
    monkeypatch.setattr(tt, "_finetune_loss", real_loss)
    m = train_tokenizer(out_dir=split, resume=True, **kw)
    assert m["finetune"]["steps"] == 6 and not m["stopped_early"]
    a_state, _, a_trainer = load_checkpoint(straight)
    b_state, _, b_trainer = load_checkpoint(split)
    assert b_trainer["finetune"]["scheduler"]["last_epoch"] == a_trainer["finetune"]["scheduler"]["last_epoch"] == 6
    for k, v in a_state.items():
        torch.testing.assert_close(b_state[k], v, rtol=0, atol=1e-6, msg=k)
    if replay:  # every image scored from the start (the scoring pass), and the scores resumed with the rest
        scores_a, scores_b = a_trainer["finetune"]["replay"]["scores"], b_trainer["finetune"]["replay"]["scores"]
        assert scores_a.shape == (split_images(folder, "train", 32).shape[0],) and not scores_a.isnan().any()
        torch.testing.assert_close(scores_b, scores_a, rtol=0, atol=1e-6)
    else:
        assert "replay" not in a_trainer["finetune"]
    with pytest.raises(ConfigError, match="finetune_steps"):
        train_tokenizer(out_dir=tmp_path / "bad", data_dir=folder, max_steps=1, progress=False, finetune_steps=-1)
    with pytest.raises(ConfigError, match="replay_fraction"):
        train_tokenizer(out_dir=tmp_path / "bad", data_dir=folder, max_steps=1, progress=False,
                        finetune_replay_fraction=1.5)


@pytest.fixture
def split_kw(folder, monkeypatch):
    """Arguments of a tiny main phase (4 steps of 4) whose decoder finetuning also takes batches of 4."""
    torch.set_num_threads(1)
    recipe = RECIPES["tiny"]
    monkeypatch.setitem(RECIPES, "tiny", dataclasses.replace(
        recipe, finetune=dataclasses.replace(recipe.finetune, batch_size=4)))
    return dict(data_dir=folder, max_steps=4, batch_size=4, progress=False)


def test_finetuning_a_copied_main_phase_equals_one_run(split_kw, tmp_path):
    """The recipe's split: the main phase in one folder, its decoder finetuned in another (``init_from``)."""
    from vargpt.training.checkpoint import CheckpointError

    kw = split_kw
    train_tokenizer(out_dir=tmp_path / "one", finetune_steps=5, **kw)
    main = train_tokenizer(out_dir=tmp_path / "main", finetune_steps=0, **kw)
    assert main["finetune"] is None and not main["stopped_early"]
    main_bytes = {p.name: p.read_bytes() for p in (tmp_path / "main").iterdir()}
    tuned = train_tokenizer(out_dir=tmp_path / "tuned", init_from=tmp_path / "main", resume=True,
                            finetune_steps=5, **kw)
    assert tuned["steps"] == 4 and tuned["finetune"]["steps"] == 5 and tuned["initial_loss"] is None
    assert {p.name: p.read_bytes() for p in (tmp_path / "main").iterdir()} == main_bytes  # never written
    a_state, _, _ = load_checkpoint(tmp_path / "one")
    b_state, _, _ = load_checkpoint(tmp_path / "tuned")
    for k, v in a_state.items():
        assert torch.equal(b_state[k], v), k
    with pytest.raises(CheckpointError, match="init_from"):
        train_tokenizer(out_dir=tmp_path / "x", init_from=tmp_path / "nothing", **kw)


def test_a_run_folder_from_before_the_split_resumes(folder, split_kw, tmp_path):
    """An old run's one-step tokenizer (main phase + finetuning in RUN/tokenizer) becomes the new layout."""
    from vargpt.recipe import migrate_split_tokenizer

    kw = split_kw
    run = tmp_path / "run"
    train_tokenizer(out_dir=run / "tokenizer", finetune_steps=3, **kw)  # the old layout's step
    assert not migrate_split_tokenizer(run, set())  # its step not done: nothing to bring over
    assert migrate_split_tokenizer(run, {"tokenizer"})
    assert not migrate_split_tokenizer(run, {"tokenizer"})  # once
    old, _, _ = load_checkpoint(run / "tokenizer")
    main, _, _ = load_checkpoint(run / "tokenizer_main")
    assert old.keys() == main.keys() and all(torch.equal(old[k], main[k]) for k in old)
    # the finetuning step (as the recipe calls it) finds its work done: no step runs, nothing changes
    again = train_tokenizer(out_dir=run / "tokenizer", init_from=run / "tokenizer_main", resume=True,
                            finetune_steps=3, **kw)
    assert again["finetune"]["steps"] == 3 and again["initial_loss"] is None
    after, _, _ = load_checkpoint(run / "tokenizer")
    assert all(torch.equal(old[k], after[k]) for k in old)
    codes = [MultiScaleVQVAE.from_pretrained(run / d).eval().encode(split_images(folder, "test", 32))
             for d in ("tokenizer", "tokenizer_main")]
    assert all(torch.equal(a, b) for a, b in zip(*codes, strict=True))


def test_a_dataset_without_training_images_is_a_dataset_error(folder, tmp_path):
    from vargpt.errors import DatasetError

    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="dataset folder not found"):
        train_tokenizer(data_dir=tmp_path / "missing", out_dir=out, max_steps=1, progress=False)
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "train.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(DatasetError, match="no training images"):
        train_tokenizer(data_dir=text_only, out_dir=out, max_steps=1, progress=False)
    assert not out.exists()
    # A test split without images is no held-out set: the run evaluates on its training images instead.
    (folder / "test.jsonl").write_text((text_only / "train.jsonl").read_text())
    assert split_images(folder, "test", 32) is None
    m = train_tokenizer(data_dir=folder, out_dir=out, max_steps=2, batch_size=4, progress=False, finetune_steps=0)
    assert m["eval_split"] == "train"


def test_adversarial_term_trains_a_discriminator_and_resumes_exactly(folder, tmp_path):
    """adv_weight > 0: from adv_start on, a discriminator trains beside the tokenizer; its state lives in the
    trainer state (not in the VQ-VAE's weights), and an interrupted run resumes to the same weights."""
    torch.set_num_threads(1)
    kw = dict(data_dir=folder, max_steps=5, batch_size=4, progress=False, finetune_steps=0, adv_weight=0.5,
              adv_start=2)
    plain = train_tokenizer(data_dir=folder, out_dir=tmp_path / "plain", max_steps=5, batch_size=4, progress=False,
                            finetune_steps=0)
    straight = train_tokenizer(out_dir=tmp_path / "straight", **kw)
    assert plain["adversarial"] is None and load_checkpoint(tmp_path / "plain")[2]["adversary"] is None
    adv = straight["adversarial"]
    assert adv["weight"] == 0.5 and adv["start"] == 2 and adv["adaptive"]
    assert adv["d_loss"] >= 0 and adv["adv_weight"] > 0 and "g_loss" in adv
    a_state, _, a_trainer = load_checkpoint(tmp_path / "straight")
    p_state = load_checkpoint(tmp_path / "plain")[0]
    assert set(a_state) == set(p_state)  # the VQ-VAE's state dict is unchanged by the option
    disc = a_trainer["adversary"]["disc"]
    assert disc and all(torch.isfinite(v).all() for v in disc.values())
    # Steps 0 and 1 are before adv_start: the same weights as the plain run would give after two steps.
    two = tmp_path / "two"
    train_tokenizer(out_dir=two, **(kw | dict(max_steps=2)))
    two_plain = tmp_path / "two_plain"
    train_tokenizer(data_dir=folder, out_dir=two_plain, max_steps=2, batch_size=4, progress=False, finetune_steps=0)
    # (the cosine schedule depends on max_steps, so compare the two 2-step runs with each other)
    for k, v in load_checkpoint(two_plain)[0].items():
        torch.testing.assert_close(load_checkpoint(two)[0][k], v, rtol=0, atol=0, msg=k)
    assert load_checkpoint(two)[2]["adversary"]["optimizer"]["state"] == {}  # not trained before adv_start
    # Interrupted after steps 1, 2 and 3 (a budget already spent stops a run after one step), then finished.
    split = tmp_path / "split"
    assert train_tokenizer(out_dir=split, **kw, time_budget_s=0)["steps"] == 1
    for step in (2, 3):  # the last interruption falls after the term switched on
        spent = load_checkpoint(split)[2]["train_seconds"]
        assert train_tokenizer(out_dir=split, **kw, resume=True, time_budget_s=spent)["steps"] == step
    assert load_checkpoint(split)[2]["adversary"]["optimizer"]["state"]  # the discriminator has trained
    done = train_tokenizer(out_dir=split, **kw, resume=True)
    assert done["steps"] == 5 and not done["stopped_early"]
    b_state, _, b_trainer = load_checkpoint(split)
    for k, v in a_state.items():
        torch.testing.assert_close(b_state[k], v, rtol=0, atol=1e-6, msg=k)
    for k, v in disc.items():
        torch.testing.assert_close(b_trainer["adversary"]["disc"][k], v, rtol=0, atol=1e-6, msg=k)


def test_bad_adversarial_values_are_config_errors(folder, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="adv_weight=-1"):
        train_tokenizer(data_dir=folder, out_dir=tmp_path / "a", max_steps=1, progress=False, adv_weight=-1)
    with pytest.raises(ConfigError, match="adv_start=-3"):
        train_tokenizer(data_dir=folder, out_dir=tmp_path / "b", max_steps=1, progress=False, adv_start=-3)
    with pytest.raises(ConfigError, match="adv_disc_layers=0"):
        dataclasses.replace(RECIPES["tiny"], adv_disc_layers=0)
    with pytest.raises(ConfigError, match="adv_disc_lr=0"):
        dataclasses.replace(RECIPES["tiny"], adv_disc_lr=0.0)
    deep = dataclasses.replace(RECIPES["tiny"], adv_weight=1.0, adv_disc_layers=4)  # 48 px patches > 32 px images
    monkeypatch.setitem(RECIPES, "tiny", deep)
    with pytest.raises(ConfigError, match="adv_disc_layers=4 needs images of at least 48 px"):
        train_tokenizer(data_dir=folder, out_dir=tmp_path / "c", max_steps=1, progress=False)
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_perceptual_term_joins_both_phases(folder, tmp_path, monkeypatch):
    from transformers import ResNetConfig, ResNetModel

    from vargpt.training import tokenizer_trainer as tt

    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = tmp_path / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic")).save_pretrained(str(backbone))
    calls = []
    original = tt.PerceptualLoss.forward
    monkeypatch.setattr(tt.PerceptualLoss, "forward", lambda self, r, t: calls.append(r.shape[0]) or original(
        self, r, t))
    m = train_tokenizer(data_dir=folder, out_dir=tmp_path / "tok", max_steps=3, batch_size=4, progress=False,
                        finetune_steps=2, perceptual_weight=0.5, perceptual_model=backbone)
    assert calls == [4, 4, 4] + [RECIPES["tiny"].finetune.batch_size] * 2  # every step of both phases
    assert m["perceptual"]["weight"] == 0.5 and m["perceptual"]["model"] == str(backbone)
    assert m["perceptual"]["distance"] > 0
    # The logged loss is pixel + 0.5 * perceptual + vq.
    t = m["train_loss"]
    assert t["loss"] == pytest.approx(t["l2"] + 0.5 * t["perceptual"] + t["vq"], rel=1e-4)
    saved = load_checkpoint(tmp_path / "tok")[2]["recipe"]
    assert saved["perceptual_weight"] == 0.5 and saved["perceptual_model"] == str(backbone)


def test_bad_perceptual_settings_fail_before_anything_is_written(folder, tmp_path):
    from vargpt.training.checkpoint import CheckpointError

    with pytest.raises(ConfigError, match="needs perceptual_model"):
        train_tokenizer(data_dir=folder, out_dir=tmp_path / "a", max_steps=1, progress=False, perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="perceptual_weight=-1"):
        train_tokenizer(data_dir=folder, out_dir=tmp_path / "a", max_steps=1, progress=False, perceptual_weight=-1,
                        perceptual_model=tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        train_tokenizer(data_dir=folder, out_dir=tmp_path / "a", max_steps=1, progress=False, perceptual_weight=1.0,
                        perceptual_model=tmp_path / "nowhere")
    assert not (tmp_path / "a").exists()
