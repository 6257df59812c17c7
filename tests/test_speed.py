"""Speed settings (pipelines/speed.py) on the managed models: each one on the tiny families and
the built-in model under ``basic`` and a streaming preset, against diffusers' own pipeline
with the same setting; compiled blocks without graph breaks; bad values refused by field."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import diffusers
import vram
from families import tiny_call_kwargs
from pipelines import DEFAULT_MODEL, GenerationRequest, RequestError, get_family, load_pipeline, speed
from pipelines.generate import main as cli_main
from pipelines.tiny import MODEL_DIR
from presets import preset_configs
from presets.footprint import footprint
from presets.planner import COMPILE_RAM_BYTES, Job, predict
from test_pipelines import PROMPT

BUILTIN = "builtin"
BUILTIN_PROMPT = "a small red circle on a blue background, top left"
STREAMING = "disk"              # vram_limit=0: every layer streamed from the files
# Caches decide step by step, so they need more than the tiny runs' 2 steps to skip anything.
CACHE_STEPS = 6
# Compiled blocks (inductor fuses kernels, so float32 sums round apart): the largest pixel
# difference from diffusers' eager pipeline, images in [0, 1]. Measured up to 8e-7.
COMPILE_TOLERANCE = 1e-5


def folder_of(name: str, tiny_family):
    return MODEL_DIR if name == BUILTIN else tiny_family(name)


def job(name: str, steps: int | None = None) -> tuple[GenerationRequest, dict, dict]:
    """(request, pipeline kwargs left over, diffusers' call arguments) of one small run."""
    if name == BUILTIN:
        d = get_family(DEFAULT_MODEL).defaults
        steps = steps or 4
        request = GenerationRequest(prompt=BUILTIN_PROMPT, steps=steps, seed=0)
        call = dict(prompt=BUILTIN_PROMPT, num_inference_steps=steps, guidance_scale=d["guidance"], output_type="np")
        return request, {}, call
    kw = dict(tiny_call_kwargs(name), num_inference_steps=steps or 2)
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt=kw.get("negative_prompt", ""), width=kw["width"], height=kw["height"],
        steps=kw["num_inference_steps"], guidance=kw.get("guidance_scale", kw.get("true_cfg_scale")), seed=0,
        frames=kw.get("num_frames"))
    extra = {k: v for k, v in kw.items() if k == "max_sequence_length"}
    return request, extra, dict(prompt=PROMPT, **kw)


def pixels(name: str, output) -> np.ndarray:
    if hasattr(output, "summary"):  # a pipelines.Result
        return output.videos if output.videos is not None else output.images
    return np.asarray(output.frames if name == "wan" else output.images, np.float32)


def denoisers(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "unet", None)) if m is not None]


def diffusers_run(name: str, folder, setting=None, steps: int | None = None) -> np.ndarray:
    """diffusers' own pipeline on the same files, with ``setting(pipe)`` applied first. Its
    weights are copied out of the memory map, as in test_pipelines.reference."""
    pipeline_class = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    pipe = pipeline_class.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for param in component.parameters():
                param.data = param.data.clone()
    if setting is not None:
        setting(pipe)
    _, _, call = job(name, steps)
    with torch.inference_mode():  # as the managed pipeline runs it (compiled graphs are then alike)
        out = pipe(generator=torch.Generator().manual_seed(0), **call)
    return pixels(name, out)


def managed_run(name: str, folder, preset: str, steps: int | None = None, **settings):
    request, extra, _ = job(name, steps)
    with load_pipeline(folder, preset_configs(preset, vram_limit=0)) as pipe:
        return pipe.generate(request, pipeline_kwargs=extra, **settings)


# -- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["basic", STREAMING])
@pytest.mark.parametrize("name", ["flux", "qwen-image", "z-image", "wan"])
def test_an_attention_backend_equals_diffusers_with_it(tiny_family, name, preset):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    folder = tiny_family(name)
    default = _AttentionBackendRegistry.get_active_backend()[0]
    expected = diffusers_run(name, folder, lambda pipe: pipe.transformer.set_attention_backend("_native_math"))
    _AttentionBackendRegistry.set_active_backend(default)
    result = managed_run(name, folder, preset, attention="_native_math")
    assert np.array_equal(pixels(name, result), expected)
    assert result.summary.speed.attention == "_native_math"
    assert _AttentionBackendRegistry.get_active_backend()[0] == default  # nothing leaks process-wide


