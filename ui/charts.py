"""Memory charts (Vega-Lite through altair, drawn by ``gr.Plot``) and the timeline as CSV.

A run's chart has two panels, each a layered chart: the GPU (NVML's device and process
figures, torch's allocated and reserved; only when something reports them) and RAM (the
process's RSS and the system's used RAM). Under the curves, bands mark the phases (loading,
text encoding, denoising with a tick per step, VAE decoding); dashed lines mark the
``vram_limit`` and the planner's predicted peaks. Times are seconds since the job got the
GPU; sizes are GiB.

With several GPUs read, the GPU panel draws one line per GPU, of the figure its cap bounds
(this process's memory on it: NVML's share where the driver reports it, else torch's
reserved bytes; the GPU's used memory where neither is read), the other figures in its
tooltip, and each GPU's ``vram_limit`` (one label for the GPUs that share a cap).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import altair as alt
import pandas as pd

from vram.sampler import MemorySample

from .jobs import Band, StepMark

GIB = 1024**3
MAX_POINTS = 400          # per series: more adds bytes to every refresh, not detail on screen
PRE_ROLL_S = 1.0          # seconds of readings drawn before the job starts: the baseline

RAM_SERIES = {"rss_bytes": "process RSS", "ram_used_bytes": "system RAM used"}
GPU_SERIES = {"device_used_bytes": "GPU used (NVML, all processes)",
              "process_device_bytes": "GPU, this process (NVML)",
              "torch_reserved_bytes": "torch reserved", "torch_allocated_bytes": "torch allocated"}
SERIES_COLORS = {"process RSS": "#1f77b4", "system RAM used": "#9ecae1",
                 "GPU used (NVML, all processes)": "#9467bd", "GPU, this process (NVML)": "#2ca02c",
                 "torch reserved": "#ff7f0e", "torch allocated": "#ffbb78"}
PHASE_COLORS = {"loading": "#bdbdbd", "text_encoding": "#6baed6", "denoising": "#74c476",
                "vae_decoding": "#9e9ac8"}
LINE_COLORS = {"vram_limit": "#d62728", "predicted peak": "#ff7f0e"}
FIELDS = tuple(RAM_SERIES) + tuple(GPU_SERIES)
# Several GPUs: the figure a GPU's line shows, the first of these it has readings of.
GPU_LINE_FIGURES = {"process_device_bytes": "this process (NVML)", "torch_reserved_bytes": "torch reserved",
                    "device_used_bytes": "used (NVML, all processes)"}
GPU_TOOLTIP = {name: name.replace("_bytes", "_gib") for name in GPU_SERIES}   # its tooltip's columns
GPU_COLORS = ("#2ca02c", "#9467bd", "#1f77b4", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


@dataclass
class Marks:
    """What the chart draws besides the curves (bytes; None: not drawn)."""

    bands: Sequence[Band] = ()
    steps: Sequence[StepMark] = ()
    vram_limit_bytes: int | Mapping[int, int] | None = None   # one cap for every GPU, or by CUDA index
    predicted_vram_bytes: int | None = None
    predicted_ram_bytes: int | None = None
    start: float = -PRE_ROLL_S             # the x axis, seconds on the job's clock
    end: float | None = None               # where an open band ends: the job's "now"
    x_title: str = "seconds since the job started"
    notes: list[str] = field(default_factory=list)


def has_gpu_readings(samples: Iterable[MemorySample]) -> bool:
    return any(getattr(reading, name) is not None for s in samples for reading in (s, *s.gpus)
               for name in GPU_SERIES)


def gpu_indices(samples: Iterable[MemorySample]) -> list[int]:
    """The CUDA indices of the GPUs the samples have readings of."""
    return sorted({gpu.cuda_index for s in samples for gpu in s.gpus})


def _downsample(samples: Sequence[MemorySample], max_points: int) -> list[dict]:
    """Rows of ``time`` and every field; buckets of consecutive readings keep each field's
    maximum, so a short peak survives."""
    return _bucket_max([{"time": s.time, **{name: getattr(s, name) for name in FIELDS}} for s in samples],
                       max_points)


def _bucket_max(rows: list[dict], max_points: int) -> list[dict]:
    """At most ``max_points`` of ``rows`` (a ``time`` and figures, None where not read): each
    bucket of consecutive rows keeps its last time and each figure's maximum."""
    if len(rows) <= max_points:
        return rows
    size = math.ceil(len(rows) / max_points)
    buckets = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        bucket = {"time": chunk[-1]["time"]}
        for name in chunk[0].keys() - {"time"}:
            values = [row[name] for row in chunk if row[name] is not None]
            bucket[name] = max(values) if values else None
        buckets.append(bucket)
    return buckets


