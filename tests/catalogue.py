"""The bad-input catalogue as data: every case is a command that must exit 2 with a message naming the culprit
and write nothing. `tests/test_catalogue.py` runs every case; `tools/reliability_doc.py` writes the table of
docs/RELIABILITY.md from the same list (and a test checks the doc is current).

Each area keeps its cases in its own module (`catalogue_<area>.py` beside this file, not collected by pytest);
add a case there with `case(...)`. A case's `make(tmp)` builds its bad input under the temporary folder `tmp`
and returns the CLI arguments (`{tmp}` may appear in `message`, replaced by the folder).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

AREAS = ("recipe", "data", "model", "output", "artifact", "bench")


@dataclass(frozen=True)
class Case:
    id: str  # short slug, unique over all areas
    area: str  # one of AREAS
    what: str  # the bad input, in a few words (the doc's first column)
    make: Callable[[Path], list[str]]  # builds the input under tmp, returns `sdsonnx` CLI arguments
    message: str  # regex the one-line message must match; names the culprit ({tmp} = the temporary folder)
    exit_code: int = 2
    output: str | None = None  # path (relative to tmp) that must not exist afterwards (None: nothing checked)
    marks: tuple = field(default_factory=tuple)  # pytest marks, e.g. (pytest.mark.slow,)


def case(area: str, id: str, what: str, make: Callable[[Path], list[str]], message: str, **kwargs) -> Case:
    if area not in AREAS:
        raise ValueError(f"unknown catalogue area {area!r}")
    return Case(id, area, what, make, message, **kwargs)


def all_cases() -> list[Case]:
    """Every case of every area module, in area order."""
    import importlib

    cases: list[Case] = []
    for area in AREAS:
        try:
            module = importlib.import_module(f"catalogue_{area}")
        except ModuleNotFoundError as exc:
            if exc.name != f"catalogue_{area}":
                raise
            continue
        cases += module.CASES
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate catalogue case ids: {dupes}")
    return cases
