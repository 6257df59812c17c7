"""One call from a job to an image: probe, size, decide (or take the user's preset), predict,
run with fallback, and record how far the prediction was from what was measured.

    from presets.auto import run
    outcome = run("flux.1-schnell", GenerationRequest(prompt="a fox"), preset="auto")
    print(outcome.decision.describe(), outcome.result.summary.describe(), outcome.errors)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipelines import Event, GenerationRequest
from pipelines.sources import is_local, locate
from vram import monitor

from .fallback import Outcome, generate_with_fallback
from .footprint import footprint
from .planner import Calibration, Job, Prediction, predict
from .probe import probe
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


def job_of(family, request: GenerationRequest) -> Job:
    d = family.defaults
    guidance = request.guidance if request.guidance is not None else d.get("guidance", 0.0)
    frames = request.frames or (d.get("frames", 81) if family.kind == "video" else 1)
    return Job(request.width or d.get("width", 1024), request.height or d.get("height", 1024), frames,
               request.batch, cfg=family.guidance_is_cfg and guidance > 1, vae_tiling=request.vae_tiling)


def run(model: str | Path, request: GenerationRequest, *, preset: str = "auto", vram_limit: float | None = None,
        source: str = "modelscope", models_dir: str | Path | None = None,
        on_event: Callable[[Event], None] | None = None, cancel=None, pipeline_kwargs: dict | None = None,
        on_message: Callable[[str], None] | None = None, calibration: Calibration | None = None) -> AutoOutcome:
    folder, family = locate(model, models_dir)
    request.resolved(family)  # bad settings fail before anything is probed or loaded
    calibration = calibration or Calibration()
    hardware = probe(folder)
    if hardware.has_gpu and not torch.cuda.is_available():
        # The GPU is there but this torch cannot use it: decide for the CPU it will run on.
        hardware = dataclasses.replace(hardware, gpus=(), gpu_status=(
            f"{hardware.gpus[0].name} found, but this torch build has no CUDA; install the CUDA build of torch"))
    sizes = footprint(family, folder)
    job = job_of(family, request)
    baseline = monitor.current_rss()
    decision = None
    if preset == "auto":
        decision = decide(hardware, family, sizes, job, baseline_ram=baseline, vram_limit=vram_limit,
                          calibration=calibration)
        preset, vram_limit = decision.preset, decision.vram_limit
    on_gpu = hardware.has_gpu
    device = f"cuda:{max(hardware.gpus, key=lambda g: g.free_bytes).index}" if on_gpu else "cpu"
    dtype = None if on_gpu else torch.float32
    local = is_local(model)
    outcome = generate_with_fallback(
        model if local else family.key, request, preset, vram_limit=vram_limit, device=device, dtype=dtype,
        on_event=on_event, cancel=cancel, pipeline_kwargs=pipeline_kwargs, on_message=on_message,
        load_options={} if local else {"source": source, "models_dir": models_dir})
    if not sizes.from_headers:
        sizes = footprint(family, folder)  # downloaded during the run: the headers are exact

    def planned(scale: Calibration | None) -> Prediction:
        return predict(family, sizes, job, outcome.preset, on_gpu=on_gpu,
                       dtype=torch.bfloat16 if on_gpu else torch.float32, vram_limit=outcome.vram_limit,
                       baseline_ram=baseline, calibration=scale)
    prediction, raw = planned(calibration), planned(None)
    summary = outcome.result.summary
    # Errors of the calibrated prediction; the file learns from the raw one (else it would
    # chase its own corrections).
    errors = {"ram": summary.peak_ram_bytes / prediction.peak_ram_bytes - 1}
    calibration.record(outcome.preset, "ram", raw.peak_ram_bytes, summary.peak_ram_bytes, baseline)
    if prediction.peak_vram_bytes and summary.peak_vram_bytes:
        errors["vram"] = summary.peak_vram_bytes / prediction.peak_vram_bytes - 1
        calibration.record(outcome.preset, "vram", raw.peak_vram_bytes, summary.peak_vram_bytes)
    return AutoOutcome(outcome, decision, prediction, errors)
