"""Quantized export keeps every pruned zero (issue 15): each scheme on a tiny 2:4 checkpoint, tampering caught by
validate, the scheme recorded per initializer, and ONNX Runtime perplexity of an export equal to PyTorch's."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from sdsonnx.artifact.export import ExportError, export_checkpoint
from sdsonnx.artifact.metadata import parse_props, read_props
from sdsonnx.artifact.onnx_eval import load_onnx, onnx_perplexity
from sdsonnx.artifact.quantize import quantize_artifact, verify_zeros
from sdsonnx.artifact.quantized import QUANT_KEY, int_weights
from sdsonnx.artifact.validate import validate_artifact
from sdsonnx.cli import main
from sdsonnx.evaluate import perplexity
from sdsonnx.models import load_model
from tiny_models import tiny_checkpoint

SCHEMES = ("int8-nbits", "int8-dynamic", "int8-static", "int4-nbits")
ZERO_POINT = {"int8-nbits": 128, "int4-nbits": 8, "int8-dynamic": 0, "int8-static": 0}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """{arch: (checkpoint, fp32 export)} of tiny 2:4 checkpoints; qwen2 has a tied LM head."""
    root = tmp_path_factory.mktemp("q")
    out = {}
    for arch in ("llama", "qwen2"):
        ckpt = tiny_checkpoint(arch, root / f"{arch}-ckpt", "2:4")
        out[arch] = ckpt, root / f"{arch}-fp32"
        export_checkpoint(ckpt, out[arch][1])
    return out


@pytest.fixture(scope="module")
def quantized(fp32, tmp_path_factory):
    """{scheme: folder} of the tiny llama quantized with each scheme (int8-static calibrated on 4 x 32 tokens)."""
    root = tmp_path_factory.mktemp("schemes")
    calibration = np.random.default_rng(0).integers(4, 128, (4, 32))
    return {s: quantize_artifact(fp32["llama"][1], root / s, s, calibration) and root / s for s in SCHEMES}


def _fp32_weights(folder):
    """{initializer: array} of the fp32 export's 2-D initializers and its manifest modules."""
    model = onnx.load(folder / "model.onnx")
    manifest = json.loads((folder / "sdsonnx.json").read_text())
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) == 2}, manifest["modules"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_zero_and_every_2_4_group_survive(fp32, quantized, scheme):
    arrays, modules = _fp32_weights(fp32["llama"][1])
    weights = {w.source: w for w in int_weights(onnx.load(quantized[scheme] / "model.onnx"), quantized[scheme]).values()}
    kept_fp32 = {"int8-dynamic": "down_proj", "int8-static": "down_proj"}.get(scheme, "never")
    checked = 0
    for module, entry in modules.items():
        if kept_fp32 in module:
            assert entry["initializer"] not in weights
            continue
        w = weights[entry["initializer"]]
        ref = arrays[entry["initializer"]]  # [in, out]
        q = w.q if w.axis == 0 else w.q.T  # -> [in, out]
        zp = (w.zp if w.axis == 0 else w.zp.T)
        scale = (w.scale if w.axis == 0 else w.scale.T)
        pruned = ref == 0
        assert pruned.mean() == 0.5
        assert np.all(zp == ZERO_POINT[scheme])
        assert np.all(q[pruned] == ZERO_POINT[scheme])  # int8: the integer 0
        assert np.all((q[pruned] - zp[pruned]) * scale[pruned] == 0.0)
        for out_col in range(q.shape[1]):  # brute force: every 4 consecutive inputs keep <= 2 off the zero point
            for start in range(0, q.shape[0], 4):
                assert np.count_nonzero(q[start:start + 4, out_col] != zp[start:start + 4, out_col]) <= 2
        checked += 1
    assert checked == (14 if kept_fp32 == "never" else 12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_metadata_records_scheme_and_validate_passes(fp32, quantized, scheme):
    folder = quantized[scheme]
    meta, problems = parse_props(read_props(onnx.load(folder / "model.onnx", load_external_data=False)))
    assert problems == [] and meta.format_version == 2
    info = json.loads(meta.quantization)
    assert info["scheme"] == scheme
    schemes = {e.module: e.scheme for e in meta.initializers.values()}
    assert len(schemes) == 14
    for module, recorded in schemes.items():
        expected = "fp32" if scheme.startswith("int8-") and scheme != "int8-nbits" and "down_proj" in module else scheme
        assert recorded == expected, module
    assert {e.zero_point for e in meta.initializers.values() if e.scheme != "fp32"} == {ZERO_POINT[scheme]}
    manifest = json.loads((folder / "sdsonnx.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme and manifest["sparsity"]["pattern"] == "2:4"
    assert manifest["sparsity"]["zeros"] >= 0.5 * manifest["sparsity"]["numel"]
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "sdsonnx.json", "config.json", "tokenizer.json"}
    report = validate_artifact(folder, fp32["llama"][0], write=False)
    assert report.ok, report.failures
    assert any(n.startswith(f"quantized numerics ({scheme})") for n in report.notes)
    assert validate_artifact(folder, write=False).ok


def _tamper(src, dst, scheme, fp32_folder):
    """Copy `src` to `dst` with one pruned weight of q_proj in block 0 stored one step off its zero point."""
    shutil.copytree(src, dst)
    model = onnx.load(dst / "model.onnx")
    arrays, modules = _fp32_weights(fp32_folder)
    source = modules["model.layers.0.self_attn.q_proj"]["initializer"]
    i, j = (int(v) for v in np.argwhere(arrays[source] == 0)[0])  # [in, out]
    for t in model.graph.initializer:
        if t.name in (source + "_quantized", source + "_Q8", source + "_Q4"):
            a = numpy_helper.to_array(t).copy()
            if a.ndim == 2:  # int8 [in, out]
                a[i, j] = 1
            else:  # MatMulNBits 8-bit [out, in/32, 32]
                a.reshape(a.shape[0], -1)[j, i] += 1
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(model, dst / "model.onnx")
    return dst


@pytest.mark.parametrize("scheme", ["int8-nbits", "int8-dynamic"])
def test_tampered_pruned_weight_fails_validate(fp32, quantized, scheme, tmp_path):
    bad = _tamper(quantized[scheme], tmp_path / "bad", scheme, fp32["llama"][1])
    report = validate_artifact(bad, fp32["llama"][0], write=False)
    messages = [f"{f.check}: {f.message}" for f in report.failures]
    assert any("1 pruned weight(s) not stored as the zero point" in m and m.startswith("sparsity") for m in messages)
    assert any(m.startswith("weights") and "changed after export" in m for m in messages)
    alone = validate_artifact(bad, write=False)  # without the checkpoint: sha256 and zero count
    assert not alone.ok
    assert any(f.check == "metadata" and ".zeros=" in f.message for f in alone.failures)


def test_verify_zeros_refuses_a_lost_zero(fp32, quantized):
    arrays, modules = _fp32_weights(fp32["llama"][1])
    weights = int_weights(onnx.load(quantized["int8-dynamic"] / "model.onnx"), quantized["int8-dynamic"])
    verify_zeros(weights, arrays, modules, "int8-dynamic")  # as written: fine
    w = next(w for w in weights.values() if w.module == "model.layers.1.mlp.up_proj")
    i, j = (int(v) for v in np.argwhere(arrays[w.source] == 0)[0])
    w.q = w.q.copy()
    w.q[i, j] = -3
    with pytest.raises(ExportError, match=r"did not keep the zeros of model.layers.1.mlp.up_proj .*1 pruned weight"):
        verify_zeros(weights, arrays, modules, "int8-dynamic")


def test_tied_head_is_quantized_and_zeros_kept(fp32, tmp_path):
    ckpt, folder = fp32["qwen2"]
    manifest = quantize_artifact(folder, tmp_path / "q", "int8-nbits")
    assert manifest["quantization"]["untied_lm_head"] is True
    names = {w.module for w in int_weights(onnx.load(tmp_path / "q" / "model.onnx"), tmp_path / "q").values()}
    assert "lm_head" in names and len(names) == 15
    assert validate_artifact(tmp_path / "q", ckpt, write=False).ok


def test_onnx_perplexity_equals_pytorch(fp32):
    ckpt, folder = fp32["llama"]
    windows = torch.randint(4, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    model, _ = load_model(str(ckpt))
    expected = perplexity(model, windows, progress=False)
    session, _ = load_onnx(folder)
    got = onnx_perplexity(session, windows, progress=False)
    assert abs(got / expected - 1) < 1e-4, (got, expected)


def test_cli_eval_of_an_export_folder_and_export_quantize_alias(fp32, tmp_path):
    ckpt, folder = fp32["llama"]
    text = tmp_path / "eval.txt"
    rng = np.random.default_rng(3)
    text.write_text("\n\n".join(" ".join(f"w{k}" for k in rng.integers(4, 128, 60)) for _ in range(6)))
    runner = CliRunner()
    args = ["--data", str(text), "--window", "32", "--json"]
    onnx_run = runner.invoke(main, ["eval", str(folder), *args])
    torch_run = runner.invoke(main, ["eval", str(ckpt), *args])
    assert onnx_run.exit_code == 0 and torch_run.exit_code == 0, onnx_run.output + torch_run.output
    a, b = json.loads(onnx_run.output.strip().splitlines()[-1]), json.loads(torch_run.output.strip().splitlines()[-1])
    assert set(a) == set(b) and a["tokens"] == b["tokens"] > 0
    assert abs(a["perplexity"] / b["perplexity"] - 1) < 1e-4
    result = runner.invoke(main, ["export", str(ckpt), str(tmp_path / "int8"), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "int8" / "sdsonnx.json").read_text())
    assert manifest["quantization"]["scheme"] == "int8-nbits"
    props = read_props(onnx.load(tmp_path / "int8" / "model.onnx", load_external_data=False))
    assert json.loads(props[QUANT_KEY])["scheme"] == "int8-nbits"
