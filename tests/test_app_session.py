"""What the app stands on in presets/: the pipeline cache (load once, generate many), the
fallback's loader, and the session that checks what users type and plans every preset."""

import dataclasses
import json
import shutil

import pytest
import torch

from pipelines import Cancelled, GenerationRequest, RequestError, load_pipeline
from presets import list_presets, preset_configs
from presets.cache import PipelineCache
from presets.fallback import generate_with_fallback
from presets.probe import GPU, Hardware
from presets.session import AUTO, CUSTOM, Session

G = 1024**3
JOB = dict(prompt="a red circle", width=32, height=32, steps=2, seed=1)


@pytest.fixture
def models(tiny_family, tmp_path):
    """A models folder holding the tiny SDXL pipeline as the local model ``tiny-sdxl``."""
    shutil.copytree(tiny_family("sdxl"), tmp_path / "tiny-sdxl")
    return tmp_path


@pytest.fixture
def session(models, tmp_path):
    from presets.planner import Calibration
    session = Session(models, calibration=Calibration(tmp_path / "calibration.json"))
    yield session
    session.close()


class CountingLoads:
    def __init__(self):
        self.loaded = []

    def __call__(self, model, configs, **options):
        pipe = load_pipeline(model, configs, **options)
        self.loaded.append(pipe)
        return pipe


# -- the cache ------------------------------------------------------------------------------

def test_the_cache_loads_once_and_reloads_when_configs_change(models):
    loads = CountingLoads()
    cache = PipelineCache(load=loads)
    folder = str(models / "tiny-sdxl")
    basic = preset_configs("basic")
    first = cache.acquire(folder, basic)
    cache.release(first, None)
    assert cache.acquire(folder, preset_configs("basic")) is first and cache.hits == 1
    assert cache.holds(folder, basic) and not cache.holds(folder, preset_configs("disk", vram_limit=0))
    cache.release(first, None)
    second = cache.acquire(folder, preset_configs("disk", vram_limit=0))
    assert second is not first and first.pipe is None      # the old one was closed first
    assert cache.loads == 2 and len(loads.loaded) == 2
    cache.close()
    assert second.pipe is None and cache.info is None


def test_the_cache_closes_after_running_out_of_memory_and_keeps_after_a_cancel(models):
    cache = PipelineCache()
    folder = str(models / "tiny-sdxl")
    pipe = cache.acquire(folder, preset_configs("basic"))
    cache.release(pipe, Cancelled("cancelled by the user"))
    assert pipe.pipe is not None and cache.info.runs == 1
    cache.release(pipe, torch.OutOfMemoryError("CUDA out of memory"))
    assert pipe.pipe is None and cache.info is None


def test_the_fallback_frees_the_pipeline_before_its_retry(models):
    request = GenerationRequest(**JOB)
    loads = CountingLoads()
    cache = PipelineCache(load=loads)
    raised = []

    def oom_once(event):
        if event.kind == "step" and not raised:
            raised.append(event)
            raise torch.OutOfMemoryError("simulated")
    outcome = generate_with_fallback(str(models / "tiny-sdxl"), request, "basic", on_event=oom_once, loader=cache)
    assert outcome.preset == "cpu_offload" and cache.loads == 2
    assert loads.loaded[0].pipe is None                          # the one that ran out was closed
    assert cache.info is not None and cache.info.runs == 1       # the retry's pipeline is kept
    again = generate_with_fallback(str(models / "tiny-sdxl"), request, "cpu_offload", loader=cache)
    assert again.result.summary.steps == 2 and cache.loads == 2   # reused


# -- the session: models, checks, plans ------------------------------------------------------

def test_models_are_registry_keys_or_folders_inside_the_models_directory(session, models):
    assert session.resolve_model("tiny-sdxl").local
    assert session.resolve_model(str(models / "tiny-sdxl")).name == "tiny-sdxl"   # its full path, inside
    assert not session.resolve_model("flux.1-dev").local
    assert "tiny-sdxl" in [c.name for c in session.models()]
    for outside in ("../tiny-sdxl", "tiny-sdxl/../../etc", "/etc", str(models.parent)):
        with pytest.raises(RequestError, match="outside the models directory"):
            session.resolve_model(outside)
    for unknown in ("nope", "tiny-sdxl/unet"):
        with pytest.raises(RequestError, match="unknown model"):
            session.resolve_model(unknown)
    with pytest.raises(RequestError, match="model: empty"):
        session.resolve_model("  ")


def test_vram_limit_is_checked_against_the_card():
    card = Hardware((GPU(0, "RTX 4070", 12 * G, 11 * G),), "ok", 64 * G, 60 * G, None, None)
    assert Session.check_vram_limit(11.5, card) == 11.5 and Session.check_vram_limit(None, card) is None
    with pytest.raises(RequestError, match="above the GPU's memory"):
        Session.check_vram_limit(12.5, card)
    cpu = dataclasses.replace(card, gpus=())
    with pytest.raises(RequestError, match="above this machine's RAM"):
        Session.check_vram_limit(65, cpu)
    for bad in (-0.5, float("nan"), float("inf"), True, "4"):
        with pytest.raises(RequestError, match="vram_limit: must be a finite number"):
            Session.check_vram_limit(bad, card)


