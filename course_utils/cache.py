"""Cache keys that cannot go stale: what made a result, including the code that made it.

The course caches what is slow and deterministic: quantized models (:mod:`course_utils.quant.store`),
library checkpoints (:mod:`course_utils.backends.common`), exported files (:mod:`course_utils.compare`).
A key made of the settings alone goes stale silently when the code changes: after a fix to ``gptq.py``
the old, wrong weights would keep coming back. So every key made here holds

- the description the caller gives (method, configuration, model, calibration fingerprint...);
- the package version and a hash of the source of the modules that computed the result, with every
  ``course_utils`` module they import, transitively (:func:`code_fingerprint`);
- the versions of the libraries involved, for results a library computed.

:func:`key` is the one key function; :func:`entry` turns it into a path under the cache folder.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
from pathlib import Path

from course_utils import __version__, config

PACKAGE = "course_utils"


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` of this package, or None if ``name`` is not a module (e.g.
    ``course_utils.models.model_bytes``, a function inside a module)."""
    parent = name.rpartition(".")[0]
    if parent:
        parent_file = _module_file(parent)
        if parent_file is None or parent_file.name != "__init__.py":
            return None  # only a package holds modules
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imports(name: str, source: str) -> set[str]:
    """The ``course_utils`` modules that module ``name`` (its ``source``) imports, by qualified name."""
    is_package = (_module_file(name) or Path()).name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: resolve it against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}") is not None}
    return found


@functools.lru_cache(maxsize=None)
def _digest(path: str, mtime_ns: int, size: int) -> tuple[str, str]:
    """sha256 of a source file and its text, remembered for as long as the file keeps its time and size."""
    text = Path(path).read_text()
    return hashlib.sha256(text.encode()).hexdigest(), text


def _sources(name: str) -> tuple[tuple[str, str], ...]:
    """(module, sha256 of its source) for ``name`` and every ``course_utils`` module it imports, transitively,
    sorted by module name. Read afresh at every call (a file edited in a running notebook counts at once);
    only unchanged files' hashes are remembered."""
    seen: dict[str, str] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        path = _module_file(current)
        if path is None:
            raise ValueError(f"{current!r} is not a module of {PACKAGE}; give a module name such as 'course_utils.quant.gptq'")
        stat = path.stat()
        seen[current], text = _digest(str(path), stat.st_mtime_ns, stat.st_size)
        todo += sorted(_imports(current, text) - set(seen))
    return tuple(sorted(seen.items()))


def code_fingerprint(*modules: str) -> str:
    """16 hex digits identifying the source of ``modules`` (qualified names) and of every ``course_utils``
    module they import, directly or not, plus the package version: any edit to that code changes it."""
    h = hashlib.sha256(__version__.encode())
    for name in sorted(set(modules)):
        for module, digest in _sources(name):
            h.update(f"{module}:{digest}\n".encode())
    return h.hexdigest()[:16]


def key(description: dict, code: tuple[str, ...] = (), libraries: dict[str, str] | None = None, length: int = 16) -> str:
    """``length`` hex digits identifying a cached result: its ``description`` (anything JSON can write;
    other values by their ``str``), the fingerprint of the ``code`` modules that computed it and the
    ``libraries`` (name: version) involved. Two results share a key only if all three agree."""
    blob = {"description": description, "code": code_fingerprint(*code) if code else None, "libraries": libraries or {}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:length]


def entry(kind: str, name: str, description: dict, code: tuple[str, ...] = (), libraries: dict[str, str] | None = None) -> Path:
    """``<cache>/<kind>/<name>-<key>``: where the result that :func:`key` identifies lives (a file's
    suffix, or a folder's contents, is the caller's choice)."""
    return config.cache_dir() / kind / f"{name}-{key(description, code, libraries)}"
