"""A soak under mixed load, bounded in count and time, against a real server (``python app.py``
on 127.0.0.1): four concurrent clients send 200 requests in all, mixed at random from a fixed
seed: valid generations, invalid inputs, cancels mid-run, disconnects mid-run, and plan,
status and memory reads.

Every request must end in an image or a clear error; no job is lost or run twice; the
server's RSS after the soak stays within 5% of its RSS after warm-up; nothing is written
outside the outputs folder (and Gradio's own file cache, which it is pointed at here)."""

import hashlib
import random
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app_harness import MODEL, TINY_JOB, AppServer, wait_until
from test_app_queue import LONG, PROMPT, RawSession

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 4
REQUESTS = 200
SEED = 0
GROWTH = 0.05
KINDS = {"generate": 30, "invalid": 20, "cancel": 8, "disconnect": 8, "plan": 12, "status": 10, "memory": 12}
# Bad settings, each with the field its error must name.
INVALID = [({"width": 7}, "width"), ({"steps": 0}, "steps"), ({"guidance": 99.0}, "guidance"),
           ({"prompt": ""}, "prompt"), ({"seed": -1}, "seed"), ({"preset": "warp"}, "preset")]
# prompt, negative, model, preset, vram_limit, width, height, steps, guidance, seed, frames,
# attention, compile, channels_last, cache
API_LONG = [PROMPT, "", MODEL, "dynamic", None, 32, 32, LONG, None, 1, None, "auto", False, False, "off"]
# One preset for every run, so the kept pipeline serves them all: reloads (and the heap they
# leave behind) are test_app_memory's subject, not this one's.
JOB = {**TINY_JOB, "preset": "dynamic"}


