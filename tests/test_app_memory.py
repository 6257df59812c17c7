"""The server's own memory over many runs: it does not creep, and a cancelled run gives its
memory back. Measured as the RSS of the ``python app.py`` process (psutil, by pid)."""

import pytest
from gradio_client.exceptions import AppError

from app_harness import TINY_JOB, wait_until

PROMPT = "a green square on a red background"
GROWTH = 0.05   # of the RSS


def generate(client, **change):
    return client.predict(prompt=PROMPT, **{**TINY_JOB, "preset": "dynamic", **change}, api_name="/generate")


def test_twenty_generations_in_a_row_do_not_grow_the_process(app_client, app_server):
    for seed in range(3):   # warm up: the pipeline loads, caches and allocator pools fill
        generate(app_client, seed=seed)
    baseline = app_server.rss()
    for seed in range(20):
        _, summary = generate(app_client, seed=100 + seed)
        assert summary["state"] == "done" and summary["pipeline_reused"]
    grown = app_server.rss() - baseline
    assert grown < GROWTH * baseline, f"RSS grew {grown / 2**20:.1f} MiB over {baseline / 2**20:.1f} MiB"


def test_a_cancelled_run_returns_memory_to_its_baseline(app_client, app_server):
    generate(app_client)
    baseline = app_server.rss()
    job = app_client.submit(prompt=PROMPT, **{**TINY_JOB, "preset": "dynamic", "steps": 1000}, api_name="/generate")
    wait_until(lambda: (app_client.predict(api_name="/status")["running"] or {}).get("step", 0) >= 3,
               timeout=120, what="the run to pass step 3")
    assert app_client.predict(api_name="/cancel")["cancelled"] == 1
    with pytest.raises(AppError, match="cancelled"):
        job.result(timeout=120)
    status = app_client.predict(api_name="/status")
    assert status["running"] is None and status["yours"][-1]["state"] == "cancelled"
    after = app_server.rss()
    assert after - baseline < GROWTH * baseline, \
        f"RSS {after / 2**20:.1f} MiB after the cancel, {baseline / 2**20:.1f} MiB before the run"
    _, summary = generate(app_client)   # and the next run is served, on the kept pipeline
    assert summary["state"] == "done" and summary["pipeline_reused"]
