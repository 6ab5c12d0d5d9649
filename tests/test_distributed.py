"""SDS on 2 gloo ranks (torchrun, loopback) gives the one-process masks exactly, its weights within 1e-4 and its
perplexity to 1e-5 relative; the distributed k-th value equals masks.topk_mask on simulated ranks.

Run as a script under torchrun (`python -m torch.distributed.run ... tests/test_distributed.py WORKDIR`), this
file is the worker: every rank runs the recipes in WORKDIR in one process group.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sdsonnx.distributed import (even_slice, local_histogram, lowest_mask, order_keys, radix_select,  # noqa: E402
                                 tie_quota)
from sdsonnx.masks import topk_mask  # noqa: E402

TEXT = "\n".join(" ".join(f"w{4 + (i * 7919 + j * 31) % 120}" for j in range(60)) for i in range(200))
RECIPES = {
    "sparsegpt50": '  - {kind: prune, method: sparsegpt, sparsity: 0.5}\n',
    "sparsegpt24": '  - {kind: prune, method: sparsegpt, pattern: "2:4"}\n',
    "sds": ('  - {kind: prune, method: sparsegpt, sparsity: 0.5}\n  - {kind: redense, max_iter: 20}\n'
            '  - {kind: second_prune, max_iter: 20}\n'),
}
WEIGHT_TOL = 1e-4  # observed max |dW| 1-2e-6: H summed in two partial sums, then SparseGPT's column sweep
PPL_RTOL = 1e-5  # observed ~1e-7 relative


# ---- pure functions on simulated ranks -------------------------------------------------------------------------

def simulated_prune(scores: torch.Tensor, k: int, world: int) -> torch.Tensor:
    """Keep-mask of the whole score matrix from `world` simulated ranks holding contiguous rows (the math of
    RankGroup.prune_lowest with the all-reduces replaced by sums over the ranks)."""
    parts = [scores[even_slice(scores.shape[0], r, world)] for r in range(world)]
    keys = [order_keys(p) for p in parts]
    threshold, need = radix_select(lambda prefix, shift: sum(local_histogram(k_, prefix, shift) for k_ in keys), k)
    equal = [int((k_ == threshold).sum()) for k_ in keys]
    masks = [~lowest_mask(k_, threshold, tie_quota(equal, need, r)).reshape(p.shape)
             for r, (k_, p) in enumerate(zip(keys, parts))]
    return torch.cat(masks)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["random", "ties", "signed"])
def test_distributed_kth_value_equals_topk_mask(world, kind):
    gen = torch.Generator().manual_seed(world)
    if kind == "random":
        scores = torch.rand(13, 17, generator=gen)
    elif kind == "ties":  # few distinct values: the tie order across ranks decides the mask
        scores = torch.randint(0, 4, (13, 17), generator=gen).float()
    else:  # negatives, -0.0 and +0.0 (equal for the stable sort), infinities
        scores = torch.randn(13, 17, generator=gen)
        scores[0, :4] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf")])
        scores[5, :3] = -0.0
    for sparsity in (0.0, 1 / 221, 0.3, 0.5, 0.9, 1.0):
        k = round(sparsity * scores.numel())
        expected = topk_mask(scores, sparsity, per_row=False)
        got = simulated_prune(scores, k, world) if k else torch.ones_like(expected)
        assert torch.equal(got, expected), (kind, world, sparsity)


def test_order_keys_sort_like_the_floats():
    x = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-45, 2.0, 3.0e38, float("inf")])
    keys = order_keys(x)
    assert keys[3] == keys[4]  # -0.0 == +0.0
    assert torch.all(keys[1:] - keys[:-1] >= 0) and len(set(keys.tolist())) == len(x) - 1
    assert int(keys.min()) >= 0 and int(keys.max()) < 2 ** 32
    with pytest.raises(ValueError, match="NaN"):
        order_keys(torch.tensor([1.0, float("nan")]))


def test_even_slice_and_tie_quota():
    assert [even_slice(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert [tie_quota([2, 3, 4], 4, r) for r in range(3)] == [2, 2, 0]
    with pytest.raises(ValueError):
        even_slice(4, 2, 2)


# ---- 2 gloo ranks against 1 process ------------------------------------------------------------------------------

def _setup(tmp: Path) -> None:
    from tiny_models import tiny_checkpoint

    tiny_checkpoint("llama", tmp / "model", pattern=None, report=False, num_hidden_layers=2)
    (tmp / "text.txt").write_text(TEXT)
    for name, stages in RECIPES.items():
        (tmp / f"{name}.yaml").write_text(
            f"model: {tmp / 'model'}\ndtype: float32\ndevice: cpu\n"
            f"calibration: {{source: {tmp / 'text.txt'}, segments: 4, length: 32}}\n"
            f"evaluation: {{source: {tmp / 'text.txt'}, window: 32, max_tokens: 256}}\nstages:\n" + stages)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(path))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_give_the_one_process_masks_weights_and_perplexity(tmp_path):
    from sdsonnx.recipe import load_recipe
    from sdsonnx.run import run_recipe

    _setup(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), str(Path(__file__).resolve()), str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for name in RECIPES:  # the one-process references, while the ranks run
        path = str(tmp_path / f"{name}.yaml")
        run_recipe(load_recipe(path, {}), tmp_path / f"one-{name}", path, progress=False)
    log, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, log.decode()[-4000:]
    for name in RECIPES:
        one, two = tmp_path / f"one-{name}", tmp_path / f"two-{name}"
        w1, w2 = _weights(one), _weights(two)
        assert w1.keys() == w2.keys()
        for key in w1:
            assert torch.equal(w1[key] != 0, w2[key] != 0), (name, key)  # masks: exact
            assert float((w1[key] - w2[key]).abs().max()) <= WEIGHT_TOL, (name, key)
        p1 = json.loads((one / "report.json").read_text())["perplexity"]
        p2 = json.loads((two / "report.json").read_text())["perplexity"]
        assert p1.keys() == p2.keys()
        for key in p1:
            assert abs(p1[key] - p2[key]) <= PPL_RTOL * p1[key], (name, key, p1[key], p2[key])
        assert not list(tmp_path.glob(f".two-{name}.sdsonnx-*")), "rank work areas must be removed"


def _worker(folder: Path) -> None:
    """Under torchrun: every recipe of `folder` on this rank (the last one through the CLI, as a user runs it)."""
    from sdsonnx.cli import main
    from sdsonnx.distributed import from_environment
    from sdsonnx.recipe import load_recipe
    from sdsonnx.run import run_recipe

    torch.set_num_threads(1)
    group = from_environment()
    *first, last = RECIPES
    for name in first:
        path = str(folder / f"{name}.yaml")
        run_recipe(load_recipe(path, {}), folder / f"two-{name}", path, progress=False, group=group)
    main(["run", str(folder / f"{last}.yaml"), "-o", str(folder / f"two-{last}"), "--no-progress"],
         standalone_mode=False)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
