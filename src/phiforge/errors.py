"""One base for the errors phiforge raises on purpose, with one subclass per area.

A ``PhiforgeError`` says what the user gave that is wrong (naming the file, record or field), so the CLI prints it
as one line; anything else is a bug or an environment failure and keeps its traceback. The area classes also derive
from ``ValueError`` (bad input) or ``RuntimeError`` (something outside failed) so callers that catch those still do.
"""

from __future__ import annotations


class PhiforgeError(Exception):
    """Base of every error phiforge raises on purpose."""


class NotFoundError(PhiforgeError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ConfigError(PhiforgeError, ValueError):
    """A config, recipe, preset or command option is wrong."""


class RecipeError(ConfigError):
    """A run recipe or study that cannot run: named file, section or stage, and what was expected."""


class DataError(PhiforgeError, ValueError):
    """A corpus, record, shard or data file is wrong."""


class FormatError(PhiforgeError, ValueError):
    """A weights, checkpoint, GGUF or tokenizer file is missing, damaged or not supported."""


class ModelError(PhiforgeError, ValueError):
    """A request the model, engine or quantizer cannot serve (too long, unsupported layout, wrong dtype)."""


class TrainError(PhiforgeError, ValueError):
    """A training run cannot start or resume as asked."""


class EvalError(PhiforgeError, ValueError):
    """An eval task, its data or its scoring request is wrong."""


class ExternalError(PhiforgeError, RuntimeError):
    """Something phiforge drives failed: a teacher, a server, the sandbox, a native build."""
