"""Understanding accuracy (exact match after normalisation), and an lmms-eval adapter for a Pipeline.

An *understanding item* is a record with one ``<image>`` input, no image to generate, and a
conversation that ends with an assistant turn: the question is the last user turn without the
placeholder, the gold answer is that final assistant turn. The model answers greedily through any
*answerer* (an object with ``answer(images, questions, *, max_new_tokens) -> list[str]``, e.g.
:class:`vargpt.generation.pipeline.Pipeline`); an answer is correct when :func:`normalise_answer` of
it equals that of the gold answer (the VQA convention: case, punctuation, articles, spacing and
number words vs. digits do not matter). Accuracy is reported overall, per ``meta["qtype"]`` and per
``meta["task"]`` when the records carry them (ShapesWorld: qtypes colour/shape/position/size/count;
tasks qa/caption).

:class:`PipelineLmms` lets lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval) drive a Pipeline
on its benchmarks. It implements lmms-eval's model interface on duck-typed requests and is usable
without lmms-eval installed; :mod:`vargpt.evaluation.lmms_eval_plugin` registers it with lmms-eval.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from vargpt.data.records import Record, load_image
from vargpt.special_tokens import IMAGE

__all__ = [
    "Answerer",
    "LlavaAnswerer",
    "PipelineLmms",
    "UnderstandingItem",
    "evaluate_understanding",
    "evaluate_vqa",
    "exact_match",
    "normalise_answer",
    "qa_items",
    "understanding_items",
]

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                 "nineteen", "twenty")
_WORD_TO_DIGITS = {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
# Punctuation becomes a space, except a "." or "," between two digits (1.5, 1,000 stay numbers).
_PUNCT_RE = re.compile(r"(?!(?<=\d)[.,](?=\d))[" + re.escape(string.punctuation) + "]")


class Answerer(Protocol):
    """What :func:`evaluate_understanding` needs: batched greedy answers to image questions."""

    def answer(self, images: list[Any], questions: list[str], *, max_new_tokens: int = 16) -> list[str]:
        """One answer per (image, question) pair."""
        ...


def normalise_answer(text: str) -> str:
    """Canonical form for exact match: lower case, punctuation -> space, articles dropped,
    number words -> digits ("Two." -> "2"), whitespace collapsed.
    """
    words = _PUNCT_RE.sub(" ", text.lower()).split()
    return " ".join(_WORD_TO_DIGITS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(answer: str, gold: str) -> bool:
    """True when the answer equals the gold answer after :func:`normalise_answer`."""
    return normalise_answer(answer) == normalise_answer(gold)


@dataclass(frozen=True)
class UnderstandingItem:
    """One question to answer: the record, its input image, the question text and the gold answer."""

    record: Record
    image: Path
    question: str
    gold: str

    @property
    def qtype(self) -> str | None:
        """``meta["qtype"]`` when present."""
        q = self.record.meta.get("qtype")
        return None if q is None else str(q)

    @property
    def task(self) -> str | None:
        """``meta["task"]`` when present."""
        t = self.record.meta.get("task")
        return None if t is None else str(t)


def strip_image_placeholders(text: str) -> str:
    """The user text without ``<image>`` placeholders (and the newline that follows each)."""
    return re.sub(rf"{re.escape(IMAGE)}\n?", "", text).strip()


def understanding_items(records: Sequence[Record], *, tasks: Sequence[str] | None = None) -> list[UnderstandingItem]:
    """The understanding items of ``records`` (see module docstring), in order.

    Args:
        tasks: keep only records whose ``meta["task"]`` is one of these (records without a task are
            kept only when ``tasks`` is None).
    """
    items = []
    for r in records:
        if r.is_generation or len(r.input_images) != 1 or r.messages[-1].role != "assistant":
            continue
        if tasks is not None and r.meta.get("task") not in tasks:
            continue
        users = [m for m in r.messages if m.role == "user"]
        if not users:
            continue
        items.append(UnderstandingItem(r, r.input_images[0], strip_image_placeholders(users[-1].content),
                                       r.messages[-1].content))
    return items


def _accuracies(groups: dict[str, list[bool]]) -> tuple[dict[str, float], dict[str, int]]:
    keys = sorted(groups)
    return ({k: round(sum(groups[k]) / len(groups[k]), 4) for k in keys}, {k: len(groups[k]) for k in keys})


def evaluate_understanding(
    answerer: Answerer, records: Sequence[Record], *, batch_size: int = 32, max_records: int | None = None,
    max_new_tokens: int = 32, tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy of ``answerer`` on the understanding items of ``records``.

    Args:
        answerer: see :class:`Answerer` (a ``Pipeline`` works).
        records: e.g. ``load_records(data_dir, "test")``; records that are not understanding items
            (generation, no or several input images) are ignored.
        batch_size: questions per ``answer`` call.
        max_records: evaluate only the first N items (None = all).
        max_new_tokens: answer length limit (captions need ~20 tokens, QA answers 1-3).
        tasks: only these ``meta["task"]`` values (None = all).

    Returns:
        ``{"accuracy", "n", "per_qtype": {qtype: acc}, "per_qtype_n", "per_task", "per_task_n",
        "samples": [{"image", "question", "answer", "gold", "correct", "qtype", "task"}]}``;
        ``accuracy`` is None when there is nothing to evaluate.
    """
    items = understanding_items(records, tasks=tasks)
    if max_records is not None:
        items = items[:max_records]
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        got = answerer.answer([load_image(it.image) for it in chunk], [it.question for it in chunk],
                              max_new_tokens=max_new_tokens)
        if len(got) != len(chunk):
            raise RuntimeError(f"the answerer returned {len(got)} answers for {len(chunk)} questions")
        answers.extend(got)
    per_qtype: dict[str, list[bool]] = defaultdict(list)
    per_task: dict[str, list[bool]] = defaultdict(list)
    samples = []
    for it, ans in zip(items, answers, strict=True):
        ok = exact_match(ans, it.gold)
        if it.qtype is not None:
            per_qtype[it.qtype].append(ok)
        if it.task is not None:
            per_task[it.task].append(ok)
        samples.append({"image": str(it.image), "question": it.question, "answer": ans, "gold": it.gold,
                        "correct": ok, "qtype": it.qtype, "task": it.task})
    n_correct = sum(s["correct"] for s in samples)
    qtype_acc, qtype_n = _accuracies(per_qtype)
    task_acc, task_n = _accuracies(per_task)
    return {
        "accuracy": round(n_correct / len(samples), 4) if samples else None, "n": len(samples),
        "per_qtype": qtype_acc, "per_qtype_n": qtype_n, "per_task": task_acc, "per_task_n": task_n,
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------
# The understanding model alone (base LLaVA stage), as an answerer
# --------------------------------------------------------------------------------------------------


class LlavaAnswerer:
    """:class:`Answerer` over the base understanding model (``vargpt.understanding.llava.Llava``)."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any, *, system_prompt: str = "") -> None:
        self.model, self.tokenizer, self.processor, self.system_prompt = model, tokenizer, processor, system_prompt

    def answer(self, images: list[Any], questions: list[str], *, max_new_tokens: int = 16) -> list[str]:
        """Greedy answers (:func:`vargpt.understanding.answer.answer_questions`)."""
        from vargpt.understanding.answer import answer_questions

        return answer_questions(self.model, self.tokenizer, self.processor, images, questions,
                                system_prompt=self.system_prompt, max_new_tokens=max_new_tokens,
                                batch_size=max(1, len(questions)))


def qa_items(records: Sequence[Record], qtypes: Sequence[str] | None = None) -> list[tuple[Record, str, str]]:
    """``(record, question, gold)`` of the QA items (``meta["task"]`` "qa" or absent), optionally of some qtypes."""
    return [(it.record, it.question, it.gold) for it in understanding_items(records)
            if it.task in (None, "qa") and (qtypes is None or it.qtype in qtypes)]


def evaluate_vqa(
    model: Any, tokenizer: Any, processor: Any, records: Sequence[Record], *,
    qtypes: Sequence[str] | None = None, system_prompt: str = "", max_new_tokens: int = 8,
    batch_size: int = 64, num_examples: int = 8,
) -> dict[str, Any]:
    """VQA accuracy of the base understanding model on the QA records (see :func:`qa_items`).

    Returns:
        ``{"accuracy", "n", "per_qtype", "per_qtype_n", "examples": [first num_examples samples]}``.

    Raises:
        ValueError: there is no QA record (of ``qtypes``) to evaluate.
    """
    keep = {id(r) for r, _, _ in qa_items(records, qtypes)}
    chosen = [r for r in records if id(r) in keep]
    if not chosen:
        raise ValueError(f"no QA records{' of types ' + str(list(qtypes)) if qtypes else ''} to evaluate")
    res = evaluate_understanding(LlavaAnswerer(model, tokenizer, processor, system_prompt=system_prompt), chosen,
                                 batch_size=batch_size, max_new_tokens=max_new_tokens)
    examples = [{"question": s["question"], "reference": s["gold"], "answer": s["answer"], "correct": s["correct"]}
                for s in res["samples"][:num_examples]]
    return {"accuracy": res["accuracy"], "n": res["n"], "per_qtype": res["per_qtype"],
            "per_qtype_n": res["per_qtype_n"], "examples": examples}


# --------------------------------------------------------------------------------------------------
# lmms-eval adapter
# --------------------------------------------------------------------------------------------------


def _truncate_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _as_images(visuals: Any) -> list[Image.Image]:
    """lmms-eval visuals (None, one PIL image/path, or a list of them) as a list of RGB PIL images."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    out = []
    for v in visuals:
        if isinstance(v, Image.Image):
            out.append(v.convert("RGB"))
        elif isinstance(v, (str, Path)):
            out.append(load_image(v))
        else:
            raise TypeError(f"unsupported visual {type(v).__name__}: pass PIL images or image paths "
                            "(video and audio are not supported by VARGPT)")
    return out


class PipelineLmms:
    """lmms-eval's model interface (``generate_until``, ``loglikelihood``, ``generate_until_multi_round``)
    over a VARGPT :class:`~vargpt.generation.pipeline.Pipeline`.

    Requests are duck-typed: anything with ``.args`` as lmms-eval builds them,
    ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` for ``generate_until`` and
    ``(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)`` for the multi-round
    variant; documents are looked up in ``self.task_dict[task][split][doc_id]`` (lmms-eval fills
    ``task_dict``). Answers are greedy; ``gen_kwargs["until"]`` stop strings and
    ``gen_kwargs["max_new_tokens"]`` are honoured. One-image requests are batched through
    ``pipeline.answer``; text-only or multi-image requests go through ``pipeline.chat``.

    Args:
        pretrained: a model directory (loaded with ``Pipeline.from_pretrained``), or None with ``pipeline``.
        pipeline: an already-built pipeline (or any object with ``answer`` and ``chat``).
        batch_size: questions per ``answer`` call.
        max_new_tokens: default answer length when a request does not set it.
    """

    is_simple = True  # lmms-eval: a "simple" (non chat-template) model

    def __init__(self, pretrained: str | Path | None = None, *, pipeline: Any = None, batch_size: int | str = 16,
                 max_new_tokens: int | str = 64, device: str = "cpu", **_unused: Any) -> None:
        super().__init__()  # lmms.__init__ (rank, world size, cache hook) when mixed into lmms-eval's base
        if pipeline is None:
            if pretrained is None:
                raise ValueError("PipelineLmms needs pretrained=MODEL_DIR or pipeline=...")
            from vargpt.generation.pipeline import Pipeline

            pipeline = Pipeline.from_pretrained(pretrained, device=device)
        self.pipeline = pipeline
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if not hasattr(self, "task_dict"):
            self.task_dict: dict[str, Any] = {}

    # lmms-eval's interface ------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """Not supported: VARGPT's pipeline exposes generation only; use generate_until tasks."""
        raise NotImplementedError(
            "VARGPT's lmms-eval adapter does not score continuations (loglikelihood); run tasks whose "
            "output_type is generate_until (most VQA benchmarks, e.g. mme, pope, gqa, textvqa).")

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy continuation of each request's context, cut at its ``until`` strings."""
        prepared = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            images = _as_images(doc_to_visual(self.task_dict[task][split][doc_id]))
            prepared.append((context, images, dict(gen_kwargs or {})))
        return self._respond(prepared)

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
        """Multi-round dialogue: round 0 answers the context; later rounds come from ``doc_to_text(doc,
        previous_output=..., round_idx=..., previous_round_info=...)`` until it signals the end.

        Returns one list of round answers per request.
        """
        results = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals, rounds, info = doc_to_visual(doc), [], None
            while True:
                rounds.append(self._respond([(context, _as_images(visuals), dict(gen_kwargs or {}))])[0])
                visuals, context, terminal, _, info = doc_to_text(
                    doc, previous_output=list(rounds), round_idx=len(rounds), previous_round_info=info)
                if terminal:
                    break
            results.append(rounds)
        return results

    # internals --------------------------------------------------------------------------------------

    def _respond(self, prepared: list[tuple[str, list[Image.Image], dict[str, Any]]]) -> list[str]:
        out: list[str | None] = [None] * len(prepared)
        single = [i for i, (_, ims, _) in enumerate(prepared) if len(ims) == 1]
        by_length: dict[int, list[int]] = defaultdict(list)
        for i in single:
            by_length[int(prepared[i][2].get("max_new_tokens", self.max_new_tokens))].append(i)
        for max_new, idx in by_length.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                answers = self.pipeline.answer([prepared[i][1][0] for i in chunk],
                                               [strip_image_placeholders(prepared[i][0]) for i in chunk],
                                               max_new_tokens=max_new)
                for i, a in zip(chunk, answers, strict=True):
                    out[i] = a
        for i, (context, images, kw) in enumerate(prepared):
            if out[i] is None:
                out[i] = self._chat(context, images, kw)
        return [_truncate_at(str(text), _until(kw)).strip() for text, (_, _, kw) in zip(out, prepared, strict=True)]

    def _chat(self, context: str, images: list[Image.Image], gen_kwargs: dict[str, Any]) -> str:
        from vargpt.config import SamplingConfig

        sampling = SamplingConfig(max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                  text_temperature=0.0, max_images=0)
        # the pipeline places the images in front of the (escaped) text of the last user turn
        reply = self.pipeline.chat([{"role": "user", "content": strip_image_placeholders(context)}],
                                   images=images or None, sampling=sampling)
        return reply.text


def _until(gen_kwargs: dict[str, Any]) -> list[str]:
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        return [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {type(until).__name__}")
    return [str(u) for u in until]

