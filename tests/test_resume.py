"""Streaming runs and resume after real kills: SIGKILL at chosen points (mid shard write, mid state commit) and at
a random moment, then `sdsonnx run --resume` until done; the weights and report figures must equal those of an
uninterrupted run bit for bit."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sdsonnx.artifact.checkpoint import weights_digest
from sdsonnx.cli import main
from sdsonnx.outputs import KILL_ENV, siblings

from tiny_models import tiny_checkpoint

TEXT = "\n".join(" ".join(f"w{4 + (i * 7919 + j * 31) % 120}" for j in range(60)) for i in range(200))
SDS = """stages:
  - {kind: prune, method: sparsegpt, pattern: "2:4"}
  - {kind: redense, max_iter: 20}
  - {kind: second_prune, max_iter: 20}
"""


def setup(tmp: Path, blocks: int = 4, dtype: str = "float32", stages: str = SDS) -> Path:
    """A tiny 4-block LLaMA folder, a text file, and an SDS recipe that evaluates every step."""
    tiny_checkpoint("llama", tmp / "model", pattern=None, report=False, num_hidden_layers=blocks)
    (tmp / "text.txt").write_text(TEXT)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"model: {tmp / 'model'}\ndtype: {dtype}\ndevice: cpu\n"
                      f"calibration: {{source: {tmp / 'text.txt'}, segments: 4, length: 32}}\n"
                      f"evaluation: {{source: {tmp / 'text.txt'}, window: 32, max_tokens: 512}}\n" + stages)
    return recipe


def sdsonnx(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from sdsonnx.cli import main; main()", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def figures(folder: Path) -> dict:
    """report.json without what legitimately differs between runs (times, memory, host)."""
    report = json.loads((folder / "report.json").read_text())
    for key in ("wall_seconds", "peak_rss_bytes", "host", "recipe_hash"):  # the hash covers the output path
        report.pop(key, None)
    for module in report["modules"].values():
        for stage in module["stages"]:
            stage.pop("seconds", None)
    return report


def test_streamed_run_equals_the_in_memory_loop_and_writes_one_shard_per_block(tmp_path):
    """The CLI's streamed run (skeleton + shards) against prune_model on the whole model: same weights, same
    perplexities."""
    from sdsonnx.evaluate import perplexity
    from sdsonnx.models import load_model
    from sdsonnx.pipeline import prune_model
    from sdsonnx.recipe import load_recipe
    from sdsonnx.run import recipe_texts, recipe_tokens

    recipe_path = setup(tmp_path)
    result = CliRunner().invoke(main, ["run", str(recipe_path), "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert not list((tmp_path / "out").glob("*.partial")) and not (tmp_path / "out" / "resume").exists()

    recipe = load_recipe(str(recipe_path), {})
    model, tokenizer = load_model(str(tmp_path / "model"))
    calibration, windows, _ = recipe_tokens(recipe, tokenizer, recipe_texts(recipe))
    dense = perplexity(model, windows, progress=False)
    in_memory = prune_model(model, recipe, calibration, progress=False, windows=windows)
    assert in_memory.perplexity["dense"] == dense
    assert in_memory.perplexity["pruned"] == perplexity(model, windows, progress=False)
    model.save_pretrained(tmp_path / "whole", safe_serialization=True)
    assert weights_digest(tmp_path / "whole") == weights_digest(tmp_path / "out")
    assert figures(tmp_path / "out")["perplexity"] == in_memory.perplexity
    reloaded, _ = load_model(str(tmp_path / "out"))
    assert perplexity(reloaded, windows, progress=False) == in_memory.perplexity["pruned"]


def test_killed_runs_resume_to_bitwise_the_same_weights_and_figures(tmp_path):
    recipe = setup(tmp_path, dtype="bfloat16")  # storage dtype != compute dtype: every cast is on the path
    reference = sdsonnx("run", str(recipe), "-o", str(tmp_path / "ref"), "--no-progress")
    assert reference.wait() == 0, reference.stdout.read().decode()

    out = tmp_path / "out"
    _, work, _ = siblings(out)
    # 1. killed between block 1's shard file and its rename; 2. killed between block 2's state tensors and
    # its commit; 3. killed at a random moment of the rest; then resumed to the end
    for point in ("shard-1", "state-3"):
        proc = sdsonnx("run", str(recipe), "-o", str(out), "--no-progress", "--resume", env={KILL_ENV: point})
        assert proc.wait() == -signal.SIGKILL, proc.stdout.read().decode()
        assert not out.exists() and work.is_dir()
        if point == "shard-1":
            assert (work / "model-00002-of-00005.safetensors.partial").exists()
            assert not (work / "model-00002-of-00005.safetensors").exists()
    state = json.loads((work / "resume" / "state.json").read_text())
    assert state["next_block"] == 2  # block 2's state was written but not committed
    proc = sdsonnx("run", str(recipe), "-o", str(out), "--no-progress", "--resume")
    time.sleep(random.Random(0).uniform(3.0, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not out.exists():
        done = sdsonnx("run", str(recipe), "-o", str(out), "--no-progress", "--resume")
        assert done.wait() == 0, done.stdout.read().decode()
    assert weights_digest(out) == weights_digest(tmp_path / "ref")
    assert figures(out) == figures(tmp_path / "ref")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())


def test_resume_refuses_another_recipe_or_model_with_exit_2(tmp_path):
    recipe = setup(tmp_path)
    out = tmp_path / "out"
    proc = sdsonnx("run", str(recipe), "-o", str(out), "--no-progress", env={KILL_ENV: "shard-2"})
    assert proc.wait() == -signal.SIGKILL
    changed = tmp_path / "changed.yaml"
    changed.write_text(recipe.read_text().replace("max_iter: 20}\n  - {kind: second", "max_iter: 21}\n  - {kind: second"))
    result = CliRunner().invoke(main, ["run", str(changed), "-o", str(out), "--no-progress", "--resume"])
    assert result.exit_code == 2 and "cannot resume: recipe_hash changed" in result.output, result.output
    tensors = tmp_path / "model" / "model.safetensors"
    os.utime(tensors, ns=(tensors.stat().st_atime_ns, tensors.stat().st_mtime_ns + 10**9))  # re-saved weights
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out), "--no-progress", "--resume"])
    assert result.exit_code == 2 and "cannot resume: model changed" in result.output, result.output
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out), "--no-progress"])  # starts over
    assert result.exit_code == 0, result.output


def test_resume_without_a_work_area_starts_at_block_0(tmp_path):
    recipe = setup(tmp_path, blocks=2)
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), "--no-progress", "--resume"])
    assert result.exit_code == 0, result.output
    assert torch.tensor(figures(tmp_path / "out")["perplexity"]["pruned"]).isfinite()
