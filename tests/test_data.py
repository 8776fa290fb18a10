import pytest
import torch

from course_utils import data


def test_windows_non_overlapping_score_every_token_once():
    ids = torch.arange(10)
    w = data.token_windows(ids, window=4)
    assert w.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # trailing 8, 9 dropped
    assert (w.labels == w.input_ids).all()
    assert w.n_scored == 2 * 3  # the first token of each window has no context


def test_sliding_windows_mask_already_scored_tokens():
    w = data.token_windows(torch.arange(8), window=4, stride=2)
    assert w.input_ids.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    assert w.labels.tolist() == [[0, 1, 2, 3], [-100, -100, 4, 5], [-100, -100, 6, 7]]
    assert w.n_scored == 3 + 2 + 2  # tokens 1..7, each predicted exactly once


@pytest.mark.parametrize("window,stride", [(1, 1), (4, 5), (4, 0)])
def test_bad_window_sizes_are_refused(window, stride):
    with pytest.raises(ValueError, match="window"):
        data.token_windows(torch.arange(10), window=window, stride=stride)


def test_too_short_text_is_refused():
    with pytest.raises(ValueError, match="fewer than one window"):
        data.token_windows(torch.arange(3), window=4)


def test_texts_are_disjoint_and_large_enough():
    ev, cal = data.evaluation_text(), data.calibration_text()
    assert len(ev) > 100_000 and len(cal) > 100_000
    assert not set(data._paragraphs(ev)) & set(data._paragraphs(cal))


@pytest.mark.slow
def test_evaluation_and_calibration_share_no_window(default_model):
    _, tok = default_model
    n = 64
    ev = data._encode(tok, data.evaluation_text()).tolist()
    cal = data._encode(tok, data.calibration_text()).tolist()
    ev_windows = {tuple(ev[i : i + n]) for i in range(0, len(ev) - n)}
    assert not any(tuple(cal[i : i + n]) in ev_windows for i in range(0, len(cal) - n))


@pytest.mark.slow
def test_windows_are_identical_for_every_call(default_model):
    _, tok = default_model
    a, b = data.evaluation_windows(tok), data.evaluation_windows(tok)
    assert a.fingerprint() == b.fingerprint()
    assert a.input_ids.shape == (8, 512)


@pytest.mark.slow
def test_calibration_batches_are_seeded(default_model):
    _, tok = default_model
    a = data.calibration_batches(tok, n_samples=4, seq_len=128, seed=1)
    b = data.calibration_batches(tok, n_samples=4, seq_len=128, seed=1)
    assert a.shape == (4, 128) and torch.equal(a, b)
    assert not torch.equal(a, data.calibration_batches(tok, n_samples=4, seq_len=128, seed=2))
