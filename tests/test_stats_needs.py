"""Statistics collected by need (issue 18): Wanda / magnitude runs accumulate squared norms only, bit for bit the
same weights as with the Gram matrix, and no output error; every other recipe keeps X X^T and its errors."""
import pytest
import torch

from sdsonnx import pipeline
from sdsonnx.errors import NumericalError
from sdsonnx.plan import GRAM_FREE_WORK, SOLVER_WORK, model_shape, plan_from_shape, stage_cost
from sdsonnx.recipe import parse_recipe
from sdsonnx.report import ModuleRecord, StageRecord
from sdsonnx.stats import LayerStats, needs_gram
from sdsonnx.summary import run_summary

from tiny_models import calibration, tiny

WANDA = {"kind": "prune", "method": "wanda", "pattern": "2:4"}
GPT = {"kind": "prune", "method": "sparsegpt", "pattern": "2:4"}
TAIL = [{"kind": "redense", "max_iter": 3}, {"kind": "second_prune", "max_iter": 3}]


def recipe(stages, **extra):
    return parse_recipe({"model": "unused", "device": "cpu", "evaluation": None, "weight_figure": None,
                         "stages": stages, **extra})


@pytest.mark.parametrize("stages, expected", [
    ([WANDA], False), ([{"kind": "prune", "method": "magnitude", "sparsity": 0.5}], False),
    ([{**WANDA, "pattern": None, "sparsity": 0.5, "profile": "owl"}], False),
    ([GPT], True), ([WANDA, *TAIL], True), ([WANDA, TAIL[0]], True), ([GPT, *TAIL], True)])
def test_needs_gram_only_for_stages_other_than_wanda_or_magnitude(stages, expected):
    assert needs_gram(recipe(stages).stages) is expected


def test_sq_norm_only_statistics_are_the_full_ones_without_the_gram():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 8, generator=gen) for _ in range(3)]
    full, lean = LayerStats(8), LayerStats(8, full=False)
    for x in batches:
        full.add(x)
        lean.add(x)
    x = torch.cat([b.reshape(-1, 8) for b in batches])
    assert lean.xtx is None and lean.count == full.count == 30
    assert torch.equal(lean.sq_norm, full.sq_norm)  # the same sums in the same order
    assert torch.allclose(full.sq_norm, (x * x).sum(0), rtol=1e-6)
    assert torch.equal(full.hessian, full.xtx / 30)  # a fresh tensor each time, the same bits
    assert full.hessian is not full.hessian
    with pytest.raises(ValueError, match="Gram"):
        lean.hessian
    assert full.all_finite() and lean.all_finite()
    with pytest.raises(ValueError, match="no inputs"):
        LayerStats(8, full=False).all_finite()


@pytest.mark.parametrize("full", [True, False])
def test_nan_inputs_are_caught_with_or_without_the_gram(full):
    stats = LayerStats(4, full=full)
    stats.add(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]))
    assert not stats.all_finite()
    with pytest.raises(NumericalError, match="block 3, module m"):
        pipeline.check_finite_inputs(stats, 3, "m", 0, "prune")


class Spy(LayerStats):
    made: list[bool] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Spy.made.append(self.full)


def run(stages, monkeypatch, force_gram=None, **extra):
    """prune_model on the tiny LLaMA; every LayerStats built is recorded; force_gram overrides needs_gram."""
    Spy.made = []
    monkeypatch.setattr(pipeline, "LayerStats", Spy)
    if force_gram is not None:
        monkeypatch.setattr(pipeline, "needs_gram", lambda stages: force_gram)
    model = tiny("llama")
    result = pipeline.prune_model(model, recipe(stages, **extra), calibration(), progress=False)
    return model.state_dict(), result, list(Spy.made)


@pytest.mark.parametrize("stage", [WANDA, {**WANDA, "pattern": None, "sparsity": 0.5},
                                   {"kind": "prune", "method": "magnitude", "pattern": "2:4"},
                                   {**WANDA, "permute": "mlp"},
                                   {**WANDA, "pattern": None, "sparsity": 0.5, "profile": "owl"}])
def test_wanda_and_magnitude_runs_skip_the_gram_and_keep_their_weights(stage, monkeypatch):
    lean, lean_result, made = run([stage], monkeypatch)
    assert made and not any(made)  # statistics passes (and OWL's pass) built no Gram
    full, full_result, made_full = run([stage], monkeypatch, force_gram=True)
    assert any(made_full)
    for key in full:
        assert torch.equal(lean[key], full[key]), key  # the same masks and weights, bit for bit
    assert lean_result.block_sparsity == full_result.block_sparsity
    for name, rec in lean_result.modules.items():
        assert rec.error is None and rec.stages[0].error is None
        assert full_result.modules[name].error > 0
        assert rec.sparsity == full_result.modules[name].sparsity


