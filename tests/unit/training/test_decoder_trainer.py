"""Class-conditional decoder pretraining: class vocabulary, in-memory codes, a short run lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch

from vargpt.config import VARGPTConfig
from vargpt.data.records import load_records
from vargpt.data.shapesworld.generate import write_dataset
from vargpt.tokenizer.vqvae import MultiScaleVQVAE
from vargpt.training.decoder_trainer import class_pairs, load_decoder, train_decoder


@pytest.fixture(scope="module")
def data_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    write_dataset(root / "sw", n_train=48, n_test=16, seed=0, progress=False)
    torch.manual_seed(0)
    MultiScaleVQVAE(VARGPTConfig.from_name("tiny").vqvae).save_pretrained(root / "tok")
    return root / "sw", root / "tok", root


def test_class_pairs_dedup(data_and_tokenizer):
    data, _, _ = data_and_tokenizer
    records = load_records(data, "train")
    pairs = class_pairs(records)
    assert len(pairs) == len(set(pairs))
    # one pair per one-object image: its generation records' class, which names the layout too
    with_cls = {(r.images[0], r.cls) for r in records if r.cls is not None and r.is_generation}
    assert set(pairs) == with_cls
    assert len({p for p, _ in pairs}) == len(pairs)
    assert all(len(c.split()) == 4 for _, c in pairs)  # "{size} {colour} {shape} {position}"


def test_short_run_lowers_loss_and_resumes(data_and_tokenizer):
    data, tok, root = data_and_tokenizer
    out = root / "run"
    m = train_decoder(data_dir=data, tokenizer_dir=tok, out_dir=out, max_steps=12, batch_size=16,
                      progress=False)
    assert m["steps"] == 12
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["heldout_loss_after"] < m["heldout_loss_before"]
    decoder, classes = load_decoder(out)
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert classes == config["classes"] == sorted(classes) and len(classes) == m["classes"]
    assert not decoder.training
    # resuming a finished run does nothing more; extending it continues from step 12
    m2 = train_decoder(data_dir=data, tokenizer_dir=tok, out_dir=out, max_steps=14, batch_size=16,
                       resume=True, progress=False)
    assert m2["steps"] == 14
