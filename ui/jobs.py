"""Generation jobs for the app: each runs on a thread of its own, one at a time on the GPU,
while the handler that started it reads its progress and timeline and refreshes the page.

A ``Job`` records what the pipeline reports (phases, steps, messages) against the same clock
as the memory sampler, so the graph can draw phase bands under the memory curves. The
``GpuRunner`` owns the GPU lock: Gradio's queue already runs one GPU event at a time, and
the lock keeps that true when a job outlives its event (a client that went away, a cancel
still winding down).
"""

from __future__ import annotations

import contextvars
import enum
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines import Cancelled, Event
from presets.session import RunOutcome, Session, SessionPlan

from .zerogpu import across_fork

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    QUEUED = "queued"          # waiting for the GPU
    LOADING = "loading"        # has the GPU; loading (or reusing) the pipeline
    RUNNING = "running"        # the pipeline runs: phases and steps
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Band:
    """A phase on the job's clock: seconds since the job got the GPU."""

    phase: str
    start: float
    end: float | None = None


@dataclass(frozen=True)
class StepMark:
    time: float                # seconds since the job got the GPU
    step: int
    total: int


def gpu_task(fn: Callable) -> Callable:
    """``fn`` under Hugging Face's ``spaces.GPU`` when the ``spaces`` package is present (a
    ZeroGPU Space attaches a GPU only inside such a call, in a forked child: zerogpu.py
    carries progress, cancel and errors across); ``fn`` itself elsewhere."""
    try:
        import spaces
    except ImportError:
        return fn
    return across_fork(fn, spaces.GPU)


def _run_session(session: Session, plan: SessionPlan, on_plan: Callable[[SessionPlan], None],
                 **callbacks) -> RunOutcome:
    """The GPU's part of a job: make room and re-measure the baseline, then run."""
    plan = session.prepare(plan)
    on_plan(plan)
    return session.generate(plan, **callbacks)


