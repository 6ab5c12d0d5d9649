"""tools/scale_bench.py on a tiny shape: the written checkpoint loads as LlamaForCausalLM, tokenizer ids < vocab,
records from a fake report, the markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import scale_bench  # noqa: E402

TINY = scale_bench.SCALES["tiny"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return scale_bench.write_checkpoint(tmp_path_factory.mktemp("tiny"), **TINY, tokenizer_documents=400)


def test_checkpoint_loads_with_the_llama_names_and_shapes(checkpoint):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = scale_bench.llama_config(**TINY)
    expected = scale_bench.expected_tensors(config)
    loaded = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert loaded == expected
    assert len(expected) == 2 + 9 * TINY["blocks"] + 1  # embedding, 9 tensors per block, norm, head
    assert type(model).__name__ == "LlamaForCausalLM" and not model.config.tie_word_embeddings
    assert torch.equal(model.model.norm.weight, torch.ones(TINY["hidden"], dtype=torch.float16))
    q = model.model.layers[1].self_attn.q_proj.weight.float()
    assert abs(q.std().item() - scale_bench.STD) < 0.002 and q.dtype == torch.float32
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_one_shard_per_block_and_the_index(checkpoint):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == TINY["blocks"] + 2
    total = 0
    for file in files:
        with safe_open(str(checkpoint / file), "pt") as f:
            names = list(f.keys())
            total += sum(f.get_tensor(n).numel() * 2 for n in names)
            assert all(index["weight_map"][n] == file for n in names)
            blocks = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
            assert len(blocks) <= 1  # never two blocks in one shard
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(scale_bench.expected_tensors(scale_bench.llama_config(**TINY)))


def test_tokenizer_is_offline_and_in_vocab(checkpoint):
    from transformers import AutoTokenizer

    from sdsonnx.data import prepends_bos

    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok("The quick brown fox jumps over the lazy dog. Zürich, 1848 — ∑ x².")["input_ids"]
    assert max(ids) < TINY["vocab"] and len(tok) <= TINY["vocab"]
    assert ids[0] == tok.bos_token_id == 1 and prepends_bos(tok)
    assert tok.decode(ids[1:]) == "The quick brown fox jumps over the lazy dog. Zürich, 1848 — ∑ x²."


def test_bench_recipe_is_valid_and_takes_the_llama7b_stages(tmp_path):
    from sdsonnx.recipe import parse_recipe

    for method, stages in (("sparsegpt", ["prune"]), ("sds-sparsegpt", ["prune", "redense", "second_prune"])):
        recipe = parse_recipe(scale_bench.bench_recipe(tmp_path, method, 2))
        assert [s.kind for s in recipe.stages] == stages and recipe.num_blocks == 2
        assert (recipe.calibration.segments, recipe.calibration.length) == (16, 512)
        assert recipe.first_prune.sparsity == 0.5 and recipe.dtype == recipe.activation_dtype == "float16"


TIME_V = """\tCommand being timed: "python -c ..."
\tMaximum resident set size (kbytes): 2097152
\tExit status: 0
"""


def test_record_from_a_fake_report():
    assert scale_bench.parse_max_rss(TIME_V) == 2 * 2**30
    assert scale_bench.parse_max_rss("no such line") is None
    report = {"peak_rss_bytes": 123, "calibration": {"segments": 16, "length": 512},
              "wall_seconds": {"load": 10.0, "prune": 40.0, "eval_pruned": 4.0}, "perplexity": {"pruned": 9.5}}
    shape = scale_bench.SCALES["7b"]
    record = scale_bench.make_record(report, method="sparsegpt", shape=shape, blocks_run=2, process_seconds=60.0,
                                     process_peak_rss=2 * 2**30,
                                     predicted={"peak_rss_bytes": 2**31 * 1.25, "seconds_per_block": 20.0})
    assert record["seconds_per_block"] == 22.0  # (40 + 4) / 2
    assert record["projected_seconds"] == 16.0 + 22.0 * 32  # the rest (60 - 44) once
    assert record["projected"] and record["blocks_run"] == 2 and record["calibration"] == "16 x 512"
    assert record["peak_rss_bytes"] == 2 * 2**30 and record["report_peak_rss_bytes"] == 123
    assert record["peak_vs_plan"] == -0.2
    fallback = scale_bench.make_record(report, method="x", shape=shape, blocks_run=32, process_seconds=1.0,
                                       process_peak_rss=None)
    assert fallback["peak_rss_bytes"] == 123 and not fallback["projected"] and "peak_vs_plan" not in fallback
    with pytest.raises(ValueError):
        scale_bench.make_record(report, method="x", shape=shape, blocks_run=0, process_seconds=1.0,
                                process_peak_rss=None)
    text = scale_bench.table([record, fallback])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == 13
    assert "| sparsegpt | 2 of 32 | 16 x 512 | none | 2.00 GiB | 2.50 GiB (-20%) | 22.0 | 12.0 min (projected) |" in lines[2]
