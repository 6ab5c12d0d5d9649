"""Streams beyond the memory budget live in files (DiskStream); a run that spills computes bit for bit what an
all-in-RAM run computes."""
import torch

from sdsonnx.blocks import target_linears
from sdsonnx.pipeline import prune_model
from sdsonnx.recipe import parse_recipe
from sdsonnx.streams import DiskStream, StreamStore

from tiny_models import calibration, tiny


def test_disk_stream_round_trips_rows_of_any_dtype(tmp_path):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        data = torch.randn(3, 5, 7).to(dtype)
        stream = DiskStream((3, 5, 7), dtype, tmp_path)
        for i, row in enumerate(data):
            stream[i] = row
        assert len(stream) == 3 and stream.nbytes == data.numel() * data.element_size()
        assert all(torch.equal(a, b) for a, b in zip(stream, data))
        assert list(tmp_path.iterdir()) == []  # unlinked at once: a kill leaves nothing behind


def test_store_spills_past_the_budget_and_release_returns_the_room(tmp_path):
    store = StreamStore(budget=100, folder=tmp_path)
    a = store.empty((5, 5), torch.float32)  # 100 bytes: fits
    b = store.empty((1, 1), torch.float32)
    assert isinstance(a, torch.Tensor) and isinstance(b, DiskStream)
    store.release(a)
    assert isinstance(store.empty((5, 5), torch.float32), torch.Tensor)


def test_a_run_with_every_stream_on_disk_equals_the_run_in_ram(tmp_path):
    recipe = parse_recipe({"model": "unused", "device": "cpu", "evaluation": {"window": 16},
                           "stages": [{"kind": "prune", "method": "sparsegpt", "pattern": "2:4"},
                                      {"kind": "redense", "max_iter": 10}, {"kind": "second_prune", "max_iter": 10}]})
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    results, weights = [], []
    for store in (None, StreamStore(budget=0, folder=tmp_path)):
        model = tiny("llama")
        results.append(prune_model(model, recipe, calibration(), progress=False, windows=windows, store=store))
        weights.append({n: m.weight.detach().clone() for mods in target_linears(model).values() for n, m in mods.items()})
    assert results[0].perplexity == results[1].perplexity
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
