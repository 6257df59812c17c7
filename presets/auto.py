"""One call from a job to an image: probe, size, decide (or take the user's preset), predict,
run with fallback, and record how far the prediction was from what was measured.

    from presets.auto import run
    outcome = run("flux.1-schnell", GenerationRequest(prompt="a fox"), preset="auto")
    print(outcome.decision.describe(), outcome.result.summary.describe(), outcome.errors)

``run`` is ``plan_run`` (everything before a weight moves) then ``execute``; the app calls
the two apart, to show the plan while the run goes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipelines import Cancelled, Event, Family, GenerationRequest
from pipelines.sources import is_local, locate
from vram import monitor

from .fallback import Loader, Outcome, generate_with_fallback
from .footprint import Footprint, footprint
from .placement import MULTI_GPU, Placement
from .planner import Calibration, Job, Prediction, predict
from .probe import Hardware, probe
from .tree import Decision, decide


@dataclass
class AutoOutcome:
    outcome: Outcome
    decision: Decision | None                 # None when the user named the preset
    prediction: Prediction
    errors: dict[str, float] = field(default_factory=dict)   # "ram"/"vram": measured / predicted - 1

    @property
    def result(self):
        return self.outcome.result


@dataclass(frozen=True)
class RunPlan:
    """What ``plan_run`` settled: the machine, the model's sizes, the job and the preset."""

    folder: Path
    family: Family
    hardware: Hardware
    sizes: Footprint
    job: Job
    baseline_ram: int                          # bytes of RSS before the run
    decision: Decision | None                  # None when the user named the preset
    preset: str
    vram_limit: float | None                   # GiB, as given or as the tree derived it
    device: str

    @property
    def on_gpu(self) -> bool:
        return self.hardware.has_gpu

    @property
    def placement(self) -> Placement | None:
        """Where a ``multi_gpu`` run puts each component (the tree's plan); None otherwise."""
        return self.decision.placement if self.decision is not None and self.preset == MULTI_GPU else None

    @property
    def dtype(self) -> torch.dtype | None:
        """The computation dtype the run uses (None: the preset's machine default)."""
        return None if self.on_gpu else torch.float32


def job_of(family, request: GenerationRequest) -> Job:
    d = family.defaults
    guidance = request.guidance if request.guidance is not None else d.get("guidance", 0.0)
    frames = request.frames or (d.get("frames", 81) if family.kind == "video" else 1)
    return Job(request.width or d.get("width", 1024), request.height or d.get("height", 1024), frames,
               request.batch, cfg=family.guidance_is_cfg and guidance > 1, vae_tiling=request.vae_tiling,
               cache=request.cache or "off", compile=bool(request.compile))


def usable_hardware(folder: str | Path | None = None, *, nvml=None) -> Hardware:
    """``probe``, minus a GPU that this torch cannot use (then the run is on the CPU)."""
    hardware = probe(folder, nvml=nvml)
    if hardware.has_gpu and not torch.cuda.is_available():
        hardware = dataclasses.replace(hardware, gpus=(), gpu_status=(
            f"{hardware.gpus[0].name} found, but this torch build has no CUDA; install the CUDA build of torch"))
    return hardware


def plan_run(model: str | Path, request: GenerationRequest, *, preset: str = "auto",
             vram_limit: float | None = None, models_dir: str | Path | None = None,
             calibration: Calibration | None = None, hardware: Hardware | None = None,
             baseline_ram: int | None = None) -> RunPlan:
    """Everything before a weight moves: bad settings fail here (RequestError, naming the
    field), then the machine is probed and, for "auto", the tree decides preset and cap.
    ``baseline_ram``: this process's RSS without what the run will replace (default: now)."""
    folder, family = locate(model, models_dir)
    request.resolved(family)  # bad settings fail before anything is probed or loaded
    hardware = hardware or usable_hardware(folder)
    sizes = footprint(family, folder)
    job = job_of(family, request)
    baseline = monitor.current_rss() if baseline_ram is None else baseline_ram
    decision = None
    if preset == "auto":
        decision = decide(hardware, family, sizes, job, baseline_ram=baseline, vram_limit=vram_limit,
                          calibration=calibration or Calibration())
        preset, vram_limit = decision.preset, decision.vram_limit
    device = f"cuda:{max(hardware.gpus, key=lambda g: g.free_bytes).index}" if hardware.has_gpu else "cpu"
    return RunPlan(folder, family, hardware, sizes, job, baseline, decision, preset, vram_limit, device)


def _stops_on_cancel(progress: Callable[[str, int, int], None] | None, cancel) -> Callable[[str, int, int], None]:
    """A download's progress callback that also stops it (``Cancelled``) once ``cancel`` is set:
    the hub clients call it after every chunk, so Cancel ends a download within one chunk."""
    def report(name: str, done: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled while downloading {name} ({done / 2**20:.0f} of {total / 2**20:.0f} MiB); "
                            f"finished files are kept and the next run resumes")
        if progress is not None:
            progress(name, done, total)
    return report


