"""The layer-wise loop on tiny random models of four architectures."""
import pytest
import torch

from sdsonnx.blocks import capture_block_inputs, find_blocks, run_block, target_linears
from sdsonnx.masks import nm_violations
from sdsonnx.pipeline import collect_stats, prune_model
from sdsonnx.recipe import parse_recipe

from tiny_models import CONFIGS, calibration, tiny


def recipe(stage, **extra):
    return parse_recipe({"model": "unused", "device": "cpu", "evaluation": None, "stages": [stage], **extra})


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_target_gets_exact_pattern_and_nothing_else_changes(arch, method):
    model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_model(model, recipe({"kind": "prune", "method": method, "pattern": "2:4"}), calibration(), progress=False)
    targets = {n for mods in target_linears(model).values() for n in mods}
    assert set(result.modules) == targets
    for name, mod in model.named_modules():
        if name in targets:
            assert len(nm_violations(mod.weight, 2, 4)) == 0, name
            assert float((mod.weight == 0).float().mean()) == 0.5
    for key, value in model.state_dict().items():
        if key.removesuffix(".weight") not in targets:
            assert torch.equal(value, before[key]), key  # head, embeddings, norms, biases untouched
    if method == "sparsegpt":
        assert all(r.error > 0 for r in result.modules.values())
    else:  # Wanda / magnitude alone collect no X X^T: no output error (stats.needs_gram)
        assert all(r.error is None and [s.error for s in r.stages] == [None] for r in result.modules.values())


def test_unstructured_sparsity_overrides_and_ignore():
    model = tiny("llama")
    stage = {"kind": "prune", "method": "wanda", "sparsity": 0.5,
             "overrides": [{"blocks": [1], "modules": r"mlp\.", "sparsity": 0.25}]}
    prune_model(model, recipe(stage, ignore=[r"layers\.2\.self_attn\.q_proj"]), calibration(), progress=False)
    sparsity = {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules() if hasattr(m, "weight") and m.weight.dim() == 2}
    assert sparsity["model.layers.1.mlp.up_proj"] == 0.25
    assert sparsity["model.layers.1.self_attn.k_proj"] == 0.5
    assert sparsity["model.layers.0.mlp.down_proj"] == 0.5
    assert sparsity["model.layers.2.self_attn.q_proj"] == 0.0
    assert sparsity["lm_head"] == 0.0


def test_statistics_of_later_blocks_come_from_the_pruned_model():
    """Sequential pruning (data: self): block 1's statistics come from block 0's *pruned* outputs."""
    from sdsonnx.stats import output_error

    model = tiny("llama")
    ids = calibration()
    inputs = capture_block_inputs(model, ids)
    _, blocks = find_blocks(model)
    name = "model.layers.1.self_attn.q_proj"
    dense_block1 = {n: m.weight.detach().clone() for n, m in target_linears(model)[1].items()}
    dense_out0 = run_block(blocks[0], inputs.hidden, inputs.kwargs[0])
    # SparseGPT: its run collects X X^T, so the record has the output error (magnitude alone would have none)
    result = prune_model(model, recipe({"kind": "prune", "method": "sparsegpt", "sparsity": 0.5}), ids, progress=False)
    pruned_w = model.get_submodule(name).weight.detach().clone()
    pruned_out0 = run_block(blocks[0], inputs.hidden, inputs.kwargs[0])
    linears = target_linears(model)[1]
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.copy_(dense_block1[n])  # statistics are taken with the block's input (dense) weights
    from_pruned = collect_stats(blocks[1], linears, pruned_out0, inputs.kwargs[1])[name].hessian
    from_dense = collect_stats(blocks[1], linears, dense_out0, inputs.kwargs[1])[name].hessian
    reported = result.modules[name].error
    assert reported == pytest.approx(output_error(dense_block1[name], pruned_w, from_pruned), rel=1e-4)
    assert reported != pytest.approx(output_error(dense_block1[name], pruned_w, from_dense), rel=1e-3)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_linears_fed_the_same_input_share_one_gram_and_it_is_exact(arch):
    model = tiny(arch)
    inputs = capture_block_inputs(model, calibration())
    _, blocks = find_blocks(model)
    linears = target_linears(model)[1]
    hidden = run_block(blocks[0], inputs.hidden, inputs.kwargs[0])
    seen = {name: [] for name in linears}  # brute force: every Linear's own inputs
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0].reshape(-1, m.in_features)))
               for n, m in linears.items()]
    run_block(blocks[1], hidden, inputs.kwargs[1])
    for h in handles:
        h.remove()
    stats = collect_stats(blocks[1], linears, hidden, inputs.kwargs[1])
    for name in linears:
        x = torch.cat(seen[name])
        torch.testing.assert_close(stats[name].hessian, x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
        assert stats[name].count == x.shape[0]
    q = next(n for n in linears if n.endswith("q_proj"))
    k = next(n for n in linears if n.endswith("k_proj"))
    assert stats[q] is stats[k]  # one accumulation for q/k/v
    assert len({id(s) for s in stats.values()}) < len(stats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stages", [
    [{"kind": "prune", "method": "wanda", "pattern": "2:4"}],
    [{"kind": "prune", "method": "sparsegpt", "sparsity": 0.5}, {"kind": "redense", "max_iter": 3},
     {"kind": "second_prune", "max_iter": 3}],
])
def test_final_weights_are_written_into_the_tensors_the_model_held(dtype, stages):
    """A model loaded from safetensors holds its weights in a private map of the file: the loop writes each final
    weight into the tensor the Linear held (no second copy beside the read file pages), in the storage dtype."""
    model = tiny("llama").to(dtype)
    targets = {n: m for mods in target_linears(model).values() for n, m in mods.items()}
    before = {n: (m.weight.data_ptr(), m.weight.detach().clone()) for n, m in targets.items()}
    prune_model(model, parse_recipe({"model": "unused", "device": "cpu", "evaluation": None, "stages": stages}),
                calibration(), progress=False)
    for name, mod in targets.items():
        ptr, dense = before[name]
        assert mod.weight.data_ptr() == ptr and mod.weight.dtype == dtype, name
        assert float((mod.weight == 0).float().mean()) == 0.5 and not torch.equal(mod.weight, dense), name


