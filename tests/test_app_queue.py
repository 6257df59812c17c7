"""The GPU queue against clients that leave and a queue that is full, on a real server
(``python app.py``): a page or an API client that disconnects mid-run cancels its job at the
next step, the server says so and the queue moves on (so does a request that
``gradio_client`` cancels); with the GPU queue full, plans, status, memory, hardware, models
and Cancel still answer, and more GPU work is refused.

A client that leaves is played by raw HTTP, as the page and ``gradio_client`` speak it: POST
``queue/join``, then the session's SSE stream (GET ``queue/data``), closed mid-run."""

import json
import re
import uuid

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status

from app_harness import MODEL, TINY_JOB, AppServer, wait_until

PROMPT = "a red circle on a blue background"
LONG = 1000          # steps: the tiny model takes seconds for them, the client leaves at step 3
GROWTH = 0.05        # of the server's RSS, as in test_app_memory.py


class RawSession:
    """One Gradio session spoken to over raw HTTP (the queue protocol), with ``client``'s view
    of the app for the endpoints' indices."""

    def __init__(self, url: str, client: Client):
        self.url = url
        self.session = uuid.uuid4().hex
        self.fns = {d.get("api_name"): d["id"] for d in client.config["dependencies"]}

    def join(self, api_name: str, data: list) -> str:
        response = httpx.post(f"{self.url}gradio_api/queue/join", timeout=30, json={
            "data": data, "fn_index": self.fns[api_name], "session_hash": self.session,
            "event_data": None, "trigger_id": None})
        response.raise_for_status()
        return response.json()["event_id"]

    def stream(self):
        return httpx.stream("GET", f"{self.url}gradio_api/queue/data", params={"session_hash": self.session},
                            timeout=httpx.Timeout(30, read=60))

    @staticmethod
    def messages(response):
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])

    def call(self, api_name: str, data: list | None = None):
        """Run a quick endpoint in this session and return its outputs."""
        event = self.join(api_name, data or [])
        with self.stream() as response:
            for message in self.messages(response):
                if message.get("event_id") == event and message["msg"] == "process_completed":
                    assert message["success"], message
                    return message["output"]["data"]
        raise AssertionError(f"{api_name}: the stream ended without completing")

    def leave_at_step(self, api_name: str, data: list, step: int) -> None:
        """Start ``api_name``, follow its stream until the run reports ``step``, then close the
        stream (the connection) as a closed page or a client that goes away does. Bounded: a
        run that ends first fails here, and each read waits at most a minute."""
        self.join(api_name, data)
        with self.stream() as response:
            for message in self.messages(response):
                assert message["msg"] not in ("process_completed", "unexpected_error"), message
                if message["msg"] == "progress":
                    desc = message["progress_data"][0].get("desc") or ""
                    found = re.search(r"step (\d+)/", desc)
                    if found and int(found.group(1)) >= step:
                        return  # leaving the block closes the connection
        raise AssertionError("the stream ended before the run reached its step")


def your_jobs(session: RawSession) -> list[dict]:
    return session.call("status")[0]["yours"]


def the_log(server: AppServer) -> str:
    return server.log_path.read_text(errors="replace")


SPEED = ["auto", False, False, "off"]  # attention, compile, channels_last, cache
API_JOB = [PROMPT, "", MODEL, "dynamic", None, 32, 32, LONG, None, 1, None, *SPEED]
# The page's Generate: model, prompt, negative, preset, custom configs on, configs, cap on,
# vram_limit, random seed, seed, steps, width, height, guidance, VAE tiling, frames, then
# the speed settings.
PAGE_JOB = [MODEL, PROMPT, "", "dynamic", False, None, False, 0, False, 1, LONG, 32, 32, 0.0, False, None, *SPEED]
COMPARE_JOB = [PROMPT, ["dynamic", "disk"], MODEL, "", None, 32, 32, LONG, None, 1, None, *SPEED]


@pytest.mark.parametrize("api_name, data", [("generate", API_JOB), ("generate_ui", PAGE_JOB), ("compare", COMPARE_JOB)],
                         ids=["api-generate", "page-generate", "api-compare"])
