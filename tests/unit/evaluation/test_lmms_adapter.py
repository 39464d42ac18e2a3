"""The lmms-eval adapter on a tiny local task of fake requests (no lmms-eval, no downloads)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from vargpt.evaluation.understanding import PipelineLmms


class FakePipeline:
    """Answers "<colour of the image>.\\nextra"; chat answers "chat: <n images>\\nmore"."""

    def __init__(self) -> None:
        self.answer_calls, self.chat_calls = [], []

    def answer(self, images, questions, *, max_new_tokens=16):
        self.answer_calls.append((len(images), max_new_tokens))
        names = {(255, 0, 0): "red", (0, 0, 255): "blue"}
        return [f"{names[im.getpixel((0, 0))]}.\nextra" for im in images]

    def chat(self, messages, images=None, sampling=None):
        self.chat_calls.append((messages, sampling))
        assert all(isinstance(im, Image.Image) for im in images or [])
        return SimpleNamespace(text=f"chat: {len(images or [])}\nmore", images=[], token_ids=[])


def _docs(tmp_path):
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue_path = tmp_path / "blue.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(blue_path)
    return [{"img": [red], "q": "What colour is it?"},
            {"img": [str(blue_path)], "q": "<image>\nWhat colour?"},
            {"img": [], "q": "Say hi."},
            {"img": [red, red], "q": "Same colour?"}]


def _request(doc_id, docs, gen_kwargs):
    return SimpleNamespace(args=(docs[doc_id]["q"], dict(gen_kwargs), lambda d: d["img"], doc_id, "toy", "test"))


@pytest.fixture
def adapter(tmp_path):
    lm = PipelineLmms(pipeline=FakePipeline(), batch_size=2, max_new_tokens=7)
    lm.task_dict = {"toy": {"test": _docs(tmp_path)}}
    return lm


def test_generate_until_batches_and_stops(adapter):
    docs = adapter.task_dict["toy"]["test"]
    reqs = [_request(i, docs, {"until": ["\n"], "max_new_tokens": 3}) for i in (1, 0)]
    reqs.append(_request(0, docs, {"until": "."}))
    assert adapter.generate_until(reqs) == ["blue.", "red.", "red"]
    # two requests with max_new_tokens=3 in one batch, one with the default 7
    assert sorted(adapter.pipeline.answer_calls) == [(1, 7), (2, 3)]


def test_text_only_and_multi_image_use_chat(adapter):
    docs = adapter.task_dict["toy"]["test"]
    out = adapter.generate_until([_request(2, docs, {"until": ["\n"]}), _request(3, docs, {"max_new_tokens": 4})])
    assert out == ["chat: 0", "chat: 2\nmore"]
    (msgs0, s0), (msgs1, s1) = adapter.pipeline.chat_calls
    assert msgs0 == [{"role": "user", "content": "Say hi."}]
    assert msgs1 == [{"role": "user", "content": "Same colour?"}]  # images go through images=, not "<image>"
    assert s1.max_new_tokens == 4 and s1.text_temperature == 0.0


def test_multi_round(adapter):
    docs = adapter.task_dict["toy"]["test"]

    def doc_to_text(doc, previous_output=None, round_idx=0, previous_round_info=None):
        info = (previous_round_info or 0) + 1
        return doc["img"], f"Round {round_idx}: and now?", round_idx >= 3, previous_output, info

    req = SimpleNamespace(args=(docs[0]["q"], {"until": ["\n"]}, lambda d: d["img"], doc_to_text, 0, "toy", "test"))
    assert adapter.generate_until_multi_round([req]) == [["red.", "red.", "red."]]


def test_loglikelihood_is_unsupported_with_a_clear_message(adapter):
    with pytest.raises(NotImplementedError, match="generate_until"):
        adapter.loglikelihood([])


def test_bad_visual_type(adapter):
    adapter.task_dict["toy"]["test"].append({"img": [object()], "q": "?"})
    with pytest.raises(TypeError, match="video and audio"):
        adapter.generate_until([_request(4, adapter.task_dict["toy"]["test"], {})])


def test_needs_a_model():
    with pytest.raises(ValueError, match="pretrained"):
        PipelineLmms()


def test_lmms_eval_plugin_registers_when_installed():
    pytest.importorskip("lmms_eval")
    from vargpt.evaluation.lmms_eval_plugin import VARGPTLmms, register

    register()
    from lmms_eval.models import get_model

    assert get_model("vargpt") is VARGPTLmms
    lm = VARGPTLmms.create_from_arg_string("batch_size=2", {"pipeline": FakePipeline()})
    assert lm.batch_size == 2 and lm.rank == 0 and lm.world_size == 1
