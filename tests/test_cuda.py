"""The CUDA path (issue 13, item 5): only the block being processed lives on the GPU, and the answer is the CPU's.

Skipped where no CUDA device is present (CI has none); tools/gpu_check.sh runs it on a lent GPU. The loop itself
is the same code on both devices (pipeline._process_block moves one block there and back), so the CPU suite
covers its logic; these tests check what only a GPU can show.
"""
import json
import re

import pytest
import torch
from click.testing import CliRunner

from sdsonnx import pipeline
from sdsonnx.cli import main
from sdsonnx.masks import nm_violations
from sdsonnx.pipeline import prune_model
from sdsonnx.recipe import parse_recipe

from test_resume import setup
from tiny_models import calibration, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SDS = [{"kind": "prune", "method": "sparsegpt", "pattern": "2:4"}, {"kind": "redense", "max_iter": 30},
       {"kind": "second_prune", "max_iter": 30}]


def recipe(device: str, evaluation: bool = True):
    ev = {"each_step": True, "dense": True} if evaluation else None
    return parse_recipe({"model": "unused", "device": device, "evaluation": ev, "stages": SDS})


def block_of(name: str) -> str | None:
    found = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", name)
    return found.group(1) if found else None


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_only_the_block_being_processed_lives_on_the_gpu(arch, monkeypatch):
    model = tiny(arch)
    seen: list[set[str]] = []
    original = pipeline.collect_stats_and_output

    def spy(block, *args, **kwargs):
        seen.append({name for name, p in model.named_parameters() if p.is_cuda})
        return original(block, *args, **kwargs)

    monkeypatch.setattr(pipeline, "collect_stats_and_output", spy)
    prune_model(model, recipe("cuda"), calibration(), progress=False, windows=calibration(2, 32))
    blocks = {block_of(n) for n, _ in model.named_parameters()} - {None}
    assert len(seen) == 3 * len(blocks)  # one statistics pass per stage and block
    for on_gpu in seen:
        assert len({block_of(n) for n in on_gpu}) == 1 and None not in {block_of(n) for n in on_gpu}, on_gpu
    assert not any(p.is_cuda for p in model.parameters())  # every block went back


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_the_gpu_gives_the_cpu_answer(arch):
    """Same masks (but for near ties) and the same perplexities to float32 rounding across devices."""
    results, weights = {}, {}
    for device in ("cpu", "cuda"):
        model = tiny(arch)
        results[device] = prune_model(model, recipe(device), calibration(), progress=False, windows=calibration(2, 32))
        weights[device] = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    for version, ppl in results["cpu"].perplexity.items():
        assert results["cuda"].perplexity[version] == pytest.approx(ppl, rel=1e-3), version
    pruned = [n for n, rec in results["cpu"].modules.items()]
    agree = []
    for name in pruned:
        w_cpu, w_gpu = weights["cpu"][name + ".weight"], weights["cuda"][name + ".weight"]
        assert w_gpu.device.type == "cpu" and len(nm_violations(w_gpu, 2, 4)) == 0, name
        agree.append(float(((w_cpu == 0) == (w_gpu == 0)).float().mean()))
    assert min(agree) > 0.99, agree


def test_a_cuda_run_reports_its_device_peak(tmp_path):
    recipe_path = setup(tmp_path, blocks=2)
    recipe_path.write_text(recipe_path.read_text().replace("device: cpu", "device: cuda"))
    result = CliRunner().invoke(main, ["run", str(recipe_path), "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["peak_device_bytes"] > 0
