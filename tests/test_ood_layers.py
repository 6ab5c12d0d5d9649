"""tools/ood_layers.py: the trace formula against the direct ||D X||^2 / ||W X||^2, zero for identical weights,
shared input Gram matrices equal to brute-force ones from captured inputs, permutation recovery, and a tiny LLaMA
checkpoint round trip through run_weights / layer_errors / measure."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
import ood_layers as OL  # noqa: E402
from tiny_models import tiny_checkpoint  # noqa: E402


def test_trace_formula_equals_direct_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g)
    w_pruned = w * (torch.rand(6, 8, generator=g) > 0.5) + 0.01 * torch.randn(6, 8, generator=g)
    x = torch.randn(50, 8, generator=g) @ torch.randn(8, 8, generator=g)  # correlated inputs
    h = x.double().T @ x.double() / x.shape[0]
    direct = OL.direct_error(w, w_pruned, x)
    assert OL.relative_error(w, w_pruned, h) == pytest.approx(direct, rel=1e-12)
    # brute force over rows and tokens
    num = sum(float((w_pruned[i].double() - w[i].double()) @ x[t].double()) ** 2 for i in range(6) for t in range(50))
    den = sum(float(w[i].double() @ x[t].double()) ** 2 for i in range(6) for t in range(50))
    assert direct == pytest.approx(num / den, rel=1e-10)


def test_identical_weights_give_zero_and_bad_shapes_raise():
    w = torch.randn(4, 8)
    h = torch.eye(8, dtype=torch.float64)
    assert OL.relative_error(w, w.clone(), h) == 0.0
    assert OL.relative_error(w, torch.zeros_like(w), h) == pytest.approx(1.0)  # D = -W
    with pytest.raises(ValueError):
        OL.relative_error(w, w, torch.eye(4))
    with pytest.raises(ValueError):
        OL.relative_error(torch.zeros(4, 8), w, h)


def test_unpermute_recovers_rows_and_columns_of_pruned_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, generator=g)
    perm = torch.randperm(32, generator=g)
    pruned = w * (torch.rand(32, 16, generator=g) > 0.5)
    back, moved = OL.unpermute(w, pruned[perm], "rows")
    assert torch.equal(back, pruned) and moved == int((perm != torch.arange(32)).sum())
    cols = torch.randperm(16, generator=g)
    back, _ = OL.unpermute(w, pruned[:, cols], "columns")
    assert torch.equal(back, pruned)
    with pytest.raises(ValueError):
        OL.unpermute(w, pruned, "diagonal")


def test_input_grams_match_captured_inputs_and_share_storage(tmp_path):
    from sdsonnx.models import load_model

    folder = tiny_checkpoint("llama", tmp_path / "dense", pattern=None)
    model, _ = load_model(str(folder))
    names = [n for block in OL.target_linears(model).values() for n in block]
    ids = torch.randint(4, 128, (3, 16), generator=torch.Generator().manual_seed(3))
    grams = OL.input_grams(model, ids, names)
    captured = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: captured[n].append(a[0].reshape(-1, a[0].shape[-1]).clone()))
               for n in names]
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in handles:
        h.remove()
    for n in names:
        x = torch.cat(captured[n]).double()
        assert torch.allclose(grams[n], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6), n
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert grams[q] is grams[k]  # q, k, v read one tensor: one H
    assert grams[q] is not grams["model.layers.0.self_attn.o_proj"]


def test_tiny_checkpoint_round_trip(tmp_path):
    """A 2:4 magnitude-pruned copy of a tiny LLaMA against its dense original: run_weights reads the pruned weights,
    layer_errors equals the direct error on the captured dense inputs, the dense copy has error 0."""
    from sdsonnx.models import load_model

    dense_dir = tiny_checkpoint("llama", tmp_path / "dense", pattern=None, seed=5)
    pruned_dir = tiny_checkpoint("llama", tmp_path / "pruned", pattern="2:4", seed=5)
    model, _ = load_model(str(dense_dir))
    names = [n for block in OL.target_linears(model).values() for n in block]
    modules = dict(model.named_modules())
    dense = {n: modules[n].weight.detach().clone() for n in names}
    weights = OL.run_weights(pruned_dir, names)
    assert all(float((weights[n] == 0).float().mean()) == 0.5 for n in names)
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    grams = {"a": OL.input_grams(model, ids, names), "b": OL.input_grams(model, ids[:1], names)}
    errors = OL.layer_errors(dense, weights, grams)
    captured = {n: [] for n in names}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: captured[n].append(a[0].reshape(-1, a[0].shape[-1]).clone()))
               for n in names]
    with torch.no_grad():
        model(input_ids=ids[:1])
    for h in handles:
        h.remove()
    for n in names:
        assert errors[n]["b"] == pytest.approx(OL.direct_error(dense[n], weights[n], torch.cat(captured[n])), rel=1e-5)
        assert 0 < errors[n]["a"] < 1
    same = OL.layer_errors(dense, OL.run_weights(dense_dir, names), grams)
    assert all(v == 0.0 for e in same.values() for v in e.values())
    # the summaries: a run against itself reduces nothing; a pair with a zero-error run reduces everything
    s = OL.run_summary(errors, ["a", "b"])
    assert set(s["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert OL.pair_summary(errors, errors, ["a", "b"], 2)["mean_reduction"] == {"a": 0.0, "b": 0.0}
    assert OL.pair_summary(same, errors, ["a", "b"], 2)["mean_reduction"] == {"a": 1.0, "b": 1.0}


def test_measure_end_to_end_with_a_permuted_run(tmp_path):
    """measure() on the real in-domain text (tiny word tokenizer): a run whose MLP hidden units are permuted (rows of
    gate/up, columns of down, as report.json records) measures exactly as the unpermuted run."""
    dense_dir = tiny_checkpoint("llama", tmp_path / "dense", pattern=None, seed=5, max_position_embeddings=512)
    pruned_dir = tiny_checkpoint("llama", tmp_path / "pruned", pattern="2:4", seed=5, max_position_embeddings=512)
    perm_dir = tiny_checkpoint("llama", tmp_path / "permuted", pattern="2:4", seed=5, max_position_embeddings=512)
    from safetensors.torch import load_file, save_file

    file = perm_dir / "model.safetensors"
    state = load_file(str(file))
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(6))
    modules = {}
    for b in range(2):
        for rel, axis in (("gate_proj", "rows"), ("up_proj", "rows"), ("down_proj", "columns")):
            key = f"model.layers.{b}.mlp.{rel}.weight"
            state[key] = state[key][perm].contiguous() if axis == "rows" else state[key][:, perm].contiguous()
            modules[f"model.layers.{b}.mlp.{rel}"] = {"permutation": {"scope": "mlp", "axis": axis}, "stages": []}
    save_file(state, str(file), metadata={"format": "pt"})
    (perm_dir / "report.json").write_text(json.dumps({"modules": modules}))
    result = OL.measure(str(dense_dir), [pruned_dir, perm_dir], ["in_domain"], 2, 0, [("permuted", "pruned")], 0, None)
    a, b = result["runs"]["pruned"], result["runs"]["permuted"]
    assert b["unpermuted_channels"]["model.layers.0.mlp.down_proj"] == int((perm != torch.arange(128)).sum())
    for n, e in a["layers"].items():
        assert b["layers"][n]["in_domain"] == pytest.approx(e["in_domain"], rel=1e-9), n
    first, second = result["texts"]["in_domain"]["windows"]
    assert first == 80 and second > 81  # held out: after the protocol's 80 windows, spread over the rest
    assert result["pairs"]["permuted vs pruned"]["mean_reduction"]["in_domain"] == pytest.approx(0.0, abs=1e-9)
    assert "permuted vs pruned" in OL.format_summary(result)
