"""course_utils.refusals: every call must be refused with one of the expected errors."""

import pytest

from course_utils import refusals


def _fails(error):
    def call():
        raise error
    return call


def test_each_refusal_is_printed_and_returned(capsys):
    messages = refusals.expect_refusals(
        {"bad size": _fails(ValueError("size 100 in /cache/x")), "missing": _fails(FileNotFoundError("no file"))},
        (ValueError, FileNotFoundError), template="{name} [{type}]: {error}", redact={"/cache": "<cache>"})
    assert messages == {"bad size": "size 100 in <cache>/x", "missing": "no file"}
    assert capsys.readouterr().out == "bad size [ValueError]: size 100 in <cache>/x\nmissing [FileNotFoundError]: no file\n"


def test_a_call_that_is_accepted_fails_the_check():
    with pytest.raises(AssertionError, match="group size 100 should have been refused"):
        refusals.expect_refusals({"group size 100": lambda: None})


def test_an_unexpected_error_is_not_taken_for_a_refusal():
    with pytest.raises(KeyError):
        refusals.expect_refusals({"typo": _fails(KeyError("x"))})
