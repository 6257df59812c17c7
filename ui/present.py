"""What the app writes for people: the hardware card, the plan, a run's summary and the
comparison table (Markdown and rows), and the same facts as plain data for the API."""

from __future__ import annotations

import html
from typing import Any

from presets.probe import Hardware
from presets.session import AUTO, SessionPlan

from .jobs import Job, JobState

GIB = 1024**3


def gib(n: int | float | None, digits: int = 2) -> str:
    return "n/a" if n is None else f"{n / GIB:.{digits}f} GiB"


def hardware_card(hardware: Hardware, sampler_status: str) -> str:
    # The probe's own description, one bullet per line (GPUs, RAM, disk where the models live).
    lines = ["### This machine", *(f"- {line}" for line in hardware.describe().splitlines())]
    if not hardware.gpus:
        lines.append("- Runs compute on the CPU.")
    if sampler_status != "ok":
        lines.append(f"- **Memory graph**: no NVML ({sampler_status}); the GPU panel shows torch's own counters "
                     f"where there are any")
    return "\n".join(lines)


def plan_markdown(plan: SessionPlan) -> str:
    """The decision tree's explanation (and the user's own choice when not "auto")."""
    choice = plan.choice
    head = f"**{choice.family.title}**" + (f" from `{choice.folder}`" if choice.local else "")
    if not choice.downloaded:
        head += " — not downloaded yet: the first run downloads it"
    chosen = f"**{plan.preset}**" + (f", vram_limit {plan.vram_limit:.2f} GiB" if plan.vram_limit is not None else "")
    how = "the decision tree chose" if plan.preset_asked == AUTO else "you chose"
    reasons = "\n".join(f"- {line}" for line in plan.describe().splitlines())
    return f"{head}\n\n{how} {chosen}\n\n{reasons}"


PREDICTION_HEADERS = ["preset", "peak VRAM (GiB)", "peak RAM (GiB)", "chosen"]


def prediction_rows(plan: SessionPlan) -> list[list[Any]]:
    rows = []
    for name, p in plan.predictions.items():
        rows.append([name, "n/a (CPU)" if p.peak_vram_bytes is None else round(p.peak_vram_bytes / GIB, 3),
                     round(p.peak_ram_bytes / GIB, 3), "◀" if name == plan.preset else ""])
    return rows


def status_line(job: Job) -> str:
    fraction, what = job.progress()
    if job.state is JobState.QUEUED:
        return "Waiting for the GPU (another job is running)"
    if job.state is JobState.DONE:
        return f"Done in {job.now():.1f} s"
    if job.state is JobState.CANCELLED:
        return f"Cancelled ({job.error})"
    if job.state is JobState.FAILED:
        return f"Failed: {job.error}"
    return f"{what} — {job.now():.1f} s"


def status_html(job: Job | None) -> str:
    """The status line with a progress bar of its own (Gradio's tracker sits on the result)."""
    if job is None:
        return '<div class="run-status">Ready</div>'
    fraction, _ = job.progress()
    colour = {JobState.FAILED: "#d62728", JobState.CANCELLED: "#ff7f0e"}.get(job.state, "#2ca02c")
    return (f'<div class="run-status" data-state="{job.state.value}">{html.escape(status_line(job))}'
            f'<div style="background:#e5e5e5;border-radius:4px;height:8px;margin-top:4px">'
            f'<div style="width:{fraction * 100:.1f}%;background:{colour};height:8px;border-radius:4px"></div>'
            f'</div></div>')


