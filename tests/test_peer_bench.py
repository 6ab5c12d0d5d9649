"""tools/peer_bench.py and tools/peers/: the parts that run in the project venv (no llm-compressor needed).

The reference loop (tools/peers/reference_ports.py reference_prune, a port of IST-DASLab llama_sequential and
locuslab prune_wanda) is checked against sdsonnx's pipeline on a tiny LLaMA: Wanda's masks and weights must be
identical, SparseGPT n:m's masks identical and weights equal to float tolerance. The table and record code is
checked on hand-made records with exact expected strings.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sdsonnx.pipeline import prune_model
from sdsonnx.recipe import parse_recipe
from tiny_models import small_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "peers"))
import peer_bench  # noqa: E402
import reference_ports  # noqa: E402
import worker  # noqa: E402


def _calibration(n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(3))


def _model():
    """A random 2-block LLaMA, hidden 16, MLP 32 (tests/tiny_models.py small_llama), seed 0."""
    return small_llama(128, 2, 64)


def _sdsonnx(model, calibration, method: str, pattern: str):
    stage = {"kind": "prune", "method": method, **({"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)})}
    recipe = parse_recipe({"model": "x", "device": "cpu", "evaluation": None, "weight_figure": None,
                           "calibration": {"segments": calibration.shape[0], "length": calibration.shape[1]},
                           "stages": [stage]})
    prune_model(model, recipe, calibration, progress=False)
    return worker.linear_weights(model)


def _reference(model, calibration, method: str, pattern: str):
    sparsity, prunen, prunem = worker.parse_pattern(pattern)
    reference_ports.reference_prune(model, calibration, method, sparsity, prunen, prunem)
    return worker.linear_weights(model)


# ---- the reference loop against sdsonnx ---------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_reference_wanda_loop_equals_sdsonnx(pattern):
    cal = _calibration()
    ref, got = _reference(_model(), cal, "wanda", pattern), _sdsonnx(_model(), cal, "wanda", pattern)
    assert len(ref) == 2 * 7 and set(ref) == set(got)
    for name in ref:  # 16 and 32 input columns: floor(cols * 0.5) == round(cols * 0.5), so exactly the same
        assert torch.equal(ref[name] == 0, got[name] == 0), name
        torch.testing.assert_close(ref[name], got[name], rtol=1e-5, atol=1e-6)


def test_reference_sparsegpt_loop_matches_sdsonnx_nm():
    cal = _calibration()
    ref, got = _reference(_model(), cal, "sparsegpt", "2:4"), _sdsonnx(_model(), cal, "sparsegpt", "2:4")
    differ = sum(int(((ref[k] == 0) != (got[k] == 0)).sum()) for k in ref)
    total = sum(w.numel() for w in ref.values())
    assert differ <= 1e-3 * total, f"{differ} of {total} mask entries differ"
    for name in ref:
        torch.testing.assert_close(ref[name], got[name], rtol=1e-3, atol=1e-3)


def test_reference_loop_accumulators_are_the_ports():
    inps = list(torch.randn(3, 1, 16, 8, generator=torch.Generator().manual_seed(4)))
    state_h = state_s = None
    for inp in inps:
        state_h = reference_ports._accumulate("sparsegpt", state_h, inp)
        state_s = reference_ports._accumulate("wanda", state_s, inp)
    assert state_h[1] == state_s[1] == 3
    torch.testing.assert_close(state_h[0], reference_ports.ref_sparsegpt_hessian(inps, 8))
    torch.testing.assert_close(state_s[0], reference_ports.ref_wanda_scaler_row(inps, 8))


def test_reference_prune_rejects_unknown_method():
    with pytest.raises(ValueError, match="sparsegpt or wanda"):
        reference_ports.reference_prune(_model(), _calibration(), "magnitude", 0.5)


# ---- worker -------------------------------------------------------------------------------------------------------

def test_parse_pattern():
    assert worker.parse_pattern("2:4") == (0.5, 2, 4)
    assert worker.parse_pattern("1:4") == (0.75, 3, 4)
    assert worker.parse_pattern("0.5") == (0.5, 0, 0)
    for bad in ("4:4", "0:4", "1.5", "0"):
        with pytest.raises(ValueError):
            worker.parse_pattern(bad)


def test_worker_process_reference(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    torch.save(_calibration(), tmp_path / "cal.pt")
    command = peer_bench.worker_command("reference", "wanda:2:4", tmp_path / "model", tmp_path / "cal.pt",
                                        tmp_path / "out.safetensors")
    result = peer_bench.run_worker(command, tmp_path / "log")
    assert result["linears"] == 14 and result["threads"] == 2 and result["peak_rss_bytes"] > 0
    assert result["command_seconds"] >= result["prune_seconds"] > 0
    assert result["command_cpu_seconds"] >= result["prune_cpu_seconds"] > 0
    weights = peer_bench.load_weights(tmp_path / "out.safetensors")
    expected = _reference(_model(), _calibration(), "wanda", "2:4")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert peer_bench.sparsity_check(weights, "2:4") == {"sparsity": 0.5, "nm_violations": 0}


# ---- records and table --------------------------------------------------------------------------------------------

def test_sparsity_check_and_mask_difference_exact():
    a = {"w": torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0]])}
    b = {"w": torch.tensor([[1.0, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 0.0]])}
    assert peer_bench.sparsity_check(a, "2:4") == {"sparsity": 3 / 8, "nm_violations": 1}
    assert peer_bench.sparsity_check(a, "0.5") == {"sparsity": 3 / 8}
    assert peer_bench.mask_difference(a, b) == 2 / 8


def test_plan_runs_interleaves_then_seeds():
    runs = peer_bench.plan_runs(["sparsegpt:2:4", "wanda:0.5"], ["sdsonnx", "reference"], [0, 1])
    assert runs == [("sdsonnx", "sparsegpt:2:4", 0), ("reference", "sparsegpt:2:4", 0), ("sdsonnx", "wanda:0.5", 0),
                    ("reference", "wanda:0.5", 0), ("sdsonnx", "sparsegpt:2:4", 1)]
    with pytest.raises(ValueError):
        peer_bench.split_cell("magnitude:0.5")


def _record(impl, seed=0, ppl=50.0, prune=100.0, command=120.0, rss=1000, run_id="r1", load=(1.0, 1.0, 1.0)):
    worker_result = {"prune_seconds": prune, "command_seconds": command, "load_seconds": 3.0, "threads": 2,
                     "prune_cpu_seconds": 2 * prune, "command_cpu_seconds": 2 * command,
                     "peak_rss_bytes": rss * 2**20, "versions": {}}
    record = peer_bench.make_record(impl, "sparsegpt:2:4", seed, worker_result, ppl, 90.0,
                                    {"sparsity": 0.5, "mask_diff_vs_reference": 0.0125}, ["py", "w"], load, load,
                                    run_id, {}, "abc1234")
    json.dumps(record)  # every record is JSON
    return record


def test_records_carry_load_and_command():
    r = _record("sdsonnx", load=(3.5, 2.0, 1.0))
    assert r["high_load"] is True and r["load_average_before"] == [3.5, 2.0, 1.0]
    assert r["command"] == "py w" and r["git_commit"] == "abc1234" and r["case"] == "sdsonnx:sparsegpt:2:4:seed0"
    assert _record("sdsonnx")["high_load"] is False
    merged = peer_bench.merge_records([r, _record("reference")], _record("sdsonnx", ppl=7.0))
    assert [x["impl"] for x in merged] == ["reference", "sdsonnx"] and merged[1]["perplexity"] == 7.0


def test_markdown_table_ratios_within_one_run():
    records = [_record("reference", ppl=51.0, prune=50.0, command=60.0, rss=800),
               _record("sdsonnx", ppl=50.0, prune=100.0, command=120.0, rss=1000),
               _record("llmcompressor", ppl=50.0, prune=200.0, command=240.0, rss=2000, run_id="other")]
    lines = peer_bench.markdown_table(records).splitlines()
    assert lines[2] == ("| sparsegpt 2:4 | sdsonnx | 0 | 50.000 | - | 1.25% | 100 | 200 | 120 | 240 | 1000 | - | - | - | "
                        "- | - | 2 | 1.0 | abc1234 |")
    assert lines[3] == ("| sparsegpt 2:4 | llmcompressor | 0 | 50.000 | - | 1.25% | 200 | 400 | 240 | 480 | 2000 | - | - | "
                        "- | - | - | 2 | 1.0 | abc1234 |")  # another run: no ratio
    assert lines[4] == ("| sparsegpt 2:4 | reference | 0 | 51.000 | +2.00% | 1.25% | 50 | 100 | 60 | 120 | 800 | 2.00x | "
                        "2.00x | 2.00x | 2.00x | 1.25x | 2 | 1.0 | abc1234 |")
    assert lines[6] == "(no seed spread measured yet)"


def test_seed_table_spread():
    records = [_record("sdsonnx", seed=s, ppl=p) for s, p in [(0, 50.0), (1, 52.0), (2, 48.0)]]
    assert peer_bench.seed_table(records).splitlines()[2] == \
        "| sparsegpt 2:4 | 0: 50.000, 1: 52.000, 2: 48.000 | 8.00% |"


def test_update_markdown_only_between_markers(tmp_path):
    path = tmp_path / "B.md"
    path.write_text(f"# B\n\n## Peers\n\n{peer_bench.MARK_BEGIN}\nold\n{peer_bench.MARK_END}\n\n## Speed\nkeep\n")
    peer_bench.update_markdown([_record("sdsonnx")], path)
    text = path.read_text()
    assert text.startswith("# B\n\n## Peers\n\n<!-- peers-table:begin -->\n| cell |") and text.endswith(
        "<!-- peers-table:end -->\n\n## Speed\nkeep\n") and "old" not in text
    path.write_text("# no markers\n")
    with pytest.raises(RuntimeError, match="markers"):
        peer_bench.update_markdown([], path)
