"""Shared test set-up: fp32 default dtype, seeded RNGs, offline Hugging Face, helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


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
