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
