"""Base models: the text tokenizer round-trips; each training step lowers its held-out loss (slow)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vargpt.special_tokens import ADDED_TOKENS, BOS, EOS, IMAGE, PAD, escape
from vargpt.training.base_text import build_bpe_tokenizer, load_text_tokenizer, strip_placeholders

CORPUS = [
    "USER: What colour is the circle? ASSISTANT: red</s>",
    "USER: Describe the image briefly. ASSISTANT: a large blue square on the left</s>",
    "USER: Draw a small green star. ASSISTANT: Here it is.",
] * 20


def test_tokenizer_round_trips_and_keeps_special_tokens_atomic(tmp_path):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=300)
    tok.save_pretrained(str(tmp_path))
    tok = load_text_tokenizer(tmp_path)
    assert [tok.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS)] == [0, 1, 2]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and tok.bos_token_id == 1
    for special in ADDED_TOKENS + (EOS,):
        ids = tok.encode(f"a{special}b", add_special_tokens=False)
        assert tok.convert_tokens_to_ids(special) in ids and len(tok.convert_ids_to_tokens(ids)) == 3
    for text in ["USER: <image>\nWhat colour is the circle? ASSISTANT: red</s>", "Ünïcödé  spaces\ttabs\n",
                 escape("typed <image> by a user"), ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(IMAGE) not in tok.encode(escape("<image>"), add_special_tokens=False)
    assert tok.encode("red", add_special_tokens=False) == tok("red", add_special_tokens=False).input_ids


def test_strip_placeholders():
    assert strip_placeholders("<image>\nWhat is it?") == "What is it?"
    assert strip_placeholders("Here.<image_gen> Done") == "Here. Done"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from vargpt.data.shapesworld.generate import write_dataset

    root = tmp_path_factory.mktemp("base")
    write_dataset(root / "data", n_train=80, n_test=12, seed=0, progress=False)
    return root


def test_vision_pairs_ask_every_question_about_their_image(tiny_data):
    from vargpt.data.records import load_records
    from vargpt.training.base_text import train_text_tokenizer
    from vargpt.training.base_vision import build_pairs, question_answer
    from vargpt.understanding.vision_tower import ImageProcessor

    records = load_records(tiny_data / "data", "train")
    train_text_tokenizer(tiny_data / "data", tiny_data / "tok_pairs", preset="tiny")
    tok = load_text_tokenizer(tiny_data / "tok_pairs")
    proc = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3)
    data, _ = build_pairs(records, [], tok, proc, max_text_len=64)
    asked = {}  # image path -> the distinct (question, answer) texts of its records
    for r in records:
        qa = question_answer(r)
        if r.input_images and qa:
            asked.setdefault(r.input_images[0], set()).add(qa)
    first = records[0].input_images[0]
    n_first = len(asked[first])
    assert n_first >= 5  # ShapesWorld: a caption request and five questions per image
    pairs = data.pairs[:2]  # two pairs about the first image, then one about another
    other = next(p for p in data.pairs if p.image != pairs[0].image)
    batch = data.collate([*pairs, other])
    assert batch["question_pair"].tolist().count(0) == batch["question_pair"].tolist().count(1) == n_first
    n_other = len(data.image_questions[other.image])
    M = batch["answers"].shape[0]
    assert n_other >= 5 and M == 2 * n_first + n_other and batch["question_pair"].tolist().count(2) == n_other
    # each distinct question text is encoded once; every question points at its own text
    U = batch["question_ids"].shape[0]
    assert U < M and sorted(set(batch["question_index"].tolist())) == list(range(U))
    texts = [tok.decode(row[m.bool()]) for row, m in zip(batch["question_ids"], batch["question_mask"], strict=True)]
    pair_of = batch["question_pair"].tolist()
    asked_of_first = {texts[u] for m, u in enumerate(batch["question_index"].tolist()) if pair_of[m] == 0}
    assert asked_of_first == {q for q, _ in asked[first]}
    # without every_question a pair carries only its own record's question
    own = dataclasses.replace(data, every_question=False).collate([*pairs, other])
    assert own["question_pair"].tolist() == [0, 1, 2] and own["answers"].sum(1).ge(1).all()


@pytest.mark.slow
def test_each_base_step_lowers_its_loss(tiny_data):
    from vargpt.data.records import load_records
    from vargpt.evaluation.understanding import evaluate_vqa
    from vargpt.training.base_models import load_llava, train_base_models

    torch.set_num_threads(1)
    fast = {"progress": False}
    m = train_base_models(tiny_data / "data", tiny_data / "run", resume=False, **fast, step_overrides={
        "llm": {"max_steps": 15, "batch_size": 8},
        "vision": {"max_steps": 15, "batch_size": 32, "tower_overrides": {"patch_size": 8}},
        "align": {"max_steps": 10, "batch_size": 8},
        "instruct": {"max_steps": 15, "batch_size": 8},
    })
    assert m["tokenizer"]["round_trip"]
    for step in ("llm", "vision", "align", "instruct"):
        assert m[step]["loss_after"] < m[step]["loss_before"], (step, m[step])
    model, tok, proc, _ = load_llava(tiny_data / "run" / "llava")
    result = evaluate_vqa(model, tok, proc, load_records(tiny_data / "data", "test"), max_new_tokens=4)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] > 0


@pytest.mark.slow
def test_llm_step_resumes_from_its_checkpoint(tiny_data):
    from vargpt.training.base_text import train_llm, train_text_tokenizer

    torch.set_num_threads(1)
    train_text_tokenizer(tiny_data / "data", tiny_data / "tok2")
    kw = {"max_steps": 6, "batch_size": 4, "progress": False}
    first = train_llm(tiny_data / "data", tiny_data / "tok2", tiny_data / "llm2", resume=False, **kw)
    again = train_llm(tiny_data / "data", tiny_data / "tok2", tiny_data / "llm2", resume=True, **kw)
    assert again["steps"] == first["steps"] == 6
    assert again["loss_after"] == pytest.approx(first["loss_after"], abs=1e-6)


def test_supervised_next_token_losses_mean_and_per_sample():
    from vargpt.training.base_text import next_token_loss, supervised_next_token_losses

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :4] = -100  # sample 0: two labelled next tokens
    labels[1, 1:] = -100  # sample 1: none
    head = torch.nn.Linear(11, 11)
    hidden, logits = logits, head(logits)  # the head applied to every position: the reference logits
    mean, per = supervised_next_token_losses(hidden, labels, head)
    assert torch.allclose(mean, next_token_loss(logits, labels))
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(per[0], ce(logits[0, 3:5], labels[0, 4:6]))
    assert per[1] == 0
    assert torch.allclose(per[2], ce(logits[2, :5], labels[2, 1:]))


@pytest.mark.parametrize("call", ["llm", "llm_sizes", "vision", "tower_sizes", "align", "instruct"])
def test_a_misspelt_override_is_a_config_error_before_any_work(tmp_path, call):
    from vargpt.config import ConfigError
    from vargpt.training.base_llava import train_alignment, train_instruct
    from vargpt.training.base_text import train_llm
    from vargpt.training.base_vision import train_vision_tower

    missing = tmp_path / "missing"  # no step may get as far as reading it
    out = tmp_path / "out"
    calls = {
        "llm": lambda: train_llm(missing, missing, out, learning_rate=1e-3),
        "llm_sizes": lambda: train_llm(missing, missing, out, llm_overrides={"hidden": 64}),
        "vision": lambda: train_vision_tower(missing, missing, out, learning_rate=1e-3),
        "tower_sizes": lambda: train_vision_tower(missing, missing, out, tower_overrides={"patch": 4}),
        "align": lambda: train_alignment(missing, missing, missing, out, learning_rate=1e-3),
        "instruct": lambda: train_instruct(missing, missing, out, learning_rate=1e-3),
    }
    with pytest.raises(ConfigError, match="unknown field") as e:
        calls[call]()
    assert "known:" in str(e.value) and not out.exists()
