"""`permute: residual` (sdsonnx/prune/residual.py, sdsonnx/residual_step.py): the fold preserves the logits of real
architectures (tied and untied heads, OPT with and without project_in/out), the identity fold is a no-op, the
normalised reader scores by hand, the shared search against brute force, the recipe values and hashes, preflight's
rejection, and a tiny end-to-end run (saved, exported, validated; its in-loop dense perplexity equals the unfolded
model's) that is killed and resumed from the saved order."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from sdsonnx.blocks import find_blocks
from sdsonnx.prune import residual as R
from sdsonnx.prune.permute import kept_score
from sdsonnx.recipe import RecipeError, parse_recipe

from test_permute import best_by_brute_force
from tiny_models import CONFIGS, tiny, tiny_checkpoint

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits_before_after(model, perm):
    with torch.no_grad():
        before = model(IDS).logits
        path, blocks = find_blocks(model)
        R.fold_model(model, path, blocks, perm)
        return before, model(IDS).logits


def models():
    yield "llama-untied", tiny("llama")
    config = CONFIGS["llama"]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = AutoModelForCausalLM.from_config(config).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    yield "llama-tied", tied
    for arch in ("qwen2", "gemma3", "opt"):
        yield arch, tiny(arch)
    for proj, before in ((32, True), (64, False)):  # OPT-350m shapes: project_in/out; post-norm blocks
        torch.manual_seed(0)
        yield f"opt-proj{proj}", AutoModelForCausalLM.from_config(OPTConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
            max_position_embeddings=256, word_embed_proj_dim=proj, do_layer_norm_before=before)).eval()


@pytest.mark.parametrize("name,model", list(models()), ids=lambda x: x if isinstance(x, str) else "")
def test_fold_preserves_logits(name, model):
    perm = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense, folded = logits_before_after(model, perm)
    assert float((folded - dense).abs().max()) < 1e-5
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("embed_tokens" in n or "project_in" in n for n in changed)
    assert any(n.endswith(("q_proj.weight", "o_proj.weight", "out_proj.weight")) for n in changed)


def test_identity_fold_is_a_no_op():
    model = tiny("llama")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    path, blocks = find_blocks(model)
    R.fold_model(model, path, blocks, torch.arange(model.config.hidden_size))
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_fold_touches_exactly_the_residual_parts():
    model = tiny("llama")
    readers, writers, norms = R.block_parts(find_blocks(model)[1][0], 64)
    assert readers == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert writers == ["self_attn.o_proj", "mlp.down_proj"]
    assert norms == ["input_layernorm", "post_attention_layernorm"]
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    w = model.model.layers[1].mlp.gate_proj.weight.detach().clone()
    o = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    e = model.model.embed_tokens.weight.detach().clone()
    R.fold_model(model, *find_blocks(model), perm)
    assert torch.equal(model.model.layers[1].mlp.gate_proj.weight, w[:, perm])
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, o[perm])
    assert torch.equal(model.model.embed_tokens.weight, e[:, perm])
    assert torch.equal(R.inverse(perm)[perm], torch.arange(64))


def test_reader_scores_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    sq = torch.tensor([4.0, 1.0])
    raw = torch.tensor([[2.0, 2.0], [0.0, 3.0]])  # |W| sqrt(sq)
    assert torch.equal(R.reader_scores(w, sq), raw / 7)
    assert torch.equal(R.reader_scores(w, None), w.abs() / 6)
    rows = R.sample_rows(torch.arange(40.0).reshape(10, 4), 0.3, torch.Generator().manual_seed(0))
    back = rows * 0.3  # rows of the source, scaled by 1 / fraction
    assert rows.shape == (3, 4) and torch.allclose(back - back[:, :1], torch.arange(4.0).expand(3, 4))
    assert len(set(back[:, 0].round().tolist())) == 3 and bool((back[:, 0].round() % 4 == 0).all())


def test_shared_search_raises_the_stacked_kept_score_to_the_brute_force_optimum():
    gen = torch.Generator().manual_seed(5)
    readers = [torch.rand(r, 8, generator=gen) ** 3 for r in (3, 5, 2)]
    stacked = torch.cat([R.reader_scores(w, None) for w in readers])
    found = R.search_residual(stacked, 2, 4)
    assert found.identity_score == pytest.approx(kept_score(stacked, 2, 4))
    assert found.score == pytest.approx(kept_score(stacked[:, found.perm], 2, 4))
    assert found.score > found.identity_score
    assert found.score == pytest.approx(best_by_brute_force(stacked, 2, 4))


def recipe(permute, **prune):
    return {"model": "smollm2-135m", "stages": [{"kind": "prune", "method": "sparsegpt", "permute": permute,
                                                 **(prune or {"pattern": "2:4"})}]}


@pytest.mark.parametrize("value", ["residual", "residual+mlp", "residual+attention", "residual+mlp+attention"])
def test_recipe_accepts_the_residual_values(value):
    stage = parse_recipe(recipe(value)).first_prune
    assert stage.permute == value and "residual" in stage.permute_scopes
    assert stage.permute_scopes - {"residual"} == set(value.split("+")[1:])
    with pytest.raises(RecipeError, match="needs pattern"):
        parse_recipe(recipe(value, sparsity=0.5))
    data = recipe("none")
    data["stages"] += [{"kind": "prune", "method": "wanda", "pattern": "2:4", "permute": value}]
    with pytest.raises(RecipeError, match="stages.1.permute"):
        parse_recipe(data)


def test_recipe_rejects_other_values_and_keeps_the_hashes_of_recipes_without_residual():
    with pytest.raises(RecipeError, match="permute"):
        parse_recipe(recipe("residual+bogus"))
    assert parse_recipe(recipe("none")).first_prune.permute_scopes == frozenset()
    assert parse_recipe(recipe("mlp+attention")).first_prune.permute_scopes == {"mlp", "attention"}
    # digests of these recipes before `residual` existed (commit 473102a): resume identities depend on them
    assert parse_recipe(recipe("none")).digest() == parse_recipe({"model": "smollm2-135m", "stages": [
        {"kind": "prune", "method": "sparsegpt", "pattern": "2:4"}]}).digest()
    assert parse_recipe(recipe("none")).digest() == PINNED["none"]
    assert parse_recipe(recipe("mlp+attention")).digest() == PINNED["mlp+attention"]


PINNED = {"none": "f14278fc0acd02a0099320394674becdf3be8c9fa18887641336e5c522fb9790",
          "mlp+attention": "0ffb48f0601e5a2d0aa5653b4b06cebc0520c0b16cbcefb80f2a3789c2f9c6a2"}


def test_preflight_rejects_other_architectures_and_no_nm_reader():
    from sdsonnx.preflight import residual_problems

    rec = parse_recipe(recipe("residual"))
    shapes = {0: {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 128)}}
    assert residual_problems(rec, SimpleNamespace(model_type="llama"), shapes, "r.yaml") == []
    assert residual_problems(parse_recipe(recipe("mlp")), SimpleNamespace(model_type="gpt2"), shapes, "r.yaml") == []
    [problem] = residual_problems(rec, SimpleNamespace(model_type="gpt2"), shapes, "r.yaml")
    assert problem.startswith("r.yaml: stages.0.permute: residual") and "'gpt2'" in problem
    only_down = {0: {"model.layers.0.mlp.down_proj": (64, 128)}}
    [problem] = residual_problems(rec, SimpleNamespace(model_type="llama"), only_down, "r.yaml")
    assert "no target Linear that reads the residual stream" in problem


def test_a_block_that_does_not_commute_is_refused():
    from sdsonnx.blocks import capture_block_inputs
    from sdsonnx.residual_step import _check_fold

    model = tiny("llama")
    block = find_blocks(model)[1][0]
    inputs = capture_block_inputs(model, IDS)
    _check_fold(block, inputs.hidden[:1], inputs.kwargs[0], 0, "llama")  # passes
    block.input_layernorm.__class__ = type("Scaled", (type(block.input_layernorm),), {
        "forward": lambda self, x: super(type(self), self).forward(x) * torch.arange(x.shape[-1], dtype=x.dtype)})
    with pytest.raises(RecipeError, match="block 0: permute: residual does not preserve"):
        _check_fold(block, inputs.hidden[:1], inputs.kwargs[0], 0, "llama")


TEXT = "\n".join(" ".join(f"w{4 + (i * 7919 + j * 31) % 120}" for j in range(60)) for i in range(200))


def run_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from sdsonnx.cli import main; main()", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 2-block LLaMA pruned by SparseGPT 2:4 with residual+mlp+attention, exported and validated (in a process
    of its own, as the resumed runs: the same thread count, so the same float sums)."""
    tmp = tmp_path_factory.mktemp("residual")
    tiny_checkpoint("llama", tmp / "model", pattern=None, report=False, num_hidden_layers=2)
    (tmp / "text.txt").write_text(TEXT)
    path = tmp / "recipe.yaml"
    path.write_text(f"model: {tmp / 'model'}\ndevice: cpu\nweight_figure: null\n"
                    f"calibration: {{source: {tmp / 'text.txt'}, segments: 4, length: 32}}\n"
                    f"evaluation: {{source: {tmp / 'text.txt'}, window: 32, max_tokens: 256, dense: true}}\n"
                    "export: {task: text-generation}\n"
                    "stages:\n  - {kind: prune, method: sparsegpt, pattern: '2:4', permute: residual+mlp+attention}\n")
    proc = run_cli("run", str(path), "-o", str(tmp / "ref"), "--no-progress")
    assert proc.wait() == 0, proc.stdout.read().decode()
    return tmp, path


