"""Errors a user can cause at inference; the CLI reports each as one line (exit status 2)."""

from __future__ import annotations

__all__ = ["GENERATION_ERRORS", "GenerationInputError", "OutputDirError"]


class GenerationInputError(ValueError):
    """The input of a generation call is unusable (empty message, unreadable image, too long ...)."""


class OutputDirError(ValueError):
    """The output folder cannot be created or written."""


GENERATION_ERRORS: tuple[type[Exception], ...] = (GenerationInputError, OutputDirError)
"""To be merged into :data:`vargpt.errors.USER_ERRORS`."""
