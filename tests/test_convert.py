"""``python -m pipelines.convert``: the copy's layout, that it draws what the source draws
under the matching preset, what the disk tier reads from it, and every refusal."""

import hashlib
import importlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

import pipelines.convert as convert_module
import vram
from pipelines import loading
from pipelines.convert import ConversionError, convert, describe, main, parse_size
from pipelines.tiny import MODEL_DIR
from presets import preset_configs
from test_pipelines import generate
from vram.casting import SCALE_SUFFIX, cast, fp8_scale
from vram.grouping import plan_groups
from vram.weights import SafetensorsFile, plan_runs

E4M3 = torch.float8_e4m3fn


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def meta_model(folder: Path, name: str) -> torch.nn.Module:
    library, class_name = loading.read_model_index(folder)[name]
    cls = getattr(importlib.import_module(library), class_name)
    return loading.build_model(cls, folder / name, torch.float32)


@pytest.fixture(scope="module")
def flux(tiny_family):
    return tiny_family("flux")


@pytest.fixture(scope="module")
def flux_bf16(flux, tmp_path_factory):
    """The tiny FLUX pipeline as a bfloat16 checkpoint (a source the real ones resemble)."""
    return convert(flux, tmp_path_factory.mktemp("bf16") / "flux", dtype="bfloat16").dest


def check_files(folder: Path, shards: int, limit: int) -> dict[str, dict]:
    """The shards of one converted component and their index; their headers by file name."""
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == shards
    headers = {path.name: SafetensorsFile(path).tensors for path in files}
    for path in files:  # at most the limit, unless the shard holds one tensor larger than it
        weights = [k for k in headers[path.name] if not k.endswith(SCALE_SUFFIX)]
        assert path.stat().st_size <= limit or len(weights) == 1, (path.name, path.stat().st_size)
        by_offset = sorted(headers[path.name].values(), key=lambda info: info.offset)
        scales_first = [info.key.endswith(SCALE_SUFFIX) for info in by_offset]
        assert scales_first == sorted(scales_first, reverse=True)  # a shard's scales together, first
        with safe_open(path, "pt") as handle:
            assert set(handle.keys()) == set(headers[path.name]) and handle.metadata()["format"] == "pt"
    indexes = list(folder.glob("*.safetensors.index.json"))
    if shards == 1:
        assert not indexes and files[0].name in ("model.safetensors", "diffusion_pytorch_model.safetensors")
    else:
        (index,) = indexes
        assert index.name == files[0].name.split("-")[0] + ".safetensors.index.json"
        content = json.loads(index.read_text())
        assert content["weight_map"] == {key: name for name, keys in headers.items() for key in keys}
        assert content["metadata"]["total_size"] == sum(i.nbytes for keys in headers.values() for i in keys.values())
    return headers


def group_spans(dest: Path, name: str) -> list[int]:
    """How many files each of the core's groups lies in, checking that it is one run of bytes
    in each (one read per file) and that its files follow each other."""
    model = meta_model(dest, name)
    source = vram.WeightSource(dest / name)
    files = [file.path for file in source.files]
    keys = {id(p): k for k, p in model.named_parameters(remove_duplicate=False)}
    spans = []
    for plan in plan_groups(model, "block"):
        params = {id(p) for _, module in plan.members for p in module._parameters.values() if p is not None}
        group = [source.info(keys[pid]) for pid in params]
        shards = sorted({files.index(info.file.path) for info in group})
        assert len(plan_runs(group)) == len(shards) == shards[-1] - shards[0] + 1, plan.name
        spans.append(len(shards))
    return spans