@pytest.mark.parametrize("name", ["sdxl", BUILTIN])
def test_auto_attention_is_native_on_the_cpu_and_a_unet_takes_native_only(tiny_family, name):
    folder = folder_of(name, tiny_family)
    request, extra, _ = job(name)
    with load_pipeline(folder, preset_configs("basic")) as pipe:
        result = pipe.generate(request, pipeline_kwargs=extra)
        assert result.summary.speed.attention == "native" and result.request.attention == "auto"
        assert np.array_equal(pixels(name, result), diffusers_run(name, folder))
        with pytest.raises(RequestError, match=r"^attention: .*UNet2DConditionModel calls torch's"):
            pipe.generate(request, pipeline_kwargs=extra, attention="_native_math")


# -- channels_last -----------------------------------------------------------------------------

def _channels_last(pipe) -> None:
    for model in (*denoisers(pipe), pipe.vae):
        model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("preset", ["basic", STREAMING])
@pytest.mark.parametrize("name", ["sdxl", "flux", "z-image", BUILTIN])
def test_channels_last_equals_diffusers_with_channels_last_weights(tiny_family, name, preset):
    folder = folder_of(name, tiny_family)
    result = managed_run(name, folder, preset, channels_last=True)
    assert np.array_equal(pixels(name, result), diffusers_run(name, folder, _channels_last))
    assert result.summary.speed.channels_last and result.summary.speed.channels_last_convolutions > 0


@pytest.mark.parametrize("name", ["qwen-image", "wan"])
def test_channels_last_on_3d_vaes_reaches_their_2d_convolutions(tiny_family, name):
    # diffusers' model.to(memory_format=channels_last) refuses 5-D weights; the input hooks
    # reach the 2-D convolutions of these VAEs (their spatial resampling) all the same.
    folder = tiny_family(name)
    plain = pixels(name, managed_run(name, folder, STREAMING))
    result = managed_run(name, folder, STREAMING, channels_last=True)
    assert result.summary.speed.channels_last_convolutions > 0
    assert np.abs(pixels(name, result) - plain).max() < 1e-5


# -- step caches -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["basic", STREAMING])
@pytest.mark.parametrize("name, cache", [("flux", "first_block:0.5"), ("flux", "mag:0.5"), ("flux", "taylorseer:2"),
                                         ("qwen-image", "first_block:0.5"), ("qwen-image", "taylorseer:2"),
                                         ("wan", "first_block:0.5")])
def test_a_step_cache_equals_diffusers_with_it(tiny_family, name, cache, preset):
    folder = tiny_family(name)

    def enable(pipe):
        pipe.transformer.enable_cache(speed.cache_config(cache, pipe.transformer, CACHE_STEPS, torch.float32))
    result = managed_run(name, folder, preset, steps=CACHE_STEPS, cache=cache)
    assert np.array_equal(pixels(name, result), diffusers_run(name, folder, enable, steps=CACHE_STEPS))
    assert result.summary.speed.cache == cache and result.summary.steps == CACHE_STEPS
    if cache.startswith("first_block"):  # the threshold is high: later steps were skipped
        assert not np.array_equal(pixels(name, result), diffusers_run(name, folder, steps=CACHE_STEPS))


def test_a_cache_is_off_again_after_its_run(tiny_family):
    folder = tiny_family("flux")
    request, extra, _ = job("flux", CACHE_STEPS)
    with load_pipeline(folder, preset_configs("basic")) as pipe:
        cached = pipe.generate(request, pipeline_kwargs=extra, cache="first_block:0.5")
        assert not pipe.pipe.transformer.is_cache_enabled
        plain = pipe.generate(request, pipeline_kwargs=extra)
        again = pipe.generate(request, pipeline_kwargs=extra, cache="first_block:0.5")
    assert np.array_equal(plain.images, diffusers_run("flux", folder, steps=CACHE_STEPS))
    assert np.array_equal(cached.images, again.images)  # a fresh cache state every run


# -- compile -----------------------------------------------------------------------------------

def _compile_blocks(pipe) -> None:
    for model in denoisers(pipe):
        model.compile_repeated_blocks()


