"""Every catalogue case (tests/catalogue.py): exit 2, one line naming the culprit, no traceback, nothing written."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from catalogue import all_cases
from sdsonnx.cli import main

CASES = all_cases()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_exits_with_a_clear_message(case, tmp_path):
    args = case.make(tmp_path)
    result = CliRunner().invoke(main, args)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == case.exit_code, f"exit {result.exit_code}: {text}\n{result.exception!r}"
    assert "Traceback" not in text, text
    pattern = case.message.replace("{tmp}", re.escape(str(tmp_path)))
    assert re.search(pattern, text), f"message does not match {pattern!r}:\n{text}"
    if case.output is not None:
        assert not (tmp_path / case.output).exists(), f"{case.output} was written"


def test_reliability_doc_lists_every_case():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    from reliability_doc import render_table

    doc = (root / "docs" / "RELIABILITY.md").read_text()
    assert render_table(CASES) in doc, "docs/RELIABILITY.md is stale: run .venv/bin/python tools/reliability_doc.py"