@pytest.mark.parametrize("dtype, own_tensors", [(torch.float32, True), (torch.bfloat16, False)])
def test_streams_advance_on_the_models_own_tensors_once_the_dense_version_is_spent(dtype, own_tensors):
    """A prune-only recipe: after the stage no stream or evaluation reads the dense weights, so a float32 model's
    final weights are written into its own tensors before the calibration stream advances (that pass holds one set
    of the block's weights, not two, as the reference implementations do). A bfloat16 model advances with float32
    weights; its own tensors get the final weights at the block's end."""
    model = tiny("llama").to(dtype)
    targets = {n: m for mods in target_linears(model).values() for n, m in mods.items()}
    ptrs = {n: m.weight.data_ptr() for n, m in targets.items()}
    last_call: dict[str, bool] = {}
    for name, mod in targets.items():
        mod.register_forward_pre_hook(lambda m, args, n=name: last_call.__setitem__(n, m.weight.data_ptr() == ptrs[n]))
    prune_model(model, recipe({"kind": "prune", "method": "wanda", "pattern": "2:4"}), calibration(), progress=False)
    assert last_call == {n: own_tensors for n in targets}  # each block's last forward call is its advance pass


def test_spent_versions_are_dropped_and_the_final_weights_move_into_the_originals():
    from sdsonnx.pipeline import _drop_spent_versions

    original, mid, final = torch.zeros(4, 4), torch.ones(4, 4), torch.full((4, 4), 2.0)
    versions = [{"a": original}, {"a": mid}, {"a": final}]
    _drop_spent_versions(versions, {1}, {"a": original})
    assert versions[0] is None and versions[1]["a"] is mid
    assert versions[2]["a"] is original and torch.equal(original, final)

    original, final = torch.zeros(4, 4), torch.full((4, 4), 2.0)
    versions = [{"a": original}, {"a": mid}, {"a": final}]
    _drop_spent_versions(versions, {0}, {"a": original})  # a stream still reads the dense weights
    assert versions[0]["a"] is original and versions[1] is None and versions[2]["a"] is final
    assert not original.any()

    original = torch.zeros(4, 4, dtype=torch.bfloat16)  # cannot hold float32 weights as they are
    versions = [{"a": original.float()}, {"a": final}]
    _drop_spent_versions(versions, set(), {"a": original})
    assert versions[0] is None and versions[1]["a"] is final and not original.any()