def summary_markdown(job: Job) -> str:
    """After a run: peaks against cap and prediction, time per phase, s/step, bytes moved."""
    if job.outcome is None:
        return status_line(job) + "".join(f"\n\n> {m}" for m in job.messages)
    outcome, summary = job.outcome, job.outcome.result.summary
    prediction = outcome.prediction
    cap = {None: "no cap", True: "**yes**", False: "**NO**"}[summary.within_cap]
    rows = [
        ("preset", f"{outcome.preset}" + (f" (vram_limit {outcome.vram_limit:.2f} GiB)"
                                          if outcome.vram_limit is not None else "")),
        ("pipeline", "loaded for this run" if outcome.loaded else "reused (already loaded)"),
        ("peak VRAM", f"{gib(summary.peak_vram_bytes)}" + (" (computing on the CPU)" if summary.peak_vram_bytes is None
                                                           else f", predicted {gib(prediction.peak_vram_reserved_bytes)}"
                                                                f" reserved, plus {gib(prediction.parts.get('cuda_context', 0))} "
                                                                f"of CUDA context")),
        ("cap respected", cap if summary.vram_limit_bytes is not None else "no cap"),
        ("peak RAM", f"{gib(summary.peak_ram_bytes)}, predicted {gib(prediction.peak_ram_bytes)} "
                     f"({outcome.errors.get('ram', 0):+.0%})"),
        ("time", f"{summary.seconds:.2f} s in the pipeline, {job.now():.2f} s with loading"),
        ("per phase", ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in summary.phase_seconds.items())),
        ("steps", f"{summary.steps}, " + ("n/a" if summary.seconds_per_step is None
                                          else f"{summary.seconds_per_step:.3f} s/step")),
        ("moved host → device", gib(summary.bytes_to_device, 3)),
        ("read from disk", gib(summary.bytes_read_from_disk, 3)),
        ("speed settings", summary.speed.describe()),
    ]
    table = "| measure | this run |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    notes = "".join(f"\n\n> {m}" for m in job.messages)
    return f"### Summary\n\n{table}{notes}"


def summary_dict(job: Job) -> dict[str, Any]:
    """The memory summary as plain data (bytes, seconds) for the API."""
    out: dict[str, Any] = {}
    if job.outcome is not None:
        out.update(job.outcome.result.summary.as_dict())  # its "model" is the family; the name follows
    out.update({"job": job.id, "state": job.state.value, "error": job.error, "messages": list(job.messages),
                "model": job.plan.choice.name, "family": job.plan.choice.family.key,
                "request": job.plan.request.as_metadata()})
    if job.outcome is not None:
        outcome = job.outcome
        out.update(preset=outcome.preset, vram_limit_gib=outcome.vram_limit, pipeline_reused=not outcome.loaded,
                   predicted_peak_vram_bytes=outcome.prediction.peak_vram_bytes,
                   predicted_peak_ram_bytes=outcome.prediction.peak_ram_bytes, prediction_errors=outcome.errors,
                   seconds_with_loading=round(job.now(), 3),
                   phases=[{"phase": b.phase, "start": round(b.start, 3),
                            "end": None if b.end is None else round(b.end, 3)} for b in job.bands])
    return out


COMPARE_HEADERS = ["preset", "status", "time (s)", "with loading (s)", "s/step", "peak VRAM (GiB)", "cap respected",
                   "peak RAM (GiB)", "predicted peak RAM (GiB)", "to device (GiB)", "read from disk (GiB)"]


def compare_row(job: Job) -> list[Any]:
    label = job.label or job.plan.preset
    if job.outcome is None:
        return [label, job.state.value if not job.error else f"{job.state.value}: {job.error}"] + [""] * 9
    summary, prediction = job.outcome.result.summary, job.outcome.prediction
    cap = {None: "no cap", True: "yes", False: "NO"}[summary.within_cap]
    return [job.outcome.preset if job.outcome.preset == label else f"{label} → {job.outcome.preset}", "done",
            round(summary.seconds, 2), round(job.now(), 2),
            None if summary.seconds_per_step is None else round(summary.seconds_per_step, 3),
            None if summary.peak_vram_bytes is None else round(summary.peak_vram_bytes / GIB, 3), cap,
            round(summary.peak_ram_bytes / GIB, 3), round(prediction.peak_ram_bytes / GIB, 3),
            round(summary.bytes_to_device / GIB, 3), round(summary.bytes_read_from_disk / GIB, 3)]
