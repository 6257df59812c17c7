"""The page's event handlers: plain functions (and generators, for runs) that take the values
of the page's fields and return or yield the values of its outputs.

They hold no torch logic: plans and runs go through ``presets.session``, jobs through
``ui.jobs``, memory readings come from the sampler (``vram.sampler``).
"""

from __future__ import annotations

import json
import math
import logging
import random
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from presets import list_presets
from presets.auto import usable_hardware
from presets.session import AUTO, CUSTOM, Session
from vram.sampler import MemorySampler

from . import charts, present
from .forms import JobInputs, make_plan, user_errors
from .jobs import Band, GpuRunner, Job, JobState

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass
class AppOptions:
    """How the app is set up (``python app.py`` flags)."""

    models_dir: Path | None = None          # None: $LOWVRAM_MODELS_DIR, else ./models
    outputs: Path = Path("outputs")         # images, videos and timelines (CSV)
    model: str | None = None                # the model picked when the page opens
    preset: str = AUTO
    source: str = "modelscope"              # where registry models download from
    sample_interval: float = 0.2            # seconds between memory readings
    refresh: float = 0.5                    # seconds between page updates during a run
    compare_presets: tuple[str, ...] = field(default_factory=tuple)


def _owner(request: gr.Request | None) -> str | None:
    """The Gradio session a job belongs to. Gradio injects ``request`` only into parameters
    before a ``*fields`` (``helpers.special_args`` stops at the first one that is not
    positional), so the page's ``generate(*fields, request=...)`` gets None: then it is the
    request Gradio keeps for the running handler (``LocalContext.request``)."""
    if request is None:
        try:
            from gradio.context import LocalContext
            request = LocalContext.request.get(None)
        except Exception:  # noqa: BLE001 - a Gradio without it: the job has no owner
            request = None
    return getattr(request, "session_hash", None)


CLIENT_LEFT = "its client went away"
EVENT_CANCELLED = "Gradio cancelled its event"


@dataclass(frozen=True)
class EventWatch:
    """Whether the Gradio event a handler serves still has someone to report to.

    Gradio 6 has no public "is my client still there?" for a handler: ``gr.Request`` wraps
    the finished ``/queue/join`` POST, not the SSE stream. When the session's SSE stream
    closes, ``queue_data`` (gradio/routes.py) calls ``Queue.clean_events``, which sets the
    running events' ``alive`` to False (gradio/queueing.py); when an event is cancelled
    (``/cancel``, a ``cancels=`` listener, ``gradio_client``'s ``Job.cancel``) its task is
    cancelled and ``Queue.process_events`` drops it from ``event_ids_to_events``. Neither stops
    a plain function running on its thread, and a generator only after its next yield."""

    queue: Any
    event: Any

    def gone(self) -> str | None:
        """Why nobody waits for this event's result any more, or None while someone does."""
        if getattr(self.event, "alive", True) is False:
            return CLIENT_LEFT
        if self.queue.event_ids_to_events.get(self.event._id) is not self.event:
            return EVENT_CANCELLED
        return None


def watch_event() -> EventWatch | None:
    """An ``EventWatch`` on the Gradio queue's event that the running handler serves; None
    outside the queue (a direct call) or with a Gradio without these internals. Gradio sets
    ``LocalContext.blocks`` and ``event_id`` around each call of a handler and each step of a
    generator (``utils.get_function_with_locals``); call this from the handler itself."""
    try:
        from gradio.context import LocalContext
        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        queue = getattr(blocks, "_queue", None)
        event = queue.event_ids_to_events.get(event_id) if queue is not None and event_id else None
        return EventWatch(queue, event) if event is not None else None
    except Exception:  # noqa: BLE001 - only a probe: without it a job ends with its generator alone
        return None