def _curves(samples: Sequence[MemorySample], origin: float, series: dict[str, str]) -> pd.DataFrame:
    rows = []
    for row in _downsample(samples, MAX_POINTS):
        t = round(row["time"] - origin, 3)
        for name, label in series.items():
            if row[name] is not None:
                rows.append({"seconds": t, "GiB": round(row[name] / GIB, 4), "series": label})
    return pd.DataFrame(rows, columns=["seconds", "GiB", "series"])


def _color(field_name: str, palette: dict[str, str], title: str | None, present: Iterable[str]) -> alt.Color:
    domain = [name for name in palette if name in set(present)]
    return alt.Color(f"{field_name}:N", title=title, scale=alt.Scale(domain=domain, range=[palette[d] for d in domain]),
                     legend=alt.Legend(orient="bottom", direction="horizontal", columns=3))


def _band_layers(marks: Marks, end: float) -> list[alt.Chart]:
    span = max(1e-9, end - marks.start)
    bands = []
    for b in marks.bands:
        stop = b.end if b.end is not None else end
        # A label only where it fits: short phases (a reused pipeline's loading) stay unlabelled.
        label = b.phase.replace("_", " ") if (stop - b.start) / span >= 0.08 else ""
        bands.append({"phase": b.phase, "label": label, "start": round(b.start, 3), "end": round(stop, 3)})
    if not bands:
        return []
    frame = pd.DataFrame(bands)
    rect = alt.Chart(frame).mark_rect(opacity=0.18).encode(
        x="start:Q", x2="end:Q", color=_color("phase", PHASE_COLORS, "phase", frame["phase"]),
        tooltip=["phase:N", "start:Q", "end:Q"])
    text = alt.Chart(frame).mark_text(align="left", baseline="top", dx=3, dy=3, fontSize=10, color="#555").encode(
        x="start:Q", y=alt.value(0), text="label:N")
    layers = [rect, text]
    if marks.steps:
        ticks = pd.DataFrame([{"seconds": round(s.time, 3), "step": f"step {s.step}/{s.total}"}
                              for s in marks.steps[-200:]])
        layers.append(alt.Chart(ticks).mark_rule(opacity=0.35, strokeWidth=0.6, color="#31a354").encode(
            x="seconds:Q", tooltip=["step:N"]))
    return layers


def _gpu_curves(samples: Sequence[MemorySample], origin: float, indices: Sequence[int]) -> pd.DataFrame:
    """One curve per GPU (see GPU_LINE_FIGURES), its other figures as tooltip columns (GiB)."""
    rows = []
    for index in indices:
        readings = _bucket_max([{"time": s.time, **{name: getattr(gpu, name) for name in GPU_SERIES}}
                                for s in samples if (gpu := s.gpu(index)) is not None], MAX_POINTS)
        figure = next((name for name in GPU_LINE_FIGURES if any(r[name] is not None for r in readings)), None)
        if figure is None:
            continue
        label = f"GPU {index}, {GPU_LINE_FIGURES[figure]}"
        for r in readings:
            if r[figure] is not None:
                rows.append({"seconds": round(r["time"] - origin, 3), "GiB": round(r[figure] / GIB, 4),
                             "series": label, **{column: None if r[name] is None else round(r[name] / GIB, 4)
                                                 for name, column in GPU_TOOLTIP.items()}})
    return pd.DataFrame(rows, columns=["seconds", "GiB", "series", *GPU_TOOLTIP.values()])


def _gpu_lines(marks: Marks, indices: Sequence[int]) -> list[tuple[str, int, str]]:
    """The dashed lines of the several-GPU panel: each GPU's cap (one line for the GPUs that
    share a value, labelled with them), and the predicted peak."""
    caps = marks.vram_limit_bytes
    by_gpu = {index: caps.get(index) if isinstance(caps, Mapping) else caps for index in indices}
    shared: dict[int, list[int]] = {}
    for index, value in by_gpu.items():
        if value:
            shared.setdefault(value, []).append(index)
    lines = [("vram_limit", value, f" (GPU {', '.join(map(str, gpus))})") for value, gpus in shared.items()]
    if marks.predicted_vram_bytes:
        lines.append(("predicted peak", marks.predicted_vram_bytes, ""))
    return lines


def _line_layers(lines: list[tuple[str, int, str]]) -> list[alt.Chart]:
    """Dashed lines of (kind, bytes, what the label adds), labelled at the right."""
    if not lines:
        return []
    frame = pd.DataFrame([{"GiB": round(value / GIB, 4), "line": name,
                           "text": f"{name} {value / GIB:.2f} GiB{where}"} for name, value, where in lines])
    color = alt.Color("line:N", scale=alt.Scale(domain=list(LINE_COLORS), range=list(LINE_COLORS.values())),
                      legend=None)
    rule = alt.Chart(frame).mark_rule(strokeDash=[6, 4], strokeWidth=1.5).encode(y="GiB:Q", color=color)
    text = alt.Chart(frame).mark_text(align="right", baseline="bottom", dx=-2, dy=-2, fontSize=10).encode(
        y="GiB:Q", x=alt.value("width"), text="text:N", color=color)
    return [rule, text]


