"""The one error module: every bad-input error derives from InputError; the CLI catches that one type.

Exit codes (an interface for deployment pipelines, docs/RELIABILITY.md):
  0  success
  2  bad input (InputError: a recipe, path, model, text, artifact or option that cannot be used) or a failed
     validation; one line that names the culprit (file, field, path, initializer) and what to do
  1  internal error: anything else, printed with its traceback and a request to report it

Each module keeps its own error class (RecipeError, DataSourceError, ModelSourceError, UnsupportedModelError,
ExportError, CheckpointError, WeightMappingError, BenchError, DeepSparseCompatError, DeepSparseUnavailable,
NumericalError, ...) so that messages and tests can tell them apart; all of them derive from InputError. Code that
catches errors to turn them into messages catches InputError, never ValueError (a ValueError from a library is an
internal error, not the user's).

Compatibility: the module classes that were ValueError subclasses before (RecipeError, DataSourceError, ...) keep
ValueError as a second base (`class RecipeError(InputError, ValueError)`), DeepSparseUnavailable keeps
RuntimeError: callers and tests that catch the old base still work. Only InputError decides the exit code.
"""
from __future__ import annotations

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class InputError(Exception):
    """Bad input from the user: exit code 2, message printed without a traceback."""

    exit_code = EXIT_BAD_INPUT


class OutputExistsError(InputError):
    """The output path already holds a result (or is being written by another process)."""


class NumericalError(InputError):
    """NaN/Inf in a block's activations or a stage's output weights during a run: names block and module.

    An input error because its cause is the model or the calibration data (a NaN weight, an overflowing dtype
    such as float16 activations), not sdsonnx; the message says what to try."""
