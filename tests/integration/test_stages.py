"""VARGPT stages end to end on a tiny random model and a small ShapesWorld: each stage trains, saves, reloads."""

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
        prefix = {1: ("image_gen_projector", "vargpt_gen.class_emb", "vargpt_gen.pos_start"),
                  2: ("language_model", "multi_modal_projector"),
                  3: ("vargpt_gen", "image_gen_projector")}[n]
        assert changed and all(k.startswith(prefix) for k in changed), (n, sorted(changed)[:5])
        before, prev = after, out
    # An interrupted-and-resumed stage ends at the same step count.
    res = train_stage("stage3", from_dir=root / "stage2", data_dir=root / "data", out_dir=root / "stage3",
                      max_steps=3, resume=True, max_eval=8, progress=False)
    assert res["steps"] == 3
