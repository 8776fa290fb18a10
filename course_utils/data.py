"""Offline texts for evaluation and calibration, and the fixed token windows every model is scored on.

Source: the Python language reference topics that ship with every CPython in ``pydoc_data.topics``
(the text behind ``help("assignment")`` and friends; Python Software Foundation License). It is real
English technical prose with code samples, available offline on any machine that runs the course.

The topics are split by name: topics at even positions (sorted by name) form the *evaluation* text,
topics at odd positions the *calibration* text, and any paragraph that occurs in both is removed from
the calibration side. So calibrating a quantizer never sees the text it is scored on.
"""

from __future__ import annotations

import hashlib
import platform
import random
from dataclasses import dataclass

import torch

PROVENANCE = (
    f"Python {platform.python_version()} language reference topics (pydoc_data.topics, shipped with "
    "CPython; PSF License). Evaluation: topics at even positions in name order; calibration: odd "
    "positions, minus any paragraph that also occurs in the evaluation text."
)


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def evaluation_text() -> str:
    """The evaluation text (about 230,000 characters), topic by topic, in name order."""
    topics = _topics()
    return "\n\n".join(topics[k].strip() for k in sorted(topics)[0::2])


def calibration_text() -> str:
    """The calibration text: the other half of the topics, with paragraphs shared with evaluation dropped."""
    topics = _topics()
    held_out = set(_paragraphs(evaluation_text()))
    kept = [p for k in sorted(topics)[1::2] for p in _paragraphs(topics[k]) if p not in held_out]
    return "\n\n".join(kept)


@dataclass(frozen=True)
class TokenWindows:
    """Fixed windows of token ids and which positions are scored.

    ``input_ids``: (n_windows, window) int64. ``labels``: same shape, the token to predict at each
    position *is* ``input_ids`` (the model shifts internally) with -100 where a token was already
    scored by an earlier window (sliding window with stride < window). ``n_scored`` counts the
    predicted tokens over all windows.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    window: int
    stride: int

    @property
    def n_scored(self) -> int:
        """Tokens whose prediction counts towards the metrics (the first token of a window has no context)."""
        return int((self.labels[:, 1:] != -100).sum())

    def fingerprint(self) -> str:
        """Short hash of the token ids and labels: equal fingerprints mean identical evaluation tokens."""
        h = hashlib.sha256(self.input_ids.numpy().tobytes() + self.labels.numpy().tobytes())
        return h.hexdigest()[:12]


def token_windows(
    ids: torch.Tensor | list[int], window: int = 512, stride: int | None = None, max_windows: int | None = None
) -> TokenWindows:
    """Cut a 1-D sequence of token ids into windows of ``window`` tokens, starting every ``stride``.

    With ``stride < window`` each window re-reads ``window - stride`` tokens of context and scores only
    its last ``stride`` tokens (the first window scores all of its tokens). A trailing piece shorter
    than ``window`` is dropped so that all windows batch together. Raises ``ValueError`` if the
    sequence is shorter than one window or the sizes are not positive.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    stride = window if stride is None else stride
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if ids.numel() < window:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    starts = list(range(0, ids.numel() - window + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    input_ids = torch.stack([ids[s : s + window] for s in starts])
    labels = input_ids.clone()
    labels[1:, : window - stride] = -100
    return TokenWindows(input_ids=input_ids, labels=labels, window=window, stride=stride)


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def evaluation_windows(
    tokenizer, window: int = 512, stride: int | None = None, max_windows: int | None = 8
) -> TokenWindows:
    """The course's standard evaluation set: the evaluation text tokenized and cut into windows.

    Defaults: 8 non-overlapping windows of 512 tokens (4,096 tokens): a few seconds per model on two
    CPU cores. Lessons that need a tighter noise floor pass a larger ``max_windows``.
    """
    return token_windows(_encode(tokenizer, evaluation_text()), window, stride, max_windows)


def calibration_batches(tokenizer, n_samples: int = 32, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from the calibration text: (n_samples, seq_len)."""
    ids = _encode(tokenizer, calibration_text())
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, need more than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len) for _ in range(n_samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts])
