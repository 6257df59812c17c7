"""Every family, loaded from its real folder layout through the real loading code, generates
under every preset exactly what diffusers' own pipeline generates on the same weights."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusers
import vram
from families import FAMILIES, tiny_call_kwargs
from pipelines import Cancelled, GenerationRequest, load_pipeline
from presets import list_presets, preset_configs

pytestmark = pytest.mark.standin  # each test runs on the CPU and on the stand-in accelerator

PROMPT = "a red circle on a blue background"
# fp8 storage of every text-encoder and denoiser weight, on random tiny models: the largest
# pixel difference from the bf16/fp32 pipeline, images in [0, 1]. Measured 0.00003-0.029 with
# fp8 scaled per tensor (0.008-0.040 with a plain cast, when the bound was 0.06).
FP8_TOLERANCE = 0.04


def request_for(name: str) -> tuple[GenerationRequest, dict]:
    """The tiny run of families.py as a request, and the pipeline arguments it leaves over."""
    kw = tiny_call_kwargs(name)
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt=kw.get("negative_prompt", ""), width=kw["width"], height=kw["height"],
        steps=kw["num_inference_steps"], guidance=kw.get("guidance_scale", kw.get("true_cfg_scale")),
        seed=0, frames=kw.get("num_frames"))
    extra = {k: v for k, v in kw.items() if k == "max_sequence_length"}
    return request, extra


_references: dict = {}


def reference(folder: Path, name: str, dtype: torch.dtype) -> np.ndarray:
    """diffusers' own pipeline on the same files. Its weights are copied out of the memory map
    first: torch's CPU kernels may round differently on weights that are not 64-byte aligned
    (as tensors inside a mapped .safetensors file mostly are), and the core's are aligned."""
    key = (name, dtype)
    if key not in _references:
        pipeline_class = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
        pipe = pipeline_class.from_pretrained(folder, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for param in component.parameters():
                    param.data = param.data.clone()
        out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs(name))
        _references[key] = np.asarray(getattr(out, "frames", None) if name == "wan" else out.images, np.float32)
    return _references[key]


def generate(folder: Path, name: str, configs, **fields):
    request, extra = request_for(name)
    with load_pipeline(folder, configs) as pipe:
        result = pipe.generate(request, pipeline_kwargs=extra, **fields)
    return result


@pytest.mark.parametrize("preset", list_presets())
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_under_every_preset_equals_diffusers(tiny_family, name, preset):
    folder = tiny_family(name)
    # vram_limit 0: the layer-level presets stream every layer, the hardest path.
    result = generate(folder, name, preset_configs(preset, vram_limit=0))
    output = result.videos if name == "wan" else result.images
    expected = reference(folder, name, torch.float32)
    assert output.shape == expected.shape and np.isfinite(output).all()
    if preset.startswith("fp8"):
        assert np.abs(output - expected).max() <= FP8_TOLERANCE
        assert not np.array_equal(output, expected)  # fp8 really was used
    else:
        assert np.array_equal(output, expected)
    assert result.summary.steps == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_mirrors_from_pretrained_dtypes(tiny_family, name):
    # Buffers built in __init__, float32-kept modules (Wan's time embedder, T5's wo under fp16)
    # and the checks pipelines make on dtypes all follow from_pretrained(torch_dtype=bf16).
    folder = tiny_family(name)
    for preset in ("basic", "disk"):
        result = generate(folder, name, preset_configs(preset, vram_limit=0, dtype="bfloat16"))
        output = result.videos if name == "wan" else result.images
        assert np.array_equal(output, reference(folder, name, torch.bfloat16)), preset


def test_phases_run_in_order_with_only_their_models_onloaded(tiny_family):
    folder = tiny_family("flux")
    request, extra = request_for("flux")
    events, onloaded = [], []
    with load_pipeline(folder, preset_configs("cpu_offload")) as pipe:
        def on_event(event):
            events.append(event)
            if event.kind in ("phase_start", "step"):
                onloaded.append((event.phase, sorted(pipe._onloaded)))
        pipe.generate(request, pipeline_kwargs=extra, on_event=on_event)
        assert not pipe._onloaded  # everything offloaded after the run
    kinds = [(e.kind, e.phase) for e in events]
    assert kinds[0] == ("run_start", None) and kinds[-1] == ("run_end", None)
    assert [p for k, p in kinds if k == "phase_start"] == ["text_encoding", "denoising", "vae_decoding"]
    assert [(e.step, e.total) for e in events if e.kind == "step"] == [(1, 2), (2, 2)]
    times = [e.time for e in events]
    assert times == sorted(times)
    family = pipe.family
    for phase, names in onloaded:
        assert set(names) <= set(family.components_in(phase)), (phase, names)


