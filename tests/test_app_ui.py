"""The app's parts without a server: forms (loose values to a request, errors to gr.Error),
jobs (events to phase bands, the GPU runner), charts (bands, caps, peaks kept) and the CSV."""

import csv
import sys
import threading
import types

import gradio as gr
import pytest

from app_harness import wait_until
from pipelines import Cancelled, Event, RequestError
from ui import charts
from ui.forms import JobInputs, number, user_errors, whole
from ui.jobs import Band, GpuRunner, Job, JobState, StepMark
from vram.sampler import MemorySample

G = 1024**3


# -- forms ----------------------------------------------------------------------------------

def test_whole_numbers_and_numbers_from_loose_values():
    assert whole(None, "steps") is None and whole("", "steps") is None
    assert whole(512.0, "width") == 512 and whole("64", "width") == 64 and whole(7, "seed") == 7
    for bad in (512.5, float("nan"), float("inf"), "abc", True, [1]):
        with pytest.raises(RequestError, match="must be a whole number"):
            whole(bad, "width")
    assert number("nan", "guidance") != number("nan", "guidance")  # NaN passes, for the field's own check
    assert number(None, "guidance") is None and number("2.5", "guidance") == 2.5
    with pytest.raises(RequestError, match="guidance: must be a number"):
        number("lots", "guidance")


def test_job_inputs_make_a_request_with_model_defaults_left_empty():
    request = JobInputs(prompt="a fox", width=64.0, steps=None, guidance="3", seed=5).request()
    assert (request.width, request.height, request.steps, request.guidance, request.seed) == (64, None, None, 3.0, 5)
    with pytest.raises(RequestError, match="prompt: must be text"):
        JobInputs(prompt=42).request()


def test_user_errors_become_gr_errors_for_functions_and_generators():
    @user_errors
    def plain(value):
        raise RequestError(f"width: {value} is not a multiple of 8")

    @user_errors
    def generator(value):
        yield 1
        raise ValueError("steps: too many")

    with pytest.raises(gr.Error, match="width: 33 is not a multiple of 8"):
        plain(33)
    items = generator(1)
    assert next(items) == 1
    with pytest.raises(gr.Error, match="steps: too many"):
        next(items)

    @user_errors
    def broken():
        raise KeyError("a bug stays a bug")
    with pytest.raises(KeyError):
        broken()


# -- jobs -----------------------------------------------------------------------------------

def plan(name="tiny"):
    return types.SimpleNamespace(choice=types.SimpleNamespace(name=name))


def test_a_job_turns_pipeline_events_into_phase_bands_and_steps():
    now = [0.0]
    job = Job(plan(), clock=lambda: now[0])
    assert job.progress() == (0.0, "waiting for the GPU")
    job.mark_started()
    for t, event in ((0.5, Event("run_start", 0.0)), (0.5, Event("phase_start", 0.0, "text_encoding")),
                     (1.0, Event("phase_start", 0.5, "denoising", total=2)),
                     (1.5, Event("step", 1.0, "denoising", 1, 2)),
                     (2.0, Event("step", 1.5, "denoising", 2, 2)), (2.0, Event("phase_end", 1.5, "denoising")),
                     (2.2, Event("phase_start", 1.7, "vae_decoding")), (2.5, Event("run_end", 2.0))):
        now[0] = t
        job.on_event(event)
        if event.kind == "step" and event.step == 1:
            assert job.progress() == (0.5, "denoising: step 1/2")
    assert [(b.phase, b.start, b.end) for b in job.bands] == [
        ("loading", 0.0, 0.5), ("text_encoding", 0.5, 1.0), ("denoising", 1.0, 2.0), ("vae_decoding", 2.2, 2.5)]
    assert [s.step for s in job.steps] == [1, 2] and job.steps[0].time == 1.5
    job.on_message("basic ran out of memory (...); memory released, retrying once with cpu_offload")
    assert job.state is JobState.LOADING and job.bands[-1].phase == "loading"


class FakeSession:
    """Runs "jobs" that step until released or cancelled; ``fail`` makes the next one raise."""

    def __init__(self):
        self.release = threading.Event()
        self.fail = None
        self.started = []

    def prepare(self, plan):
        return plan

    def generate(self, plan, *, on_event, cancel, on_message, progress):
        self.started.append(plan)
        if self.fail:
            raise self.fail
        on_event(Event("run_start", 0.0))
        while not self.release.wait(0.01):
            if cancel.is_set():
                on_event(Event("cancelled", 0.0))
                raise Cancelled("cancelled by the user")
        result = types.SimpleNamespace(images=[1], videos=None, save=lambda out: [out / "image.png"])
        return types.SimpleNamespace(result=result)


def test_the_runner_runs_one_job_at_a_time_and_cancels_queued_ones_at_once(tmp_path):
    session = FakeSession()
    runner = GpuRunner(session, tmp_path)
    first, second = runner.submit(plan("a"), owner="me"), runner.submit(plan("b"), owner="you")
    runner.start(first)
    wait_until(lambda: first.state is JobState.RUNNING, timeout=30, what="the first job to run")
    runner.start(second)
    assert second.state is JobState.QUEUED and runner.busy() and runner.running() is first
    assert runner.cancel("you") == 1
    wait_until(lambda: second.finished, timeout=30, what="the queued job to end")
    assert second.state is JobState.CANCELLED and "before it started" in second.error
    assert first.state is JobState.RUNNING
    session.release.set()
    wait_until(lambda: first.finished, timeout=30, what="the first job to end")
    assert first.state is JobState.DONE and first.files == [tmp_path / "image.png"]
    assert first.outcome.result.images is None       # pixels are in the file, not kept in the history
    assert [p.choice.name for p in session.started] == ["a"]


