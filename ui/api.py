"""The app's named API endpoints, for ``gradio_client`` (listed in the README).

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    image, summary = client.predict(prompt="a small red circle on a blue background, top left",
                                    preset="auto", api_name="/generate")

Each endpoint is a plain function of keyword arguments; ``ui.layout`` binds it to hidden
components whose initial values are the defaults a client sees. Bad input is a ``gr.Error``
with the same message the page shows. GPU work (``generate``, ``compare``) waits in the one
GPU queue, and a client that disconnects cancels it at the next step; ``plan``, ``status``,
``memory``, ``hardware``, ``models`` and ``cancel`` do not wait, and answer when it is full.
"""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from presets.session import AUTO

from . import present
from .forms import JobInputs, make_plan, user_errors
from .handlers import AppHandlers, _owner, watch_event
from .jobs import JobState


class Api:
    """The endpoints, over the app's handlers (one session, sampler and runner)."""

    def __init__(self, handlers: AppHandlers):
        self.app = handlers

    @user_errors
    def generate(self, prompt: str, negative_prompt: str = "", model: str | None = None, preset: str = AUTO,
                 vram_limit: float | None = None, width: float | None = None, height: float | None = None,
                 steps: float | None = None, guidance: float | None = None, seed: float | None = None,
                 frames: float | None = None, attention: str = "auto", compile: bool = False,
                 channels_last: bool = False, cache: str = "off", request: gr.Request = None,
                 progress=gr.Progress()) -> tuple[str, dict]:
        """Generate one image (or video) and return its file, then the memory summary: peak
        VRAM and RAM (bytes), the cap and whether it held, the predicted peaks, time per phase,
        s/step, bytes moved to the device and read from disk, and the speed settings as they
        ran (``speed``: the attention backend, compiled blocks and compile seconds, ...). Empty
        settings take the model's defaults; ``preset`` "auto" lets the decision tree choose;
        ``vram_limit`` is in GiB. ``attention`` ("auto", "native", "flash", ...), ``compile``,
        ``channels_last`` and ``cache`` ("off", "first_block:0.12", "mag", "taylorseer:5") are
        the speed settings. A client that disconnects cancels its run at the next step."""
        watch = watch_event()   # Gradio does not stop a plain function whose client left
        inputs = JobInputs(prompt=prompt, model=model, negative_prompt=negative_prompt, preset=preset,
                           vram_limit=vram_limit, width=width, height=height, steps=steps, guidance=guidance,
                           seed=seed, frames=frames, attention=attention, compile=compile,
                           channels_last=channels_last, cache=cache)
        job = self.app.runner.submit(make_plan(self.app.session, inputs), owner=_owner(request))
        for live in self.app._follow(job, watch):
            self.app._progress(progress, live)
        if job.state is not JobState.DONE:
            raise gr.Error(f"The run {job.state.value}: {job.error}", print_exception=False)
        summary = present.summary_dict(job)
        summary["timeline_csv"] = str(self.app._timeline_file(job))
        return str(job.files[0]), summary

    @user_errors
    def compare(self, prompt: str, presets: list[str] | None = None, model: str | None = None,
                negative_prompt: str = "", vram_limit: float | None = None, width: float | None = None,
                height: float | None = None, steps: float | None = None, guidance: float | None = None,
                seed: float | None = None, frames: float | None = None, attention: str = "auto",
                compile: bool = False, channels_last: bool = False, cache: str = "off", request: gr.Request = None,
                progress=gr.Progress()) -> tuple[list[dict], list]:
        """The same job under each of ``presets``, one after another (one seed for all, the
        same speed settings). Returns one summary per preset (as ``generate``'s), then the
        images with their preset as caption. A client that disconnects cancels the run at its
        next step, and the rest."""
        watch = watch_event()
        inputs = JobInputs(prompt=prompt, model=model, negative_prompt=negative_prompt, vram_limit=vram_limit,
                           width=width, height=height, steps=steps, guidance=guidance, seed=seed, frames=frames,
                           attention=attention, compile=compile, channels_last=channels_last, cache=cache)
        jobs = []
        for jobs, current in self.app._compare(inputs, presets, _owner(request), watch):
            if current is not None:
                fraction, what = current.progress()
                progress((jobs.index(current) + fraction) / max(1, len(presets or [])), desc=f"{current.label}: {what}")
        rows = [{"preset_asked": j.label, **present.summary_dict(j)} for j in jobs]
        gallery = [(str(j.files[0]), j.label) for j in jobs if j.state is JobState.DONE and j.files]
        return rows, gallery

    @user_errors
    def plan(self, model: str | None = None, preset: str = AUTO, vram_limit: float | None = None,
             width: float | None = None, height: float | None = None, steps: float | None = None,
             guidance: float | None = None, frames: float | None = None, attention: str = "auto",
             compile: bool = False, channels_last: bool = False, cache: str = "off") -> dict:
        """What would happen, without running: this machine, the decision tree's explanation,
        the preset and cap, every preset's predicted peaks (bytes; a step cache's states and
        the compiler's RAM included) and the 8-key config per component. Does not wait behind
        a generation."""
        inputs = JobInputs(prompt="plan", model=model, preset=preset, vram_limit=vram_limit, width=width,
                           height=height, steps=steps, guidance=guidance, frames=frames, attention=attention,
                           compile=compile, channels_last=channels_last, cache=cache)
        plan = make_plan(self.app.session, inputs)
        return {**plan.as_dict(), "configs": self.app.session.configs_for(plan)}

    def status(self, request: gr.Request = None) -> dict:
        """The GPU queue now: the running job (state, phase, step) and this client's jobs."""
        running = self.app.runner.running()

        def brief(job):
            return {"job": job.id, "state": job.state.value, "phase": job.phase, "step": job.step, "total": job.total,
                    "seconds": round(job.now(), 3), "model": job.plan.choice.name, "preset": job.plan.preset,
                    "error": job.error}
        return {"busy": self.app.runner.busy(), "running": brief(running) if running is not None else None,
                "yours": [brief(j) for j in self.app.runner.jobs(_owner(request))][-10:]}

    def memory(self, seconds: float = 10.0) -> dict:
        """The sampler's readings of the last ``seconds`` (at most 600): bytes, and seconds
        relative to now. Does not wait behind a generation."""
        seconds = min(600.0, max(0.0, float(seconds or 0)))
        now = time.monotonic()
        samples = self.app.sampler.samples(since=now - seconds)
        return {"nvml": self.app.sampler.nvml_status, "interval_s": self.app.sampler.interval,
                "samples": [{"seconds": round(s.time - now, 3), "rss_bytes": s.rss_bytes,
                             "ram_used_bytes": s.ram_used_bytes, "torch_allocated_bytes": s.torch_allocated_bytes,
                             "torch_reserved_bytes": s.torch_reserved_bytes, "device_used_bytes": s.device_used_bytes,
                             "process_device_bytes": s.process_device_bytes} for s in samples]}

    def hardware(self) -> dict:
        """This machine: GPUs (NVML), RAM and disk, bytes."""
        from presets.auto import usable_hardware
        h = usable_hardware(self.app.session.models_dir)
        return {"gpus": [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes}
                         for g in h.gpus], "gpu_status": h.gpu_status, "ram_total_bytes": h.ram_total_bytes,
                "ram_available_bytes": h.ram_available_bytes, "disk_free_bytes": h.disk_free_bytes,
                "nvml_sampler": self.app.sampler.nvml_status}

    def models(self) -> list[dict[str, Any]]:
        """Every model a request may name: the default first, local folders, then the registry."""
        return [{"name": c.name, "title": c.family.title, "kind": c.family.kind, "local": c.local,
                 "downloaded": c.downloaded, "defaults": dict(c.family.defaults)}
                for c in self.app.session.models(first=self.app.initial_model())]

    def cancel(self, request: gr.Request = None) -> dict:
        """Cancel this client's unfinished jobs (they stop at the next step)."""
        return {"cancelled": self.app.runner.cancel(_owner(request))}
