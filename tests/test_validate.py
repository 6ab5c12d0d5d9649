"""`sdsonnx validate`: clean exports pass; each kind of tampering fails with a message naming what and where."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.numpy import load_file

from sdsonnx.cli import main
from sdsonnx.artifact.export import export_checkpoint
from sdsonnx.artifact.initializers import consumers, load_initializers, map_weights
from sdsonnx.artifact.metadata import (describe_initializer, global_sparsity, parse_props, read_props, to_props,
                                       write_metadata)
from sdsonnx.artifact.validate import CASES, DECODE_STEPS, validate_artifact
from sdsonnx.masks import first_group_violation
from tiny_models import tiny_checkpoint


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """{arch: (checkpoint, export)}: 2:4 LLaMA with past, 2:4 OPT without past."""
    root = tmp_path_factory.mktemp("clean")
    made = {}
    for arch, task in (("llama", "text-generation-with-past"), ("opt", "text-generation")):
        ckpt = tiny_checkpoint(arch, root / f"ckpt_{arch}", pattern="2:4")
        export_checkpoint(ckpt, root / f"onnx_{arch}", task=task)
        made[arch] = ckpt, root / f"onnx_{arch}"
    return made


def tampered(src: Path, dst: Path, edit) -> Path:
    """Copy the export folder and apply edit(model proto) to its model.onnx."""
    shutil.copytree(src, dst)
    model = onnx.load(dst / "model.onnx")
    edit(model)
    onnx.save(model, dst / "model.onnx")
    return dst


def initializer_of(folder: Path, ckpt: Path, module: str) -> str:
    """The ONNX initializer name holding `module`'s weight, found by value."""
    proto = onnx.load(folder / "model.onnx", load_external_data=False)
    w = load_file(ckpt / "model.safetensors")[module + ".weight"]
    found, _ = map_weights({module: w}, load_initializers(proto, folder), consumers(proto))
    return found[module].initializer


def edit_initializer(name: str, change):
    def edit(model):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        array = numpy_helper.to_array(tensor).copy()
        change(array)
        tensor.CopyFrom(numpy_helper.from_array(array, name))
    return edit


def messages(report, check=None) -> list[str]:
    return [f.message for f in report.failures if check is None or f.check == check]


def test_clean_exports_pass(clean):
    ckpt, out = clean["llama"]
    report = validate_artifact(out, ckpt)
    assert report.ok, report.failures
    assert len(report.numerics) == len(CASES) * (1 + DECODE_STEPS)
    assert all(r["max_abs"] < 1e-5 and r["top1_agreement"] == 1.0 for r in report.numerics)
    assert sum(r["positions"] for r in report.numerics if r["case"].endswith("prefill")) == 7 + 24 + 16 + 11 + 3
    assert len(report.weights) == 14 and all(w["matches_checkpoint"] for w in report.weights)
    alone = validate_artifact(out)  # against the metadata only
    assert alone.ok and alone.numerics == [] and "numerics skipped" in alone.notes[0]
    assert json.loads((out / "validation.json").read_text())["ok"] is True
    ckpt, out = clean["opt"]
    report = validate_artifact(out, ckpt)
    assert report.ok, report.failures
    assert len(report.numerics) == len(CASES)


