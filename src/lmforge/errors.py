"""The library's exception types.

Every error lmforge raises on bad input derives from :class:`LMForgeError`, so callers (and the
CLI, which turns them into one line on stderr and exit code 2) can catch them in one place.
Messages are one line: what is wrong, and what was expected.
"""

from __future__ import annotations


class LMForgeError(Exception):
    """Base class of every lmforge error raised on bad input."""


class ConfigError(LMForgeError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent.

    ``problems`` holds one ``"field.path: message"`` string per problem; the error message joins
    them so every problem is reported at once.
    """

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class InputError(LMForgeError, ValueError):
    """Model or generation input is invalid (token id out of range, sequence too long, ...)."""


class TokenizerError(LMForgeError):
    """A tokenizer file is missing, corrupt or of the wrong kind."""


class CheckpointError(LMForgeError):
    """A checkpoint or weights file is missing, partial or corrupt."""


class DataError(LMForgeError):
    """A data source is missing, empty, too short, or lacks the requested field."""


class InteropError(LMForgeError):
    """A model cannot be converted to or from another framework's format without loss."""


class TrainingError(LMForgeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""
