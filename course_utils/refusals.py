"""Show that bad input is refused, with a message a learner can act on.

Every lesson ends by feeding its tools what they must refuse (a group size that does not divide a layer,
too little calibration text, an architecture a method does not know) and printing the message. This is
that loop, once: each call must raise one of the expected errors, or the check fails.
"""

from __future__ import annotations

from collections.abc import Callable


def expect_refusals(
    checks: dict[str, Callable[[], object]],
    errors: tuple[type[BaseException], ...] = (ValueError,),
    template: str = "{name}: {error}\n",
    redact: dict[str, str] | None = None,
) -> dict[str, str]:
    """Run each of ``checks`` (name -> a call that must fail) and print its error with ``template``
    (fields ``name``, ``error`` and ``type``, the error's class name); ``redact`` replaces text in the
    messages (e.g. a cache path by ``<cache>``). Returns ``{name: message}``; raises ``AssertionError``
    naming the first call that did not raise one of ``errors`` (any other error propagates)."""
    messages = {}
    for name, call in checks.items():
        try:
            call()
        except errors as err:
            message = str(err)
            for old, new in (redact or {}).items():
                message = message.replace(old, new)
            messages[name] = message
            print(template.format(name=name, error=message, type=type(err).__name__))
        else:
            raise AssertionError(f"{name} should have been refused")
    return messages
