"""The app through its API, as a client sees it: ``python app.py`` in a subprocess, driven
by ``gradio_client``. Every preset generates; compare and plan answer; every bad input is
refused with a message naming the field, and the server keeps serving."""

import json

import numpy as np
import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from app_harness import MODEL, TINY_JOB, wait_until
from presets import list_presets

PROMPT = "a red circle on a blue background"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def test_the_api_lists_its_named_endpoints(app_client):
    endpoints = app_client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/generate", "/compare", "/plan", "/status", "/memory", "/hardware", "/models", "/cancel"):
        assert name in endpoints, name
    generate = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    assert generate[:10] == ["prompt", "negative_prompt", "model", "preset", "vram_limit", "width", "height", "steps",
                             "guidance", "seed"]
    required = [p["parameter_name"] for p in endpoints["/generate"]["parameters"] if not p["parameter_has_default"]]
    assert required == ["prompt"]


def test_generate_under_every_preset(app_client):
    images = {}
    for preset in ["auto"] + list_presets():
        path, summary = app_client.predict(prompt=PROMPT, preset=preset, **TINY_JOB, api_name="/generate")
        assert summary["state"] == "done" and summary["model"] == MODEL and summary["steps"] == 2
        assert summary["preset"] == preset or preset == "auto", summary
        assert summary["peak_ram_bytes"] > 0 and summary["predicted_peak_ram_bytes"] > 0
        assert set(summary["phase_seconds"]) == {"text_encoding", "denoising", "vae_decoding"}
        assert [p["phase"] for p in summary["phases"]] == ["loading", "text_encoding", "denoising", "vae_decoding"]
        assert summary["request"]["seed"] == 1 and summary["timeline_csv"].endswith(".csv")
        images[preset] = pixels(path)
        assert images[preset].shape == (32, 32, 3)
    # Same seed, same computation dtype: every preset but fp8 storage draws the same image.
    for preset in ("cpu_offload", "dynamic", "disk"):
        assert np.array_equal(images[preset], images["basic"]), preset
    assert np.abs(images["fp8_offload"] - images["basic"]).max() <= 0.06


def test_the_loaded_pipeline_is_kept_between_runs(app_client):
    app_client.predict(prompt=PROMPT, preset="dynamic", **TINY_JOB, api_name="/generate")
    _, again = app_client.predict(prompt=PROMPT, preset="dynamic", **TINY_JOB, api_name="/generate")
    assert again["pipeline_reused"] is True
    _, other = app_client.predict(prompt=PROMPT, preset="disk", **TINY_JOB, api_name="/generate")
    assert other["pipeline_reused"] is False


def test_compare_runs_each_preset_with_one_seed(app_client):
    rows, gallery = app_client.predict(prompt=PROMPT, presets=["basic", "disk"], model=MODEL, width=32, height=32,
                                       steps=2, api_name="/compare")
    assert [r["preset_asked"] for r in rows] == ["basic", "disk"]
    assert all(r["state"] == "done" and r["preset"] == r["preset_asked"] for r in rows)
    assert rows[0]["request"]["seed"] == rows[1]["request"]["seed"]
    assert [item["caption"] for item in gallery] == ["basic", "disk"]
    assert np.array_equal(pixels(gallery[0]["image"]), pixels(gallery[1]["image"]))


def test_plan_explains_and_predicts_every_preset(app_client):
    plan = app_client.predict(model=MODEL, width=64, height=64, api_name="/plan")
    assert plan["preset_asked"] == "auto" and plan["preset"] in list_presets()
    assert any(line.startswith("-> ") for line in plan["explanation"])
    assert set(list_presets()) <= set(plan["predictions"])
    assert all(p["peak_ram_bytes"] > 0 for p in plan["predictions"].values())
    assert set(plan["configs"]) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert {"offload_device", "onload_dtype", "preparing_device", "computation_dtype"} <= set(plan["configs"]["unet"])
    named = app_client.predict(model=MODEL, preset="disk", vram_limit=0.5, api_name="/plan")
    assert named["preset"] == "disk" and named["vram_limit_gib"] == 0.5
    assert named["configs"]["unet"]["offload_device"] == "disk"


def test_models_hardware_and_memory(app_client):
    models = app_client.predict(api_name="/models")
    assert models[0]["name"] == MODEL and models[0]["local"]       # the server's --model comes first
    assert any(m["name"] == "flux.1-dev" for m in models)
    hardware = app_client.predict(api_name="/hardware")
    assert hardware["ram_total_bytes"] > 0 and "gpu_status" in hardware
    memory = app_client.predict(seconds=5, api_name="/memory")
    assert memory["samples"] and all(s["rss_bytes"] > 0 for s in memory["samples"])
    assert all(-5.5 <= s["seconds"] <= 0 for s in memory["samples"])