def execute(plan: RunPlan, model: str | Path, request: GenerationRequest, *, source: str = "modelscope",
            models_dir: str | Path | None = None, on_event: Callable[[Event], None] | None = None, cancel=None,
            pipeline_kwargs: dict | None = None, on_message: Callable[[str], None] | None = None,
            calibration: Calibration | None = None, loader: Loader | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> AutoOutcome:
    """Run ``plan`` with fallback, then compare the measured peaks with the planner's and
    record the ratio. ``loader`` supplies the pipeline (default: a fresh one per run);
    ``progress(file, done, total)`` hears a download."""
    calibration = calibration or Calibration()
    local = is_local(model)
    load_options = {} if local else {"source": source, "models_dir": models_dir}
    if not local and (progress is not None or cancel is not None):
        load_options["progress"] = _stops_on_cancel(progress, cancel)
    outcome = generate_with_fallback(
        model if local else plan.family.key, request, plan.preset, vram_limit=plan.vram_limit, device=plan.device,
        dtype=plan.dtype, on_event=on_event, cancel=cancel, pipeline_kwargs=pipeline_kwargs, on_message=on_message,
        load_options=load_options, loader=loader, placement=plan.placement)
    sizes = plan.sizes if plan.sizes.from_headers else footprint(plan.family, plan.folder)  # exact once downloaded
    summary = outcome.result.summary
    if outcome.preset == MULTI_GPU:
        return AutoOutcome(outcome, plan.decision, *_multi_gpu_errors(plan, sizes, summary, calibration))

    def planned(scale: Calibration | None) -> Prediction:
        return predict(plan.family, sizes, plan.job, outcome.preset, on_gpu=plan.on_gpu,
                       dtype=torch.bfloat16 if plan.on_gpu else torch.float32, vram_limit=outcome.vram_limit,
                       baseline_ram=plan.baseline_ram, calibration=scale)
    prediction, raw = planned(calibration), planned(None)
    # Errors of the calibrated prediction; the file learns from the raw one (else it would
    # chase its own corrections).
    errors = {"ram": summary.peak_ram_bytes / prediction.peak_ram_bytes - 1}
    calibration.record(outcome.preset, "ram", raw.peak_ram_bytes, summary.peak_ram_bytes, plan.baseline_ram)
    # A run measures what torch's allocator reserves: compared with the same, the CUDA context left out.
    if prediction.peak_vram_reserved_bytes and summary.peak_vram_bytes:
        errors["vram"] = summary.peak_vram_bytes / prediction.peak_vram_reserved_bytes - 1
        calibration.record(outcome.preset, "vram", raw.peak_vram_reserved_bytes, summary.peak_vram_bytes)
    return AutoOutcome(outcome, plan.decision, prediction, errors)


def _multi_gpu_errors(plan: RunPlan, sizes: Footprint, summary, calibration: Calibration
                      ) -> tuple[Prediction, dict[str, float]]:
    """A ``multi_gpu`` run's prediction (the placement it ran, RAM as ``basic`` predicts it
    with the exact sizes) and its errors: RAM, and each GPU's peak against its share
    ("vram cuda:1"). Nothing is recorded: the planner scales a placement by ``basic``'s
    factors, learned where one GPU's peak is one number."""
    basic = predict(plan.family, sizes, plan.job, "basic", on_gpu=plan.on_gpu,
                    dtype=torch.bfloat16 if plan.on_gpu else torch.float32, baseline_ram=plan.baseline_ram,
                    calibration=calibration)
    prediction = plan.placement.prediction(basic)
    errors = {"ram": summary.peak_ram_bytes / prediction.peak_ram_bytes - 1}
    measured = {use.device: use.peak_vram_bytes for use in summary.devices}
    placement = plan.placement.on(plan.device)
    for index, (reserved, _) in prediction.per_gpu.items():
        peak = measured.get(placement.device(index))
        if peak and reserved:
            errors[f"vram {placement.device(index)}"] = peak / reserved - 1
    return prediction, errors


def run(model: str | Path, request: GenerationRequest, *, preset: str = "auto", vram_limit: float | None = None,
        source: str = "modelscope", models_dir: str | Path | None = None,
        on_event: Callable[[Event], None] | None = None, cancel=None, pipeline_kwargs: dict | None = None,
        on_message: Callable[[str], None] | None = None, calibration: Calibration | None = None,
        loader: Loader | None = None) -> AutoOutcome:
    calibration = calibration or Calibration()
    plan = plan_run(model, request, preset=preset, vram_limit=vram_limit, models_dir=models_dir,
                    calibration=calibration)
    return execute(plan, model, request, source=source, models_dir=models_dir, on_event=on_event, cancel=cancel,
                   pipeline_kwargs=pipeline_kwargs, on_message=on_message, calibration=calibration, loader=loader)
