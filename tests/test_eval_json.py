"""`sdsonnx eval --json` on a tiny checkpoint: one JSON object whose perplexity is recomputed here by hand."""
import json
import math

import torch
from click.testing import CliRunner

from sdsonnx.cli import main
from tiny_models import tiny_checkpoint


def test_eval_json_on_a_tiny_checkpoint(tmp_path):
    folder = tiny_checkpoint("llama", tmp_path / "ckpt", pattern="2:4", report=False)
    text = tmp_path / "eval.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("\n".join(" ".join(f"w{int(i)}" for i in torch.randint(4, 128, (40,), generator=g))
                              for _ in range(200)) + "\n")
    args = ["eval", str(folder), "--data", str(text), "--window", "32", "--max-tokens", "256"]
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    out = json.loads(lines[0])
    assert {"perplexity", "tokens", "windows", "window", "seconds", "load_seconds", "peak_rss_bytes"} <= set(out)
    assert (out["windows"], out["window"], out["tokens"]) == (8, 32, 256)
    assert out["seconds"] >= 0 and out["peak_rss_bytes"] > 2**20

    # the same windows through the model by hand: exp(mean next-token cross-entropy)
    from sdsonnx.data import evaluation_windows, load_split_texts
    from sdsonnx.models import load_model

    model, tokenizer = load_model(str(folder))
    windows = evaluation_windows(tokenizer, load_split_texts(str(text), "evaluation"), 32, 256)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(out["perplexity"], math.exp(float(nll)), rel_tol=1e-5)

    plain = CliRunner().invoke(main, args)  # without --json: the one-line text form is unchanged
    assert plain.exit_code == 0 and plain.stdout.startswith(f"perplexity {out['perplexity']:.4f} (256 tokens, 8 windows")
