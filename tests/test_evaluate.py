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
    assert result.value == pytest.approx(50.0, rel=1e-5)  # exp of a mean of float32 log(1/50) values: rounding only
    assert result.n_tokens == w.n_scored


def test_oracle_has_perplexity_one():
    w = data.token_windows(torch.arange(32), window=8)
    # p(true token) = 1 / (1 + 63 e**-60): the perplexity is 1 + 4e-25, so only float32 rounding is left
    assert evaluate.perplexity(Oracle(), w).value == pytest.approx(1.0, abs=1e-6)


def test_model_against_itself_kl_zero_agreement_one():
    w = data.token_windows(torch.arange(32), window=8)
    c = evaluate.compare(Oracle(), Oracle(), w)
    # the same logits twice: KL exactly 0 but for float32 rounding of the log-softmax differences
    assert c.kl_mean == pytest.approx(0.0, abs=1e-7) and c.top1 == 1.0 and c.ppl_delta_pct == pytest.approx(0.0)


def test_kl_of_uniform_against_oracle_is_log_vocab():
    # KL(oracle || uniform) = sum p log(p / (1/V)) = log V when the oracle is (almost) one-hot.
    w = data.token_windows(torch.arange(32), window=8)
    c = evaluate.compare(Uniform(64), Oracle(), w)
    # the oracle's p(true token) = 1 / (1 + 63 e**-60): one-hot to 1e-24, so only float32 rounding is left
    assert c.kl_mean == pytest.approx(math.log(64), rel=1e-4)
    assert c.ppl == pytest.approx(64.0, rel=1e-4)


@pytest.mark.slow
def test_default_model_against_itself(default_model):
    model, tok = default_model
    w = data.evaluation_windows(tok, max_windows=1, window=128)
    c = evaluate.compare(model, model, w)
    # the same model twice: identical logits, so KL 0 up to float32 rounding of log-softmax (1e-6)
    assert c.kl_mean == pytest.approx(0.0, abs=1e-6) and c.top1 == 1.0
    assert c.ppl == pytest.approx(evaluate.perplexity(model, w).value, rel=1e-5)  # two float32 passes
    # a 135M model on English prose sits far below a uniform guess over its 49,152 tokens and above 2
    # (even large models stay above 2 on such text); outside that range the windows or the scoring are wrong
    assert 2 < c.ppl < 100


def test_precomputed_reference_gives_the_same_comparison():
    w = data.token_windows(torch.arange(64) % 50, window=8)
    direct = evaluate.compare(Uniform(64), Oracle(), w, batch_size=3)
    ref = evaluate.reference_log_probs(Oracle(), w, batch_size=3)
    cached = evaluate.compare(Uniform(64), ref, w)
    assert cached.kl_mean == pytest.approx(direct.kl_mean) and cached.ppl == pytest.approx(direct.ppl)
    other = data.token_windows(torch.arange(64), window=8)
    with pytest.raises(ValueError, match="other windows"):
        evaluate.compare(Uniform(64), ref, other)


def test_bootstrap_interval_of_identical_models_is_zero_and_brackets_a_real_change():
    w = data.token_windows(torch.arange(64) % 50, window=8)
    same = evaluate.compare(Oracle(), Oracle(), w)
    assert evaluate.bootstrap_delta_pct(same, n_chunks=8) == pytest.approx((0.0, 0.0), abs=1e-6)  # zero but for rounding
    worse = evaluate.compare(Uniform(64), Oracle(), w)
    lo, hi = evaluate.bootstrap_delta_pct(worse, n_chunks=8)
    assert lo <= worse.ppl_delta_pct <= hi


class Noisy(torch.nn.Module):
    """The Oracle's logits plus seeded noise of size ``sigma``: a candidate that is worse by a known amount."""

    def __init__(self, sigma: float, seed: int = 0):
        super().__init__()
        self.sigma, self.seed = sigma, seed

    def forward(self, input_ids):
        g = torch.Generator().manual_seed(self.seed)
        logits = Oracle()(input_ids).logits / 10  # soft enough that noise moves the probabilities
        return SimpleNamespace(logits=logits + self.sigma * torch.randn(logits.shape, generator=g))


def test_paired_intervals_between_two_candidates():
    w = data.token_windows(torch.arange(256) % 50, window=16)
    ref = evaluate.reference_log_probs(Oracle(), w)
    small, large = evaluate.compare(Noisy(0.5), ref, w), evaluate.compare(Noisy(3.0), ref, w)
    change, lo, hi = evaluate.paired_ppl_change(large, small, n_chunks=16)
    assert change == pytest.approx(100 * (large.ppl / small.ppl - 1)) and 0 < lo <= change <= hi
    diff, lo, hi = evaluate.paired_kl_difference(large, small, n_chunks=16)
    assert diff == pytest.approx(large.kl_mean - small.kl_mean, rel=1e-5) and 0 < lo <= diff <= hi
    same_change, lo, hi = evaluate.paired_ppl_change(small, small, n_chunks=16)
    assert (same_change, lo, hi) == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)
    # two equally noisy candidates (different seeds): the interval of their difference straddles zero
    twin = evaluate.compare(Noisy(0.5, seed=1), ref, w)
    _, lo, hi = evaluate.paired_kl_difference(twin, small, n_chunks=16)
    assert lo < 0 < hi
    other = evaluate.compare(Noisy(0.5), Oracle(), data.token_windows(torch.arange(128) % 50, window=16))
    with pytest.raises(ValueError, match="same reference on the same tokens"):
        evaluate.paired_ppl_change(other, small)


def test_share_removed_is_one_at_the_reference_and_zero_at_the_baseline():
    w = data.token_windows(torch.arange(32), window=8)
    worse = evaluate.compare(Uniform(64), Oracle(), w)        # perplexity 64 against 1
    same = evaluate.compare(Oracle(), Oracle(), w)
    half = evaluate.compare(Uniform(64), Oracle(), w)
    half = type(half)(**{**half.__dict__, "ppl": (64.0 + half.ref_ppl) / 2})  # halfway back to the reference
    assert evaluate.share_removed(same, worse) == pytest.approx(1.0, abs=1e-6)
    assert evaluate.share_removed(worse, worse) == pytest.approx(0.0)
    assert evaluate.share_removed(half, worse) == pytest.approx(0.5, rel=1e-4)


def test_scoreboard_keeps_each_row_and_prints_one_aligned_line(capsys):
    w = data.token_windows(torch.arange(32), window=8)
    board = evaluate.Scoreboard(evaluate.reference_log_probs(Oracle(), w), w, width=12)
    c = board.score("uniform", Uniform(64), 1.25)
    board.score("quiet", Oracle(), show=False)
    assert board.rows["uniform"] == (c, 1.25) and board.rows["quiet"][1] is None
    line = capsys.readouterr().out
    assert line == f"uniform      ppl {c.ppl:7.2f} ({c.ppl_delta_pct:+6.1f} %)  KL {c.kl_mean:.3f}  top-1 {c.top1:.1%}     1.2 s\n"
