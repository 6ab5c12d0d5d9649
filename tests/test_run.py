"""`sdsonnx run` end to end: bad recipes stop before any weight loads; SmolLM2-135M cut to two blocks runs SDS."""
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from sdsonnx.cli import main
from sdsonnx.masks import nm_violations

PNG = b"\x89PNG\r\n\x1a\n"


def write_recipe(folder, **fields):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


def no_weights(*args, **kwargs):
    raise AssertionError("weights were loaded although the recipe is bad")


@pytest.mark.parametrize("fields, message", [
    ({"targets": [r"mlp\.nothing_here"]}, r"targets: 'mlp\\\\.nothing_here' matches no Linear"),
    ({"ignore": ["zzz"]}, r"ignore: 'zzz' matches no Linear"),
    ({"targets": ["q_proj"], "ignore": ["q_proj"]}, "leave no module to prune"),
    ({"weight_figure": "model.layers.0.mlp.nope"}, "weight_figure: .* is not a module the recipe prunes"),
    ({"stages": [{"kind": "prune", "method": "wanda", "pattern": "2:5"}]}, r"pattern 2:5 needs in_features divisible by 5"),
    ({"stages": [{"kind": "prune", "method": "wanda", "sparsity": 0.5,
                  "overrides": [{"blocks": [7], "sparsity": 0.3}]}]}, r"overrides\.0\.blocks: block 7 does not exist"),
    ({"calibration": {"source": "missing.jsonl"}}, r"calibration\.source"),
    ({"stages": [{"kind": "prune", "method": "wanda", "sparsity": 0.5}, {"kind": "second_prune"}]},
     "second_prune needs a redense stage before it"),
])
def test_bad_recipe_exits_2_naming_file_and_field_before_loading_weights(tmp_path, monkeypatch, fields, message):
    import sdsonnx.run

    monkeypatch.setattr(sdsonnx.run, "open_streamed", no_weights)
    recipe = {"model": "smollm2-135m", "num_blocks": 2,
              "stages": [{"kind": "prune", "method": "wanda", "sparsity": 0.5}], **fields}
    path = write_recipe(tmp_path, **recipe)
    result = CliRunner().invoke(main, ["run", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert str(path) in result.output
    assert __import__("re").search(message, result.output), result.output
    assert not (tmp_path / "out").exists()


def test_unknown_model_and_unsupported_architecture(tmp_path):
    path = write_recipe(tmp_path, model=str(tmp_path / "nothing"), stages=[{"kind": "prune", "method": "wanda", "sparsity": 0.5}])
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2 and "model:" in result.output


@pytest.mark.slow
def test_smollm2_two_blocks_sds_run_export_validate(tmp_path):
    """The real SmolLM2-135M cut to two blocks: SDS-SparseGPT 2:4, checkpoint, report, figure, ONNX export."""
    recipe = {
        "model": "smollm2-135m", "num_blocks": 2,
        "calibration": {"segments": 8, "length": 128, "seed": 0},
        "evaluation": {"window": 128, "max_tokens": 1024},
        "stages": [{"kind": "prune", "method": "sparsegpt", "pattern": "2:4"},
                   {"kind": "redense", "max_iter": 40}, {"kind": "second_prune", "max_iter": 40}],
        "export": {"task": "text-generation"},
    }
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, **recipe)), "--output", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "after_1_prune" in result.output and "after_2_redense" in result.output

    report = json.loads((out / "report.json").read_text())
    assert len(report["modules"]) == 14 and report["stages"] == ["prune", "redense", "second_prune"]
    assert set(report["perplexity"]) == {"dense", "after_1_prune", "after_2_redense", "pruned"}
    assert all(0 < v < float("inf") for v in report["perplexity"].values())  # two blocks: large but finite
    assert report["global_sparsity"] == 0.5 and report["peak_rss_bytes"] > 0
    assert {"stage_prune", "stage_redense", "stage_second_prune", "export", "validate"} <= set(report["wall_seconds"])
    assert report["export"]["validation"]["ok"], report["export"]["validation"]["failures"]
    assert (out / "weights.png").read_bytes()[:8] == PNG
    assert report["weight_figure"]["module"] == "model.layers.1.mlp.down_proj"
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["stages"][1]["l1"] == 0.1

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, rec in report["modules"].items():
        w = model.get_submodule(name).weight.detach()
        assert len(nm_violations(w, 2, 4)) == 0, name
        assert float((w == 0).float().mean()) == rec["sparsity"] == 0.5
        first, final = rec["stages"][0]["error"], rec["stages"][-1]["error"]
        if name.startswith("model.layers.0.self_attn.") and not name.endswith("o_proj"):
            # q/k/v of block 0 read the embeddings in every stage: the errors are measured on the same inputs
            assert final <= first * (1 + 1e-5), name

    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0 and result.output.count("2:4") == 14


@pytest.mark.slow
def test_sds_on_a_real_smollm2_block_beats_the_first_prune():
    """Block 0 of SmolLM2-135M: SparseGPT 2:4, then re-dense + second prune on the same statistics, per Linear."""
    from sdsonnx.blocks import capture_block_inputs, find_blocks, target_linears
    from sdsonnx.data import calibration_segments, load_split_texts
    from sdsonnx.models import load_model
    from sdsonnx.pattern import Pattern
    from sdsonnx.pipeline import collect_stats
    from sdsonnx.prune.sparsegpt import sparsegpt_prune
    from sdsonnx.sds import reconstruction_loss, redense_gram, second_prune

    model, tokenizer = load_model("smollm2-135m", num_blocks=1)
    ids = calibration_segments(tokenizer, load_split_texts("wiki-extracts", "calibration"), 8, 256, 0)
    inputs = capture_block_inputs(model, ids)
    _, blocks = find_blocks(model)
    linears = target_linears(model)[0]
    stats = collect_stats(blocks[0], linears, inputs.hidden, inputs.kwargs[0])
    pattern, first_total, final_total, better = Pattern.parse("2:4"), 0.0, 0.0, 0
    for name, mod in linears.items():
        w, h = mod.weight.detach().float(), stats[name].hessian
        first, _ = sparsegpt_prune(w, h, pattern)
        dense_again, _ = redense_gram(w, first, h, 0.1, 0.1, max_iter=60)
        final, info = second_prune("sparsegpt", w, dense_again, first, stats[name], pattern, max_iter=60)
        assert len(nm_violations(final, 2, 4)) == 0, name
        r_first, r_final = reconstruction_loss(first, w, h), reconstruction_loss(final, w, h)
        assert r_final <= r_first, name  # never worse
        better += r_final < 0.99 * r_first
        first_total, final_total = first_total + r_first, final_total + r_final
    assert better >= 5, f"SDS beat the first prune by 1% on only {better} of 7 Linears"
    assert final_total < 0.95 * first_total
