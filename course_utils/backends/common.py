"""What the adapters to quantization libraries share.

- :func:`calibration_rows`: calibration samples (token-id rows or texts) and a fingerprint of their content;
- :func:`source_fingerprint`: a cheap fingerprint of a checkpoint folder (file names, sizes, dates);
- :func:`reusable` and :func:`build_checkpoint`: build a checkpoint folder once per settings record. The
  folder is written under a temporary name and renamed when complete, its settings are recorded in a JSON
  file beside the library's files, and a later call with the same record reuses it. The library's own
  output is kept in ``quantize.log`` instead of the notebook;
- :func:`settings_folder`: ``<cache>/<kind>/<name>-<hash of the record>``;
- :func:`import_library` and :func:`import_status`: import a library or say what is missing and how to
  install it; ``available()``'s dict of library name -> None or the reason;
- :func:`probe_import`: whether a module imports, tried in a child process (for libraries that are
  reported on but not used: a failed import can leave half-loaded modules behind);
- :func:`hf_progress_bars_off` (and :func:`course_utils.config.restored_environ`): what a library changes in the process
  (environment variables, transformers' progress bars) is put back when the call ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from course_utils import cache, config
from course_utils.config import restored_environ  # noqa: F401 (the adapters use it from here)


def import_library(*names: str, why: Callable[[BaseException], str],
                   errors: tuple[type[BaseException], ...] = (ImportError,)):
    """Import the modules ``names`` (``"gguf.quants"`` imports ``gguf`` and its submodule) and return the first
    one's top-level package; an import that raises one of ``errors`` raises :class:`BackendUnavailableError`
    with the message ``why(error)`` instead (what is missing and how to install it)."""
    try:
        modules = [__import__(name) for name in names]
    except errors as err:
        raise BackendUnavailableError(why(err)) from None
    return modules[0]


def import_status(importers: dict[str, Callable[[], object]]) -> dict[str, str | None]:
    """Try each importer: name -> None when it works, else the reason it raised (BackendUnavailableError)."""
    status: dict[str, str | None] = {}
    for name, importer in importers.items():
        try:
            importer()
            status[name] = None
        except BackendUnavailableError as err:
            status[name] = str(err)
    return status


class BackendUnavailableError(ImportError):
    """A quantization library (or a library it needs) is missing or broken; the message says how to install it."""


@contextlib.contextmanager
def hf_progress_bars_off():
    """transformers' progress bars off while the block runs (loading a checkpoint), then on again if they were."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def calibration_rows(calibration) -> tuple[list, str]:
    """Calibration samples as a list of rows and a fingerprint of their content.

    Accepts a 2-D tensor (n_samples, seq_len) of token ids (``data.calibration_batches``), a list of
    1-D token-id tensors or lists (each becomes ``{"input_ids": ids, "attention_mask": ones}``, int64
    tensors), or a list of texts (kept as they are: the library tokenizes them).
    """
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise ValueError(f"a calibration tensor must be (n_samples, seq_len), got shape {tuple(calibration.shape)}")
        calibration = list(calibration)
    calibration = list(calibration)
    if not calibration:
        raise ValueError("calibration is empty: pass token-id rows (data.calibration_batches) or texts")
    h = hashlib.sha256()
    if all(isinstance(c, str) for c in calibration):
        for text in calibration:
            h.update(text.encode() + b"\0")
        return calibration, "text:" + h.hexdigest()[:16]
    rows = []
    for c in calibration:
        ids = torch.as_tensor(c, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("a calibration sample holds no tokens")
        h.update(ids.numpy().tobytes() + b"|")
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return rows, "ids:" + h.hexdigest()[:16]


def source_fingerprint(model_dir: Path) -> str:
    """Hash of the names, sizes and modification times of a checkpoint's weights and config.json."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("config.json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def installed_versions(*distributions: str) -> dict[str, str | None]:
    """The installed version of each distribution (None when it is not installed), read from its metadata
    without importing it."""
    from importlib import metadata

    versions = {}
    for dist in distributions:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def settings_folder(kind: str, name: str, record: dict, code: tuple[str, ...], libraries: tuple[str, ...]) -> Path:
    """``<cache>/<kind>/<name>-<key>``: one folder per distinct settings record made by the current source of
    the adapter modules ``code`` with the installed versions of ``libraries`` (:func:`course_utils.cache.entry`)."""
    return cache.entry(kind, name, record, code, installed_versions(*libraries))


def read_record(out_dir: str | Path, record_file: str) -> dict | None:
    """The JSON record ``cached_build`` wrote in ``out_dir``, or None."""
    f = Path(out_dir) / record_file
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def log_summary(text: str, tail: int = 20) -> str:
    """A library's log without its progress bars: its INFO/WARN/ERROR lines and the last few lines."""
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    keep = [line[:300] for line in lines
            if line.startswith(("INFO", "WARN", "ERROR")) and not line[4:].lstrip().startswith(("|", "+"))]  # no tables
    return "\n".join(keep + ["--- last lines ---"] + [line[:300] for line in lines[-tail:]]) + "\n"


def reusable(out_dir: Path, record_file: str, settings: dict, overwrite: bool = False) -> float | None:
    """The seconds recorded in ``out_dir`` if it holds a checkpoint (config.json) built with ``settings``
    (and ``overwrite`` is False), else None: the checkpoint must be built."""
    previous = read_record(out_dir, record_file)
    if not overwrite and previous is not None and previous.get("settings") == settings and (Path(out_dir) / "config.json").is_file():
        return float(previous["seconds"])
    return None


def build_checkpoint(
    out_dir: Path,
    record_file: str,
    settings: dict,
    build: Callable[[Path, io.StringIO], dict],
    library: str,
    source: Path,
    quiet: bool = True,
) -> float:
    """Run ``build(folder, log)`` to write a checkpoint, move it to ``out_dir`` and record ``settings``
    and the seconds it took in ``out_dir / record_file`` (see :func:`reusable`); returns the seconds.

    ``build`` writes into ``folder`` (a temporary sibling of ``out_dir``, renamed to it when everything
    succeeded) and returns extra facts to record (device, sample count...). With ``quiet`` its stdout and
    stderr go to ``log`` (a summary is kept in ``quantize.log``); ``log`` is also where a library's own
    logger can be pointed. It runs in a scratch working directory, so files a library writes relative to
    the current directory (GPTQModel's ``logs/``) never land beside the notebook. Any failure raises ``RuntimeError`` naming ``library`` with the last lines of
    its log, and leaves no partial folder behind.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".partial-"))
    scratch = Path(tempfile.mkdtemp(prefix="course-quantize-"))  # libraries write relative logs/ here
    log = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.chdir(scratch))
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            start = time.perf_counter()
            facts = build(tmp, log)
            seconds = time.perf_counter() - start
        (tmp / "quantize.log").write_text(log_summary(log.getvalue()))
        (tmp / record_file).write_text(json.dumps({
            "settings": settings, "seconds": round(seconds, 2), "torch_threads": torch.get_num_threads(), **facts,
        }, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except Exception as err:
        tail = "\n".join(log.getvalue().strip().splitlines()[-15:])
        raise RuntimeError(f"{library} failed to quantize {source}: {type(err).__name__}: {err}"
                           + (f"\nlast lines of its log:\n{tail}" if tail else "")) from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return seconds


def probe_import(module: str, timeout: float = 300) -> str | None:
    """None if ``import <module>`` works in a fresh interpreter; else why not, in one line
    ("not installed", the last line of the error, or a timeout)."""
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`import {module}` did not finish within {timeout:g} s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return f"`import {module}` fails here ({lines[-1] if lines else f'exit status {proc.returncode}'})"