def _panel(curves: pd.DataFrame, palette: dict[str, str], marks: Marks, lines: list[tuple[str, int, str]],
           title: str, end: float, tooltip: Sequence[alt.Tooltip] = ()) -> alt.LayerChart:
    layers = _band_layers(marks, end)
    layers.append(alt.Chart(curves).mark_line(strokeWidth=2, interpolate="step-after").encode(
        x=alt.X("seconds:Q", title=marks.x_title, scale=alt.Scale(domain=[marks.start, end], nice=False)),
        y=alt.Y("GiB:Q", title="GiB", scale=alt.Scale(zero=True)),
        color=_color("series", palette, None, curves["series"]),
        tooltip=["series:N", "seconds:Q", alt.Tooltip("GiB:Q", format=".3f"), *tooltip]))
    layers += _line_layers(lines)
    return alt.layer(*layers).resolve_scale(color="independent").properties(
        title=title, width="container", height=230)


def ram_chart(samples: Sequence[MemorySample], origin: float, marks: Marks, title: str = "RAM") -> alt.LayerChart:
    """The RAM panel: RSS and the system's used RAM, phase bands, the predicted peak RSS."""
    end = _end(samples, origin, marks)
    lines = [("predicted peak", marks.predicted_ram_bytes, "")] if marks.predicted_ram_bytes else []
    return _panel(_curves(samples, origin, RAM_SERIES), SERIES_COLORS, marks, lines, title, end)


def gpu_chart(samples: Sequence[MemorySample], origin: float, marks: Marks,
              title: str = "GPU memory") -> alt.LayerChart | None:
    """The GPU panel, or None when nothing reported GPU memory (no NVML and no CUDA): one
    GPU's four figures, or with several GPUs read one line per GPU and each one's cap."""
    if not has_gpu_readings(samples):
        return None
    end = _end(samples, origin, marks)
    indices = gpu_indices(samples)
    if len(indices) > 1:
        curves = _gpu_curves(samples, origin, indices)
        palette = {f"GPU {index}, {figure}": GPU_COLORS[index % len(GPU_COLORS)]
                   for index in indices for figure in GPU_LINE_FIGURES.values()}
        tooltip = [alt.Tooltip(f"{GPU_TOOLTIP[name]}:Q", title=f"{label}, GiB", format=".3f")
                   for name, label in GPU_SERIES.items()]
        return _panel(curves, palette, marks, _gpu_lines(marks, indices), title, end, tooltip)
    cap = marks.vram_limit_bytes
    if isinstance(cap, Mapping):
        cap = cap.get(indices[0] if indices else 0)
    lines = [(name, value, "") for name, value in (("vram_limit", cap),
                                                   ("predicted peak", marks.predicted_vram_bytes)) if value]
    return _panel(_curves(samples, origin, GPU_SERIES), SERIES_COLORS, marks, lines, title, end)


def _end(samples: Sequence[MemorySample], origin: float, marks: Marks) -> float:
    last = samples[-1].time - origin if samples else 0.0
    return round(max(marks.start + 1.0, last, marks.end or 0.0), 3)


def compare_chart(curves: dict[str, tuple[Sequence[MemorySample], float]], field_name: str,
                  title: str) -> alt.Chart | None:
    """One curve per label (a preset) of ``field_name`` (e.g. "rss_bytes"), overlaid, each on
    its own job's clock; None when no curve has that reading."""
    rows = []
    for label, (samples, origin) in curves.items():
        for row in _downsample(samples, MAX_POINTS // 2):
            if row[field_name] is not None:
                rows.append({"seconds": round(row["time"] - origin, 3), "GiB": round(row[field_name] / GIB, 4),
                             "preset": label})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    return alt.Chart(frame).mark_line(strokeWidth=2, interpolate="step-after").encode(
        x=alt.X("seconds:Q", title="seconds since each run started"),
        y=alt.Y("GiB:Q", title="GiB", scale=alt.Scale(zero=False)),   # the presets differ by little
        color=alt.Color("preset:N", legend=alt.Legend(orient="bottom")),
        tooltip=["preset:N", "seconds:Q", alt.Tooltip("GiB:Q", format=".3f")],
    ).properties(title=title, width="container", height=260)


def phase_at(bands: Sequence[Band], t: float) -> str:
    for band in bands:
        if band.start <= t and (band.end is None or t <= band.end):
            return band.phase
    return ""


def write_timeline_csv(path: str | Path, samples: Sequence[MemorySample], origin: float,
                       bands: Sequence[Band]) -> Path:
    """Every reading (not downsampled) with the phase it fell in; bytes, seconds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seconds", "phase", *FIELDS])
        for s in samples:
            t = s.time - origin
            writer.writerow([f"{t:.3f}", phase_at(bands, t), *("" if getattr(s, n) is None else getattr(s, n)
                                                                 for n in FIELDS)])
    return path