class AppHandlers:
    """The app's state (one session, sampler and GPU runner per process) and its handlers."""

    def __init__(self, options: AppOptions, *, session: Session | None = None, sampler: MemorySampler | None = None):
        self.options = options
        self.session = session or Session(options.models_dir, source=options.source)
        self.sampler = sampler or MemorySampler(interval=options.sample_interval)
        self.runner = GpuRunner(self.session, options.outputs)
        self.timelines = Path(options.outputs) / "timelines"
        self._comparisons: dict[str | None, list[Job]] = {}

    def start(self) -> None:
        self.sampler.start()

    def close(self) -> None:
        """At exit (Ctrl-C included): running jobs are cancelled first, so this does not wait
        for a long run to finish."""
        self.sampler.stop()
        self.runner.shut_down()

    # -- choices for the page ------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        return [(choice.label, choice.name) for choice in self.session.models(first=self.initial_model())]

    def initial_model(self) -> str:
        return self.options.model or self.session.default_model()

    def preset_choices(self) -> list[str]:
        return [AUTO] + list_presets()

    def vram_slider_max(self) -> float:
        """GiB: the largest GPU's memory, or the RAM without a GPU (the CPU is the device)."""
        hardware = usable_hardware(self.session.models_dir)
        total = max((g.total_bytes for g in hardware.gpus), default=hardware.ram_total_bytes)
        return math.floor(total / GIB * 4) / 4  # rounded down: the slider's end must be a valid cap

    # -- cards -----------------------------------------------------------------------------------
    def hardware_card(self) -> str:
        return present.hardware_card(usable_hardware(self.session.models_dir), self.sampler.nvml_status)

    def model_changed(self, model: str):
        """A model was picked: its defaults fill the fields; video models show frames and a player."""
        try:
            choice = self.session.resolve_model(model)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None
        family = choice.family
        d = family.defaults
        video = family.kind == "video"
        about = f"**{family.title}** — {family.description}" if family.description else f"**{family.title}**"
        if choice.conversion:
            about = f"**A converted copy: {choice.conversion}** ({choice.folder.name}). " + about
        return (gr.update(value=d.get("width", 1024)), gr.update(value=d.get("height", 1024)),
                gr.update(value=d.get("steps", 30)), gr.update(value=d.get("guidance", 0.0)),
                gr.update(visible=video, value=d.get("frames", 81) if video else None),
                gr.update(visible=not video), gr.update(visible=video), about)

    @staticmethod
    def ui_inputs(model, prompt, negative_prompt, preset, custom_on, configs_text, cap_on, vram_limit, random_seed,
                  seed, steps, width, height, guidance, vae_tiling, frames, attention, compile_on, channels_last,
                  cache) -> JobInputs:
        """The Generate tab's fields, in the order the layout passes them."""
        return JobInputs(prompt=prompt, model=model, negative_prompt=negative_prompt,
                         preset=CUSTOM if custom_on else (preset or AUTO), vram_limit=vram_limit if cap_on else None,
                         width=width, height=height, steps=steps, guidance=guidance,
                         seed=None if random_seed else seed, frames=frames,
                         vae_tiling=vae_tiling, configs=configs_text if custom_on else None, attention=attention,
                         compile=compile_on, channels_last=channels_last, cache=cache)

    def plan_view(self, *fields):
        """The plan for the fields as they are: explanation, predicted peaks per preset, and
        the configs the run would use. Bad fields show their message here instead of a popup
        (this runs on every change)."""
        inputs = self.ui_inputs(*fields)
        if not (isinstance(inputs.prompt, str) and inputs.prompt.strip()):
            inputs = replace(inputs, prompt="plan")  # no prompt yet: plan anyway
        try:
            plan = make_plan(self.session, inputs)
        except ValueError as error:
            return f"**Cannot plan this job**: {error}", gr.skip(), gr.skip()
        configs = self.session.configs_for(plan)
        custom_on = fields[4]
        return (present.plan_markdown(plan), present.prediction_rows(plan),
                gr.skip() if custom_on else json.dumps(configs, indent=1))

    # -- generation ------------------------------------------------------------------------------
    def _follow(self, job: Job, watch: EventWatch | None = None) -> Iterator[Job]:
        """Run ``job`` on its thread and yield it at each change, at most every ``refresh``/2
        seconds and at least every ``refresh`` seconds, until it ends.

        The job ends with its client: when ``watch`` (on the Gradio event that asked for the
        job, ``watch_event()``) says nobody waits for it any more, or when this generator is
        closed before the job ended (the page went away, or Gradio cancelled the event), the
        job is cancelled and stops at its next step; a job still waiting for the GPU ends at
        once. The loop goes on until the job has stopped: the GPU queue moves on then."""
        self.runner.start(job)
        version, last = -1, 0.0
        try:
            while not job.finished:
                version = job.wait(version, timeout=self.options.refresh)
                gone = watch.gone() if watch is not None else None
                if gone:
                    self._abandon(job, gone)
                if time.monotonic() - last >= self.options.refresh / 2 and not job.finished:
                    last = time.monotonic()
                    yield job
        finally:
            if not job.finished:
                self._abandon(job, (watch.gone() if watch is not None else None) or "its handler ended first")

    @staticmethod
    def _abandon(job: Job, why: str) -> None:
        """Cancel ``job``, whose result nobody waits for any more, and say so once (a warning
        when its client went away)."""
        if job.finished or job.cancel.is_set():
            return
        job.cancel.set()
        log.log(logging.WARNING if why == CLIENT_LEFT else logging.INFO,
                "%s: %s; cancelling the run at its next step", job.id, why)

    def _marks(self, job: Job) -> charts.Marks:
        plan = job.plan
        prediction = job.outcome.prediction if job.outcome is not None else plan.prediction
        limit = job.outcome.vram_limit if job.outcome is not None else plan.vram_limit
        on_gpu = plan.hardware.has_gpu
        return charts.Marks(bands=list(job.bands), steps=list(job.steps),
                            vram_limit_bytes=int(limit * GIB) if (limit and on_gpu) else None,
                            predicted_vram_bytes=prediction.peak_vram_bytes,
                            predicted_ram_bytes=prediction.peak_ram_bytes, end=job.now())

    def _samples(self, job: Job):
        origin = job.started if job.started is not None else job.created
        until = job.finished_at + self.options.sample_interval * 2 if job.finished_at is not None else None
        return self.sampler.samples(since=origin - charts.PRE_ROLL_S, until=until), origin

    def _charts(self, job: Job):
        samples, origin = self._samples(job)
        marks = self._marks(job)
        gpu = charts.gpu_chart(samples, origin, marks)
        ram = charts.ram_chart(samples, origin, marks)
        return gr.update(value=gpu, visible=gpu is not None), ram

    def _caption(self, job: Job) -> str:
        parts = []
        if not self.sampler.has_nvml:
            samples, _ = self._samples(job)
            parts.append(f"No NVML ({self.sampler.nvml_status}): " + (
                "the GPU graph shows torch's own counters only." if charts.has_gpu_readings(samples)
                else "GPU memory is not drawn, RAM only."))
        if not job.plan.hardware.has_gpu:
            limit = job.plan.vram_limit
            parts.append("Computing on the CPU: the device is RAM" + (
                f"; vram_limit {limit:g} GiB bounds the layers staged for compute" if limit is not None else "") + ".")
        return " ".join(parts)

    def _timeline_file(self, job: Job) -> Path:
        samples, origin = self._samples(job)
        stem = job.files[0].stem if job.files else job.id
        return charts.write_timeline_csv(self.timelines / f"{stem}.csv", samples, origin, job.bands)

    def _gallery(self, job: Job):
        if job.plan.choice.family.kind == "video":
            return gr.skip(), (str(job.files[0]) if job.files else None)
        return [(str(p), f"{job.outcome.preset}, seed {job.plan.request.seed}") for p in job.files], gr.skip()

    @user_errors
    def generate(self, *fields, request: gr.Request = None, progress=gr.Progress()):
        """The Generate button: plan, run on the GPU queue, and refresh the status, progress
        and memory graphs while it runs; then the result, the summary and the timeline CSV.
        Yields (status, caption, gpu plot, ram plot, gallery, video, summary, csv)."""
        watch = watch_event()
        plan = make_plan(self.session, self.ui_inputs(*fields))
        job = self.runner.submit(plan, owner=_owner(request))
        with closing(self._follow(job, watch)) as follow:   # closed with this generator
            for live in follow:
                self._progress(progress, live)
                gpu, ram = self._charts(live)
                yield (present.status_html(live), self._caption(live), gpu, ram, gr.skip(), gr.skip(),
                       gr.skip(), gr.skip())
        gpu, ram = self._charts(job)
        csv_path = str(self._timeline_file(job))
        gallery, video = self._gallery(job) if job.state is JobState.DONE else (gr.skip(), gr.skip())
        yield (present.status_html(job), self._caption(job), gpu, ram, gallery, video, present.summary_markdown(job),
               csv_path)
        if job.state is JobState.FAILED:
            raise gr.Error(f"The run failed: {job.error}", print_exception=False)

    @staticmethod
    def _progress(progress, job: Job) -> None:
        fraction, what = job.progress()
        if job.phase == "denoising" and job.total and not job.finished:
            progress((job.step, job.total), desc=what, unit="steps")
        else:
            progress(fraction, desc=what)

    def _cancel_and_wait(self, owner: str | None, timeout: float = 60.0) -> list[Job]:
        """Cancel ``owner``'s unfinished jobs and wait (at most ``timeout`` s) for them to stop:
        a run stops at its next step, so this is about one step's time."""
        jobs = [j for j in self.runner.jobs(owner) if not j.finished] if owner is not None else []
        for job in jobs:
            job.cancel.set()
        deadline = time.monotonic() + timeout
        for job in jobs:
            version = job.version
            while not job.finished and time.monotonic() < deadline:
                version = job.wait(version, timeout=0.5)
        return jobs

    def cancel(self, request: gr.Request = None):
        """The Cancel button: stop this page's run at its next step (Gradio drops a queued
        one), then show where it stopped. Returns (status, caption, gpu plot, ram plot,
        summary, csv)."""
        jobs = self._cancel_and_wait(_owner(request))
        if not jobs:
            return ('<div class="run-status">Nothing was running</div>',) + (gr.skip(),) * 5
        job = jobs[-1]
        gpu, ram = self._charts(job)
        return (present.status_html(job), self._caption(job), gpu, ram, present.summary_markdown(job),
                str(self._timeline_file(job)))

    def cancel_compare(self, request: gr.Request = None):
        """The Compare tab's Cancel: as ``cancel``, then the comparison's table and curves."""
        owner = _owner(request)
        self._cancel_and_wait(owner)
        jobs = self._comparisons.get(owner, [])
        if not jobs:
            return ("Nothing was running",) + (gr.skip(),) * 4
        return self._compare_outputs(jobs, None)

    def unload(self) -> str:
        """Close the kept pipeline (frees its memory; the next run loads again)."""
        return "Unloaded the model" if self.runner.unload() else "No model was loaded"

    # -- comparison ------------------------------------------------------------------------------
    @user_errors
    def compare(self, *fields, request: gr.Request = None, progress=gr.Progress()):
        """The Compare button: the Generate tab's job under each chosen preset, one after
        another. Yields (status, table, gpu curves, ram curves, gallery)."""
        watch = watch_event()
        *job_fields, presets = fields
        inputs = self.ui_inputs(*job_fields)
        with closing(self._compare(inputs, presets, _owner(request), watch)) as steps:
            for jobs, current in steps:
                if current is not None:
                    fraction, what = current.progress()
                    index = jobs.index(current)
                    progress((index + fraction) / len(jobs), desc=f"{current.label}: {what}")
                yield self._compare_outputs(jobs, current)

    def _compare(self, inputs: JobInputs, presets, owner: str | None, watch: EventWatch | None = None):
        """Yields (jobs so far, the running one or None); checks every preset's plan first.
        A cancelled job (its client gone, or Cancel) ends the comparison."""
        if isinstance(presets, str):
            presets = [presets]  # one preset named as text, not a list of its letters
        presets = list(dict.fromkeys(presets or []))  # each preset once
        if not presets:
            raise gr.Error("Pick at least one preset to compare", print_exception=False)
        if inputs.seed in (None, ""):
            inputs = inputs.with_seed(random.randrange(2**31))  # one seed for all: comparable images
        for preset in presets:
            make_plan(self.session, inputs, preset=preset)  # bad input fails before any run
        jobs: list[Job] = []
        self._comparisons[owner] = jobs   # what the Compare tab's Cancel reports on
        while len(self._comparisons) > self.runner.history:
            self._comparisons.pop(next(iter(self._comparisons)))
        for preset in presets:
            job = self.runner.submit(make_plan(self.session, inputs, preset=preset), owner=owner, label=preset)
            jobs.append(job)
            with closing(self._follow(job, watch)) as follow:
                for live in follow:
                    yield jobs, live
            if job.state is JobState.CANCELLED:
                break
        yield jobs, None

    def _compare_outputs(self, jobs: list[Job], current: Job | None):
        rows = [present.compare_row(j) for j in jobs]
        curves = {j.label: self._samples(j) for j in jobs if j.started is not None}
        ram = charts.compare_chart(curves, "rss_bytes", "Process RSS per preset")
        gpu_field = "process_device_bytes" if self.sampler.has_nvml else "torch_reserved_bytes"
        gpu = charts.compare_chart(curves, gpu_field, "GPU memory per preset")
        gallery = [(str(j.files[0]), f"{j.label}: {j.outcome.result.summary.seconds:.1f} s")
                   for j in jobs if j.state is JobState.DONE and j.files]
        if current is not None:
            status = f"Running {current.label} ({jobs.index(current) + 1} of the chosen presets): " \
                     f"{present.status_line(current)}"
        else:
            status = "Finished: " + ", ".join(f"{j.label} {j.state.value}" for j in jobs)
        return status, rows, gr.update(value=gpu, visible=gpu is not None), ram, gallery

    # -- live memory (the machine, whoever runs) -------------------------------------------------
    def watch(self, seconds: float = 60.0):
        """The last ``seconds`` of readings of this server's process, for the Memory panel."""
        now = time.monotonic()
        samples = self.sampler.samples(since=now - seconds)
        running = self.runner.running()
        bands = []
        if running is not None and running.started is not None:
            shift = running.started - now   # the job's clock onto this chart's (0 = now)
            bands = [Band(b.phase, b.start + shift, None if b.end is None else b.end + shift) for b in running.bands]
        marks = charts.Marks(bands=bands, start=-seconds, end=0.0, x_title="seconds (0 is now)")
        gpu = charts.gpu_chart(samples, now, marks, title="GPU memory, last minute")
        ram = charts.ram_chart(samples, now, marks, title="RAM, last minute")
        busy = f"running {running.id} ({present.status_line(running)})" if running is not None else "idle"
        return gr.update(value=gpu, visible=gpu is not None), ram, f"GPU queue: {busy}"

