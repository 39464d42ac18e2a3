"""Shared fixtures of the evaluation tests: a tiny ShapesWorld and stand-in pipelines (right and wrong)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vargpt.data.records import load_image, load_records
from vargpt.evaluation.generation import generation_items
from vargpt.evaluation.understanding import understanding_items


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small ShapesWorld dataset (20 train, 40 test images)."""
    from vargpt.data.shapesworld import write_dataset

    d = tmp_path_factory.mktemp("shapesworld")
    write_dataset(d, n_train=20, n_test=40, seed=0, progress=False)
    return d


@pytest.fixture(scope="session")
def test_records(shapes_dir):
    return load_records(shapes_dir, "test")


def _key(image, question: str) -> tuple[bytes, str]:
    return np.asarray(image.convert("RGB")).tobytes(), question


class StandInPipeline:
    """Answers and draws like a model would, from a lookup of the dataset (``mode`` picks right or wrong).

    mode "right": gold answers, the dataset's own images and, asked for a lead-in, the dataset's own reply
    text; "wrong": "zzz", blank images and "Here it is."; "colour_only": right answers only to colour
    questions.
    """

    def __init__(self, records, mode: str = "right") -> None:
        self.mode = mode
        self.gold = {}
        self.qtype = {}
        for it in understanding_items(records):
            key = _key(load_image(it.image), it.question)
            self.gold[key], self.qtype[key] = it.gold, it.qtype
        self.refs = {it.prompt: it.reference for it in generation_items(records)}
        self.replies = {it.prompt: [m.content for m in it.record.messages if m.role == "assistant"][-1]
                        for it in generation_items(records)}
        self.calls = []
        self.run_on = 0
        self.no_draw = 0

    def answer(self, images, questions, *, max_new_tokens=16):
        self.calls.append(("answer", len(questions), max_new_tokens))
        out = []
        for im, q in zip(images, questions, strict=True):
            key = _key(im, q)
            right = self.mode == "right" or (self.mode == "colour_only" and self.qtype.get(key) == "colour")
            out.append(self.gold[key] if right else "zzz")
        return out

    def generate_images(self, prompts, *, n_per_prompt=1, sampling=None, batch_size=16, previews=False, lead_in=False,
                        finish_reply=False):
        self.calls.append(("generate_images", len(prompts), lead_in, finish_reply))
        out = []
        for i, p in enumerate(prompts):
            for k in range(n_per_prompt):
                img = load_image(self.refs[p]) if self.mode == "right" else Image.new("RGB", (32, 32), (200, 200, 200))
                strip = [img.resize((s, s), Image.Resampling.BOX) for s in (1, 2, 4)] + [img] if previews else []
                text = self.replies[p] if lead_in and self.mode == "right" else "Here it is.<image_gen>"
                reason = "image"
                if finish_reply:  # every ``run_on``-th reply runs on to the text budget after its image
                    runs_on = self.run_on > 0 and i % self.run_on == 0
                    text, reason = (text + " ring ring ring", "length") if runs_on else (text, "stop")
                forced = self.no_draw > 0 and i % self.no_draw == 1  # the model wrote on; the start was forced
                out.append(SimpleNamespace(prompt=p, image=img, text=text, seed=k, previews=strip,
                                           finish_reason=reason, image_forced=forced))
        return out

    def chat(self, messages, images=None, sampling=None):
        self.calls.append(("chat", messages, len(images or [])))
        return SimpleNamespace(text="chat reply\nsecond line", images=[], token_ids=[])


@pytest.fixture
def stand_in():
    """``stand_in(records, mode)`` -> a :class:`StandInPipeline`."""
    return StandInPipeline