@pytest.mark.parametrize("arch, module, where", [
    ("llama", "model.layers.1.mlp.up_proj", "[8:12, 5]"),  # MatMul B, stored [in, out]: groups down a column
    ("opt", "model.decoder.layers.1.fc1", "[5, 8:12]"),  # Gemm transB=1, stored [out, in]: groups along a row
])
def test_one_group_breaking_2_4(clean, tmp_path, arch, module, where):
    ckpt, out = clean[arch]
    name = initializer_of(out, ckpt, module)

    def break_group(a):  # give output 5, inputs 8..11 a third nonzero
        group = a[8:12, 5] if name.startswith("onnx::") else a[5, 8:12]
        group[np.flatnonzero(group == 0)[0]] = 0.25

    bad = tampered(out, tmp_path / "bad", edit_initializer(name, break_group))
    first = f"{name} ({module}): 1 group(s) break 2:4; first: stored elements {where} (output 5, inputs 8..11) " \
            f"hold 3 nonzeros > 2"
    report = validate_artifact(bad, ckpt)
    assert first in messages(report, "sparsity")
    assert any(m.startswith(f"{name} ({module}): sparsity ") and "but the checkpoint has 0.500000" in m
               for m in messages(report, "sparsity"))
    assert any(f"{name} ({module}) differs from the checkpoint: 1 element(s) differ" in m
               for m in messages(report, "weights"))
    alone = validate_artifact(bad)
    assert first in messages(alone, "sparsity")
    assert f"{name} ({module}) changed after export: its sha256 differs from the one in sdsonnx.initializers" \
        in messages(alone, "weights")
    assert any(m.startswith(f"sdsonnx.initializers[{name}].zeros=") for m in messages(alone, "metadata"))
    assert any(m.startswith("sdsonnx.sparsity=0.5 but the weights it lists give") for m in messages(alone, "metadata"))
    assert "sdsonnx.pattern='2:4' but the weights it lists satisfy 'unstructured'" in messages(alone, "metadata")


def test_recorded_request_is_checked_without_a_checkpoint(clean, tmp_path):
    """sdsonnx.json records 2:4 for up_proj; its initializer breaks 2:4 and the metadata is re-written to match."""
    ckpt, out = clean["llama"]
    module = "model.layers.1.mlp.up_proj"
    name = initializer_of(out, ckpt, module)

    def break_group_and_rewrite_metadata(model):
        edit_initializer(name, lambda a: a.__setitem__((8 + int(np.flatnonzero(a[8:12, 5] == 0)[0]), 5), 0.25))(model)
        props = read_props(model)
        meta, _ = parse_props(props)
        stored = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        meta.initializers[name], _ = describe_initializer(module, stored, 0)
        meta.sparsity, meta.pattern = global_sparsity(meta.initializers), "unstructured"  # validate checks both
        write_metadata(model, to_props(meta))
        manifest["sparsity"]["global"] = meta.sparsity

    manifest = json.loads((out / "sdsonnx.json").read_text())
    bad = tampered(out, tmp_path / "bad", break_group_and_rewrite_metadata)
    (bad / "sdsonnx.json").write_text(json.dumps(manifest))
    assert manifest["modules"][module]["recorded"]["pattern"] == "2:4"
    report = validate_artifact(bad)
    assert messages(report) == [f"{name} ({module}): 1 group(s) break 2:4, the pattern sdsonnx.json records as "
                                "requested; first: stored elements [8:12, 5] (output 5, inputs 8..11) hold 3 nonzeros > 2"]
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2 and "VALIDATION FAILED: 1 failure(s)" in result.output


def test_one_weight_changed_after_export(clean, tmp_path):
    ckpt, out = clean["llama"]
    module = "model.layers.0.mlp.down_proj"
    name = initializer_of(out, ckpt, module)
    positions = {}

    def scale_one(a):  # same zeros, one nonzero value changed
        i, j = (int(v) for v in np.argwhere(a != 0)[3])
        positions["ij"] = i, j
        a[i, j] *= 1.5

    bad = tampered(out, tmp_path / "bad", edit_initializer(name, scale_one))
    i, j = positions["ij"]
    report = validate_artifact(bad, ckpt)
    assert [f.check for f in report.failures if f.check != "numerics"] == ["weights", "weights"]
    assert messages(report, "weights")[0].startswith(
        f"{name} ({module}) differs from the checkpoint: 1 element(s) differ, first at stored [{i}, {j}]")
    assert messages(report, "weights")[1].startswith(f"{name} ({module}) changed after export: its sha256 differs")
    alone = validate_artifact(bad)
    assert messages(alone) == [f"{name} ({module}) changed after export: its sha256 differs from the one in "
                               "sdsonnx.initializers"]


