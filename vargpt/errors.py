"""The named errors a user can cause, collected so the CLI can report each as one clear line."""

from __future__ import annotations

from vargpt.config import ConfigError
from vargpt.data.conversation import ConversationError
from vargpt.data.records import DatasetError
from vargpt.generation.errors import GENERATION_ERRORS, GenerationInputError, OutputDirError
from vargpt.training.checkpoint import CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, ConversationError, CheckpointError,
                                            *GENERATION_ERRORS)
"""Exceptions whose message tells the user what to fix (no traceback needed)."""

__all__ = ["USER_ERRORS", "ConfigError", "DatasetError", "ConversationError", "CheckpointError",
           "GenerationInputError", "OutputDirError"]
