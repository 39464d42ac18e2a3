"""VARGPT as an lmms-eval model (imported by lmms-eval, never by vargpt itself: it needs ``lmms_eval``).

lmms-eval (>= 0.7) discovers external models through the entry-point group ``lmms_eval.models``; with
this in ``pyproject.toml``::

    [project.entry-points."lmms_eval.models"]
    vargpt = "vargpt.evaluation.lmms_eval_plugin:manifest"

a VARGPT directory is evaluated on any generate_until benchmark with::

    lmms-eval --model vargpt --model_args pretrained=runs/tiny/model --tasks mme --batch_size 8

Without the entry point, call :func:`register` before ``lmms_eval.evaluator.simple_evaluate``.
The adapter itself is :class:`vargpt.evaluation.understanding.PipelineLmms` (usable and tested
without lmms-eval); this module only mixes it into lmms-eval's ``lmms`` base class.
"""

from __future__ import annotations

from lmms_eval.api.model import lmms

from vargpt.evaluation.understanding import PipelineLmms

__all__ = ["MODEL_ID", "VARGPTLmms", "manifest", "register"]

MODEL_ID = "vargpt"


class VARGPTLmms(PipelineLmms, lmms):
    """:class:`PipelineLmms` as an ``lmms_eval.api.model.lmms`` (``--model_args pretrained=DIR,batch_size=N``)."""


def manifest():  # noqa: ANN201 - lmms_eval.models.registry_v2.ModelManifest
    """The entry-point payload: lmms-eval model id ``vargpt`` -> :class:`VARGPTLmms`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VARGPTLmms")


def register() -> None:
    """Register :class:`VARGPTLmms` in lmms-eval's model registry of this process (when not installed
    through the entry point)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
