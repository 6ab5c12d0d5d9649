"""sdsonnx.plan: byte counts against hand sums, streams per recipe, budget, a LLaMA-7B config (no files)."""
import pytest
import torch
import transformers

from sdsonnx.plan import (ADJUST_COST, ADMM_COST, ADMM_RHO_EVERY, BASELINE_BYTES, SOLVER_WORK, admm_factorisations,
                          work_kind, EARLY_EXIT_SHARE, EVAL_TOKENS, LOGIT_COPIES, REDENSE_COST,
                          SPARSEGPT_LOOP, TEXT_BYTES, TOKENIZE_BYTES_PER_TOKEN, stage_cost,
                          evaluated_versions, format_plan, input_groups, measure_gflops, model_shape, parse_bytes,
                          plan_from_shape, plan_run, stream_keys)
from sdsonnx.recipe import Recipe

V, D, F, KV, BLOCKS = 20, 8, 12, 4, 2  # tiny LLaMA: vocab, hidden, ffn, k/v width (GQA: 2 heads, 1 kv head)
PRUNE = {"kind": "prune", "method": "sparsegpt", "sparsity": 0.5}
SDS = [PRUNE, {"kind": "redense"}, {"kind": "second_prune", "adjust_solver": "soft_mask"}]
SDS_ADMM = [PRUNE, {"kind": "redense"}, {"kind": "second_prune", "adjust_solver": "admm", "admm_iterations": 50,
                                         "admm_reselect": 30}]


def tiny_config(tied: bool = False) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=BLOCKS,
                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                                    tie_word_embeddings=tied)


def recipe(stages=(PRUNE,), evaluation=None, **extra) -> Recipe:
    return Recipe.model_validate({"model": "tiny", "dtype": "float16", "activation_dtype": "float32",
                                  "calibration": {"segments": 3, "length": 5}, "evaluation": evaluation,
                                  "weight_figure": None, "stages": list(stages), **extra})


