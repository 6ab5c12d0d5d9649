"""The one error module: every bad-input error derives from InputError; the CLI catches that one type.

Exit codes (an interface for deployment pipelines, docs/RELIABILITY.md):
  0  success
  2  bad input (InputError: a recipe, path, model, text, artifact or option that cannot be used) or a failed
     validation; one line that names the culprit (file, field, path, initializer) and what to do
  1  internal error: anything else, printed with its traceback and a request to report it

Each module keeps its own error class (RecipeError, DataSourceError, ...) so that messages and tests can tell
them apart; all of them derive from InputError. Code that catches errors to turn them into messages catches
InputError, never ValueError (a ValueError from a library is an internal error, not the user's).
"""
from __future__ import annotations

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class InputError(Exception):
    """Bad input from the user: exit code 2, message printed without a traceback."""

    exit_code = EXIT_BAD_INPUT


class OutputExistsError(InputError):
    """The output path already holds a result (or is being written by another process)."""
