"""Lab 12's self-checks: the solution passes them, and three wrong answers per exercise trip them."""

import nbformat
import pytest
import torch

from course_utils import config

SOLUTION = config.repo_root() / "solutions" / "12_smoothquant_and_mxfp4.ipynb"


def _cells() -> dict[str, str]:
    """The set-up cell, each exercise's solved function and the self-check that follows it."""
    code = [c.source for c in nbformat.read(SOLUTION, as_version=4).cells if c.cell_type == "code"]
    setup = next(c for c in code if "E2M1 = torch.tensor" in c)
    out = {"setup": setup}
    for name in ("smoothing_factor", "mxfp4_block"):
        i = next(k for k, c in enumerate(code) if c.startswith(f"def {name}("))
        out[name], out[f"{name} check"] = code[i], code[i + 1]
    return out


def _namespace() -> dict:
    ns: dict = {}
    exec(_cells()["setup"], ns)  # noqa: S102 - the lab's own set-up cell
    return ns


def _check(name: str, implementation) -> None:
    ns = _namespace()
    ns[name] = implementation
    exec(_cells()[f"{name} check"], ns)  # noqa: S102


def test_the_solutions_pass_their_checks():
    cells = _cells()
    ns = _namespace()
    for name in ("smoothing_factor", "mxfp4_block"):
        exec(cells[name], ns)  # noqa: S102
        exec(cells[f"{name} check"], ns)  # noqa: S102


def _swapped_powers(activation, weights, alpha=0.5):
    w = torch.cat([m.abs() for m in weights]).amax(0)
    return (activation.pow(1 - alpha) / w.pow(alpha)).clamp(min=1e-5)


def _first_weight_only(activation, weights, alpha=0.5):
    if not 0 <= alpha <= 1:
        raise ValueError("alpha")
    w = weights[0].abs().amax(0)
    return torch.where(w > 0, activation.pow(alpha) / w.pow(1 - alpha), activation).clamp(min=1e-5)


def _no_dead_channels(activation, weights, alpha=0.5):
    if not 0 <= alpha <= 1:
        raise ValueError("alpha")
    w = torch.cat([m.abs() for m in weights]).amax(0)
    return activation.pow(alpha) / w.pow(1 - alpha)


@pytest.mark.parametrize("wrong", [_swapped_powers, _first_weight_only, _no_dead_channels])
def test_wrong_smoothing_factors_trip_the_check(wrong):
    with pytest.raises(AssertionError):
        _check("smoothing_factor", wrong)


def _mxfp4(block, scale_of, ties_even=True):
    levels = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    x = block.float()
    byte, scale = scale_of(x.abs().max())
    mags = (x.abs() / scale).clamp(max=6.0)
    mids = (levels[:-1] + levels[1:]) / 2
    index = torch.bucketize(mags, mids)
    if ties_even:
        tie = mags == mids[index.clamp(max=6)]
        index = index + (tie & (index % 2 == 1)).long()
    return byte, (index + 8 * torch.signbit(x).long()).to(torch.uint8)


def _exact_scale(amax):
    _, k = torch.frexp(amax)
    e = max(-127, min(127, int(k) - 3)) if amax > 0 else -127
    return e + 127, 2.0 ** e


def _not_a_power_of_two(block):
    return _mxfp4(block, lambda amax: (_exact_scale(amax)[0], float(amax) / 6 if amax > 0 else 1.0))


def _float_log2(block):
    def scale(amax):
        e = max(-127, min(127, int(torch.floor(torch.log2(amax))) - 2)) if amax > 0 else -127
        return e + 127, 2.0 ** e
    return _mxfp4(block, scale)


def _ties_toward_zero(block):
    return _mxfp4(block, _exact_scale, ties_even=False)


@pytest.mark.parametrize("wrong", [_not_a_power_of_two, _float_log2, _ties_toward_zero])
def test_wrong_mxfp4_blocks_trip_the_check(wrong):
    with pytest.raises(AssertionError):
        _check("mxfp4_block", wrong)