BAD_INPUTS = [
    ({"vram_limit": -1}, "vram_limit: must be a finite number"),
    # JSON has no NaN or infinity: clients send them as text, which a number field parses.
    ({"vram_limit": "nan"}, "vram_limit: must be a finite number"),
    ({"vram_limit": "inf"}, "vram_limit: must be a finite number"),
    ({"vram_limit": 1e6}, "vram_limit: 1e+06 GiB is above"),
    ({"width": 33}, "width: 33 is not a multiple of 8"),
    ({"height": 100}, "height: 100 is not a multiple of 8"),
    ({"width": 8192}, "width: 8192 is above 2048"),
    ({"steps": 0}, "steps: must be a whole number from 1 to 1000"),
    ({"steps": 10**6}, "steps: must be a whole number from 1 to 1000"),
    ({"steps": 2.5}, "steps: must be a whole number"),
    ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
    ({"model": "../../etc"}, "is outside the models directory"),
    ({"model": "/etc"}, "is outside the models directory"),
    ({"preset": "turbo"}, "unknown preset 'turbo'"),
    ({"prompt": ""}, "prompt: empty"),
    ({"prompt": "   "}, "prompt: empty"),
    ({"prompt": "x" * 20_000}, "prompt: 20000 characters; at most 10000"),
    ({"guidance": "inf"}, "guidance: must be a finite number"),
    ({"guidance": "nan"}, "guidance: must be a finite number"),
    ({"guidance": "-inf"}, "guidance: must be a finite number"),
    ({"seed": -1}, "seed: must be a whole number from 0"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS, ids=[json.dumps(c)[:40] for c, _ in BAD_INPUTS])
def test_bad_input_is_refused_with_a_clear_message(app_client, change, message):
    job = {"prompt": PROMPT, **TINY_JOB, **change}
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace("+", r"\+")):
        app_client.predict(**job, api_name="/generate")


def test_bad_input_to_plan_and_compare_is_refused_too(app_client):
    with pytest.raises(AppError, match="outside the models directory"):
        app_client.predict(model="../secrets", api_name="/plan")
    with pytest.raises(AppError, match="unknown preset 'nope'"):
        app_client.predict(prompt=PROMPT, presets=["basic", "nope"], **TINY_JOB, api_name="/compare")
    with pytest.raises(AppError, match="Pick at least one preset"):
        app_client.predict(prompt=PROMPT, presets=[], **TINY_JOB, api_name="/compare")


def test_after_bad_input_a_good_request_is_served(app_client, app_server):
    for change, _ in BAD_INPUTS[:3]:
        with pytest.raises(AppError):
            app_client.predict(prompt=PROMPT, **{**TINY_JOB, **change}, api_name="/generate")
    path, summary = app_client.predict(prompt=PROMPT, **TINY_JOB, api_name="/generate")
    assert summary["state"] == "done" and pixels(path).shape == (32, 32, 3)
    assert app_server.process.poll() is None


def test_plan_and_memory_answer_while_a_generation_runs(app_client):
    """Reads do not wait behind the GPU queue: they answer while a long run is going on."""
    job = app_client.submit(prompt=PROMPT, **{**TINY_JOB, "steps": 1000}, api_name="/generate")
    running = wait_until(lambda: (app_client.predict(api_name="/status")["running"] or {}).get("step", 0) >= 2,
                         timeout=120, what="the long run to pass step 2")
    assert running
    plan = app_client.predict(model=MODEL, api_name="/plan")
    memory = app_client.predict(seconds=2, api_name="/memory")
    status = app_client.predict(api_name="/status")
    assert plan["preset"] and memory["samples"]
    assert status["running"] is not None and status["running"]["step"] < 1000  # still running when they answered
    assert app_client.predict(api_name="/cancel")["cancelled"] == 1
    with pytest.raises(AppError, match="cancelled"):
        job.result(timeout=120)


def test_gpu_work_waits_in_one_queue_and_sees_its_place(app_server, app_client):
    from gradio_client import Client
    from gradio_client.utils import Status
    other = Client(app_server.url, verbose=False)              # a second user
    first = app_client.submit(prompt=PROMPT, **{**TINY_JOB, "steps": 1000}, api_name="/generate")
    wait_until(lambda: (app_client.predict(api_name="/status")["running"] or {}).get("step", 0) >= 1,
               timeout=120, what="the first run to start")
    second = other.submit(prompt=PROMPT, **TINY_JOB, api_name="/generate")
    waiting = wait_until(lambda: (lambda s: s if s.code == Status.IN_QUEUE and s.rank is not None else None)(
        second.status()), timeout=60, what="the second request to be queued")
    assert waiting.rank == 0                                   # next in line, told so
    assert app_client.predict(api_name="/status")["running"]["step"] < 1000
    app_client.predict(api_name="/cancel")
    with pytest.raises(AppError, match="cancelled"):
        first.result(timeout=120)
    _, summary = second.result(timeout=120)
    assert summary["state"] == "done"
