"""Shared test set-up: fp32 default dtype, seeded RNGs, offline Hugging Face, helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def _temp_free_gb() -> tuple[str, float]:
    import shutil
    import tempfile

    return tempfile.gettempdir(), shutil.disk_usage(tempfile.gettempdir()).free / 1e9


def pytest_report_header(config):
    """The temp folder's free space (shown without ``-q``)."""
    where, free_gb = _temp_free_gb()
    return f"temp dir {where}: {free_gb:.1f} GB free"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A full run writes ~1.6 GB of tiny run folders under the temp dir, and a full disk otherwise shows up
    only as "No space left on device" deep inside a checkpoint write: say so at the end, also with ``-q``."""
    where, free_gb = _temp_free_gb()
    if free_gb < 2.0:
        terminalreporter.write_line(f"LOW DISK: {where} has {free_gb:.2f} GB free; a full test run needs ~1.6 GB "
                                    "there, so tests that save checkpoints fail with 'No space left on device'",
                                    red=True)


@pytest.fixture(autouse=True)
def _fp32_and_seeded():
    """Every test starts in fp32 with a fixed seed, and may not leak a dtype change."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def hf_tokenizer():
    """A small byte-level BPE tokenizer with the project's special tokens (built offline in ~0.1 s)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vargpt import special_tokens as st

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", st.PAD, st.BOS, st.EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["please draw a red circle", "what colour is the square"] * 20, trainer)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=st.PAD, bos_token=st.BOS,
                                   eos_token=st.EOS, additional_special_tokens=list(st.ADDED_TOKENS))


@pytest.fixture(scope="session")
def chat_model_dir(hf_tokenizer, tmp_path_factory):
    """A tiny VARGPT checkpoint whose LLM was overfitted (about 2 s) to one conversation with an image.

    User "please draw a red circle" -> assistant "here<image_gen> and more</s>". Each step uses fresh
    random image codes, so the text after the image does not depend on the image; the decoder and
    projectors keep their random weights (images are noise, but the path is the model's own choice).
    """
    import dataclasses

    from vargpt.config import VARGPTConfig
    from vargpt.data.collate import encode_record, pad_samples
    from vargpt.data.records import Message, Record
    from vargpt.model import VARGPT, VARGPTBatch
    from vargpt.pretrained import save_pretrained
    from vargpt.special_tokens import IMAGE_GEN, SpecialTokenIds

    cfg = VARGPTConfig.from_name("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=2))
    torch.manual_seed(0)
    model = VARGPT.from_config(cfg, SpecialTokenIds.from_tokenizer(hf_tokenizer))
    record = Record((Message("user", "please draw a red circle"),
                     Message("assistant", f"here{IMAGE_GEN} and more")), ("unused.png",))
    sample = encode_record(record, hf_tokenizer, model.token_ids, image_tokens=cfg.vision_tower.tokens_per_image,
                           gen_tokens=cfg.vqvae.tokens_total)
    tb = pad_samples([sample], model.token_ids.pad)
    opt = torch.optim.Adam(model.language_model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        codes = [torch.randint(cfg.vqvae.vocab_size, (1, pn * pn), generator=g) for pn in cfg.vqvae.patch_nums]
        loss = model(VARGPTBatch(tb.input_ids, tb.labels, tb.attention_mask, gen_codes=codes), image_weight=0.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    out = tmp_path_factory.mktemp("chat_model")
    save_pretrained(model.eval(), hf_tokenizer, out)
    return out