def test_run_folds_saves_exports_and_validates(reference):
    from sdsonnx.evaluate import perplexity
    from sdsonnx.models import load_model
    from sdsonnx.recipe import load_recipe
    from sdsonnx.run import recipe_texts, recipe_tokens

    tmp, path = reference
    report = json.loads((tmp / "ref" / "report.json").read_text())
    assert report["export"]["validation"]["ok"], report["export"]["validation"]["failures"]
    record = report["residual_permutation"]
    saved = json.loads((tmp / "ref" / record["file"]).read_text())
    perm = torch.tensor(saved["perm"])
    assert record["digest"] == R.permutation_digest(perm) and record["kept_score_gain"] > 0
    assert record["readers"] == 10 and record["rows"] == record["sample_rows"] == 2 * (64 + 32 + 32 + 128 + 128)
    assert "resumed" not in record
    # the block-level permutations still ran on the folded blocks
    assert report["modules"]["model.layers.0.mlp.down_proj"]["permutation"]["scope"] == "mlp"
    # the in-loop dense perplexity is the folded dense model's: equal to the unfolded model's
    rec = load_recipe(str(path), {})
    model, tokenizer = load_model(str(tmp / "model"))
    _, windows, _ = recipe_tokens(rec, tokenizer, recipe_texts(rec))
    assert report["perplexity"]["dense"] == pytest.approx(perplexity(model, windows, progress=False), rel=1e-5)
    # the checkpoint is the folded model: its embeddings are the source's columns in the saved order
    pruned, _ = load_model(str(tmp / "ref"))
    assert torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight[:, perm])
    assert report["perplexity"]["pruned"] == pytest.approx(perplexity(pruned, windows, progress=False), rel=1e-5)


def test_resume_reads_the_saved_order_instead_of_searching(reference):
    from sdsonnx.artifact.checkpoint import weights_digest
    from sdsonnx.outputs import KILL_ENV, siblings

    tmp, path = reference
    out = tmp / "out"
    _, work, _ = siblings(out)
    proc = run_cli("run", str(path), "-o", str(out), "--no-progress", env={KILL_ENV: "shard-1"})
    assert proc.wait() == -signal.SIGKILL, proc.stdout.read().decode()
    saved = json.loads((work / "residual_permutation.json").read_text())
    saved["record"]["marker"] = "read back"  # a resumed run that searched again would not carry it
    (work / "residual_permutation.json").write_text(json.dumps(saved))
    done = run_cli("run", str(path), "-o", str(out), "--no-progress", "--resume")
    assert done.wait() == 0, done.stdout.read().decode()
    record = json.loads((out / "report.json").read_text())["residual_permutation"]
    assert record["resumed"] is True and record["marker"] == "read back"
    assert weights_digest(out) == weights_digest(tmp / "ref")