def test_a_client_that_leaves_mid_run_cancels_its_job(app_server, app_client, api_name, data):
    quick = {**TINY_JOB, "preset": "dynamic"}         # on the pipeline the long job keeps loaded
    app_client.predict(prompt=PROMPT, **quick, api_name="/generate")
    baseline = app_server.rss()
    leaving = RawSession(app_server.url, app_client)
    waiting = app_client.submit(prompt=PROMPT, **quick, api_name="/generate")   # the next job, in line
    leaving.leave_at_step(api_name, data, step=3)

    def ended():
        yours = your_jobs(leaving)
        return yours if yours and yours[-1]["state"] not in ("queued", "loading", "running") else None
    yours = wait_until(ended, timeout=30, what="the abandoned job to end")
    assert len(yours) == 1, yours                     # a comparison does not go on to its next preset
    job = yours[-1]
    assert job["state"] == "cancelled" and 3 <= job["step"] < LONG, job
    wait_until(lambda: f"{job['job']}: its client went away" in the_log(app_server), timeout=10,
               what="the server to log that the client went away")
    _, summary = waiting.result(timeout=60)           # the queue moved on
    assert summary["state"] == "done"
    assert app_client.predict(api_name="/status")["running"] is None
    grown = app_server.rss() - baseline               # and the abandoned run gave its memory back
    assert grown < GROWTH * baseline, f"RSS grew {grown / 2**20:.1f} MiB over {baseline / 2**20:.1f} MiB"


def test_a_request_its_client_cancels_mid_run_cancels_its_job(app_server, app_client):
    """``gradio_client``'s ``Job.cancel`` (Gradio's ``/cancel``) drops the event; the run,
    which Gradio cannot stop on its thread, stops at its next step."""
    leaving = Client(app_server.url, verbose=False)
    job = leaving.submit(prompt=PROMPT, **{**TINY_JOB, "preset": "dynamic", "steps": LONG}, api_name="/generate")
    running = wait_until(lambda: (lambda r: r if r and r["step"] >= 3 else None)(
        app_client.predict(api_name="/status")["running"]), timeout=120, what="the run to pass step 3")
    assert job.cancel()
    wait_until(lambda: app_client.predict(api_name="/status")["running"] is None, timeout=30,
               what="the run to stop")
    mine = leaving.predict(api_name="/status")["yours"][-1]
    assert mine["job"] == running["job"] and mine["state"] == "cancelled" and mine["step"] < LONG, mine
    wait_until(lambda: f"{running['job']}: Gradio cancelled its event" in the_log(app_server), timeout=10,
               what="the server to log the cancel")
    _, summary = app_client.predict(prompt=PROMPT, **TINY_JOB, api_name="/generate")
    assert summary["state"] == "done"


@pytest.fixture
def small_queue_server(tiny_family, tmp_path):
    """A server whose GPU queue holds one waiting request (``--max-queue 1``)."""
    server = AppServer(tmp_path, tiny_family("sdxl"), extra_args=("--max-queue", "1"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_reads_answer_while_the_gpu_queue_is_full(small_queue_server):
    url = small_queue_server.url
    first, second, third = (Client(url, verbose=False) for _ in range(3))
    running = first.submit(prompt=PROMPT, **{**TINY_JOB, "steps": LONG}, api_name="/generate")
    wait_until(lambda: (third.predict(api_name="/status")["running"] or {}).get("step", 0) >= 1,
               timeout=120, what="the long run to start")
    queued = second.submit(prompt=PROMPT, **TINY_JOB, api_name="/generate")
    wait_until(lambda: queued.status().code == Status.IN_QUEUE, timeout=60, what="the second request to wait")
    with pytest.raises(QueueError):                   # the GPU queue is full: more GPU work is refused
        third.predict(prompt=PROMPT, **TINY_JOB, api_name="/generate")

    plan = third.predict(model=MODEL, width=64, height=64, api_name="/plan")
    status = third.predict(api_name="/status")
    memory = third.predict(seconds=2, api_name="/memory")
    hardware = third.predict(api_name="/hardware")
    models = third.predict(api_name="/models")
    assert plan["preset"] and memory["samples"] and hardware["ram_total_bytes"] > 0
    assert models[0]["name"] == MODEL
    assert status["busy"] and status["running"]["step"] < LONG     # answered while the run went on
    assert queued.status().code == Status.IN_QUEUE                 # and the queue was still full

    assert first.predict(api_name="/cancel")["cancelled"] == 1     # Cancel answers too
    with pytest.raises(AppError, match="cancelled"):
        running.result(timeout=60)
    _, summary = queued.result(timeout=60)
    assert summary["state"] == "done"