@pytest.mark.parametrize("name, preset", [(BUILTIN, STREAMING), ("flux", "dynamic")])
def test_compiled_blocks_have_no_graph_breaks_and_match_diffusers_compiled(tiny_family, name, preset):
    torch._dynamo.reset()
    folder = folder_of(name, tiny_family)
    request, extra, _ = job(name)
    with load_pipeline(folder, preset_configs(preset, vram_limit=0)) as pipe:
        blocks = sum(len(speed._repeated_blocks(m)) for m in denoisers(pipe.pipe))
        first = pipe.generate(request, pipeline_kwargs=extra, compile=True)
        second = pipe.generate(request, pipeline_kwargs=extra, compile=True)
        eager = pipe.generate(request, pipeline_kwargs=extra)
        assert not any("forward" in vars(block) for m in denoisers(pipe.pipe) for block in speed._repeated_blocks(m))
    report = first.summary.speed
    assert report.compiled_blocks == blocks > 0 and report.eager_blocks == 0
    assert report.graph_breaks == 0 and report.graphs >= 1 and report.compile_seconds > 0
    assert second.summary.speed.graphs == 0 and second.summary.speed.graph_breaks == 0  # nothing recompiled
    assert not eager.summary.speed.compile
    compiled = diffusers_run(name, folder, _compile_blocks)
    assert np.abs(pixels(name, first) - compiled).max() <= COMPILE_TOLERANCE
    assert np.array_equal(pixels(name, first), pixels(name, second))
    assert np.array_equal(pixels(name, eager), diffusers_run(name, folder))


def test_blocks_streamed_leaf_by_leaf_stay_eager(tiny_family):
    folder = tiny_family("flux")
    request, extra, _ = job("flux")
    configs = {key: dataclasses.replace(config, granularity="leaf")
               for key, config in preset_configs("dynamic", vram_limit=0).items()}
    with load_pipeline(folder, configs) as pipe:
        result = pipe.generate(request, pipeline_kwargs=extra, compile=True)
    report = result.summary.speed
    assert report.compiled_blocks == 0 and report.eager_blocks == 2 and report.graph_breaks == 0
    assert np.array_equal(result.images, diffusers_run("flux", folder))


# -- together, under a cap ---------------------------------------------------------------------

@pytest.mark.standin
def test_the_cap_and_the_ledger_hold_with_every_setting(tiny_family):
    folder = tiny_family("flux")
    request, extra, _ = job("flux", CACHE_STEPS)
    manager = vram.get_manager()
    configs = preset_configs("dynamic", vram_limit=0.002)
    with load_pipeline(folder, configs) as pipe:
        baseline = sum(manager.ledger().values())
        plain = pipe.generate(request, pipeline_kwargs=extra)
        fast = pipe.generate(request, pipeline_kwargs=extra, attention="_native_math", compile=True,
                             channels_last=True, cache="first_block:0.05")
        assert sum(manager.ledger().values()) == baseline
    for result in (plain, fast):
        assert result.summary.within_cap is True
    assert fast.summary.speed.graph_breaks == 0 and fast.summary.speed.compiled_blocks == 2
    assert np.abs(fast.images - plain.images).max() < 0.05


# -- records -----------------------------------------------------------------------------------

def test_the_summary_and_the_png_record_the_settings(tmp_path, tiny_family):
    from PIL import Image
    result = managed_run("flux", tiny_family("flux"), "basic", channels_last=True, cache="first_block")
    report = result.summary.speed
    assert report.cache == "first_block:0.05" and report.attention == "native"  # diffusers' default threshold
    assert "channels_last on" in result.summary.describe() and "cache first_block:0.05" in result.summary.describe()
    assert result.summary.as_dict()["speed"]["channels_last"] is True
    (path,) = result.save(tmp_path / "fast.png")
    image = Image.open(path)
    recorded = json.loads(image.text["speed"])
    assert recorded == report.as_dict()
    settings = json.loads(image.text["parameters"])
    assert settings["cache"] == "first_block:0.05" and settings["channels_last"] is True
    assert settings["attention"] == "auto" and settings["speed"]["attention"] == "native"


