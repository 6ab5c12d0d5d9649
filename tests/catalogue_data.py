"""Catalogue: calibration and evaluation texts that cannot be used (exit 2, recipe field and file named).

Every case runs a recipe on a tiny random checkpoint (tests/tiny_models.py) with output tmp/out. File problems
(missing, empty, binary, non-UTF-8, no 'text' field, an empty part) are found before the weights load; too few
tokens once the tokenizer has read the text.
"""
from __future__ import annotations

import json
from pathlib import Path

from catalogue import case

WORDS = " ".join(f"w{i}" for i in range(4, 100))  # 96 tokens of the tiny word tokenizer
GOOD = "\n".join([WORDS] * 4) + "\n"


def data_recipe(files: dict[str, bytes | str | None], calibration: str = "good.txt", evaluation: str = "good.txt",
                extra: str = ""):
    """A case maker: write `files` (bytes, text, or None for a parquet table without a 'text' column) and the
    good text under tmp, a tiny checkpoint as tmp/model, and run a recipe reading `calibration` and
    `evaluation` (file names under tmp, or wiki-extracts; `extra` is added to the calibration mapping)."""
    def make(tmp: Path) -> list[str]:
        from tiny_models import tiny_checkpoint

        tiny_checkpoint("llama", tmp / "model", pattern=None, report=False)
        for name, content in {"good.txt": GOOD, **files}.items():
            if content is None:
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table({"body": ["w4 w5", "w6 w7"]}), tmp / name)
            elif isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
        cal, ev = (name if name == "wiki-extracts" else tmp / name for name in (calibration, evaluation))
        (tmp / "recipe.yaml").write_text(
            f"model: {tmp / 'model'}\n"
            f"calibration: {{source: {cal}, segments: 2, length: 16{extra}}}\n"
            f"evaluation: {{source: {ev}, window: 16}}\n"
            "stages:\n  - {kind: prune, method: magnitude, sparsity: 0.5}\n")
        return ["run", str(tmp / "recipe.yaml"), "--output", str(tmp / "out")]
    return make


def field(section: str, file: str) -> str:
    """The start of the message: recipe file, recipe field, data file."""
    return rf"{{tmp}}/recipe\.yaml: {section}(\.source)?: .*{{tmp}}/{file.replace('.', chr(92) + '.')}"


CASES = [
    case("data", "data-missing-file", "a data file that does not exist", data_recipe({}, evaluation="missing.txt"),
         field("evaluation", "missing.txt") + ".*not a text source", output="out"),
    case("data", "data-empty-txt", "an empty .txt file", data_recipe({"empty.txt": ""}, evaluation="empty.txt"),
         field("evaluation", "empty.txt") + ": no text", output="out"),
    case("data", "data-blank-jsonl", "a .jsonl whose texts are all blank",
         data_recipe({"blank.jsonl": '{"text": " "}\n{"text": ""}\n'}, calibration="blank.jsonl"),
         field("calibration", "blank.jsonl") + ": no text", output="out"),
    case("data", "data-binary-txt", "a binary file given as .txt",
         data_recipe({"model.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, calibration="model.txt"),
         field("calibration", "model.txt") + ": binary content", output="out"),
    case("data", "data-non-utf8-txt", "a non-UTF-8 .txt (Latin-1)",
         data_recipe({"latin1.txt": "caf\u00e9 w4 w5\n".encode("latin-1")}, evaluation="latin1.txt"),
         field("evaluation", "latin1.txt") + r": not UTF-8 \(byte 0xe9 at offset 3\)", output="out"),
    case("data", "data-jsonl-no-text", "a .jsonl without a `text` field",
         data_recipe({"rows.jsonl": json.dumps({"body": WORDS}) + "\n"}, calibration="rows.jsonl"),
         field("calibration", "rows.jsonl") + r": rows need a 'text' field; found \['body'\]", output="out"),
    case("data", "data-jsonl-not-json", "a .jsonl line that is not JSON",
         data_recipe({"rows.jsonl": '{"text": "w4"}\n{text: w5}\n'}, calibration="rows.jsonl"),
         field("calibration", "rows.jsonl") + ": line 2 is not JSON", output="out"),
    case("data", "data-parquet-no-text", "a .parquet without a `text` column",
         data_recipe({"rows.parquet": None}, evaluation="rows.parquet"),
         field("evaluation", "rows.parquet") + r": rows need a 'text' field; found \['body'\]", output="out"),
    case("data", "data-parquet-corrupt", "a .parquet that is not parquet",
         data_recipe({"rows.parquet": b"PAR1 truncated"}, evaluation="rows.parquet"),
         field("evaluation", "rows.parquet") + ": not a readable parquet file", output="out"),
    case("data", "data-empty-part", "one file for both sections, too short for an evaluation part",
         data_recipe({"two.txt": "w4 w5\nw6 w7\n"}, calibration="two.txt", evaluation="two.txt"),
         field("evaluation", "two.txt") + r": its evaluation part .* holds no text", output="out"),
    case("data", "data-split-builtin", "`split: all` on the built-in wiki-extracts",
         data_recipe({}, calibration="wiki-extracts", extra=", split: all"),
         r"{tmp}/recipe\.yaml: calibration\.split: 'wiki-extracts'.*split: all", output="out"),
    case("data", "data-calibration-too-few-tokens", "calibration text with fewer tokens than the segments need",
         data_recipe({"short.txt": "w4 w5 w6\n"}, calibration="short.txt"),
         field("calibration", "short.txt") + ": 3 tokens in 1 documents; 2 segments of 16 need 32", output="out"),
    case("data", "data-evaluation-shorter-than-window", "an evaluation text shorter than one window",
         data_recipe({"short.txt": "w4 w5 w6\n"}, evaluation="short.txt"),
         field("evaluation", "short.txt") + ": gives no full window: 3 tokens, window 16", output="out"),
]
