"""report.json as typed records: round trip, the keys a real tiny run writes equal the documented ones, no -0.0."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sdsonnx.recipe import parse_recipe
from sdsonnx.report import (REPORT_VERSION, CalibrationRecord, EvaluationRecord, ExportRecord, FigureRecord,
                            HostRecord, ModuleRecord, RunReport, StageRecord, ValidationRecord, read_report,
                            write_report)
from sdsonnx.run import timed
from tiny_models import tiny_checkpoint

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARTIFACTS.md"


def documented_keys() -> tuple[set[str], set[str], dict[str, set[str]]]:
    """(top-level keys, module keys, {stage kind: own keys}) from docs/ARTIFACTS.md's report.json section."""
    section = DOC.read_text().split("## report.json", 1)[1].split("\n## ", 1)[0].replace("\\|", "/")
    tables = [t for t in re.split(r"\n\s*\n", section) if t.lstrip().startswith("| ")]
    first_col = [[row.split("|")[1].strip() for row in t.strip().splitlines()[2:]] for t in tables]
    top = {k.strip("`") for k in first_col[0]}
    module = {k.strip("`") for k in first_col[1]}
    stage_rows = {row.split("|")[1].strip().strip("`"): row.split("|")[2] for row in tables[2].strip().splitlines()[2:]}
    stage = {kind: set(re.findall(r"`([a-z_0-9]+)`", text)) - {"gram", "first", "second", "adjusted"}
             for kind, text in stage_rows.items()}
    return top, module, stage


def sample_report() -> RunReport:
    stages = [StageRecord("prune", 0.5, 0.125, 0.01),
              StageRecord("second_prune", 0.5, 0.0625, 0.02, {"kept": "adjusted", "loss_adjusted": None})]
    module = ModuleRecord(1, "2:4", [8, 16], 128, stages)
    module.finish()
    return RunReport("0.1", "ab" * 32, "tiny", "sparsegpt", ["prune", "second_prune"], "2:4", "uniform",
                     CalibrationRecord("c.txt", 4, 16, 0), EvaluationRecord("c.txt", 2, 16, 32),
                     {"dense": 10.0, "pruned": 11.5}, 0.5, {"load": 0.25, "prune": 1.5}, 1 << 20, None,
                     HostRecord("3.11.0", "2.5.0", 1), {"model.layers.1.mlp.up_proj": module},
                     weight_figure=FigureRecord("model.layers.1.mlp.up_proj", "weights.png"),
                     export=ExportRecord("onnx", ValidationRecord(False, ["sparsity: x: broken"])))


def test_round_trip_through_the_file(tmp_path):
    report = sample_report()
    write_report(report, tmp_path)
    back = read_report(tmp_path)
    assert back == report and back.report_version == REPORT_VERSION == 2
    data = json.loads((tmp_path / "report.json").read_text())
    assert list(data)[0] == "report_version"
    assert data["modules"]["model.layers.1.mlp.up_proj"]["stages"][1] == {
        "stage": "second_prune", "sparsity": 0.5, "error": 0.0625, "seconds": 0.02, "kept": "adjusted",
        "loss_adjusted": None}  # a stage's own keys sit beside the common ones
    assert data["modules"]["model.layers.1.mlp.up_proj"]["sparsity"] == 0.5
    assert data["export"] == {"folder": "onnx", "validation": {"ok": False, "failures": ["sparsity: x: broken"]}}


def test_optional_entries_are_left_out_and_old_reports_read_as_version_0():
    report = sample_report()
    report.weight_figure = report.export = None
    data = report.to_dict()
    assert "weight_figure" not in data and "export" not in data
    del data["report_version"]
    back = RunReport.from_dict(data)
    assert back.report_version == 0 and back.modules == report.modules
    assert "trust_remote_code" not in data and back.trust_remote_code is None
    report.trust_remote_code = True  # recorded only when the recipe let the model's code run
    assert RunReport.from_dict(report.to_dict()).trust_remote_code is True


def test_timed_adds_up():
    wall = {}
    with timed(wall, "a"):
        pass
    first = wall["a"]
    with timed(wall, "a"):
        sum(range(10000))
    assert wall["a"] > first >= 0 and list(wall) == ["a"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real `run` of SDS-Wanda 2:4 on a tiny random LLaMA: checkpoint and report.json."""
    from sdsonnx.run import run_recipe

    root = tmp_path_factory.mktemp("run")
    model_dir = tiny_checkpoint("llama", root / "model", pattern=None, report=False)
    text = root / "corpus.txt"
    text.write_text("\n".join(" ".join(f"w{4 + (7 * i + j) % 120}" for j in range(24)) for i in range(80)) + "\n")
    recipe = parse_recipe({
        "model": str(model_dir), "device": "cpu",
        "calibration": {"source": str(text), "segments": 4, "length": 16},
        "evaluation": {"source": str(text), "window": 16, "max_tokens": 64},
        "stages": [{"kind": "prune", "method": "wanda", "pattern": "2:4", "profile": "uniform"},
                   {"kind": "redense", "max_iter": 10}, {"kind": "second_prune", "max_iter": 10}]})
    out = root / "out"
    returned = run_recipe(recipe, out, progress=False)
    return out, returned


def test_a_real_runs_report_has_exactly_the_documented_keys(tiny_run):
    out, returned = tiny_run
    data = json.loads((out / "report.json").read_text())
    assert returned == data
    top, module, stage = documented_keys()
    # no export in this recipe, trust_remote_code not set (written only when true); weight_figure is drawn by default
    # optional ones a CPU run without permute: residual omits
    assert set(data) == top - {"export", "trust_remote_code", "peak_device_bytes", "residual_permutation"}
    assert data["report_version"] == REPORT_VERSION
    assert set(data["perplexity"]) == {"dense", "after_1_prune", "after_2_redense", "pruned"}
    assert set(data["wall_seconds"]) == {"load", "eval_dense", "prune", "stage_prune", "stage_redense",
                                         "stage_second_prune", "eval_steps", "eval_pruned"}
    assert len(data["modules"]) == 14
    for record in data["modules"].values():
        assert set(record) == module
        for rec in record["stages"]:
            own = set(rec) - {"stage", "sparsity", "error", "seconds"}
            allowed = stage[rec["stage"]] - {"seconds"}
            optional = {"restarts", "adjust_per_row"}
            assert allowed - optional <= own <= allowed, rec["stage"]
    assert read_report(out).to_dict() == data


def test_saved_checkpoint_has_no_negative_zeros(tiny_run):
    """-0.0 is zero to torch but not to a byte-level consumer: the saved pruned weights hold +0.0 only."""
    from safetensors.torch import load_file

    out, returned = tiny_run
    weights = {k: v for shard in out.glob("model-*.safetensors") for k, v in load_file(str(shard)).items()}
    for name, record in returned["modules"].items():
        w = weights[f"{name}.weight"]
        assert int((w == 0).sum()) == w.numel() // 2, name
        assert not bool((torch.signbit(w) & (w == 0)).any()), name