def test_metadata_stripped(clean, tmp_path):
    ckpt, out = clean["opt"]
    bad = tampered(out, tmp_path / "bad", lambda m: m.ClearField("metadata_props"))
    for report in (validate_artifact(bad, ckpt), validate_artifact(bad)):
        assert messages(report) == ["model.onnx has no sdsonnx.* metadata (stripped or never written)"]


def test_metadata_one_key_missing(clean, tmp_path):
    ckpt, out = clean["opt"]

    def drop(model):
        keep = [p for p in model.metadata_props if p.key != "sdsonnx.sparsity"]
        del model.metadata_props[:]
        model.metadata_props.extend(keep)

    report = validate_artifact(tampered(out, tmp_path / "bad", drop))
    assert messages(report) == ["metadata key sdsonnx.sparsity is missing"]


def _set_props(values: dict[str, str]):
    def edit(model):
        for p in model.metadata_props:
            if p.key in values:
                p.value = values[p.key]
    return edit


def test_metadata_lying_about_sparsity(clean, tmp_path):
    ckpt, out = clean["llama"]
    bad = tampered(out, tmp_path / "global", _set_props({"sdsonnx.sparsity": "0.7", "sdsonnx.pattern": "1:4"}))
    report = validate_artifact(bad)
    assert messages(report) == [
        "sdsonnx.sparsity=0.7 but the weights it lists give 0.500000 (36864/73728 zeros)",
        "sdsonnx.pattern='1:4' but the weights it lists satisfy '2:4'",
        "sdsonnx.json sparsity.global=0.5 but sdsonnx.sparsity=0.7",
    ]
    with_ckpt = validate_artifact(bad, ckpt)
    assert "sdsonnx.sparsity=0.7 but the weights it lists give 0.500000 (36864/73728 zeros)" in messages(with_ckpt)
    assert any("sdsonnx.json sparsity.global=0.5 but sdsonnx.sparsity=0.7" in m for m in messages(with_ckpt))

    meta = {p.key: p.value for p in onnx.load(out / "model.onnx", load_external_data=False).metadata_props}
    entries = json.loads(meta["sdsonnx.initializers"])
    name = next(iter(sorted(entries)))
    entries[name].update(zeros=entries[name]["zeros"] - 1,
                         sparsity=(entries[name]["zeros"] - 1) / entries[name]["numel"])
    bad = tampered(out, tmp_path / "entry", _set_props({"sdsonnx.initializers": json.dumps(entries)}))
    zeros = entries[name]["zeros"]
    assert messages(validate_artifact(bad, ckpt)) == [
        f"sdsonnx.initializers[{name}].zeros={zeros} but the weight has {zeros + 1}"]


def test_metadata_from_other_weights_and_malformed(clean, tmp_path):
    ckpt, out = clean["llama"]
    bad = tampered(out, tmp_path / "hash", _set_props({"sdsonnx.source_sha256": "ab" * 32, "sdsonnx.recipe_hash": "cd"}))
    got = messages(validate_artifact(bad, ckpt), "metadata")
    assert got[0] == "sdsonnx.recipe_hash='cd' but the checkpoint's report.json has '" + "0" * 64 + "'"
    assert got[1].startswith("sdsonnx.source_sha256 does not match the checkpoint's weights (ababababab")
    bad = tampered(out, tmp_path / "json", _set_props({"sdsonnx.initializers": "{not json"}))
    got = messages(validate_artifact(bad))
    assert len(got) == 1 and got[0].startswith("metadata sdsonnx.initializers is not valid JSON")