def hand_block() -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every Linear of one block, written out by hand."""
    return {"q": (D, D), "k": (KV, D), "v": (KV, D), "o": (D, D), "gate": (F, D), "up": (F, D), "down": (D, F)}


def test_model_shape_counts_match_a_hand_sum():
    shape = model_shape(tiny_config())
    block = sum(o * i for o, i in hand_block().values()) + 2 * D  # 7 Linears (no bias) + 2 RMSNorms
    assert shape.block_params == (block, block)
    assert shape.nonblock_params == V * D + V * D + D  # embedding, untied head, final norm
    assert (shape.vocab, shape.hidden, shape.blocks) == (V, D, BLOCKS)
    leaves = [(lin.name.rsplit(".", 1)[1], lin.d_out, lin.d_in) for lin in shape.linears[1]]
    assert leaves == [(k + ("_proj"), o, i) for k, (o, i) in hand_block().items()]
    groups = [lin.group for lin in shape.linears[0]]
    assert groups[0] == groups[1] == groups[2] != groups[3]  # q/k/v share, o_proj alone
    assert groups[4] == groups[5] != groups[6] and len(set(groups)) == 4


def test_tied_head_counts_once():
    untied, tied = model_shape(tiny_config(False)), model_shape(tiny_config(True))
    assert untied.nonblock_params - tied.nonblock_params == V * D
    r = recipe()
    assert (plan_from_shape(untied, r).memory["non-block weights"]
            - plan_from_shape(tied, r).memory["non-block weights"]) == V * D * 2
    assert plan_from_shape(untied, r).disk["checkpoint"] - plan_from_shape(tied, r).disk["checkpoint"] == V * D * 2


def test_plan_bytes_on_the_tiny_config_are_the_hand_sums():
    shape = model_shape(tiny_config())
    ev = {"source": "wiki-extracts", "window": 4, "max_tokens": 10, "dense": True, "each_step": True}
    plan = plan_from_shape(shape, recipe(SDS, evaluation=ev), gflops=1.0)
    lin = hand_block()
    block = sum(o * i for o, i in lin.values()) + 2 * D
    targets = sum(o * i for o, i in lin.values())
    cal = 3 * 5 * D * 4  # segments x length x hidden, float32 activations
    ev_tokens = 10 // 4 * 4
    ev_stream = ev_tokens * D * 2  # float16 storage
    streams = 2 * cal + 4 * ev_stream  # SDS: versions 1 and 3; evaluated: dense, after 1, after 2, final
    grams = 4 * (D * D + D * D + D * D + F * F)  # q/k/v, o, gate/up, down
    # worst solver: second_prune's larger phase, 5.1 H + 2.8 W (its prune) or 2.0 H + 13.3 W (its adjustment)
    solver = int(max(4 * max(5.1 * i * i + 2.8 * o * i, 2.0 * i * i + 13.3 * o * i) for o, i in lin.values()))
    forward = 4 * 5 * (2 * F + F + 2 * D)  # gate+up outputs, the largest output again, two hidden; length 5 > 4
    params = 2 * block + 2 * V * D + D
    expected = {
        "baseline (python, torch, transformers)": BASELINE_BYTES,
        "texts of the data sources": TEXT_BYTES["wiki-extracts"],
        "tokenising the evaluation part": TOKENIZE_BYTES_PER_TOKEN * EVAL_TOKENS["wiki-extracts"],
        "source checkpoint pages mapped": block * 2,  # one block's tensors, file-backed until cast
        "non-block weights": (2 * V * D + D) * 2,
        "block weights but targets (float32)": (block - targets) * 4,  # the Linears alias the versions
        "weight versions (float32)": 4 * targets * 4,
        "streams in RAM": streams,
        "stream advanced by a statistics pass": cal,  # SDS: the re-dense pass advances version 1
        "captured block-0 inputs (held)": 0,
    }
    phases = {"solver: Grams + working copies": grams + solver,
              "statistics pass: Grams + output": grams + forward + cal,
              "stream advance + NaN check": forward + cal,
              "evaluation advance": forward + ev_stream}
    assert plan.phases == phases
    largest = max(phases, key=phases.get)
    expected[f"largest phase: {largest}"] = phases[largest]
    assert plan.memory == expected
    assert plan.peak_rss_bytes == max(sum(expected.values()), plan.head_phase_bytes)
    assert plan.head_phase_bytes == (BASELINE_BYTES + TEXT_BYTES["wiki-extracts"] + (2 * V * D + D) * 2
                                     + TOKENIZE_BYTES_PER_TOKEN * EVAL_TOKENS["wiki-extracts"] + block * 2
                                     + 4 * ev_stream + LOGIT_COPIES * 4 * V * 4)
    assert plan.disk == {"checkpoint": params * 2, "spilled streams": 0,
                         "resume state (streams, last two commits)": 2 * streams}
    assert (plan.calibration_streams, plan.evaluation_streams, plan.evaluation_tokens) == (2, 4, 8)


def test_gpu_peak_is_the_block_its_versions_and_the_largest_solver_or_statistics_work():
    shape = model_shape(tiny_config())
    cpu = plan_from_shape(shape, recipe(SDS), gflops=1.0)
    gpu = plan_from_shape(shape, recipe(SDS), gflops=1.0, on_gpu=True)
    lin = hand_block()
    targets = sum(o * i for o, i in lin.values())
    grams = 4 * (D * D + D * D + D * D + F * F)
    solver = int(max(4 * max(5.1 * i * i + 2.8 * o * i, 2.0 * i * i + 13.3 * o * i) for o, i in lin.values()))
    forward = 4 * 5 * (2 * F + F + 2 * D)
    assert gpu.device_peak_bytes == 2 * D * 4 + 4 * targets * 4 + max(grams + solver, grams + forward)  # norms
    assert gpu.memory == cpu.memory and cpu.device_peak_bytes == gpu.device_peak_bytes
    assert "predicted GPU peak" in format_plan(gpu) and "predicted GPU peak" not in format_plan(cpu)


def test_budget_moves_stream_bytes_from_ram_to_disk():
    shape = model_shape(tiny_config())
    r = recipe(SDS)
    free, capped, zero = (plan_from_shape(shape, r, memory_budget=b) for b in (None, 3 * 5 * D * 4, 0))
    streams = 2 * 3 * 5 * D * 4
    assert free.memory["streams in RAM"] == streams and free.disk["spilled streams"] == 0
    assert capped.memory["streams in RAM"] == streams // 2 and capped.disk["spilled streams"] == streams // 2
    assert zero.memory["streams in RAM"] == 0 and zero.disk["spilled streams"] == streams
    for plan in (capped, zero):
        assert free.peak_rss_bytes - plan.peak_rss_bytes == plan.disk["spilled streams"]
        assert plan.disk_bytes - free.disk_bytes == plan.disk["spilled streams"]
    with pytest.raises(ValueError):
        plan_from_shape(shape, r, memory_budget=-1)


def test_stream_counts_sparsegpt_vs_sds():
    plain, sds = recipe(), recipe(SDS)
    keys, reused = stream_keys(plain)
    assert {(k.version, k.part) for k in keys} == {(1, 0)} and not reused
    keys, reused = stream_keys(sds)
    assert {(k.version, k.part) for k in keys} == {(1, 0), (3, 0)}
    assert {(k.version, k.part) for k in reused} == {(1, 0)}  # the re-dense pass on SD data is the advance
    shape = model_shape(tiny_config())
    assert plan_from_shape(shape, plain).block_passes == 2  # 1 statistics + 1 advance (docs/DESIGN.md)
    assert plan_from_shape(shape, sds).block_passes == 4  # 3 statistics + 1 advance
    assert plan_from_shape(shape, sds).calibration_streams == 2


def test_evaluated_versions():
    ev = {"max_tokens": 100, "window": 4}
    assert evaluated_versions(recipe(SDS, evaluation=ev)) == [0, 1, 2, 3]
    assert evaluated_versions(recipe(SDS, evaluation={**ev, "each_step": False, "dense": False})) == [3]
    assert evaluated_versions(recipe(evaluation=ev)) == [0, 1]
    assert evaluated_versions(recipe()) == []


def test_input_groups_of_opt_names():
    names = ["d.0.self_attn.q_proj", "d.0.self_attn.k_proj", "d.0.self_attn.v_proj", "d.0.self_attn.out_proj",
             "d.0.fc1", "d.0.fc2"]
    groups = input_groups(names, [8, 8, 8, 8, 8, 32])
    assert groups[0] == groups[1] == groups[2] and len(set(groups)) == 4


def test_llama_7b_config():
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=32000)
    shape = model_shape(config)
    assert shape.params == pytest.approx(6.74e9, rel=0.01)
    per_block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert shape.block_params[0] == per_block and shape.nonblock_params == 2 * 32000 * 4096 + 4096
    r = Recipe.model_validate({"model": "llama", "dtype": "float16", "activation_dtype": "float16",
                               "calibration": {"segments": 128, "length": 2048}, "evaluation": None,
                               "stages": [PRUNE]})
    plan = plan_from_shape(shape, r, gflops=100.0)
    assert plan.disk["checkpoint"] == 2 * shape.params
    assert plan.memory["streams in RAM"] == 2 * 2**30  # one 128 x 2048 x 4096 float16 stream: 2 GiB (DESIGN.md)
    grams = 4 * (3 * 4096**2 + 11008**2)  # q/k/v, o_proj, gate/up: 4096; down_proj: 11008
    solver = int(4 * (5.6 * 11008**2 + 1.45 * 4096 * 11008))  # SparseGPT on down_proj
    assert plan.phases["solver: Grams + working copies"] == grams + solver
    text = format_plan(plan)
    assert "predicted peak RSS" in text and "GiB" in text and "per block" in text


def test_plan_run_reads_a_config_folder(tmp_path):
    tiny_config().save_pretrained(tmp_path)  # config.json only: no weights are read
    r = Recipe.model_validate({"model": str(tmp_path), "num_blocks": 1, "evaluation": None,
                               "calibration": {"segments": 2, "length": 8}, "stages": [PRUNE]})
    plan = plan_run(r, memory_budget="0GiB", gflops=1.0)
    block = sum(o * i for o, i in hand_block().values()) + 2 * D
    assert plan.blocks == 1 and plan.params == block + 2 * V * D + D  # cut to num_blocks
    assert plan.memory["streams in RAM"] == 0 and plan.disk["spilled streams"] == 2 * 8 * D * 4


def test_stage_costs_and_time():
    o, i = 6, 10
    product = 2.0 * o * i * i
    sds = recipe([PRUNE, {"kind": "redense", "max_iter": 7}, {"kind": "second_prune", "max_iter": 5,
                                                               "adjust_solver": "soft_mask"}])
    gpt_flops = o * i * i + o * i * 128 + 2 * i ** 3
    gpt_seconds = i * (SPARSEGPT_LOOP[0] + SPARSEGPT_LOOP[1] * o)
    assert stage_cost(sds, 0, o, i) == pytest.approx((gpt_flops + 2 * product, gpt_seconds))
    a, b, c, e = REDENSE_COST
    assert stage_cost(sds, 1, o, i) == pytest.approx(((a * 7 + c) * product + 2 * product, b * o * i * 7 + e * i * i))
    a, b, c, e = ADJUST_COST
    full = stage_cost(sds, 2, o, i)
    assert full == pytest.approx((gpt_flops + 4 * product + (a * 5 + c) * product,
                                  gpt_seconds + b * o * i * 5 + e * i * i))
    early = recipe([PRUNE, {"kind": "redense"}, {"kind": "second_prune", "max_iter": 5, "early_exit": True,
                                                  "adjust_solver": "soft_mask"}])
    skipped = 1.0 - EARLY_EXIT_SHARE
    assert stage_cost(early, 2, o, i)[0] == pytest.approx(gpt_flops + 4 * product + skipped * (a * 5 + c) * product)
    plan = plan_from_shape(model_shape(tiny_config()), sds, gflops=2.0)
    assert plan.seconds_per_block == pytest.approx(sum(plan.flops_per_block.values()) / 2e9
                                                   + plan.loop_seconds_per_block)
    assert plan.total_seconds == pytest.approx(BLOCKS * plan.seconds_per_block)  # no evaluation: no head pass
    ev = recipe(SDS, evaluation={"window": 4, "max_tokens": 8, "dense": False, "each_step": False})
    plan = plan_from_shape(model_shape(tiny_config()), ev, gflops=2.0, eval_gflops=0.5)
    flops = plan.flops_per_block
    assert flops["evaluation passes"] == 8 * (2.0 * (sum(o * i for o, i in hand_block().values()) + 2 * D) + 2 * 4 * D)
    assert plan.seconds_per_block == pytest.approx((sum(flops.values()) - flops["evaluation passes"]) / 2e9
                                                   + flops["evaluation passes"] / 0.5e9 + plan.loop_seconds_per_block)
    assert plan.total_seconds == pytest.approx(BLOCKS * plan.seconds_per_block + 8 * 2.0 * V * D / 0.5e9)


def test_admm_factorisations_count_the_solver_own():
    import inspect

    from sdsonnx.pattern import Pattern
    from sdsonnx.sds.admm import admm_reconstruct

    assert ADMM_RHO_EVERY == inspect.signature(admm_reconstruct).parameters["rho_every"].default
    assert admm_factorisations(50, 30) == 11 and admm_factorisations(50, 0) == 1
    assert admm_factorisations(30, 30) == 10 and admm_factorisations(20, 12) == 5 and admm_factorisations(0, 0) == 0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=gen)
    w = torch.randn(4, 8, generator=gen)
    w_init = w * (torch.arange(8) % 2 == 0)
    for iterations, reselect in [(50, 30), (50, 0), (7, 7), (10, 3), (4, 2)]:
        _, info = admm_reconstruct(w, w_init, x.T @ x / 32, iterations=iterations, pattern=Pattern.parse("0.5"),
                                   reselect_iterations=reselect)
        assert info["factorisations"] == admm_factorisations(iterations, reselect)


def test_second_prune_cost_follows_its_adjust_solver():
    o, i = 6, 10
    product = 2.0 * o * i * i
    gpt_flops = o * i * i + o * i * 128 + 2 * i ** 3
    gpt_seconds = i * (SPARSEGPT_LOOP[0] + SPARSEGPT_LOOP[1] * o)
    admm = recipe([PRUNE, {"kind": "redense"}, {"kind": "second_prune", "adjust_solver": "admm",
                                                "admm_iterations": 50, "admm_reselect": 30, "max_iter": 5}])
    soft = recipe([PRUNE, {"kind": "redense"}, {"kind": "second_prune", "adjust_solver": "soft_mask",
                                                "admm_iterations": 50, "admm_reselect": 30, "max_iter": 5}])
    a, b_re, b_fix, c, f, e = ADMM_COST
    adjust_flops = (a * 50 + c) * product + f * 11 * i ** 3  # 11 factorisations: rho grows every 3 of 30 steps
    adjust_seconds = (b_re * 30 + b_fix * 20 + e) * o * i
    assert stage_cost(admm, 2, o, i) == pytest.approx((gpt_flops + 4 * product + adjust_flops,
                                                       gpt_seconds + adjust_seconds))
    a2, b2, c2, e2 = ADJUST_COST
    assert stage_cost(soft, 2, o, i) == pytest.approx((gpt_flops + 4 * product + (a2 * 5 + c2) * product,
                                                       gpt_seconds + b2 * o * i * 5 + e2 * i * i))
    assert stage_cost(admm, 2, o, i) != pytest.approx(stage_cost(soft, 2, o, i))
    fixed = recipe([PRUNE, {"kind": "redense"}, {"kind": "second_prune", "adjust_solver": "admm",
                                                 "admm_iterations": 20, "admm_reselect": 0, "early_exit": True}])
    share = 1.0 - EARLY_EXIT_SHARE
    assert stage_cost(fixed, 2, o, i) == pytest.approx((
        gpt_flops + 4 * product + share * ((a * 20 + c) * product + f * 1 * i ** 3),
        gpt_seconds + share * (b_fix * 20 + e) * o * i))
    bare = [PRUNE, {"kind": "redense"}, {"kind": "second_prune", "adjust": False, "adjust_solver": "admm"}]
    assert stage_cost(recipe(bare), 2, o, i) == pytest.approx((gpt_flops + 4 * product, gpt_seconds))
    # the other stages do not see the solver
    assert stage_cost(admm, 0, o, i) == stage_cost(soft, 0, o, i) and stage_cost(admm, 1, o, i) == stage_cost(soft, 1, o, i)
    assert [work_kind(s) for s in admm.stages] == ["sparsegpt", "redense", "second_prune_admm"]
    assert [work_kind(s) for s in soft.stages] == [work_kind(s) for s in recipe(bare).stages] == [
        "sparsegpt", "redense", "second_prune"]


def test_llama_7b_plan_follows_the_adjust_solver():
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=32000)
    shape = model_shape(config)
    lins = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    grams = 4 * (3 * 4096**2 + 11008**2)
    plans = {}
    for name, stages in (("soft_mask", SDS), ("admm", SDS_ADMM)):
        plan = plan_from_shape(shape, recipe(stages), gflops=100.0)
        plans[name] = plan
        kind = "second_prune" if name == "soft_mask" else "second_prune_admm"
        worst = max(4 * (h * i * i + w * o * i) for o, i in lins for h, w in SOLVER_WORK[kind] + SOLVER_WORK["sparsegpt"]
                    + SOLVER_WORK["redense"])
        assert plan.phases["solver: Grams + working copies"] == grams + int(worst)
    # the soft-mask figures the plan had before the ADMM solver (docs/BENCHMARKS.md, Scale): down_proj's adjustment
    assert SOLVER_WORK["second_prune"] == ((5.1, 2.8), (2.0, 13.3))
    assert plans["soft_mask"].phases["solver: Grams + working copies"] == grams + int(4 * (2.0 * 11008**2
                                                                                           + 13.3 * 4096 * 11008))
    # ADMM's adjustment holds one H more (Hs and the inverse besides H) and 1 W less: 3.0 H + 12.3 W on down_proj
    assert SOLVER_WORK["second_prune_admm"] == ((5.1, 2.8), (3.0, 12.3))
    assert plans["admm"].phases["solver: Grams + working copies"] == grams + int(4 * (3.0 * 11008**2
                                                                                      + 12.3 * 4096 * 11008))
    assert plans["admm"].peak_rss_bytes - plans["soft_mask"].peak_rss_bytes == (
        int(4 * (3.0 * 11008**2 + 12.3 * 4096 * 11008)) - int(4 * (2.0 * 11008**2 + 13.3 * 4096 * 11008)))
    soft, admm = recipe(SDS), recipe(SDS_ADMM)
    flops = sum(stage_cost(admm, 2, o, i)[0] - stage_cost(soft, 2, o, i)[0] for o, i in lins)
    seconds = sum(stage_cost(admm, 2, o, i)[1] - stage_cost(soft, 2, o, i)[1] for o, i in lins)
    assert flops != 0 and seconds != 0
    assert plans["admm"].flops_per_block["solvers"] - plans["soft_mask"].flops_per_block["solvers"] == \
        pytest.approx(flops)
    assert plans["admm"].seconds_per_block - plans["soft_mask"].seconds_per_block == pytest.approx(flops / 100e9
                                                                                                   + seconds)
    assert plans["admm"].total_seconds - plans["soft_mask"].total_seconds == pytest.approx(32 * (flops / 100e9
                                                                                                 + seconds))


def test_parse_bytes():
    assert parse_bytes("8GiB") == parse_bytes("8G") == 8 * 2**30
    assert parse_bytes("500MB") == 500_000_000 and parse_bytes(1234) == 1234 and parse_bytes(None) is None
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_measure_gflops_is_positive():
    assert measure_gflops(seconds=0.05, size=64) > 0
    assert measure_gflops(seconds=0.05, size=64, dtype=torch.bfloat16) > 0