@pytest.mark.parametrize("dtype, max_shard_size", [("float8_e4m3fn", "2MB"), ("float32", "1MB")])
def test_shards_indexes_and_block_order(tmp_path, dtype, max_shard_size):
    dest = tmp_path / "copy"
    report = convert("tiny-shapes", dest, dtype=dtype, max_shard_size=max_shard_size)
    assert report.source == MODEL_DIR.resolve() and report.source_name == "tiny-shapes"
    for name, component in report.components.items():
        headers = check_files(dest / name, component.shards, parse_size(max_shard_size))
        infos = [i for keys in headers.values() for k, i in keys.items() if not k.endswith(SCALE_SUFFIX)]
        aligned = sum(i.nbytes for i in infos if i.offset % 4096 == 0) / sum(i.nbytes for i in infos)
        assert component.aligned_fraction == pytest.approx(aligned)
        if name == "unet":  # measured 0.52 (fp8) and 0.93 (fp32); the tiny VAE has no 4 KiB-sized tensor
            assert aligned > 0.5
        spans = group_spans(dest, name)
        if dtype == "float32" and name == "unet":
            assert max(spans) > 1  # blocks larger than a shard were split across shards

        # Every tensor holds the source's bytes (kept, or already in the dtype), or the core's
        # load-time cast to scaled fp8.
        original = vram.WeightSource(loading.weight_files(MODEL_DIR / name))
        copy = vram.WeightSource(dest / name)
        scales = copy.scales()
        for key in original:
            value, stored = original.read(key), copy.read(key)
            if stored.dtype == value.dtype:
                assert torch.equal(stored.view(torch.uint8), value.view(torch.uint8)) and key not in scales
            else:
                assert stored.dtype == E4M3 and scales[key] == fp8_scale(value, E4M3)
                assert torch.equal(stored.view(torch.uint8), cast(value, E4M3, 1.0 / scales[key]).view(torch.uint8))
        assert component.tensors == len(copy) == len(original)
        if dtype == "float8_e4m3fn":
            assert 0 < component.kept == sum(copy.info(k).dtype != E4M3 for k in copy) < len(copy)
    if dtype == "float8_e4m3fn":  # the VAE stays as it is under fp8
        assert report.copied == ("vae",) and tree_hashes(dest / "vae") == tree_hashes(MODEL_DIR / "vae")
    for path in ("model_index.json", "training.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                 "unet/config.json"):
        assert (dest / path).read_bytes() == (MODEL_DIR / path).read_bytes()


def test_float32_and_bfloat16_copies_generate_identical_images(flux, flux_bf16, tmp_path):
    basic = preset_configs("basic")
    f32 = convert(flux, tmp_path / "f32", dtype="float32")
    assert np.array_equal(generate(f32.dest, "flux", basic).images, generate(flux, "flux", basic).images)
    # A bfloat16 copy draws what its float32 source draws under a bfloat16 preset...
    bf16 = preset_configs("basic", dtype="bfloat16")
    assert np.array_equal(generate(flux_bf16, "flux", bf16).images, generate(flux, "flux", bf16).images)
    # ... and a bfloat16 copy of a bfloat16 source what the source draws.
    again = convert(flux_bf16, tmp_path / "bf16", dtype="bfloat16")
    assert np.array_equal(generate(again.dest, "flux", basic).images, generate(flux_bf16, "flux", basic).images)
    record = json.loads((again.dest / "conversion.json").read_text())  # its own, not its source's
    assert record["source"] == str(flux_bf16.resolve()) and describe(again.dest) == "flux, bf16, 4 shards"


def test_fp8_copy_draws_what_the_source_draws_under_fp8_offload(flux, tmp_path):
    before = tree_hashes(flux)
    progress = []
    report = convert(flux, tmp_path / "fp8", progress=lambda *call: progress.append(call))
    assert tree_hashes(flux) == before  # the source is never written
    assert set(report.components) == {"text_encoder", "text_encoder_2", "transformer"} and report.copied == ("vae",)
    for name in report.components:
        calls = [(done, total) for component, done, total in progress if component == name]
        assert calls[-1][0] == calls[-1][1] > 0 and [d for d, _ in calls] == sorted(d for d, _ in calls)
    fp8 = preset_configs("fp8_offload")
    copy = generate(report.dest, "flux", fp8).images
    assert np.array_equal(copy, generate(flux, "flux", fp8).images)
    assert not np.array_equal(copy, generate(flux, "flux", preset_configs("basic")).images)  # fp8 was used


def test_disk_tier_reads_about_half_from_an_fp8_copy(flux_bf16, tmp_path):
    fp8 = convert(flux_bf16, tmp_path / "fp8").dest
    disk = preset_configs("disk", vram_limit=0)
    from_bf16 = generate(flux_bf16, "flux", disk).summary.bytes_read_from_disk
    from_fp8 = generate(fp8, "flux", disk).summary.bytes_read_from_disk
    # Half, plus what the rule keeps in bf16 (norms, the modulation linears): measured 0.62.
    assert 0.5 < from_fp8 / from_bf16 < 0.65, (from_fp8, from_bf16)


def test_plain_fp8_has_no_scales_and_loads_in_diffusers(flux, tmp_path):
    import diffusers
    report = convert(flux, tmp_path / "plain", fp8_scale="none", components=["transformer"])
    files = loading.weight_files(report.dest / "transformer")
    for path in files:
        with safe_open(path, "pt") as handle:
            assert not [k for k in handle.keys() if k.endswith(SCALE_SUFFIX)]
            assert handle.metadata()["lowvram.fp8_scale"] == "none"
    copy = diffusers.FluxTransformer2DModel.from_pretrained(report.dest / "transformer", torch_dtype=torch.float32)
    source = diffusers.FluxTransformer2DModel.from_pretrained(flux / "transformer", torch_dtype=torch.float32)
    plain = dict(source.named_parameters())
    cast_count = 0
    for key, value in copy.named_parameters():
        if not torch.equal(value, plain[key]):
            assert torch.equal(value, plain[key].to(E4M3).float()), key
            cast_count += 1
    assert cast_count and report.copied == ("text_encoder", "text_encoder_2", "vae")


def test_a_variant_file_is_written_under_the_plain_name(tiny_family, tmp_path):
    source = tmp_path / "sdxl"  # the SDXL family loads fp16 variant files
    shutil.copytree(tiny_family("sdxl"), source)
    (source / "text_encoder" / "model.safetensors").rename(source / "text_encoder" / "model.fp16.safetensors")
    dest = convert(source, tmp_path / "copy", components=["text_encoder"]).dest
    assert sorted(p.name for p in (dest / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]


def test_sizes_parse_and_bad_arguments_are_refused(flux, tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("123456789") == 123456789 and parse_size(2**20) == 2**20
    with pytest.raises(ConversionError, match=r"--max-shard-size '1B' is too small: the minimum is 1MB"):
        convert(flux, tmp_path / "a", max_shard_size="1B")
    with pytest.raises(ConversionError, match="--max-shard-size 'lots' is not a size"):
        parse_size("lots")
    with pytest.raises(ConversionError, match="--dtype 'int4' .* float8_e4m3fn, float8_e5m2, bfloat16, float16, "
                                              "float32"):
        convert(flux, tmp_path / "a", dtype="int4")
    with pytest.raises(ConversionError, match="--fp8-scale 'block'"):
        convert(flux, tmp_path / "a", fp8_scale="block")
    with pytest.raises(ConversionError, match="--components: unet: .* choose from text_encoder, text_encoder_2, "
                                              "transformer, vae"):
        convert(flux, tmp_path / "a", components=["unet"])
    assert not (tmp_path / "a").exists()


def test_destinations_that_are_refused(flux, tmp_path):
    source = tmp_path / "flux"
    shutil.copytree(flux, source)
    with pytest.raises(ConversionError, match="inside the source folder"):
        convert(source, source / "transformer" / "copy")
    with pytest.raises(ConversionError, match="contains the source folder"):
        convert(source, tmp_path)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match=re.escape(f"{occupied} exists and is not empty")):
        convert(source, occupied)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(source, empty).dest == empty and (empty / "model_index.json").is_file()


def test_damaged_or_missing_sources_are_named(flux, tmp_path):
    source = tmp_path / "flux"
    shutil.copytree(flux, source)
    shard = sorted((source / "transformer").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"{shard}: truncated")):
        convert(source, tmp_path / "copy")
    with pytest.raises(ValueError, match="flux.1-dev is not downloaded in .* python -m pipelines.generate --model "
                                         "flux.1-dev --models-dir"):
        convert("flux.1-dev", tmp_path / "copy", models_dir=tmp_path / "models")
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        convert("no-such-model", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_too_little_disk_space_is_refused_before_writing(flux, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000))
    full = r"the copy needs \d+ bytes .* has 1000 bytes \(0.00 GiB\) free; nothing was written"
    with pytest.raises(ConversionError, match=full) as refused:
        convert(flux, tmp_path / "out" / "copy")
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    need = int(re.search(r"needs (\d+) bytes", str(refused.value)).group(1))
    written = convert(flux, tmp_path / "out" / "copy").bytes_written
    assert written <= need <= written + 2**16  # the prediction, and room for conversion.json


def test_an_interrupted_conversion_leaves_nothing(flux, tmp_path, monkeypatch):
    write_shard = convert_module._write_shard
    calls = []

    def interrupted(*args):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_shard(*args)
    monkeypatch.setattr(convert_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(flux, tmp_path / "copy")
    assert not calls[0].exists() and list(tmp_path.iterdir()) == []  # no copy, no hidden partial folder


def test_command_line_with_a_downloaded_registry_model(flux, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(flux, models / "flux.1-dev")
    dest = tmp_path / "flux-fp8"
    assert main(["flux.1-dev", str(dest), "--models-dir", str(models), "--max-shard-size", "1MB",
                 "--components", "transformer,text_encoder_2"]) == 0
    out, err = capsys.readouterr()
    assert "transformer: 100%" in err and "text_encoder_2: 100%" in err
    assert "copied as they are: text_encoder, vae" in out
    record = json.loads((dest / "conversion.json").read_text())
    assert record["tool"] == "pipelines.convert" and record["version"] == 1
    assert record["source"] == str((models / "flux.1-dev").resolve()) and record["source_name"] == "flux.1-dev"
    assert record["dtype"] == "float8_e4m3fn" and record["fp8_scale"] == "tensor" and record["max_shard_size"] == 10**6
    assert set(record["components"]) == {"transformer", "text_encoder_2"}
    assert set(record["components"]["transformer"]) == {"dtype", "shards", "bytes", "tensors", "kept",
                                                        "aligned_fraction"}
    assert describe(dest) == "FLUX.1-dev (12B), fp8 e4m3 (scaled), 2 shards"
    assert describe(flux) is None

    assert main([str(flux), str(tmp_path / "bad"), "--dtype", "int4"]) == 2
    assert "error: --dtype 'int4' is not supported; choose one of float8_e4m3fn" in capsys.readouterr().err
