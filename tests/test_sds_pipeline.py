"""SDS as recipe stages on the layer-wise loop: tiny models of four architectures, data modes, figure capture."""
import pytest
import torch

from sdsonnx.blocks import target_linears
from sdsonnx.masks import nm_violations
from sdsonnx.pipeline import prune_model, stream_key
from sdsonnx.recipe import parse_recipe

from tiny_models import CONFIGS, calibration, tiny

SDS = [{"kind": "redense", "max_iter": 30}, {"kind": "second_prune", "max_iter": 30}]


def sds_recipe(first, *later, **extra):
    stages = [first, *(later or SDS)]
    return parse_recipe({"model": "unused", "device": "cpu", "evaluation": None, "stages": stages, **extra})


def weights(model):
    return {n: m.weight.detach().clone() for mods in target_linears(model).values() for n, m in mods.items()}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("first", [{"kind": "prune", "method": "sparsegpt", "pattern": "2:4"},
                                   {"kind": "prune", "method": "wanda", "sparsity": 0.5}], ids=["sparsegpt-2:4", "wanda-50"])
def test_sds_keeps_the_pattern_and_is_never_worse_than_the_first_prune(arch, first):
    model = tiny(arch)
    result = prune_model(model, sds_recipe(first), calibration(), progress=False)
    final = weights(model)
    assert set(result.modules) == set(final)
    for name, rec in result.modules.items():
        kinds = [s.stage for s in rec.stages]
        assert kinds == ["prune", "redense", "second_prune"], name
        redense, second = rec.stages[1], rec.stages[2].details
        assert redense.sparsity < 0.5  # re-dense reactivated pruned weights
        assert redense.details["loss_after"] < redense.details["loss_before"]
        assert second["kept"] in ("first", "second", "adjusted")
        assert second["loss_" + second["kept"]] <= second["loss_first"]
        w = final[name]
        if "pattern" in first:
            assert len(nm_violations(w, 2, 4)) == 0, name
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1 / w.shape[1]), name


def test_first_prune_output_is_what_second_prune_falls_back_to():
    """A useless re-dense (iteration cap 1, huge L1) must leave every module at worst at its first-prune weights."""
    model = tiny("llama")
    first = {"kind": "prune", "method": "sparsegpt", "pattern": "2:4"}
    plain = tiny("llama")
    one_shot = parse_recipe({"model": "unused", "device": "cpu", "evaluation": None, "stages": [first]})
    prune_model(plain, one_shot, calibration(), progress=False)
    result = prune_model(model, sds_recipe(first, {"kind": "redense", "l1": 50.0, "max_iter": 1},
                                           {"kind": "second_prune", "adjust": False}), calibration(), progress=False)
    plain_w, sds_w = weights(plain), weights(model)
    for name, rec in result.modules.items():
        if rec.stages[2].details["kept"] == "first":
            assert torch.equal(sds_w[name], plain_w[name]), name
    assert any(rec.stages[2].details["kept"] == "first" for rec in result.modules.values())


@pytest.mark.parametrize("data, versions", [("sparse", {1}), ("dense", {0}), ("self", {2, 3})])
def test_data_modes_pick_their_stream(data, versions):
    stages = [{"kind": "redense", "data": data}, {"kind": "second_prune", "data": data}]
    recipe = sds_recipe({"kind": "prune", "method": "wanda", "pattern": "2:4"}, *stages)
    assert {stream_key(recipe, i).version for i in (1, 2)} == versions


def test_data_modes_change_the_result_and_msd_uses_other_samples():
    first = {"kind": "prune", "method": "wanda", "pattern": "2:4"}
    results = {}
    for mode in ("sparse", "dense", "self"):
        model = tiny("llama")
        stages = [{"kind": "redense", "data": mode, "max_iter": 20}, {"kind": "second_prune", "data": mode, "max_iter": 20}]
        prune_model(model, sds_recipe(first, *stages), calibration(), progress=False)
        results[mode] = weights(model)
    name = "model.layers.2.mlp.down_proj"  # block 2: the three streams differ by then
    assert not torch.equal(results["sparse"][name], results["dense"][name])
    assert not torch.equal(results["sparse"][name], results["self"][name])

    msd = tiny("llama")
    stages = [{"kind": "redense", "calibration_part": 1, "max_iter": 20},
              {"kind": "second_prune", "calibration_part": 1, "max_iter": 20}]
    recipe = sds_recipe(first, *stages, calibration={"parts": 2})
    prune_model(msd, recipe, calibration(n=8), progress=False)
    assert not torch.equal(weights(msd)[name], results["sparse"][name])
    assert len(nm_violations(weights(msd)[name], 2, 4)) == 0


def test_figure_versions_are_kept_for_the_chosen_module():
    model = tiny("llama")
    dense = weights(model)
    name = "model.layers.1.mlp.up_proj"
    result = prune_model(model, sds_recipe({"kind": "prune", "method": "sparsegpt", "sparsity": 0.5}, weight_figure=name),
                         calibration(), progress=False)
    assert result.figure_module == name and len(result.figure_versions) == 4
    assert torch.equal(result.figure_versions[0], dense[name])
    assert torch.equal(result.figure_versions[-1], weights(model)[name])
    assert float((result.figure_versions[1] == 0).float().mean()) == 0.5
    assert float((result.figure_versions[2] == 0).float().mean()) < 0.5

    auto = prune_model(tiny("llama"), sds_recipe({"kind": "prune", "method": "magnitude", "sparsity": 0.5}),
                       calibration(), progress=False)
    assert auto.figure_module == "model.layers.2.mlp.down_proj" and len(auto.figure_versions) == 4


def test_redense_pass_doubles_as_the_sparse_stream_advance(monkeypatch):
    """On SD data the re-dense stage's statistics pass is the pass that advances the first-pruned stream: reusing
    it saves one block forward per block and leaves every weight bit-identical to running that pass again."""
    import sdsonnx.pipeline as pipeline

    first = {"kind": "prune", "method": "sparsegpt", "pattern": "2:4"}
    calls = {"n": 0}
    real_run_block = pipeline.run_block

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_run_block(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_block", counting)
    fused = tiny("llama")
    prune_model(fused, sds_recipe(first), calibration(), progress=False)
    fused_calls, calls["n"] = calls["n"], 0

    real_run_stages = pipeline._run_stages
    monkeypatch.setattr(pipeline, "_run_stages", lambda *a: (real_run_stages(*a)[0], {}))
    unfused = tiny("llama")
    prune_model(unfused, sds_recipe(first), calibration(), progress=False)

    blocks = len(target_linears(fused))
    assert calls["n"] - fused_calls == blocks  # one block pass saved per block
    for name, w in weights(fused).items():
        assert torch.equal(w, weights(unfused)[name]), name