def test_a_plan_names_the_preset_and_predicts_every_one(session):
    plan = session.plan("tiny-sdxl", GenerationRequest(**JOB))
    assert plan.preset_asked == AUTO and plan.preset in list_presets()
    assert set(list_presets()) <= set(plan.predictions) and plan.prediction is plan.predictions[plan.preset]
    assert plan.describe().splitlines()[-1].startswith("-> ")
    named = session.plan("tiny-sdxl", GenerationRequest(**JOB), preset="disk", vram_limit=0.25)
    assert named.preset == "disk" and named.vram_limit == 0.25 and "you chose disk" in named.describe()
    configs = session.configs_for(named)
    assert set(configs) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert configs["unet"]["offload_device"] == "disk" and configs["unet"]["vram_limit"] == 0.25
    with pytest.raises(RequestError, match="unknown preset"):
        session.plan("tiny-sdxl", GenerationRequest(**JOB), preset="fast")


def test_a_job_too_big_for_this_machine_is_refused(session, monkeypatch):
    import presets.session as module
    small = Hardware((), "no NVIDIA GPU", 2 * G, 1 * G, None, None)
    monkeypatch.setattr(module, "usable_hardware", lambda *args, **kwargs: small)
    session.plan("tiny-sdxl", GenerationRequest(**JOB))                       # 32 px fits
    with pytest.raises(RequestError, match=r"width/height: 2048x2048 needs about .* GiB of RAM even under the "
                                           r"disk preset.*or turn on VAE tiling"):
        session.plan("tiny-sdxl", GenerationRequest(**{**JOB, "width": 2048, "height": 2048}))


def test_custom_configs_are_checked_planned_and_run(session):
    plan = session.plan("tiny-sdxl", GenerationRequest(**JOB), preset="disk", vram_limit=0)
    configs = session.configs_for(plan)
    custom = session.plan("tiny-sdxl", GenerationRequest(**JOB), preset=CUSTOM, configs=json.dumps(configs))
    assert custom.preset == CUSTOM and CUSTOM in custom.predictions
    outcome = session.generate(session.prepare(custom))
    assert outcome.preset == CUSTOM and outcome.result.summary.steps == 2 and outcome.loaded
    for bad, message in (("{not json", "not valid JSON"), ("{}", "give an object of configs"),
                         (json.dumps({"unett": configs["unet"]}), "unknown key"),
                         (json.dumps({"default": {"offload_device": "moon"}}), "configs:")):
        with pytest.raises(RequestError, match=message):
            session.plan("tiny-sdxl", GenerationRequest(**JOB), preset=CUSTOM, configs=bad)
    with pytest.raises(RequestError, match="'custom' needs your configs"):
        session.plan("tiny-sdxl", GenerationRequest(**JOB), preset=CUSTOM)


def test_runs_reuse_the_pipeline_and_prepare_rebases_the_prediction(session):
    plan = session.plan("tiny-sdxl", GenerationRequest(**JOB), preset="basic")
    first = session.generate(session.prepare(plan))
    assert first.loaded and first.preset == "basic" and session.cache.loads == 1
    again = session.prepare(plan)
    # Reused: the weights already in the RSS leave the baseline the prediction stands on.
    # (A loaded pipeline also holds objects besides its weights: tens of KB here, against
    # 0.86 MB of weights; a baseline counting the weights again would grow by all of them.)
    weights = again.prediction.parts["weights_in_ram"]
    assert weights > 0 and again.run_plan.baseline_ram <= plan.run_plan.baseline_ram + weights // 2
    second = session.generate(again)
    assert not second.loaded and session.cache.loads == 1
    other = session.prepare(session.plan("tiny-sdxl", GenerationRequest(**JOB), preset="disk", vram_limit=0))
    assert session.cache.info is None      # prepare closed the pipeline the next run will not reuse
    assert session.generate(other).loaded and session.cache.loads == 2
    assert session.unload() and not session.unload()


def test_a_symlink_out_of_the_models_directory_and_absurd_names_are_refused(session, models, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(models / "tiny-sdxl", elsewhere / "model")
    (models / "linked").symlink_to(elsewhere / "model", target_is_directory=True)
    with pytest.raises(RequestError, match="leads outside the models directory"):
        session.resolve_model("linked")
    assert "linked" not in [c.name for c in session.models()]
    with pytest.raises(RequestError, match="is not a model"):
        session.resolve_model("a" * 5000)


def test_derived_caps_ignore_small_drift():
    from presets.tree import cap_from_free
    assert cap_from_free(int(8.3 * G)) == cap_from_free(int(8.3 * G) - 4096) == 7.75
    assert cap_from_free(0) == 0.0


def test_the_kept_pipeline_counts_as_free_when_planning(session, monkeypatch):
    # A kept pipeline's weights are reused or released before the next run: the tree must not
    # see them as used, or it steps down, closes the pipeline, and steps back up next time.
    plan = session.plan("tiny-sdxl", GenerationRequest(**JOB), preset="basic")
    session.generate(session.prepare(plan))
    held = {"cuda:0": 3 * G, "cpu": 200 * 2**20}
    monkeypatch.setattr("vram.stats", lambda: {"devices": {d: {"resident_bytes": b} for d, b in held.items()}})
    card = Hardware((GPU(0, "RTX 4070", 12 * G, 8 * G),), "ok", 64 * G, 60 * G, None, None)
    adjusted, host = session._without_kept_pipeline(card)
    assert adjusted.gpus[0].free_bytes == 11 * G and host == 200 * 2**20
    session.unload()
    assert session._without_kept_pipeline(card) == (card, 0)
