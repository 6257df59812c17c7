"""Memory charts (Vega-Lite through altair, drawn by ``gr.Plot``) and the timeline as CSV.

A run's chart has two panels, each a layered chart: the GPU (NVML's device and process
figures, torch's allocated and reserved; only when something reports them) and RAM (the
process's RSS and the system's used RAM). Under the curves, bands mark the phases (loading,
text encoding, denoising with a tick per step, VAE decoding); dashed lines mark the
``vram_limit`` and the planner's predicted peaks. Times are seconds since the job got the
GPU; sizes are GiB.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

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


@dataclass
class Marks:
    """What the chart draws besides the curves (bytes; None: not drawn)."""

    bands: Sequence[Band] = ()
    steps: Sequence[StepMark] = ()
    vram_limit_bytes: int | None = None
    predicted_vram_bytes: int | None = None
    predicted_ram_bytes: int | None = None
    start: float = -PRE_ROLL_S             # the x axis, seconds on the job's clock
    end: float | None = None               # where an open band ends: the job's "now"
    x_title: str = "seconds since the job started"
    notes: list[str] = field(default_factory=list)


def has_gpu_readings(samples: Iterable[MemorySample]) -> bool:
    return any(getattr(s, name) is not None for s in samples for name in GPU_SERIES)


def _downsample(samples: Sequence[MemorySample], max_points: int) -> list[dict]:
    """Rows of ``time`` and every field; buckets of consecutive readings keep each field's
    maximum, so a short peak survives."""
    if len(samples) <= max_points:
        return [{"time": s.time, **{name: getattr(s, name) for name in FIELDS}} for s in samples]
    size = math.ceil(len(samples) / max_points)
    rows = []
    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        row = {"time": chunk[-1].time}
        for name in FIELDS:
            values = [getattr(s, name) for s in chunk if getattr(s, name) is not None]
            row[name] = max(values) if values else None
        rows.append(row)
    return rows


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


def _line_layers(lines: list[tuple[str, int]]) -> list[alt.Chart]:
    if not lines:
        return []
    frame = pd.DataFrame([{"GiB": round(value / GIB, 4), "line": name, "text": f"{name} {value / GIB:.2f} GiB"}
                          for name, value in lines])
    color = alt.Color("line:N", scale=alt.Scale(domain=list(LINE_COLORS), range=list(LINE_COLORS.values())),
                      legend=None)
    rule = alt.Chart(frame).mark_rule(strokeDash=[6, 4], strokeWidth=1.5).encode(y="GiB:Q", color=color)
    text = alt.Chart(frame).mark_text(align="right", baseline="bottom", dx=-2, dy=-2, fontSize=10).encode(
        y="GiB:Q", x=alt.value("width"), text="text:N", color=color)
    return [rule, text]


def _panel(samples, origin: float, series: dict[str, str], marks: Marks, lines: list[tuple[str, int]],
           title: str, end: float) -> alt.LayerChart:
    curves = _curves(samples, origin, series)
    layers = _band_layers(marks, end)
    layers.append(alt.Chart(curves).mark_line(strokeWidth=2, interpolate="step-after").encode(
        x=alt.X("seconds:Q", title=marks.x_title, scale=alt.Scale(domain=[marks.start, end], nice=False)),
        y=alt.Y("GiB:Q", title="GiB", scale=alt.Scale(zero=True)),
        color=_color("series", SERIES_COLORS, None, curves["series"]),
        tooltip=["series:N", "seconds:Q", alt.Tooltip("GiB:Q", format=".3f")]))
    layers += _line_layers(lines)
    return alt.layer(*layers).resolve_scale(color="independent").properties(
        title=title, width="container", height=230)


def ram_chart(samples: Sequence[MemorySample], origin: float, marks: Marks, title: str = "RAM") -> alt.LayerChart:
    """The RAM panel: RSS and the system's used RAM, phase bands, the predicted peak RSS."""
    end = _end(samples, origin, marks)
    lines = [("predicted peak", marks.predicted_ram_bytes)] if marks.predicted_ram_bytes else []
    return _panel(samples, origin, RAM_SERIES, marks, lines, title, end)


def gpu_chart(samples: Sequence[MemorySample], origin: float, marks: Marks,
              title: str = "GPU memory") -> alt.LayerChart | None:
    """The GPU panel, or None when nothing reported GPU memory (no NVML and no CUDA)."""
    if not has_gpu_readings(samples):
        return None
    end = _end(samples, origin, marks)
    lines = [(name, value) for name, value in (("vram_limit", marks.vram_limit_bytes),
                                               ("predicted peak", marks.predicted_vram_bytes)) if value]
    return _panel(samples, origin, GPU_SERIES, marks, lines, title, end)


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
