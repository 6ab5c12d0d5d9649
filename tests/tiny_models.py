"""The one place tests build tiny models, checkpoints, tokenizers and calibration ids (no hub access).

`tiny(arch)` builds a 3-block random model of four architectures (CONFIGS) for the layer-wise loop;
`calibration()` gives seeded token ids for it; `word_tokenizer(words)` is a whitespace word tokenizer with
predictable ids.

`tiny_checkpoint("llama", folder, pattern="2:4")` writes a Hugging Face folder (config.json, model.safetensors,
a word-level tokenizer) whose decoder Linears are magnitude-pruned to the pattern, plus an optional
`report.json` shaped like the one `sdsonnx run` writes. Sizes are small but realistic: every Linear input
dimension is divisible by 8, so 2:4 and 4:8 groups exist.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, OPTConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

VOCAB = 128

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, intermediate_size=128, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**COMMON, intermediate_size=128, num_key_value_heads=2),
    "opt": lambda: OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                             ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64),
    # sliding window smaller than the sequence, so local and global layers really differ
    "gemma3": lambda: Gemma3TextConfig(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                       sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}


def tiny(arch: str) -> nn.Module:
    """A 3-block random `arch` model (CONFIGS), eager attention, eval mode, seed 0."""
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def small_llama(vocab_size: int, num_hidden_layers: int, max_position_embeddings: int) -> nn.Module:
    """A random LLaMA of hidden size 16 (2 heads, 1 KV head, MLP 32), seed 0, eval mode."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_position_embeddings)
    return AutoModelForCausalLM.from_config(config).eval()


def calibration(n: int = 4, length: int = 32) -> torch.Tensor:
    """Seeded calibration token ids [n, length] below vocab 128."""
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(2))


def word_tokenizer(words: int, bos: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word tokenizer: "<s>" = 0 (BOS), "<unk>" = 1, w{i} -> i + 2; bos=True prepends <s>."""
    vocab = {"<s>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def tiny_config(arch: str, **overrides):
    """A small config of `arch` ('llama' | 'opt' | 'qwen2'): hidden 64, 2 blocks, vocab 128."""
    if arch == "llama":
        cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaConfig(**{**cfg, **overrides})
    if arch == "opt":
        cfg = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                   word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, do_layer_norm_before=True)
        return OPTConfig(**{**cfg, **overrides})
    if arch == "qwen2":
        cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return Qwen2Config(**{**cfg, **overrides})
    raise ValueError(f"unknown tiny architecture {arch!r}")


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A word-level fast tokenizer over tokens '<pad>', '<s>', '</s>', '<unk>', 'w4', 'w5', ..."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask [d_out, d_in] keeping the n largest |w| of every m consecutive inputs (dim 1)."""
    groups = w.abs().reshape(w.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(w.shape)


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping the largest (1 - sparsity) share of |w| over the whole matrix."""
    k = int(round(sparsity * w.numel()))
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[w.abs().flatten().argsort()[:k]] = False
    return keep.reshape(w.shape)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by full module name."""
    from sdsonnx.blocks import target_linears

    return {name: mod for mods in target_linears(model).values() for name, mod in mods.items()}


def prune_(model: nn.Module, pattern: str | float) -> dict[str, dict]:
    """Prune every decoder Linear in place to '2:4'-style or unstructured `pattern`; report.json module records."""
    records = {}
    with torch.no_grad():
        for name, mod in decoder_linears(model).items():
            w = mod.weight
            if isinstance(pattern, str) and ":" in pattern:
                n, m = map(int, pattern.split(":"))
                keep = nm_mask(w, n, m)
            else:
                keep = magnitude_mask(w, float(pattern))
            w.mul_(keep)
            records[name] = {"sparsity": float((w == 0).float().mean()), "pattern": str(pattern),
                             "shape": list(w.shape), "numel": w.numel(), "error": 0.0}
    return records


def tiny_checkpoint(arch: str, folder: Path, pattern: str | float | None = "2:4", seed: int = 0,
                    report: bool = True, **overrides) -> Path:
    """Write a tiny random `arch` checkpoint (pruned to `pattern` unless None) and return its folder."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).float().eval()
    records = prune_(model, pattern) if pattern is not None else {}
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    if report and records:
        body = {"recipe_hash": "0" * 64, "model": f"tiny-{arch}", "pattern": str(pattern), "modules": records,
                "perplexity": {"dense": 130.0, "pruned": 131.0}}
        (folder / "report.json").write_text(json.dumps(body, indent=2))
    return folder
