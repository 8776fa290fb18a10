# Quantization, Measured: every target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup course test test-fast lab doctor clean-cache gpu-setup gpu-test gpu-course

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

## The whole test suite: unit tests, then every lesson and solution re-executed and compared (nbval);
## the 25 slowest cells and tests are listed at the end, to see where the minutes go.
test: setup
	$(PY) -m pytest --nbval --nbval-current-env --nbval-cell-timeout=900 -q --durations=25

## The unit tests that need neither the default model nor a GPU (under two minutes on two cores).
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not gpu" tests

## JupyterLab on the same environment.
lab: setup
	$(VENV)/bin/jupyter lab lessons/

## Check this machine: Python, libraries, GPU, default model, disk, memory.
doctor: setup
	$(PY) -m course_utils doctor

## A rented CUDA GPU: the same environment (PyPI's Linux torch is the CUDA build) plus requirements-gpu.txt,
## llama.cpp compiled for CUDA when nvcc is there, then the doctor. See docs/instructors.md.
gpu-setup: setup
	$(PY) -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'torch ' + torch.__version__ + ' sees no CUDA GPU: check nvidia-smi, and that torch.version.cuda is not None')"
	$(PY) -m pip install --quiet -r requirements-gpu.txt
	@if command -v nvcc >/dev/null 2>&1; then \
	  echo "compiling llama-cpp-python with CUDA (several minutes)"; \
	  CMAKE_ARGS="-DGGML_CUDA=on" $(PY) -m pip install --quiet --no-deps --force-reinstall --no-cache-dir \
	    "$$(grep '^llama-cpp-python==' requirements.txt)"; \
	else echo "nvcc not found: llama-cpp-python stays a CPU build (lesson 09 runs llama.cpp on the CPU)"; fi
	$(PY) -m course_utils doctor

## The GPU-only tests (bitsandbytes, GPTQ and AWQ kernels, GEMV timing, CUDA codes equal to CPU codes).
gpu-test: gpu-setup
	$(PY) -m pytest -m gpu -q tests

## Every lesson on the GPU, into build/: make gpu-course MODEL=Qwen/Qwen2.5-1.5B (default: the course's model).
gpu-course: gpu-setup
	$(PY) -m course_utils run --device cuda $(if $(MODEL),--model $(MODEL))

clean-cache:
	rm -rf $${COURSE_CACHE:-$$HOME/.cache/quantization-measured}
