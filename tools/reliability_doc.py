"""Regenerate the catalogue table of docs/RELIABILITY.md from tests/catalogue*.py (the tests check it is current).

  .venv/bin/python tools/reliability_doc.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"


def render_table(cases) -> str:
    """Markdown table: area, bad input, command, exit code, message (regex the test matches)."""
    rows = ["| area | bad input | exit | message matches |", "|---|---|---|---|"]
    for c in cases:
        message = c.message.replace("|", "\\|")
        rows.append(f"| {c.area} | {c.what} | {c.exit_code} | `{message}` |")
    return "\n".join(rows)


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from catalogue import all_cases

    table = render_table(all_cases())
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    print(f"wrote {DOC} ({table.count(chr(10)) - 1} cases)")


if __name__ == "__main__":
    main()