def test_summary_and_settings(tiny_family, computation):
    folder = tiny_family("sdxl")
    result = generate(folder, "sdxl", preset_configs("disk", vram_limit=0))
    summary = result.summary
    assert set(summary.phase_seconds) == {"text_encoding", "denoising", "vae_decoding"}
    assert summary.seconds_per_step > 0 and summary.peak_ram_bytes > 0
    if computation == "standin":  # a device with an allocator of its own: its peak is measured
        assert summary.peak_vram_bytes > 0 and summary.device == "standin"
    else:
        assert summary.peak_vram_bytes is None and summary.device == "cpu"
    assert summary.bytes_read_from_disk > 0  # the disk tier read the denoiser's layers
    assert "peak RAM" in summary.describe()
    assert result.settings["seed"] == 0 and result.settings["model"] == "sdxl"
    assert result.settings["configs"]["unet"]["offload_device"] == "disk"


def test_cancel_between_steps_releases_memory(tiny_family):
    folder = tiny_family("z-image")
    request, extra = request_for("z-image")
    manager = vram.get_manager()
    with load_pipeline(folder, preset_configs("cpu_offload")) as pipe:
        baseline = sum(manager.ledger().values())
        cancel = threading.Event()

        def on_event(event):
            if event.kind == "step" and event.step == 1:
                cancel.set()
        seen = []
        with pytest.raises(Cancelled):
            pipe.generate(request, pipeline_kwargs=extra, cancel=cancel,
                          on_event=lambda e: (seen.append(e.kind), on_event(e)))
        assert seen.count("step") == 1 and seen[-1] == "cancelled"
        assert not pipe._onloaded and sum(manager.ledger().values()) == baseline
        again = pipe.generate(request, pipeline_kwargs=extra)  # the pipeline still works
        assert again.summary.steps == 2


def test_seed_batch_and_defaults(tiny_family):
    folder = tiny_family("sdxl")
    request, extra = request_for("sdxl")
    with load_pipeline(folder, preset_configs("basic")) as pipe:
        two = pipe.generate(request, pipeline_kwargs=extra, batch=2)
        one = pipe.generate(request, pipeline_kwargs=extra)
        other = pipe.generate(request, pipeline_kwargs=extra, seed=1)
        random_seed = pipe.generate(request, pipeline_kwargs=extra, seed=None)
    # The first of a batch has the same noise as a single image (batched kernels round apart).
    assert two.images.shape[0] == 2 and np.allclose(two.images[0], one.images[0], atol=1e-4)
    assert not np.array_equal(one.images, other.images)
    assert isinstance(random_seed.request.seed, int) and random_seed.request.seed >= 0


def test_vae_tiling_and_slicing_switch(tiny_family):
    folder = tiny_family("sdxl")
    request, extra = request_for("sdxl")
    with load_pipeline(folder, preset_configs("basic")) as pipe:
        result = pipe.generate(request, pipeline_kwargs=extra, vae_tiling=True, vae_slicing=True)
        vae = pipe.components["vae"].module
        assert vae.use_tiling and vae.use_slicing
        pipe.generate(request, pipeline_kwargs=extra)
        assert not vae.use_tiling and not vae.use_slicing
    assert np.isfinite(result.images).all()


def test_disk_loading_reads_headers_only_until_the_first_forward(tiny_family):
    folder = tiny_family("flux")
    request, extra = request_for("flux")
    io_before = _process_read_bytes()
    with load_pipeline(folder, preset_configs("disk", vram_limit=0)) as pipe:
        io_after = _process_read_bytes()
        disk = [c for c in pipe.components.values() if c.config.uses_disk]
        assert disk and all(vram.managed(c.module).source.bytes_read == 0 for c in disk)
        weights = sum(p.stat().st_size for c in disk for p in c.files)
        # Headers, configs and tokenizer files only (and the small RAM-resident VAE).
        vae = sum(p.stat().st_size for p in pipe.components["vae"].files)
        assert io_after - io_before < vae + 0.5 * weights, (io_after - io_before, weights)
        pipe.generate(request, pipeline_kwargs=extra)
        assert all(vram.managed(c.module).source.bytes_read > 0 for c in disk)


def _process_read_bytes() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def test_results_are_saved_as_png_with_settings_and_mp4(tiny_family, tmp_path):
    from PIL import Image
    result = generate(tiny_family("sdxl"), "sdxl", preset_configs("basic"), batch=2)
    paths = result.save(tmp_path / "out.png")
    assert [p.name for p in paths] == ["out_1.png", "out_2.png"]
    image = Image.open(paths[0])
    settings = json.loads(image.text["parameters"])
    assert settings["prompt"] == PROMPT and settings["seed"] == 0 and image.text["model"] == "sdxl"
    again = result.save(tmp_path / "out.png")  # nothing is overwritten
    assert all(p.exists() for p in paths + again) and len(set(paths + again)) == 4
    folder_paths = result.save(tmp_path / "folder")
    assert all(p.parent == tmp_path / "folder" and p.suffix == ".png" for p in folder_paths)

    video = generate(tiny_family("wan"), "wan", preset_configs("basic"), fps=8)
    (mp4,) = video.save(tmp_path)
    assert mp4.suffix == ".mp4" and mp4.stat().st_size > 0
    import imageio.v3 as iio
    frames = iio.imread(mp4)
    assert frames.shape[0] == 5
