"""Perplexity against a hand computation and a closed form."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sdsonnx.evaluate import perplexity
from tiny_models import small_llama


def tiny_llama():
    return small_llama(vocab_size=40, num_hidden_layers=2, max_position_embeddings=32)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_matches_cross_entropy_by_hand(batch_size):
    model = tiny_llama()
    windows = torch.randint(0, 40, (5, 9), generator=torch.Generator().manual_seed(1))
    nll = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]
            nll.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    expected = math.exp(torch.cat(nll).double().mean().item())
    assert perplexity(model, windows, batch_size=batch_size, progress=False) == pytest.approx(expected, rel=1e-6)


class Uniform(torch.nn.Module):
    """Predicts all V tokens with equal probability: perplexity exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_has_perplexity_vocab_size():
    assert perplexity(Uniform(37), torch.zeros(3, 4, dtype=torch.long), progress=False) == pytest.approx(37, rel=1e-6)  # float32 log-softmax


@pytest.mark.parametrize("shape", [(0, 4), (2, 1), (4,)])
def test_rejects_bad_windows(shape):
    with pytest.raises(ValueError, match="windows"):
        perplexity(Uniform(5), torch.zeros(shape, dtype=torch.long), progress=False)
