"""Bad input to pipelines/: each gets an error that names the field or the file, and no
model folder is ever written to."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipelines import (DownloadError, GenerationRequest, ModelFilesError, RequestError, download, get_family,
                       load_pipeline)
from presets import preset_configs
from test_pipelines import request_for

pytestmark = pytest.mark.standin  # each test runs on the CPU and on the stand-in accelerator


def folder_digest(folder: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sdxl_copy(tiny_family, tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_family("sdxl"), folder)
    return folder


def load_error(folder, preset="disk"):
    before = folder_digest(folder)
    with pytest.raises((ModelFilesError, ValueError)) as error:
        load_pipeline(folder, preset_configs(preset))
    assert folder_digest(folder) == before  # nothing written, not even metadata
    return str(error.value)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'flux-dev'.*did you mean 'flux.1-dev'.*sdxl"):
        load_pipeline("flux-dev", preset_configs("basic"))
    with pytest.raises(ModelFilesError, match="no such model folder"):
        load_pipeline("/nonexistent/folder", preset_configs("basic"))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelFilesError, match="model_index.json is missing"):
        load_pipeline(tmp_path, preset_configs("basic"))


@pytest.mark.parametrize("fields, message", [
    ({"width": 36}, r"width: 36 is not a multiple of 8.*try 32 or 40"),
    ({"height": 0}, r"height: must be a positive"),
    ({"width": 4096}, r"width: 4096 is above 2048"),
    ({"steps": 0}, r"steps: must be a whole number from 1"),
    ({"steps": -3}, r"steps"),
    ({"steps": 10**6}, r"steps"),
    ({"guidance": float("nan")}, r"guidance: must be a finite number"),
    ({"guidance": -1.0}, r"guidance"),
    ({"guidance": 1e308}, r"guidance: must be a finite number from 0 to 30"),
    ({"guidance": 30.5}, r"guidance: must be a finite number from 0 to 30"),
    ({"seed": -1}, r"seed: must be a whole number"),
    ({"prompt": "   "}, r"prompt: empty"),
    ({"prompt": "x" * 20_000}, r"prompt: 20000 characters"),
    ({"batch": 0}, r"batch"),
    ({"frames": 9}, r"frames: .* makes images, not videos"),
    ({"sampler": "euler"}, r"unknown setting\(s\) \['sampler'\]"),
])
def test_bad_generation_settings(tiny_family, fields, message):
    request, extra = request_for("sdxl")
    with load_pipeline(tiny_family("sdxl"), preset_configs("basic")) as pipe:
        with pytest.raises(RequestError, match=message):
            pipe.generate(request, pipeline_kwargs=extra, **fields)
        assert pipe.generate(request, pipeline_kwargs=extra).summary.steps == 2  # still serves


@pytest.mark.parametrize("frames", [4, 6, 0, 2000])
def test_wan_frames_must_be_4k_plus_1(tiny_family, frames):
    request, extra = request_for("wan")
    with load_pipeline(tiny_family("wan"), preset_configs("basic")) as pipe:
        with pytest.raises(RequestError, match=r"frames: .* needs 4k\+1 frames"):
            pipe.generate(request, pipeline_kwargs=extra, frames=frames)


def test_truncated_shard_is_named(sdxl_copy):
    shard = sorted((sdxl_copy / "unet").glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    message = load_error(sdxl_copy)
    assert shard.name in message and "truncated" in message


def test_corrupt_header_is_named(sdxl_copy):
    path = sdxl_copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))
    message = load_error(sdxl_copy)
    assert "vae" in message and "corrupt" in message


def test_missing_shard_is_named(sdxl_copy):
    shard = sorted((sdxl_copy / "unet").glob("*.safetensors"))[0]
    shard.unlink()
    message = load_error(sdxl_copy)
    assert f"missing: {shard.name}" in message


def test_key_mismatch_names_the_key(sdxl_copy):
    index = sdxl_copy / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    # Point one tensor's entry at a renamed key: the model's key is then missing.
    from safetensors.torch import load_file, save_file
    shard_name = data["weight_map"]["conv_in.weight"]
    shard = sdxl_copy / "unet" / shard_name
    tensors = load_file(shard)
    tensors["conv_in.weight_renamed"] = tensors.pop("conv_in.weight")
    save_file(tensors, shard)
    message = load_error(sdxl_copy, preset="basic")
    assert "missing key 'conv_in.weight'" in message and "unet" in message


def test_shape_mismatch_names_the_key(sdxl_copy):
    from safetensors.torch import load_file, save_file
    path = sdxl_copy / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"][:1].clone()
    save_file(tensors, path)
    message = load_error(sdxl_copy, preset="basic")
    assert "shape mismatch for 'decoder.conv_out.bias'" in message


def test_pickle_weights_are_refused(sdxl_copy):
    for path in (sdxl_copy / "vae").glob("*.safetensors"):
        path.rename(path.with_suffix(".bin"))
    message = load_error(sdxl_copy)
    assert "pickle" in message and ".bin" in message


def test_bad_configs_name_the_component(tiny_family):
    folder = tiny_family("sdxl")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['transformer'\]"):
        load_pipeline(folder, {"transformer": {"computation_device": "cpu"}, "default": {"computation_device": "cpu"}})
    with pytest.raises(ValueError, match=r"no config for component 'unet'"):
        load_pipeline(folder, {"vae": {"computation_device": "cpu"}, "text_encoders": {"computation_device": "cpu"}})
    with pytest.raises(ValueError, match=r"config for vae.*offload_dtype"):
        load_pipeline(folder, {"default": {"computation_device": "cpu"},
                               "vae": {"computation_device": "cpu", "offload_device": "cpu", "offload_dtype": "int7"}})


def test_download_failure_names_the_model_the_source_and_the_files(tmp_path):
    family = get_family("flux.1-schnell")
    with pytest.raises(DownloadError) as error:
        download(family, tmp_path / "flux", source="huggingface", endpoint="http://127.0.0.1:9")
    message = str(error.value)
    assert "black-forest-labs/FLUX.1-schnell" in message and "huggingface" in message
    assert "transformer/*.safetensors" in message and "run again to resume" in message


def test_download_patterns_take_only_the_diffusers_safetensors():
    from fnmatch import fnmatch
    patterns = get_family("flux.1-dev").allow_patterns()
    wanted = ["model_index.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
              "transformer/diffusion_pytorch_model.safetensors.index.json", "text_encoder_2/config.json",
              "tokenizer_2/spiece.model", "tokenizer/merges.txt", "scheduler/scheduler_config.json", "vae/config.json"]
    unwanted = ["flux1-dev.safetensors", "ae.safetensors", "transformer/diffusion_pytorch_model.bin",
                "README.md", "dev_grid.jpg"]
    assert all(any(fnmatch(f, p) for p in patterns) for f in wanted)
    assert not any(fnmatch(f, p) for f in unwanted for p in patterns)
    sdxl = get_family("sdxl").allow_patterns()
    assert any(fnmatch("unet/diffusion_pytorch_model.fp16.safetensors", p) for p in sdxl)
    assert not any(fnmatch("unet/diffusion_pytorch_model.safetensors", p) for p in sdxl)


def test_a_complete_local_copy_needs_no_network(tiny_family, tmp_path):
    # A registry key whose files are already in models_dir loads without any download.
    shutil.copytree(tiny_family("sdxl"), tmp_path / "sdxl")
    with load_pipeline("sdxl", preset_configs("basic"), models_dir=tmp_path) as pipe:
        assert pipe.family.key == "sdxl" and pipe.folder == tmp_path / "sdxl"
    with pytest.raises(ModelFilesError, match="no local copy"):
        load_pipeline("qwen-image", preset_configs("basic"), source="local", models_dir=tmp_path)


def test_checkpoints_with_either_module_layout_load(tiny_family, tmp_path):
    # Qwen-Image's text encoder ships with the names Qwen2.5-VL had before transformers moved
    # its modules (model.layers -> model.language_model.layers, visual -> model.visual), and
    # transformers still saves them so; the loader applies transformers' own renaming rules,
    # as from_pretrained does. A checkpoint saved with the new names loads too.
    from safetensors.torch import load_file, save_file

    def new_name(key: str) -> str:
        if key.startswith("model."):
            return "model.language_model." + key.removeprefix("model.")
        return "model." + key if key.startswith("visual.") else key
    folder = tmp_path / "qwen"
    shutil.copytree(tiny_family("qwen-image"), folder)
    for path in (folder / "text_encoder").glob("*.safetensors"):
        tensors = load_file(path)
        assert any(k.startswith("model.layers.") for k in tensors)  # the published layout
        save_file({new_name(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    index = folder / "text_encoder" / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {new_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    request, extra = request_for("qwen-image")
    with load_pipeline(folder, preset_configs("basic")) as renamed, \
            load_pipeline(tiny_family("qwen-image"), preset_configs("basic")) as original:
        a = renamed.generate(request, pipeline_kwargs=extra).images
        b = original.generate(request, pipeline_kwargs=extra).images
    assert (a == b).all()


def test_request_defaults_come_from_the_family():
    request = GenerationRequest(prompt="x").resolved(get_family("flux.1-schnell"), 16)
    assert (request.steps, request.guidance, request.width) == (4, 0.0, 1024)
    video = GenerationRequest(prompt="x").resolved(get_family("wan2.1-t2v-1.3b"), 16)
    assert (video.frames, video.fps, video.width, video.height) == (81, 16, 832, 480)


def test_a_closed_pipeline_says_so(tiny_family):
    request, extra = request_for("sdxl")
    pipe = load_pipeline(tiny_family("sdxl"), preset_configs("basic"))
    pipe.close()
    pipe.close()  # twice is fine
    with pytest.raises(RuntimeError, match="was closed"):
        pipe.generate(request, pipeline_kwargs=extra)


def test_a_failed_load_leaves_nothing_charged(tiny_family, monkeypatch):
    # Running out of RAM half-way through binding a component: what was charged is refunded.
    import vram
    import vram.model
    original, calls = vram.model.ManagedModel.rest, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 40:
            raise MemoryError("simulated: RAM ran out while loading")
        return original(*args)
    monkeypatch.setattr(vram.model.ManagedModel, "rest", failing)
    before = dict(vram.get_manager().ledger())
    with pytest.raises(MemoryError):
        load_pipeline(tiny_family("sdxl"), preset_configs("basic"))
    assert len(calls) == 40
    assert dict(vram.get_manager().ledger()) == before and not vram.get_manager().models()
