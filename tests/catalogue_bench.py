"""Catalogue: bench inputs that must be refused with exit 2 (and no hang), nothing written.

The exports are catalogue_artifact's hand-built tiny ONNX graphs; the DeepSparse worker is a fake python script
(passed with --deepsparse-python) that answers the venv probe and then crashes or hangs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from catalogue import case
from catalogue_artifact import tiny_onnx

FAST = ["--seq", "4", "--decode", "0", "--warmup", "0", "--reps", "1", "--threads", "1"]
FAKE_WORKER = """#!{python}
import os, sys, time
if sys.argv[1:2] == ["-c"]:  # find_deepsparse_python's probe: deepsparse and numpy versions
    print("1.8.0 1.26.4")
    sys.exit(0)
if {hang}:
    time.sleep(600)
sys.stderr.write("Assertion at src/lib/engine/fake.cpp:1\\n")
sys.stderr.flush()
os.abort()
"""


def different_models(tmp: Path) -> list[str]:
    dense = tiny_onnx(tmp / "dense", vocab=128, hidden=64)
    sparse = tiny_onnx(tmp / "sparse", vocab=96, hidden=32)
    return ["bench", str(sparse), "--dense", str(dense), "--engine", "onnxruntime", *FAST, "-o", str(tmp / "bench")]


def fake_deepsparse(hang: bool):
    """A case maker: bench a tiny export with DeepSparse only, its worker a script that hangs or crashes."""
    def make(tmp: Path) -> list[str]:
        python = tmp / "fake-python"
        python.write_text(FAKE_WORKER.format(python=sys.executable, hang=hang))
        python.chmod(0o755)
        export = tiny_onnx(tmp / "export")
        return ["bench", str(export), "--engine", "deepsparse", *FAST, "--deepsparse-python", str(python),
                "--deepsparse-timeout", "2", "-o", str(tmp / "bench")]
    return make


CASES = [
    case("bench", "bench-different-models", "a dense and a sparse export of different models", different_models,
         r"{tmp}/dense/model\.onnx and {tmp}/sparse/model\.onnx are exports of different models \(vocab_size 128 "
         r"vs 96; hidden_size 64 vs 32\)", output="bench"),
    case("bench", "bench-deepsparse-hangs", "a DeepSparse worker that hangs (killed after --deepsparse-timeout)",
         fake_deepsparse(hang=True), r"DeepSparse worker \({tmp}/fake-python\) on case prefill-b1-s4-p0 did not "
         r"finish within 2 s and was killed", output="bench"),
    case("bench", "bench-deepsparse-crashes", "a DeepSparse worker that crashes", fake_deepsparse(hang=False),
         r"DeepSparse worker died \(exit -6\): Assertion at src/lib/engine/fake\.cpp:1 on case prefill-b1-s4-p0",
         output="bench"),
]
