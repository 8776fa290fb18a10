"""Interactive controls for the lessons (ipywidgets), each a thin wrapper around a pure function.

The logic of every control lives in a plain function that the tests call and a notebook can print
without a widget front end; the widget only reads its inputs and shows that function's result.
"""

from __future__ import annotations

from dataclasses import dataclass

from course_utils.formats import FORMATS, get_format
from course_utils.memory import GB, memory_estimate


@dataclass(frozen=True)
class MemoryFit:
    """Result of the memory calculator: ``bytes_needed`` (weights, group scales and KV cache, in
    bytes), ``gb_needed`` and ``gpu_gb`` (GB = 1e9 bytes), ``fits`` (needed <= available),
    ``headroom_gb`` (available minus needed, negative when it does not fit) and a one-line ``message``."""

    bytes_needed: float
    gb_needed: float
    gpu_gb: float
    fits: bool
    headroom_gb: float
    message: str


def memory_fit(
    params_billions: float,
    precision: str,
    gpu_memory_gb: float,
    group_size: int | None = None,
    kv_cache_gb: float = 0.0,
) -> MemoryFit:
    """Does a model of ``params_billions`` billion parameters, stored in ``precision`` (a format name
    of :mod:`course_utils.formats`), fit into ``gpu_memory_gb`` GB (1e9 bytes)? ``group_size`` (None
    or 0 for none) adds one FP16 scale per group and is ignored for 16- and 32-bit formats;
    ``kv_cache_gb`` is added on top. Weights only: activations and runtime overhead need extra room.
    Raises ValueError for a non-positive size or GPU memory."""
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb must be positive (e.g. 24 or 80), got {gpu_memory_gb!r}")
    fmt = get_format(precision)
    group = group_size if group_size and fmt.bits <= 8 else None
    needed = memory_estimate(params_billions * 1e9, fmt, group, kv_cache_bytes=kv_cache_gb * GB)
    gb_needed = needed / GB
    headroom = gpu_memory_gb - gb_needed
    fits = headroom >= 0
    grouping = f", groups of {group}" if group else ""
    verdict = f"fits, {headroom:,.2f} GB to spare" if fits else f"does not fit, {-headroom:,.2f} GB short"
    message = f"{params_billions:g}B parameters in {fmt.name}{grouping}: {gb_needed:,.2f} GB on a {gpu_memory_gb:g} GB GPU -> {verdict}"
    return MemoryFit(needed, gb_needed, float(gpu_memory_gb), fits, headroom, message)


def memory_calculator(params_billions: float = 7.0, precision: str = "fp16", gpu_memory_gb: float = 24.0, group_size: int = 128):
    """An ipywidgets panel around :func:`memory_fit`: parameter count (billions), precision, group
    size (0 = none), KV cache (GB) and GPU memory (GB) in, bytes needed and the verdict out. Returns
    the widget (a VBox); display it in a notebook."""
    import ipywidgets as w

    style = {"description_width": "160px"}
    params = w.BoundedFloatText(value=params_billions, min=0.001, max=10_000, step=0.5, description="parameters (billions)", style=style)
    prec = w.Dropdown(options=list(FORMATS), value=get_format(precision).name, description="precision", style=style)
    group = w.Dropdown(options=[0, 32, 64, 128, 256], value=group_size, description="group size (0 = none)", style=style)
    kv = w.BoundedFloatText(value=0.0, min=0.0, max=10_000, step=1.0, description="KV cache (GB)", style=style)
    gpu = w.BoundedFloatText(value=gpu_memory_gb, min=0.1, max=10_000, step=8.0, description="GPU memory (GB)", style=style)
    out = w.HTML()

    def update(_=None) -> None:
        fit = memory_fit(params.value, prec.value, gpu.value, group.value or None, kv.value)
        colour = "green" if fit.fits else "crimson"
        out.value = f"<b>{fit.bytes_needed:,.0f} bytes</b> = {fit.gb_needed:,.2f} GB: <span style='color:{colour}'>{fit.message.split('-> ')[-1]}</span>"

    for control in (params, prec, group, kv, gpu):
        control.observe(update, names="value")
    update()
    return w.VBox([params, prec, group, kv, gpu, out])


def recommender(hardware_class: str = "consumer_gpu", memory_gb: float = 24.0, params_billions: float = 8.0):
    """An ipywidgets panel around :func:`course_utils.recommend.recommend`: hardware, memory, model size,
    goal, batch size, fine-tuning, accepted loss and KV cache in; the recommendation and its reasons (or
    why nothing fits) out. Returns the widget (a VBox); display it in a notebook."""
    import html

    import ipywidgets as w

    from course_utils import recommend as rec

    style = {"description_width": "160px"}
    hw = w.Dropdown(options=list(rec.HARDWARE_CLASSES), value=hardware_class, description="hardware", style=style)
    mem = w.BoundedFloatText(value=memory_gb, min=0.1, max=10_000, step=8.0, description="memory (GB)", style=style)
    params = w.BoundedFloatText(value=params_billions, min=0.01, max=10_000, step=1.0, description="parameters (billions)", style=style)
    goal = w.ToggleButtons(options=list(rec.GOALS), value="latency", description="goal", style=style)
    batch = w.BoundedIntText(value=1, min=1, max=4096, description="batch size", style=style)
    tune = w.Checkbox(value=False, description="fine-tuning (QLoRA)")
    loss = w.BoundedFloatText(value=3.0, min=0.0, max=100.0, step=0.5, description="accepted loss (%)", style=style)
    kv = w.BoundedFloatText(value=0.0, min=0.0, max=10_000, step=1.0, description="KV cache (GB)", style=style)
    out = w.HTML()

    def update(_=None) -> None:
        try:
            text = str(rec.recommend(hw.value, mem.value, params.value * 1e9, goal.value, batch.value, tune.value,
                                     loss.value, kv.value))
            colour = "black"
        except ValueError as err:
            text, colour = str(err), "crimson"
        out.value = f"<pre style='color:{colour}; white-space:pre-wrap'>{html.escape(text)}</pre>"

    controls = (hw, mem, params, goal, batch, tune, loss, kv)
    for control in controls:
        control.observe(update, names="value")
    update()
    return w.VBox([*controls, out])
