import math
from types import SimpleNamespace

import pytest
import torch

from course_utils import data, evaluate


class Uniform(torch.nn.Module):
    """Predicts every token of a vocabulary of size ``vocab`` with equal probability."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class Oracle(torch.nn.Module):
    """Puts almost all probability on the true next token (knows the sequence 0, 1, 2, ...)."""

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, 64), -30.0)
        logits.scatter_(-1, (input_ids + 1).clamp(max=63).unsqueeze(-1), 30.0)
        return SimpleNamespace(logits=logits)


def test_uniform_predictor_has_perplexity_equal_to_vocabulary_size():
    w = data.token_windows(torch.arange(40) % 7, window=8, stride=4)
    result = evaluate.perplexity(Uniform(50), w)
    assert result.value == pytest.approx(50.0, rel=1e-5)
    assert result.n_tokens == w.n_scored


def test_oracle_has_perplexity_one():
    w = data.token_windows(torch.arange(32), window=8)
    assert evaluate.perplexity(Oracle(), w).value == pytest.approx(1.0, abs=1e-6)


def test_model_against_itself_kl_zero_agreement_one():
    w = data.token_windows(torch.arange(32), window=8)
    c = evaluate.compare(Oracle(), Oracle(), w)
    assert c.kl_mean == pytest.approx(0.0, abs=1e-7) and c.top1 == 1.0 and c.ppl_delta_pct == pytest.approx(0.0)


def test_kl_of_uniform_against_oracle_is_log_vocab():
    # KL(oracle || uniform) = sum p log(p / (1/V)) = log V when the oracle is (almost) one-hot.
    w = data.token_windows(torch.arange(32), window=8)
    c = evaluate.compare(Uniform(64), Oracle(), w)
    assert c.kl_mean == pytest.approx(math.log(64), rel=1e-4)
    assert c.ppl == pytest.approx(64.0, rel=1e-4)


def test_default_model_against_itself(default_model):
    model, tok = default_model
    w = data.evaluation_windows(tok, max_windows=1, window=128)
    c = evaluate.compare(model, model, w)
    assert c.kl_mean == pytest.approx(0.0, abs=1e-6) and c.top1 == 1.0
    assert c.ppl == pytest.approx(evaluate.perplexity(model, w).value, rel=1e-5)
    assert 2 < c.ppl < 100  # a real language model on real English prose