@pytest.fixture
def soak_server(tiny_family, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))
    server = AppServer(tmp_path / "app", tiny_family("sdxl"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _tree(root: Path, skip: tuple[Path, ...]) -> dict[str, str]:
    """Every file below ``root`` but those under ``skip``: path -> sha256."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _repo_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True).stdout


class Soaker:
    """One client: its own gradio_client session, and a raw one for disconnects."""

    def __init__(self, url: str, index: int):
        self.client = Client(url, verbose=False)
        self.raw = RawSession(url, self.client)
        self.index = index
        self.records: list[dict] = []

    def run(self, kind: str, n: int, rng: random.Random) -> dict:
        record = {"kind": kind, "n": n}
        try:
            record.update(getattr(self, kind)(n, rng))
        except Exception as error:  # noqa: BLE001 - an unexpected outcome, judged by the test
            record.update(outcome="unexpected", error=f"{type(error).__name__}: {error}")
        self.records.append(record)
        return record

    def generate(self, n, rng):
        image, summary = self.client.predict(prompt=PROMPT, **{**JOB, "seed": n}, api_name="/generate")
        assert Path(image).is_file() and summary["state"] == "done", summary
        return {"outcome": "image", "job": summary["job"], "file": Path(image).name}

    def invalid(self, n, rng):
        change, field = INVALID[n % len(INVALID)]
        settings = {"prompt": PROMPT, **JOB, **change}
        try:
            self.client.predict(**settings, api_name="/generate")
        except AppError as error:
            assert field in str(error), f"{change}: the error does not name {field!r}: {error}"
            return {"outcome": "clear error", "field": field}
        raise AssertionError(f"{change} was accepted")

    def cancel(self, n, rng):
        job = self.client.submit(prompt=PROMPT, **{**JOB, "steps": LONG, "seed": n}, api_name="/generate")

        def mine_running():
            yours = self.client.predict(api_name="/status")["yours"]
            return yours[-1] if yours and yours[-1]["state"] == "running" and yours[-1]["step"] >= 1 else None
        running = wait_until(mine_running, timeout=120, what="the run to cancel to start")
        job.cancel()
        ended = wait_until(lambda: (lambda y: y if y["state"] not in ("queued", "loading", "running") else None)(
            self.client.predict(api_name="/status")["yours"][-1]), timeout=60, what="the cancelled run to stop")
        assert ended["job"] == running["job"] and ended["state"] == "cancelled", ended
        return {"outcome": "cancelled", "job": ended["job"]}

    def disconnect(self, n, rng):
        self.raw.leave_at_step("generate", API_LONG, step=2)

        def ended():
            yours = self.raw.call("status")[0]["yours"]
            return yours[-1] if yours and yours[-1]["state"] not in ("queued", "loading", "running") else None
        job = wait_until(ended, timeout=60, what="the abandoned run to stop")
        assert job["state"] == "cancelled", job
        return {"outcome": "cancelled", "job": job["job"]}

    def plan(self, n, rng):
        plan = self.client.predict(model=MODEL, width=64, height=64, api_name="/plan")
        assert plan["preset"]
        return {"outcome": "answered"}

    def status(self, n, rng):
        assert "running" in self.client.predict(api_name="/status")
        return {"outcome": "answered"}

    def memory(self, n, rng):
        assert self.client.predict(seconds=1, api_name="/memory")["samples"]
        return {"outcome": "answered"}


def test_soak_under_mixed_load(soak_server, tmp_path):
    server = soak_server
    rng = random.Random(SEED)
    plan = rng.choices(list(KINDS), weights=list(KINDS.values()), k=REQUESTS)
    soakers = [Soaker(server.url, i) for i in range(CLIENTS)]
    # Warm-up: every client's first generation and one request of every other kind (the two
    # presets the mix switches between loaded once each), then the baseline.
    # The runner keeps its last 64 jobs (ui/jobs.py): warm-up fills that history first, so what
    # the soak may not grow is everything else.
    warm = 64 // CLIENTS

    def warm_up(soaker):
        for k in range(warm):
            soaker.generate(10_000 + soaker.index * warm + k, rng)
    threads = [threading.Thread(target=warm_up, args=(s,), daemon=True) for s in soakers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for kind, soaker in zip(("cancel", "disconnect", "plan", "status", "memory"), soakers * 2):
        getattr(soaker, kind)(20_000, rng)
    soakers[0].generate(10_100, rng)
    wait_until(lambda: soakers[0].client.predict(api_name="/status")["running"] is None, timeout=60,
               what="the warm-up to drain")
    baseline_rss = server.rss()
    watched = (server.outputs, server.log_path, tmp_path / "gradio-cache")
    files_before = _tree(tmp_path, skip=watched)
    repo_before = _repo_status()

    work = {i: [(n, kind) for n, kind in enumerate(plan) if n % CLIENTS == i] for i in range(CLIENTS)}
    errors: list[str] = []

    def client_loop(soaker: Soaker):
        own = random.Random(SEED + 1 + soaker.index)
        for n, kind in work[soaker.index]:
            soaker.run(kind, n, own)

    threads = [threading.Thread(target=client_loop, args=(s,), daemon=True) for s in soakers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
        if thread.is_alive():
            errors.append(f"{thread.name} still running after 10 minutes")
    records = [r for s in soakers for r in s.records]

    # Every request ended, in an image or a clear error (cancels end cancelled).
    assert not errors, errors
    assert len(records) == REQUESTS
    unexpected = [r for r in records if r["outcome"] == "unexpected"]
    assert not unexpected, unexpected[:5]
    expected = {"generate": "image", "invalid": "clear error", "cancel": "cancelled", "disconnect": "cancelled",
                "plan": "answered", "status": "answered", "memory": "answered"}
    assert all(r["outcome"] == expected[r["kind"]] for r in records)

    # No job lost or run twice: every job id once, one image per generation, nothing else drawn.
    jobs = [r["job"] for r in records if "job" in r]
    assert len(jobs) == len(set(jobs))
    images = sorted(p.name for p in server.outputs.rglob("*.png"))
    made = [r["file"] for r in records if r["outcome"] == "image"]
    assert set(made) <= set(images) and len(images) == len(made) + warm * CLIENTS + 1  # + the warm-up's

    # Memory back to where it was after warm-up; nothing written outside outputs/.
    wait_until(lambda: soakers[0].client.predict(api_name="/status")["running"] is None, timeout=60,
               what="the queue to drain")
    grown = server.rss() - baseline_rss
    assert grown < GROWTH * baseline_rss, f"RSS grew {grown / 2**20:.1f} MiB over {baseline_rss / 2**20:.1f} MiB"
    assert _tree(tmp_path, skip=watched) == files_before
    assert _repo_status() == repo_before

    counts = Counter((r["kind"], r["outcome"]) for r in records)
    print(f"soak: {REQUESTS} requests by {CLIENTS} clients: "
          + ", ".join(f"{kind} -> {outcome}: {count}" for (kind, outcome), count in sorted(counts.items()))
          + f"; RSS {baseline_rss / 2**20:.1f} MiB after warm-up, {(baseline_rss + grown) / 2**20:.1f} MiB after")