def test_runs_with_a_gram_stage_collect_it_in_every_stage(monkeypatch):
    _, result, made = run([WANDA, *TAIL], monkeypatch)
    assert len(made) > 0 and all(made)  # every statistics pass of every stage with X X^T
    assert all(s.error is not None for r in result.modules.values() for s in r.stages)


def test_report_round_trip_and_summary_with_null_errors():
    from sdsonnx.report import RunReport

    rec = ModuleRecord(0, "2:4", [8, 16], 128, [StageRecord("prune", 0.5, None, 0.01)])
    rec.finish()
    assert rec.error is None and StageRecord.from_dict(rec.stages[0].to_dict()) == rec.stages[0]
    assert ModuleRecord.from_dict({**{k: getattr(rec, k) for k in ("block", "pattern", "shape", "numel")},
                                   "stages": [s.to_dict() for s in rec.stages], "sparsity": 0.5,
                                   "error": None}) == rec
    report = {"modules": {"model.layers.0.mlp.up_proj": {"numel": 128, "sparsity": 0.5, "error": None,
                                                         "pattern": "2:4"},
                          "model.layers.0.self_attn.q_proj": {"numel": 64, "sparsity": 0.5, "error": 0.25,
                                                              "pattern": "2:4"},
                          "model.layers.1.self_attn.q_proj": {"numel": 64, "sparsity": 0.5, "error": 0.75,
                                                              "pattern": "2:4"}},
              "perplexity": {}, "wall_seconds": {"prune": 1.0}, "global_sparsity": 0.5, "peak_rss_bytes": 2 ** 30}
    lines = {line.split()[0]: line.split() for line in run_summary(report).splitlines() if "_proj" in line}
    assert lines["up_proj"][-1] == "-" and lines["q_proj"][-1] == "0.5"  # mean of the errors that exist
    assert RunReport.__dataclass_fields__["report_version"].default == 2


def test_plan_counts_squared_norms_and_no_error_records_without_the_gram():
    import transformers

    config = transformers.LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=20)
    shape = model_shape(config)
    wanda, gpt = recipe([WANDA]), recipe([GPT])
    d, f = 8, 12
    lean = plan_from_shape(shape, wanda, gflops=1.0)
    full = plan_from_shape(shape, gpt, gflops=1.0)
    stats_lean, stats_full = 4 * (3 * d + f), 4 * (3 * d * d + f * f)  # q/k/v, o, gate/up: d wide; down: f
    assert (lean.phases["statistics pass: Grams + output"] - stats_lean
            == full.phases["statistics pass: Grams + output"] - stats_full)
    # the worst Wanda stage alone: 4.05 float32 copies of the largest W (12 x 8 = 8 x 12), no H
    assert GRAM_FREE_WORK["wanda"] == ((0.0, 4.05),) and SOLVER_WORK["wanda"] == ((0.75, 3.75),)
    assert lean.phases["solver: Grams + working copies"] == stats_lean + int(4 * 4.05 * f * d)
    assert stage_cost(wanda, 0, 6, 10) == (20.0 * 6 * 10, 0.0)  # the selection, no W H products
    sds = recipe([WANDA, *TAIL])
    assert stage_cost(sds, 0, 6, 10)[0] == 20.0 * 6 * 10 + 4.0 * 6 * 10 * 10  # with its error record
    tokens = gpt.calibration.segments * gpt.calibration.length  # one statistics pass per block in both
    grams_lean, grams_full = 2.0 * (3 * d + f), 2.0 * (3 * d * d + f * f)  # per token
    assert full.flops_per_block["statistics passes"] - lean.flops_per_block["statistics passes"] == pytest.approx(
        tokens * (grams_full - grams_lean))


@pytest.mark.parametrize("stage", [WANDA, GPT])
def test_row_split_path_records_errors_only_with_the_gram(stage, tmp_path):
    """pipeline._stage_on_rows (a RankGroup; here one gloo rank): the same weights as without a group, and an
    error only where the run collects X X^T."""
    import torch.distributed as dist

    from sdsonnx.distributed import RankGroup

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny("llama")
        result = pipeline.prune_model(model, recipe([stage]), calibration(), progress=False, group=RankGroup(0, 1))
    finally:
        dist.destroy_process_group()
    plain = tiny("llama")
    expected = pipeline.prune_model(plain, recipe([stage]), calibration(), progress=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    for name, rec in result.modules.items():
        if stage is WANDA:
            assert rec.error is None and expected.modules[name].error is None
        else:
            assert rec.error == pytest.approx(expected.modules[name].error, rel=1e-5)