def test_a_failed_or_cancelled_run_is_reported_and_the_next_one_runs(tmp_path):
    session = FakeSession()
    runner = GpuRunner(session, tmp_path)
    session.fail = RuntimeError("boom")
    failed = runner.run(runner.submit(plan()))
    assert failed.state is JobState.FAILED and failed.error == "RuntimeError: boom"
    session.fail = None
    running = runner.submit(plan(), owner="me")
    runner.start(running)
    wait_until(lambda: running.state is JobState.RUNNING, timeout=30, what="the run to start")
    runner.cancel("me")
    wait_until(lambda: running.finished, timeout=30, what="the cancel")
    assert running.state is JobState.CANCELLED and running.bands[-1].end is not None
    session.release.set()
    assert runner.run(runner.submit(plan())).state is JobState.DONE


# -- charts and the timeline ----------------------------------------------------------------

def sample(t, rss, gpu=None):
    return MemorySample(t, rss, 4 * G, gpu, gpu, gpu, gpu)


def layers(chart):
    return chart.to_dict()["layer"]


def test_the_ram_chart_draws_phase_bands_steps_and_the_predicted_peak():
    samples = [sample(100 + i * 0.2, G + i * 2**20) for i in range(20)]
    marks = charts.Marks(bands=[Band("loading", 0, 1), Band("denoising", 1, None)],
                         steps=[StepMark(1.5, 1, 2), StepMark(2.0, 2, 2)], predicted_ram_bytes=int(1.5 * G), end=3.0)
    spec = charts.ram_chart(samples, 100.0, marks).to_dict()
    kinds = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]]
    assert kinds[:3] == ["rect", "text", "rule"] and "line" in kinds and kinds.count("rule") == 2
    text = str(spec)
    assert "predicted peak 1.50 GiB" in text and "process RSS" in text and "system RAM used" in text
    assert charts.gpu_chart(samples, 100.0, marks) is None      # nothing reported GPU memory


def test_the_gpu_chart_draws_the_cap_and_the_predicted_peak():
    samples = [sample(i * 0.2, G, gpu=2 * G + i) for i in range(5)]
    marks = charts.Marks(vram_limit_bytes=6 * G, predicted_vram_bytes=5 * G)
    text = str(charts.gpu_chart(samples, 0.0, marks).to_dict())
    assert "vram_limit 6.00 GiB" in text and "predicted peak 5.00 GiB" in text and "torch reserved" in text


def test_downsampling_keeps_a_short_peak():
    samples = [sample(i * 0.1, G) for i in range(5000)]
    samples[2501] = sample(250.1, 3 * G)
    rows = charts._downsample(samples, charts.MAX_POINTS)
    assert len(rows) <= charts.MAX_POINTS and max(r["rss_bytes"] for r in rows) == 3 * G


def test_the_timeline_csv_has_every_reading_with_its_phase(tmp_path):
    samples = [sample(10 + i * 0.5, G + i) for i in range(6)]
    bands = [Band("loading", 0, 1), Band("denoising", 1, 2)]
    path = charts.write_timeline_csv(tmp_path / "t.csv", samples, 10.0, bands)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 6 and rows[0]["seconds"] == "0.000" and rows[-1]["rss_bytes"] == str(G + 5)
    assert [r["phase"] for r in rows] == ["loading", "loading", "loading", "denoising", "denoising", ""]
    assert rows[0]["device_used_bytes"] == ""


def test_compare_curves_overlay_one_line_per_preset():
    curves = {"basic": ([sample(i, G) for i in range(3)], 0.0),
              "disk": ([sample(10 + i, G // 2) for i in range(3)], 10.0)}
    spec = charts.compare_chart(curves, "rss_bytes", "RSS").to_dict()
    assert {row["preset"] for row in spec["datasets"][spec["data"]["name"]]} == {"basic", "disk"}
    assert charts.compare_chart(curves, "device_used_bytes", "GPU") is None


# -- app.py ---------------------------------------------------------------------------------

def test_the_command_line_serves_localhost_by_default(monkeypatch):
    import app
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app._parser().parse_args([])
    assert (args.host, args.port, args.share, args.auth, args.preset) == ("127.0.0.1", 7860, False, None, "auto")
    args = app._parser().parse_args(["--share", "--auth", "ana:s3cret:x", "--model", "sdxl", "--models-dir", "m"])
    assert args.share and args.auth == ("ana", "s3cret:x") and args.model == "sdxl" and args.models_dir == "m"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")       # a Space sets these
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    args = app._parser().parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7861)
    with pytest.raises(SystemExit):
        app._parser().parse_args(["--auth", "nopassword"])


def test_gpu_work_runs_under_spaces_gpu_when_the_package_is_there(monkeypatch):
    from ui.jobs import gpu_task
    calls = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda fn: (lambda *args, **kwargs: calls.append(args) or fn(*args, **kwargs))
    monkeypatch.setitem(sys.modules, "spaces", fake)

    def work(session, plan, on_plan, *, cancel=None, on_event=None):
        on_plan(plan + 1)
        on_event("step")
        return session * 2, cancel.is_set()
    seen = []
    wrapped = gpu_task(work)
    # Through spaces.GPU, the callbacks and the cancel event cross the bridge (ui/zerogpu.py).
    assert wrapped(21, 1, seen.append, cancel=threading.Event(), on_event=seen.append) == (42, False)
    assert len(calls) == 1 and calls[0][:2] == (21, 1) and seen == [2, "step"]
    monkeypatch.setitem(sys.modules, "spaces", None)          # not installed: the function itself
    plain = lambda x: x  # noqa: E731
    assert gpu_task(plain) is plain
