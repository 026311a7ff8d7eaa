"""User-facing errors.

Every problem a user can fix (bad config, bad data, wrong path) is raised as a :class:`BittuneError`. The CLI
prints it as one message — what is wrong, where, and how to fix it — and exits non-zero without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BittuneError(Exception):
    """A problem the user can fix.

    Args:
        message: What is wrong, naming the file, line and field where known.
        hint: How to fix it, in one sentence.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(BittuneError):
    """The run configuration is invalid (all problems are listed in one message)."""


class DataError(BittuneError):
    """A data file is missing or malformed."""


class ModelLoadError(BittuneError):
    """A model or tokenizer could not be loaded from the given path or id."""


class CheckpointError(BittuneError):
    """A checkpoint is missing, incomplete or does not match the run."""


class StorageError(BittuneError):
    """Writing to disk failed (disk full, permissions); the previous complete state is untouched."""


class NonFiniteError(BittuneError):
    """Training produced a NaN or infinite loss or gradient."""


class PreflightError(BittuneError):
    """Several problems found before training (each one is listed with its own fix)."""