def test_the_planner_counts_a_caches_states_and_the_compiler():
    family = get_family("flux.1-dev")
    sizes = footprint(family)
    plain = predict(family, sizes, Job(1024, 1024), "basic", on_gpu=True)
    cached = predict(family, sizes, Job(1024, 1024, cache="first_block:0.1"), "basic", on_gpu=True)
    taylor = predict(family, sizes, Job(1024, 1024, cache="taylorseer:5"), "basic", on_gpu=True)
    compiled = predict(family, sizes, Job(1024, 1024, compile=True), "basic", on_gpu=True)
    tokens, width = (1024 // 16) ** 2 + 512, 3072

    def denoising(prediction):
        return prediction.phases["denoising"]["vram"]
    assert denoising(cached) - denoising(plain) == 4 * tokens * width * 2  # four bf16 hidden states
    assert denoising(taylor) > denoising(cached) and cached.peak_vram_bytes > plain.peak_vram_bytes
    assert compiled.peak_ram_bytes - plain.peak_ram_bytes == COMPILE_RAM_BYTES
    assert compiled.peak_vram_bytes == plain.peak_vram_bytes


# -- bad values --------------------------------------------------------------------------------

@pytest.mark.parametrize("family, fields, message", [
    ("flux.1-dev", {"attention": "warp"}, r"^attention: unknown backend 'warp'"),
    ("flux.1-dev", {"attention": "flash_hub"}, r"^attention: 'flash_hub' downloads its kernel"),
    ("flux.1-dev", {"attention": 3}, r"^attention: must be a backend name"),
    ("flux.1-dev", {"cache": "first_block:-0.1"}, r"^cache: first_block's threshold must be a positive number, got -0.1"),
    ("flux.1-dev", {"cache": "mag:nan"}, r"^cache: mag's threshold must be a positive number"),
    ("flux.1-dev", {"cache": "taylorseer:2.5"}, r"^cache: taylorseer's cache_interval is a number of steps"),
    ("flux.1-dev", {"cache": "teacache"}, r"^cache: unknown cache 'teacache'; choose off, first_block"),
    (DEFAULT_MODEL, {"cache": "first_block"}, r"^cache: Built-in tiny model .* has no step cache in diffusers "
                                              r"\(UNet2DConditionModel has no CacheMixin\); caches run on .*FLUX.1-dev"),
    ("sdxl", {"cache": "taylorseer:3"}, r"^cache: Stable Diffusion XL .* has no step cache"),
    ("z-image-turbo", {"cache": "first_block"}, r"^cache: Z-Image-Turbo .* \(ZImageTransformer2DModel has no"),
    ("qwen-image", {"cache": "mag"}, r"^cache: mag needs magnitude ratios .* FLUX.1 only; Qwen-Image .* takes "
                                     r"first_block or taylorseer"),
    ("flux.1-dev", {"compile": "yes"}, r"^compile: must be true or false, got 'yes'"),
    ("flux.1-dev", {"channels_last": 1}, r"^channels_last: must be true or false, got 1"),
])
def test_bad_values_name_their_field(family, fields, message):
    with pytest.raises(RequestError, match=message):
        GenerationRequest(prompt="a fox", **fields).resolved(get_family(family))


def test_a_backend_this_machine_cannot_run_is_refused_before_the_run(tiny_family):
    if not speed._installed("flash"):
        with pytest.raises(RequestError, match=r"^attention: 'flash' needs the flash-attn package \(not installed\)"):
            GenerationRequest(prompt="a fox", attention="flash").resolved(get_family("flux.1-dev"))
    request, extra, _ = job("flux")
    with load_pipeline(tiny_family("flux"), preset_configs("basic")) as pipe:
        with pytest.raises(RequestError, match=r"^attention: '_native_cudnn' needs a CUDA device; this run computes on cpu"):
            pipe.generate(request, pipeline_kwargs=extra, attention="_native_cudnn")
        with pytest.raises(RequestError, match=r"^attention: '_native_flash' takes float16 or bfloat16 only"):
            pipe.generate(request, pipeline_kwargs=extra, attention="_native_flash")
        assert pipe.generate(request, pipeline_kwargs=extra).summary.speed.attention == "native"  # still usable


def test_the_command_line_takes_the_settings_and_refuses_bad_ones_before_loading(capsys):
    assert cli_main(["--prompt", "a fox", "--cache", "first_block:-1"]) == 2
    assert "error: cache: first_block's threshold must be a positive number" in capsys.readouterr().err
    assert cli_main(["--prompt", "a fox", "--attention", "warp", "--compile", "--channels-last"]) == 2
    assert "error: attention: unknown backend 'warp'" in capsys.readouterr().err


def test_the_app_forms_carry_the_settings():
    from ui.forms import JobInputs
    request = JobInputs(prompt="a fox", attention="native", compile=True, channels_last=None,
                        cache="mag:0.1").request()
    assert (request.attention, request.compile, request.channels_last, request.cache) == ("native", True, False,
                                                                                          "mag:0.1")
    with pytest.raises(RequestError, match=r"^compile: must be true or false"):
        JobInputs(prompt="a fox", compile="false").request()
    assert math.isclose(speed.cache_default(speed.CACHES["first_block"]), 0.05)


def test_a_graph_break_inside_a_block_is_counted(tiny_family):
    # What the tests above rely on: dynamo's counter sees a break in a compiled block's body.
    torch._dynamo.reset()
    request, extra, _ = job("flux")
    with load_pipeline(tiny_family("flux"), preset_configs("basic")) as pipe:
        block = pipe.pipe.transformer.transformer_blocks[0]
        block.attn.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
        report = pipe.generate(request, pipeline_kwargs=extra, compile=True).summary.speed
    assert report.compiled_blocks == 2 and report.graph_breaks >= 1
