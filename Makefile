# Quantization, Measured: every target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup course test lab doctor clean-cache gpu-setup

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

## The course's main job: execute every lesson on the default model into build/ (+ build/summary.md).
course: setup
	$(PY) -m course_utils run

## The whole test suite: unit tests, then every lesson and solution re-executed and compared (nbval).
test: setup
	$(PY) -m pytest --nbval --nbval-current-env --nbval-cell-timeout=900 -q

## JupyterLab on the same environment.
lab: setup
	$(VENV)/bin/jupyter lab lessons/

## Check this machine: Python, libraries, GPU, default model, disk, memory.
doctor: setup
	$(PY) -m course_utils doctor

clean-cache:
	rm -rf $${COURSE_CACHE:-$$HOME/.cache/quantization-measured}
