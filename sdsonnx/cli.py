"""Command line: each command parses its arguments, calls one library function and prints.

Exit codes (an interface for deployment pipelines): 0 success, 2 bad input or failed validation,
1 internal error.
"""
from __future__ import annotations

import logging
import sys

import click

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class UserError(click.ClickException):
    """Bad input from the user: printed without a traceback, exit code 2."""

    exit_code = EXIT_BAD_INPUT


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="sdsonnx")
def main(verbose: bool) -> None:
    """sdsonnx: Sparse-Dense-Sparse pruning of causal language models, exported to ONNX."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
