"""ShapesWorld text: captions, understanding QA pairs and generation instructions for a scene.

The generation instructions follow ImageNet-Instruct (VARGPT paper, Figure 15): a user prompt drawn
from a pool of templates around the caption, and an assistant answer drawn from a pool of templates that
ends with the ``<image_gen>`` placeholder. Stage-1 class prompts use the paper's fixed wording
"Please generate an image of a {class}." (section 3.2). QA answers are single words, for exact-match
evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import NamedTuple

from vargpt.data.shapesworld.world import POSITIONS, Scene, SceneObject
from vargpt.special_tokens import IMAGE_GEN

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
QTYPES: tuple[str, ...] = ("colour", "shape", "position", "size", "count")

GENERATION_PROMPTS: tuple[str, ...] = (
    "Please create a painting of {caption}.",
    "Draw {caption}.",
    "Please draw {caption}.",
    "Can you draw {caption}?",
    "Generate an image of {caption}.",
    "Please generate an image of {caption}.",
    "Create a picture of {caption}.",
    "Make an image showing {caption}.",
    "I would like a picture of {caption}.",
    "Could you paint {caption}?",
    "Paint {caption}.",
    "Show me {caption}.",
    "Sketch {caption}.",
    "Render {caption}.",
    "Produce an illustration of {caption}.",
    "Illustrate {caption}.",
    "Can you make a drawing of {caption}?",
    "I need an image of {caption}.",
    "Please make a picture with {caption}.",
    "Design an image featuring {caption}.",
    "Create an illustration showing {caption}.",
    "Draw me {caption}, please.",
    "Could you generate a picture of {caption}?",
    "Would you draw {caption} for me?",
    "Please produce an image of {caption}.",
    "Make a drawing of {caption}.",
    "Generate a picture that shows {caption}.",
    "I want to see {caption}. Please draw it.",
    "Can you create an image with {caption}?",
    "Please sketch {caption}.",
    "Create an image: {caption}.",
    "Picture this: {caption}. Please draw it.",
    "Draw a picture of {caption}.",
    "Please render an image of {caption}.",
    "Could you create a painting of {caption}?",
    "Paint a picture of {caption}.",
    "Show me a picture of {caption}.",
    "Give me an image of {caption}.",
    "Please show {caption} in an image.",
    "Generate {caption}.",
    "Make a picture: {caption}.",
    "Can you show me what {caption} looks like?",
    "Draw an image containing {caption}.",
    "Please illustrate {caption}.",
    "Create a simple drawing of {caption}.",
    "I'd like you to draw {caption}.",
    "Please create an image that contains {caption}.",
    "Visualize {caption}.",
    "Could you make an image of {caption}?",
    "Produce a picture of {caption}.",
    "Generate a drawing of {caption}.",
    "Please paint {caption}.",
    "An image of {caption}, please.",
    "Can you generate {caption}?",
    "Please depict {caption}.",
    "Depict {caption} in a picture.",
)
GENERATION_ANSWERS: tuple[str, ...] = tuple(
    text + IMAGE_GEN
    for text in (
        "Here's a drawing of {caption}.",
        "Sure, here is {caption}.",
        "Here is an image of {caption}.",
        "Of course! Here's {caption}.",
        "Certainly. This is {caption}.",
        "Here you go: {caption}.",
        "I drew {caption}.",
        "This image shows {caption}.",
        "Here is a picture of {caption}.",
        "Sure! I have drawn {caption}.",
        "Here's the painting of {caption} you asked for.",
        "Done. Here is {caption}.",
        "Here's my illustration of {caption}.",
        "As requested, {caption}.",
        "Below is an image of {caption}.",
        "Absolutely, here's a picture showing {caption}.",
        "I've created an image of {caption}.",
        "Here's a simple drawing of {caption}.",
        "Sure thing. Here is a painting of {caption}.",
        "This is what {caption} looks like.",
        "Okay, here is an illustration with {caption}.",
        "Here's an image featuring {caption}.",
        "Sure.",
        "Here it is.",
    )
)
CLASS_PROMPT = "Please generate an image of {name}."
CLASS_ANSWERS: tuple[str, ...] = (
    IMAGE_GEN,
    "Here is {name}." + IMAGE_GEN,
    "Sure." + IMAGE_GEN,
    "Here is an image of {name}." + IMAGE_GEN,
)
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short caption for this image.",
    "Describe what you see.",
    "Write a brief caption for the image.",
    "What does this image show?",
)
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?",
               "Which colour does the {shape} have?"),
    "colour_single": ("What colour is the shape?", "What colour is the object?"),
    "shape": ("What shape is the {colour} object?", "What is the shape of the {colour} object?",
              "Which shape is {colour}?"),
    "position": ("Where is the {colour} {shape}?", "In which part of the image is the {colour} {shape}?"),
    "size": ("Is the {colour} {shape} small or large?", "What size is the {colour} {shape}?"),
    "count": ("How many shapes are there?", "How many objects are in the image?",
              "How many shapes can you see?"),
}


class QA(NamedTuple):
    """One understanding question about a scene and its single-word answer."""

    qtype: str
    question: str
    answer: str


def with_article(phrase: str) -> str:
    """``"orange star"`` -> ``"an orange star"``; ``"red star"`` -> ``"a red star"``."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def describe(obj: SceneObject) -> str:
    """``"a large red circle on the left"``."""
    return f"a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}"