_run_on_gpu = gpu_task(_run_session)
_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One generation: its plan, its live state and its timeline. Written by the job's
    thread, read by handlers; ``version`` grows with every change (``wait`` blocks on it)."""

    plan: SessionPlan
    owner: str | None = None                 # the Gradio session that asked for it
    label: str = ""                          # e.g. the preset, in a comparison
    id: str = field(default_factory=lambda: f"job-{next(_ids)}")
    clock: Callable[[], float] = time.monotonic
    cancel: threading.Event = field(default_factory=threading.Event)
    state: JobState = JobState.QUEUED
    created: float = 0.0
    started: float | None = None             # on ``clock``: when it got the GPU
    finished_at: float | None = None
    phase: str | None = None
    step: int = 0
    total: int = 0
    bands: list[Band] = field(default_factory=list)
    steps: list[StepMark] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    download: str | None = None              # "file: done/total MiB" while a download runs
    download_bytes: tuple[int, int] = (0, 0)  # (done, total) of the file downloading now
    outcome: RunOutcome | None = None
    error: str | None = None
    files: list[Path] = field(default_factory=list)
    version: int = 0

    def __post_init__(self) -> None:
        self.created = self.clock()
        self._changed = threading.Condition()

    # -- written by the job's thread -----------------------------------------------------------
    def _touch(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def now(self) -> float:
        """Seconds since the job got the GPU (0 before; its whole length once it ended)."""
        if self.started is None:
            return 0.0
        return (self.finished_at if self.finished_at is not None else self.clock()) - self.started

    def mark_started(self) -> None:
        self.started = self.clock()
        self.state = JobState.LOADING
        self.bands.append(Band("loading", 0.0))
        self._touch()

    def on_plan(self, plan: SessionPlan) -> None:
        """The plan as prepared for the run (its predictions on the baseline measured then)."""
        self.plan = plan
        self._touch()

    def on_event(self, event: Event) -> None:
        """A pipeline event; called on the job's thread as the run goes."""
        now = self.now()
        if event.kind == "run_start":
            self._close_band(now)
            self.state = JobState.RUNNING
        elif event.kind == "phase_start":
            self._close_band(now)
            self.phase = event.phase
            self.bands.append(Band(event.phase, now))
            if event.phase == "denoising" and event.total:
                self.total, self.step = event.total, 0
        elif event.kind == "phase_end":
            self._close_band(now)
        elif event.kind == "step":
            self.step, self.total = event.step or 0, event.total or self.total
            self.steps.append(StepMark(now, self.step, self.total))
        elif event.kind in ("run_end", "cancelled"):
            self._close_band(now)
        self._touch()

    def on_message(self, text: str) -> None:
        """A message from the fallback ("... ran out of memory; retrying with ..."): the
        retry loads again."""
        self.messages.append(text)
        now = self.now()
        self._close_band(now)
        if "retrying" in text:
            self.state = JobState.LOADING
            self.bands.append(Band("loading", now))
        self._touch()

    def on_download(self, name: str, done: int, total: int) -> None:
        downloading = done < total
        self.download = f"downloading {name}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB" if downloading else None
        self.download_bytes = (done, total) if downloading else (0, 0)
        self._touch()

    def _close_band(self, now: float) -> None:
        if self.bands and self.bands[-1].end is None:
            self.bands[-1].end = now

    def finish(self, state: JobState, *, outcome: RunOutcome | None = None, error: str | None = None,
               files: list[Path] | None = None) -> None:
        now = self.now()
        self._close_band(now)
        self.outcome, self.error, self.files = outcome, error, list(files or [])
        self.finished_at = self.clock()
        self.state = state
        self._touch()

    # -- read by handlers ----------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state.finished

    def wait(self, version: int, timeout: float) -> int:
        """Block until ``version`` is out of date or ``timeout`` seconds pass; the version now."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != version, timeout=timeout)
            return self.version

    def progress(self) -> tuple[float, str]:
        """(fraction done in [0, 1], what is happening), for a progress bar."""
        if self.state is JobState.QUEUED:
            return 0.0, "waiting for the GPU"
        if self.state is JobState.LOADING:
            done, total = self.download_bytes
            if self.download and total:
                return done / total, self.download
            return 0.0, "loading " + self.plan.choice.name
        if self.finished:
            return 1.0, self.state.value
        if self.phase == "denoising" and self.total:
            return self.step / self.total, f"denoising: step {self.step}/{self.total}"
        done = 1.0 if self.phase == "vae_decoding" else 0.0
        return done, (self.phase or "starting").replace("_", " ")


class GpuRunner:
    """Runs jobs one at a time (the GPU lock), each on its own thread, and remembers the last
    ``history`` of them. Results are saved under ``outputs``."""

    def __init__(self, session: Session, outputs: str | Path, *, history: int = 64):
        self.session = session
        self.outputs = Path(outputs)
        self.history = history
        self._gpu = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, plan: SessionPlan, owner: str | None = None, label: str = "") -> Job:
        job = Job(plan, owner, label)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.history:
                oldest = next(iter(self._jobs.values()))
                if not oldest.finished:
                    break
                self._jobs.popitem(last=False)
        return job

    def start(self, job: Job) -> threading.Thread:
        """Run ``job`` on a thread of its own (it waits for the GPU lock there). The thread
        carries the caller's context variables, which ``spaces.GPU`` reads the request from."""
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(self._execute, job), name=job.id, daemon=True)
        thread.start()
        return thread

    def run(self, job: Job) -> Job:
        """Run ``job`` and wait for it."""
        self.start(job).join()
        return job

    def _execute(self, job: Job) -> None:
        # Poll the lock so that a job cancelled while it waits ends at once.
        while not self._gpu.acquire(timeout=0.2):
            if job.cancel.is_set():
                job.finish(JobState.CANCELLED, error="cancelled before it started")
                return
        try:
            self._execute_locked(job)
        finally:
            self._gpu.release()

    def _execute_locked(self, job: Job) -> None:
        if job.cancel.is_set():
            job.finish(JobState.CANCELLED, error="cancelled before it started")
            return
        job.mark_started()
        try:
            outcome = _run_on_gpu(self.session, job.plan, job.on_plan, on_event=job.on_event, cancel=job.cancel,
                                  on_message=job.on_message, progress=job.on_download)
            files = outcome.result.save(self.outputs)
            # The files hold the pixels now; the job history must not keep them in RAM.
            outcome.result.images = outcome.result.videos = None
        except Cancelled:
            job.finish(JobState.CANCELLED, error="cancelled")
        except Exception as error:  # reported to the user; the server keeps serving
            log.exception("%s failed", job.id)
            job.finish(JobState.FAILED, error=f"{type(error).__name__}: {error}")
        else:
            job.finish(JobState.DONE, outcome=outcome, files=files)

    # -- lookups -------------------------------------------------------------------------------
    def get(self, job_id: str | None) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def jobs(self, owner: str | None = None) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if owner is None or j.owner == owner]

    def running(self) -> Job | None:
        """The job holding the GPU, if any."""
        with self._lock:
            return next((j for j in self._jobs.values() if j.state in (JobState.LOADING, JobState.RUNNING)), None)

    def cancel(self, owner: str | None) -> int:
        """Cancel every unfinished job of ``owner`` (None: nobody's, not everybody's); how many."""
        if owner is None:
            return 0
        jobs = [j for j in self.jobs(owner) if not j.finished]
        for job in jobs:
            job.cancel.set()
        return len(jobs)

    def shut_down(self, timeout: float = 30.0) -> None:
        """At exit: cancel every unfinished job, wait (up to ``timeout`` s) for the running one
        to stop at its next step, then close the kept pipeline."""
        with self._lock:
            unfinished = [j for j in self._jobs.values() if not j.finished]
        for job in unfinished:
            job.cancel.set()
        if self._gpu.acquire(timeout=timeout):
            try:
                self.session.close()
            finally:
                self._gpu.release()
        else:
            log.warning("a run did not stop within %.0f s; exiting without closing its pipeline", timeout)

    def unload(self) -> bool:
        """Close the session's kept pipeline once no job holds the GPU; True if one was loaded."""
        with self._gpu:
            return self.session.unload()

    def busy(self) -> bool:
        return self._gpu.locked()
