"""Catalogue: output paths that cannot take a result (exit 2, the path named, nothing written there).

How each is made: a file where the output folder goes; an unwritable folder is a real read-only place, a path
under /sys (sysfs refuses mkdir even for root, so no chmod or os.access monkeypatching is needed); a full disk is
simulated: the exporter (optimum's writer, `sdsonnx.artifact.export._run_optimum`) is replaced for that one call
by one that writes part of model.onnx and raises OSError(ENOSPC), as a real full disk makes it do. The replacement
removes itself on its first call and only ever fails for that case's own folder, so it cannot leak into other
tests. Export cases use a folder with only a config.json: the output is refused before anything else is read.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from catalogue import case
from catalogue_data import GOOD, data_recipe

UNWRITABLE = "/sys/sdsonnx-catalogue/out"


def fake_checkpoint(tmp: Path) -> Path:
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp / "ckpt"


def export_to(prepare):
    """A case maker: export a (fake) checkpoint to tmp/out after `prepare(tmp)` has set up the bad output."""
    def make(tmp: Path) -> list[str]:
        ckpt = fake_checkpoint(tmp)
        return ["export", str(ckpt), str(prepare(tmp))]
    return make


def a_file(tmp: Path) -> Path:
    (tmp / "out").write_text("not an output folder\n")
    return tmp / "out"


def existing(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "model.onnx").write_bytes(b"a previous export")
    return tmp / "out"


def full_disk(tmp: Path) -> list[str]:
    import sdsonnx.artifact.export as export
    from tiny_models import tiny_checkpoint

    ckpt = tiny_checkpoint("llama", tmp / "ckpt")
    original = export._run_optimum

    def no_space_left(checkpoint: Path, out: Path, task: str, opset: int | None) -> None:
        export._run_optimum = original  # once
        if not out.is_relative_to(tmp):
            return original(checkpoint, out, task, opset)
        with open(out / "model.onnx", "wb") as f:
            f.write(b"\x08\x07" * 512)  # the first kilobyte, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "model.onnx"))

    export._run_optimum = no_space_left
    return ["export", str(ckpt), str(tmp / "out"), "--task", "text-generation"]


def run_over_existing(tmp: Path) -> list[str]:
    args = data_recipe({"eval.txt": GOOD}, evaluation="eval.txt")(tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "report.json").write_text("{}")
    return args


def resume_another_run(tmp: Path) -> list[str]:
    """--resume into a work area whose committed state came from another recipe/model/data."""
    args = data_recipe({"eval.txt": GOOD}, evaluation="eval.txt")(tmp)
    state = tmp / ".out.sdsonnx-work" / "resume"
    state.mkdir(parents=True)
    identity = {"recipe_hash": "0" * 64, "model": ["elsewhere", []], "calibration": "0", "windows": "0"}
    (state / "state.json").write_text(json.dumps({"format": 1, "identity": identity, "next_block": 1}))
    return [*args, "--resume"]


def bench_over_existing(tmp: Path) -> list[str]:
    (tmp / "results").mkdir()
    return ["bench", str(tmp / "artifact"), "--output", str(tmp / "results")]


CASES = [
    case("output", "output-is-file", "an output path that is a file (export)", export_to(a_file),
         r"{tmp}/out'?:? (the output path )?is a file"),  # click's Path check or atomic_output's
    case("output", "output-unwritable", "an unwritable output folder (under read-only /sys)",
         export_to(lambda tmp: Path(UNWRITABLE)), rf"{UNWRITABLE}: cannot write the output there"),
    case("output", "output-disk-full", "a full disk while writing (ENOSPC, simulated in the exporter)", full_disk,
         r"{tmp}/out: the disk is full", output="out"),
    case("output", "output-exists-export", "an existing export folder without --force", export_to(existing),
         r"{tmp}/out already exists: pass --force to replace it"),
    case("output", "output-exists-run", "an existing run output without --force", run_over_existing,
         r"{tmp}/out already exists: pass --force to replace it"),
    case("output", "resume-another-run", "run --resume over a work area left by another recipe, model and data",
         resume_another_run, r"{tmp}/\.out\.sdsonnx-work/resume/state\.json: cannot resume: recipe_hash and model "
         r"and calibration and windows changed"),
    case("output", "output-exists-bench", "an existing bench output without --force", bench_over_existing,
         r"{tmp}/results already exists: pass --force to replace it"),
]