def test_parse_props():
    assert parse_props({})[1][0] == "metadata key sdsonnx.format_version is missing"
    good = {"sdsonnx.format_version": "1", "sdsonnx.sparsity": "0.5", "sdsonnx.pattern": "2:4",
            "sdsonnx.initializers": json.dumps({"w": {"module": "m", "shape": [4, 8], "axis": 1, "zeros": 16,
                                                      "numel": 32, "sparsity": 0.5, "pattern": "2:4", "sha256": "00"}}),
            "sdsonnx.recipe_hash": "", "sdsonnx.source_sha256": "ff", "sdsonnx.version": "0.1.0"}
    meta, problems = parse_props(good)
    assert problems == [] and meta.initializers["w"].zeros == 16 and meta.sparsity == 0.5
    assert parse_props({**good, "sdsonnx.format_version": "3"})[1] == [
        "metadata sdsonnx.format_version=3 is not supported (this reader knows 1, 2)"]
    assert parse_props({**good, "sdsonnx.sparsity": "1.5"})[1] == [
        "metadata sdsonnx.sparsity='1.5' is not a number in [0, 1]"]
    assert parse_props({**good, "sdsonnx.pattern": "half"})[1] == [
        "metadata sdsonnx.pattern='half' is not dense, unstructured or n:m"]


def test_numerics_catch_a_changed_unpruned_weight(clean, tmp_path):
    """lm_head is not pruned, so only the ORT vs torch comparison can see it change."""
    ckpt, out = clean["llama"]
    name = initializer_of(out, ckpt, "lm_head")
    bad = tampered(out, tmp_path / "bad", edit_initializer(name, lambda a: a.__imul__(2.0)))
    report = validate_artifact(bad, ckpt)
    assert {f.check for f in report.failures} == {"numerics"}
    assert len(report.failures) == len(CASES) * (1 + DECODE_STEPS)
    assert report.failures[0].message.startswith("batch 1 len 7 prefill: max |logit diff| ONNX Runtime vs PyTorch ")
    row = report.numerics[0]
    assert row["tolerance"] == pytest.approx(1e-3 + 1e-3 * row["max_logit"]) and row["max_abs"] > 0.05
    assert f"> tolerance {row['tolerance']:.3g} (atol 0.001 + rtol 0.001 x max |logit|" in report.failures[0].message
    assert validate_artifact(bad).ok  # metadata alone cannot see an unpruned weight


def test_cli_exit_code_and_validation_json(clean, tmp_path):
    ckpt, out = clean["opt"]
    name = initializer_of(out, ckpt, "model.decoder.layers.0.fc2")
    bad = tampered(out, tmp_path / "bad", edit_initializer(name, lambda a: a.__setitem__((0, slice(0, 4)), 1.0)))
    result = CliRunner().invoke(main, ["validate", str(bad), "--checkpoint", str(ckpt)])
    assert result.exit_code == 2, result.output
    assert "VALIDATION FAILED" in result.output and name in result.output
    saved = json.loads((bad / "validation.json").read_text())
    assert saved["ok"] is False
    assert {f["check"] for f in saved["failures"]} >= {"sparsity", "weights", "metadata", "numerics"}
    assert any(f["subject"] == name and "first: stored elements [0, 0:4]" in f["message"] for f in saved["failures"])


def test_first_group_violation():
    a = np.zeros((8, 3), np.float32)  # stored [in, out]
    a[4:8, 2] = [1, 2, -0.0, 3]
    a[0:2, 0] = 1
    assert first_group_violation(a, 0, 2, 4) == (
        1, "stored elements [4:8, 2] (output 2, inputs 4..7) hold 3 nonzeros > 2")
    assert first_group_violation(a, 0, 3, 4) is None
    assert first_group_violation(a.T.copy(), 1, 2, 4)[1].startswith("stored elements [2, 4:8]")
    assert first_group_violation(np.ones((2, 6), np.float32), 1, 2, 4)[1] == \
        "input axis 1 has length 6, not a multiple of 4"
