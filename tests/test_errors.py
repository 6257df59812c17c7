"""Bad input gets a clear error naming the field, key or file, and changes nothing."""

import hashlib

import pytest
import torch

import vram
from models import Stack, Zoo, save_weights, stack_files

DISK = {"offload_device": "disk", "offload_dtype": "disk", "onload_device": "disk", "onload_dtype": "disk",
        "preparing_device": "cpu", "preparing_dtype": torch.float32,
        "computation_device": "cpu", "computation_dtype": torch.float32}


@pytest.mark.parametrize("config, message", [
    ({"offload_device": "cpu", "colour": "blue"}, "unknown key 'colour'"),
    ({"computation_dtype": "float12"}, "computation_dtype: unknown dtype 'float12'"),
    ({"computation_dtype": torch.float8_e4m3fn}, "computation_dtype: cpu cannot compute in torch.float8_e4m3fn"),
    ({"computation_dtype": torch.int8}, "computation_dtype: dtype torch.int8 is not a floating"),
    ({"computation_device": "disk", "computation_dtype": "disk"}, "only for offload/onload"),
    ({"preparing_device": "disk", "preparing_dtype": "disk"}, "preparing_device: 'disk' is allowed only"),
    ({"offload_device": "disk", "offload_dtype": torch.float32}, "offload_device and offload_dtype: 'disk'"),
    ({"computation_device": "cuda:7"}, "computation_device: device 'cuda:7'"),
    ({"computation_device": "tpu"}, "computation_device: unknown device 'tpu'"),
    ({"prefetch": -1}, "prefetch must be a whole number of groups from 0 to 32"),
    ({"prefetch": 10**9}, "prefetch must be a whole number of groups from 0 to 32"),
    ({"granularity": "layer"}, "granularity must be one of block, leaf"),
    ({"ram_cache_gib": float("nan")}, "ram_cache_gib must be a finite number"),
    ("cpu", "vram_config must be a dict or VramConfig"),
])
def test_bad_configs(config, message):
    model = Stack(width=8, depth=1)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        vram.enable_vram_management(model, config)
    assert not vram.is_managed(model)


@pytest.mark.parametrize("limit", [-1, float("nan"), float("inf"), "10", True])
def test_bad_vram_limit(limit):
    with pytest.raises(ValueError, match="vram_limit"):
        vram.enable_vram_management(Stack(width=8, depth=1), {"computation_device": "cpu"}, vram_limit=limit)


def test_disk_needs_weights():
    with pytest.raises(ValueError, match="'disk' needs weights="):
        vram.enable_vram_management(Stack(width=8, depth=1), DISK)


def test_meta_model_needs_weights():
    with vram.empty_weights():
        model = Stack(width=8, depth=1)
    with pytest.raises(ValueError, match="meta device; pass weights="):
        vram.enable_vram_management(model, {"computation_device": "cpu", "computation_dtype": torch.float32})


def test_missing_keys_are_named(tmp_path):
    torch.manual_seed(0)
    small = Stack(width=16, depth=1)
    save_weights(small, tmp_path)
    with vram.empty_weights():
        model = Stack(width=16, depth=2)
    with pytest.raises(ValueError, match=r"missing key 'blocks\.1\.0\.weight'.*model\.safetensors|model\.safetensors.*missing key 'blocks\.1\.0\.weight'"):
        vram.enable_vram_management(model, DISK, weights=tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    save_weights(Stack(width=16, depth=1), tmp_path)
    with vram.empty_weights():
        model = Stack(width=8, depth=1)
    with pytest.raises(ValueError, match=r"shape mismatch for 'blocks\.0\.0\.weight': file \(16, 16\)"):
        vram.enable_vram_management(model, DISK, weights=tmp_path)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        vram.WeightSource(tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="no .safetensors files in"):
        vram.WeightSource(tmp_path)


def test_pickle_formats_are_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="only .safetensors .* can run code"):
        vram.WeightSource(path)


def test_truncated_and_corrupt_files(tmp_path):
    _, path = stack_files(tmp_path, width=16, depth=1)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated.safetensors: truncated; tensor"):
        vram.WeightSource(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="garbage.safetensors: corrupt safetensors header"):
        vram.WeightSource(garbage)


def test_missing_shard_is_named(tmp_path):
    model = Zoo()
    save_weights(model, tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        vram.WeightSource(tmp_path)


def test_enabling_twice_is_refused(tmp_path):
    model = Stack(width=8, depth=1)
    vram.enable_vram_management(model, {"computation_device": "cpu", "computation_dtype": torch.float32})
    with pytest.raises(ValueError, match="already under VRAM management"):
        vram.enable_vram_management(model, {"computation_device": "cpu"})
    vram.disable_vram_management(model)
    with pytest.raises(ValueError, match="not under VRAM management"):
        vram.onload(model)


def test_weight_files_are_never_written(tmp_path):
    _, path = stack_files(tmp_path, width=64, depth=3)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = path.stat().st_mtime_ns
    with vram.empty_weights():
        model = Stack(width=64, depth=3)
    vram.enable_vram_management(model, DISK, vram_limit=0, weights=path)
    with torch.no_grad():
        model(torch.randn(2, 64))
    vram.onload(model)
    vram.offload(model)
    vram.disable_vram_management(model)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert path.stat().st_mtime_ns == mtime


def test_a_failed_forward_leaves_the_model_usable(tmp_path):
    plain, path = stack_files(tmp_path, width=16, depth=2)
    with vram.empty_weights():
        model = Stack(width=16, depth=2)
    vram.enable_vram_management(model, DISK, vram_limit=0, weights=path)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong width
    record = vram.managed(model)
    assert all(group.users == 0 for group in record.groups)
    assert torch.isnan(model.blocks[0][0].weight).all()  # placeholders are back
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    vram.disable_vram_management(model)
