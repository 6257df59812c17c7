"""The app as on a ZeroGPU Space: ``spaces.GPU`` runs each job's GPU part in a forked child
(tests/zerogpu/spaces is a stand-in that forks the same way). Progress, Cancel and errors
must cross the fork; the kept pipeline cannot, and the app must not claim it was reused."""

import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app_harness import MODEL, ROOT, TINY_JOB, AppServer, wait_until

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def zerogpu(tiny_family, tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("zerogpu"), tiny_family("sdxl"),
                       env={"PYTHONPATH": str(ROOT / "tests" / "zerogpu")})
    try:
        server.wait_ready()
        yield server, Client(server.url, verbose=False)
    finally:
        server.stop()


def test_progress_crosses_the_fork_and_nothing_claims_a_kept_pipeline(zerogpu):
    server, client = zerogpu
    path, summary = client.predict(prompt=PROMPT, preset="dynamic", **TINY_JOB, api_name="/generate")
    assert path.endswith(".png") and summary["state"] == "done"
    # The phases and steps the page shows were reported by the child, through the bridge.
    assert [p["phase"] for p in summary["phases"]] == ["loading", "text_encoding", "denoising", "vae_decoding"]
    assert summary["steps"] == 2 and set(summary["phase_seconds"]) == {"text_encoding", "denoising", "vae_decoding"}
    log = server.log(tail=400)
    children = {int(line.split(" runs in child ")[1].split()[0]) for line in log.splitlines()
                if line.startswith("spaces stand-in: ") and " runs in child " in line}
    assert children and server.pid not in children
    # The child's pipeline died with it: the next run loads again, and says so.
    _, again = client.predict(prompt=PROMPT, preset="dynamic", **TINY_JOB, api_name="/generate")
    assert again["state"] == "done" and again["pipeline_reused"] is False


def test_cancel_reaches_the_child(zerogpu):
    server, client = zerogpu
    job = client.submit(prompt=PROMPT, preset="dynamic", **{**TINY_JOB, "steps": 400}, api_name="/generate")
    def stepping():
        running = client.predict(api_name="/status")["running"]
        return running is not None and running["phase"] == "denoising" and running["step"] >= 1
    wait_until(stepping, 120, "the run to reach its steps (reported from the child)", interval=0.2)
    started = time.monotonic()
    client.predict(api_name="/cancel")
    with pytest.raises(AppError, match="cancelled"):
        job.result(timeout=60)
    assert time.monotonic() - started < 30
    # The queue moves on: the next job runs.
    _, summary = client.predict(prompt=PROMPT, preset="dynamic", **TINY_JOB, api_name="/generate")
    assert summary["state"] == "done"


def test_an_error_in_the_child_reaches_the_client(zerogpu, tmp_path):
    server, client = zerogpu
    weights = next((server.models / MODEL / "vae").glob("*.safetensors"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[: len(original) // 2])  # truncated after the plan was made
        with pytest.raises(AppError, match="(?i)truncated|incomplete|corrupt|safetensors"):
            client.predict(prompt=PROMPT, preset="dynamic", **TINY_JOB, api_name="/generate")
    finally:
        weights.write_bytes(original)
    _, summary = client.predict(prompt=PROMPT, preset="dynamic", **TINY_JOB, api_name="/generate")
    assert summary["state"] == "done"