def caption(scene: Scene, positions: Mapping[str, tuple[float, float]] | None = None) -> str:
    """The scene's caption: its objects described in reading order of their regions, joined by "and".

    Reading order = by the region centre's row, then column (``positions``: region name -> ``(fx, fy)``
    centre, default :data:`~vargpt.data.shapesworld.world.POSITIONS`): top, left, centre, right, bottom.
    Objects never overlap, so the drawing order cannot be seen in the image; a caption in drawing order
    would give a two-object image two equally likely answers, of which exact match accepts one.
    """
    centres = POSITIONS if positions is None else positions
    missing = sorted({obj.position for obj in scene.objects} - set(centres))
    if missing:
        raise ValueError(f"no region centre for position(s) {missing}: pass the world's positions")
    ordered = sorted(scene.objects, key=lambda obj: centres[obj.position][::-1])
    return " and ".join(describe(obj) for obj in ordered)


def caption_prompt(rng: random.Random) -> str:
    """A user request for a caption (without the image placeholder)."""
    return rng.choice(CAPTION_PROMPTS)


def _question(qtype: str, obj: SceneObject, n_objects: int, rng: random.Random) -> QA:
    if qtype == "count":
        return QA(qtype, rng.choice(QUESTIONS["count"]), NUMBER_WORDS[n_objects])
    pool = QUESTIONS[qtype]
    if qtype == "colour" and n_objects == 1:
        pool = pool + QUESTIONS["colour_single"]
    question = rng.choice(pool).format(colour=obj.colour, shape=obj.shape)
    answer = {"colour": obj.colour, "shape": obj.shape, "position": obj.position, "size": obj.size}[qtype]
    return QA(qtype, question, answer)


def qa_pairs(scene: Scene, rng: random.Random, *, every_object: bool = False) -> list[QA]:
    """One question of every type in :data:`QTYPES`, each about a randomly chosen object; with
    ``every_object``, then the same question type about each of the scene's *other* objects too (count
    excepted), drawn after all the others (so the first questions do not change).

    Objects of one scene differ in colour and in shape, so "the {shape}" and "the {colour} object"
    always name exactly one object. Asking about every object of a two-object scene gives one image two
    questions with different answers ("What colour is the circle?" red, "... the star?" blue): answering
    with either object's attribute no longer fits both, so the answer must be read from the named one
    (binding). With one question per image that shortcut is right half of the time.
    """
    n = len(scene.objects)
    asked = []
    pairs = []
    for qtype in QTYPES:
        obj = rng.choice(scene.objects)
        asked.append(obj)
        pairs.append(_question(qtype, obj, n, rng))
    if every_object and n > 1:
        for qtype, chosen in zip(QTYPES, asked, strict=True):
            if qtype != "count":
                pairs.extend(_question(qtype, obj, n, rng) for obj in scene.objects if obj is not chosen)
    return pairs


def generation_turns(text: str, rng: random.Random) -> tuple[str, str]:
    """(user prompt, assistant answer ending in ``<image_gen>``) for the caption ``text``."""
    return rng.choice(GENERATION_PROMPTS).format(caption=text), rng.choice(GENERATION_ANSWERS).format(
        caption=text
    )


def class_turns(colour: str, shape: str, rng: random.Random) -> tuple[str, str]:
    """Stage-1 class prompt "Please generate an image of a {colour} {shape}." and its answer."""
    name = with_article(f"{colour} {shape}")
    return CLASS_PROMPT.format(name=name), rng.choice(CLASS_ANSWERS).format(name=name)
