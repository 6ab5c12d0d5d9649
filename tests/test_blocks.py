"""Block discovery, capture and replay on tiny random models of four architectures."""
import pytest
import torch
from torch import nn

from sdsonnx.blocks import (UnsupportedModelError, capture_block_inputs, find_blocks, run_block, select_targets,
                            target_linears, unmatched_patterns)
from tiny_models import CONFIGS, tiny

EXPECTED_LINEARS = {"llama": 7, "qwen2": 7, "opt": 6, "gemma3": 7}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_replaying_blocks_reproduces_the_models_hidden_states(arch):
    model = tiny(arch)
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    inputs = capture_block_inputs(model, ids)
    _, blocks = find_blocks(model)
    hidden = inputs.hidden
    torch.testing.assert_close(hidden, reference[0], atol=1e-6, rtol=0)
    for i, block in enumerate(blocks[:-1]):  # the last hidden_states entry has the final norm applied
        hidden = run_block(block, hidden, inputs.kwargs[i])
        torch.testing.assert_close(hidden, reference[i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_default_targets_are_the_block_linears_never_head_or_embeddings(arch):
    model = tiny(arch)
    targets = target_linears(model)
    assert len(targets) == 3
    for index, linears in targets.items():
        assert len(linears) == EXPECTED_LINEARS[arch]
        assert all(f"layers.{index}." in name for name in linears)
    assert not any("lm_head" in n or "embed" in n for t in targets.values() for n in t)


def test_target_and_ignore_regexes():
    names = ["m.layers.0.self_attn.q_proj", "m.layers.0.mlp.up_proj", "m.layers.1.mlp.up_proj"]
    assert select_targets(names, [r"mlp\."], [r"layers\.1\."]) == ["m.layers.0.mlp.up_proj"]
    assert select_targets(names, None, []) == names
    assert unmatched_patterns(names, [r"q_proj", r"fc1"]) == ["fc1"]


def test_model_without_blocks_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="no decoder blocks found.*model.layers"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_captured_inputs_are_cast_to_the_activation_dtype():
    model = tiny("llama")
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(2))
    full = capture_block_inputs(model, ids).hidden
    half = capture_block_inputs(model, ids, torch.bfloat16).hidden
    assert full.shape == (3, 24, model.config.hidden_size) and full.dtype == torch.float32
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))
