"""docs/instructors.md: its GPU table is the course's own memory arithmetic, not numbers typed by hand."""

import re

from course_utils import config, hardware, memory


def _guide() -> str:
    return (config.repo_root() / "docs" / "instructors.md").read_text()


def test_the_gpu_table_is_what_formats_and_hardware_compute():
    rows = [line for line in _guide().splitlines() if re.match(r"\| [^|]+ \| [0-9.]+e9 \|", line)]
    assert len(rows) >= 6
    for line in rows:
        name, params, bf16, int8, int4, gpu = [cell.strip() for cell in line.strip("|").split("|")]
        n = float(params)
        assert bf16 == f"{memory.memory_estimate(n, 'bf16') / 1e9:.2f}", name
        assert int8 == f"{memory.memory_estimate(n, 'int8') / 1e9:.2f}", name
        assert int4 == f"{memory.memory_estimate(n, 'int4', 128) / 1e9:.2f}", name
        assert gpu == hardware.smallest_gpu(memory.memory_estimate(n, "bf16")), name


def test_the_guide_names_the_commands_that_exist():
    text, makefile = _guide(), (config.repo_root() / "Makefile").read_text()
    for target in re.findall(r"make ([a-z-]+)", text):
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target} is not a Makefile target"
    assert "LESSON_TIMES" not in text


def test_smallest_gpu_uses_the_headroom_and_says_when_nothing_fits():
    assert hardware.smallest_gpu(10e9) == "T4 (16 GB)"          # 15 GB = 13.97 GiB with headroom, a T4 has 14.5
    assert hardware.smallest_gpu(10.5e9) == "L4, A10G or RTX 4090 (24 GB)"   # 15.75 GB = 14.67 GiB > 14.5 GiB
    assert hardware.smallest_gpu(14.5 * 2**30 / hardware.GPU_HEADROOM) == "T4 (16 GB)"  # exactly 14.5 GiB fits
    assert hardware.smallest_gpu(1e12) is None
