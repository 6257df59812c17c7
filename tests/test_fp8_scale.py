"""Scaled fp8 storage (vram/casting.py): the rule, the casts, scaled files, and what it buys.

Marked ``standin``: every test runs computing on the CPU and on the stand-in accelerator,
whose copies carry the scales through its copy engine.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import vram
from models import cfg
from vram.casting import FP8_MAX, SCALE_SUFFIX, cast, fp8_scale, plain_fp8

pytestmark = pytest.mark.standin

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3 = torch.float8_e4m3fn


class Stack(torch.nn.Module):
    """Linear layers with a realistic weight spread (std 0.005: below e4m3's normal range)."""

    def __init__(self, width: int = 256, depth: int = 4, std: float = 0.005):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        for layer in self.layers:
            torch.nn.init.normal_(layer.weight, std=std)
            torch.nn.init.normal_(layer.bias, std=std)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x) * 20
        return x


def _stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().eval()


def _managed(folder, config, **kwargs) -> Stack:
    with vram.empty_weights():
        model = Stack()
    return vram.enable_vram_management(model.eval(), config, weights=folder, **kwargs)


@pytest.mark.parametrize("dtype", FP8)
def test_the_scale_is_the_smallest_power_of_two_that_fits(dtype):
    top = FP8_MAX[dtype]
    for amax in (1e-7, 3e-3, 0.02, 1.0, top / 2, top, 3 * top, 1e6):
        values = torch.tensor([amax, -amax / 3, 0.0])
        scale = fp8_scale(values, dtype)
        assert math.frexp(scale)[0] == 0.5, scale  # a power of two
        assert top / 2 < amax / scale <= top, (amax, scale)
    assert fp8_scale(torch.zeros(4), dtype) == 1.0
    assert fp8_scale(torch.empty(0), dtype) == 1.0
    assert fp8_scale(torch.tensor([1.0, float("inf")]), dtype) == 1.0
    # Values already scaled: the scale of what they stand for.
    assert fp8_scale(torch.tensor([2.0]), dtype, values_scale=0.25) == fp8_scale(torch.tensor([0.5]), dtype)
    with pytest.raises(ValueError, match="not an fp8 dtype"):
        fp8_scale(torch.ones(2), torch.bfloat16)


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float16])
def test_casts_with_a_power_of_two_are_exact(dtype, source):
    w = (torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.004).to(source)
    scale = fp8_scale(w, dtype)
    stored = cast(w, dtype, 1.0 / scale)
    assert stored.dtype == dtype
    # The multiplications add no rounding: the same bits as dividing in float32 first.
    assert torch.equal(stored.view(torch.uint8), (w.float() / scale).to(dtype).view(torch.uint8))
    back = cast(stored, source, scale)
    assert back.dtype == source
    assert torch.equal(back, (stored.float() * scale).to(source))
    # No overflow: the largest magnitude lands in the format's range (e4m3fn has no infinity).
    assert torch.isfinite(stored.float()).all()
    assert cast(w, source) is w


def test_scaled_fp8_buys_precision_on_small_weights(tmp_path, computation):
    """Weights with std 0.005 (most of a large model's): e4m3 scaled keeps the output within
    a few percent, a plain cast (as DiffSynth stores fp8) loses several times more."""
    plain_model = _stack()
    save_file(plain_model.state_dict(), str(tmp_path / "model.safetensors"))
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = plain_model(x)
    config = cfg(("cpu", E4M3), ("cpu", E4M3))
    errors = {}
    for how in ("scaled", "plain"):
        if how == "plain":
            with plain_fp8():
                model = _managed(tmp_path, config)
        else:
            model = _managed(tmp_path, config)
        with torch.no_grad():
            got = model(x)
        errors[how] = float((got - exact).norm() / exact.norm())
        vram.release(model)
    assert errors["scaled"] < 0.06, errors  # measured 0.044 (plain: 0.189)
    assert errors["plain"] > 3 * errors["scaled"], errors


def _scaled_file(tmp_path, model: torch.nn.Module, dtype=E4M3):
    """The model's weights as a scaled fp8 file, written by hand as the converter does."""
    tensors, expected = {}, {}
    for key, value in model.state_dict().items():
        scale = fp8_scale(value, dtype)
        tensors[key] = (value / scale).to(dtype)
        tensors[key + SCALE_SUFFIX] = torch.tensor(scale, dtype=torch.float32)
        expected[key] = tensors[key].float() * scale
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return expected


def test_a_scaled_file_loads_scaled_in_every_tier(tmp_path, computation):
    expected = _scaled_file(tmp_path, _stack())
    reference = Stack()
    reference.load_state_dict(expected)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(x)
    source = vram.WeightSource(tmp_path)
    assert set(source) == set(expected) and set(source.scales()) == set(expected)
    for config in (cfg(("cpu", torch.float32), ("cpu", torch.float32)),   # dequantised at load
                   cfg(("cpu", E4M3), ("cpu", E4M3)),                     # kept: nothing cast at load
                   cfg(("disk", "disk"), ("cpu", E4M3)),                  # the disk tier reads fp8
                   cfg(("disk", "disk"), ("cpu", torch.float32)),
                   cfg(("cpu", torch.float8_e5m2), ("cpu", torch.float8_e5m2))):
        model = _managed(tmp_path, config, vram_limit=0 if config["offload_device"] == "disk" else None)
        with torch.no_grad():
            got = model(x)
        if config["offload_dtype"] is torch.float8_e5m2:  # stored again in another format
            assert float((got - want).norm() / want.norm()) < 0.15  # two mantissa bits: 0.11
        else:
            assert torch.equal(got, want), config
        # state_dict() gives values, not bare fp8 bits.
        for key, value in model.state_dict().items():
            if config["offload_dtype"] is not torch.float8_e5m2:
                assert torch.equal(value.float(), expected[key]), key
        vram.release(model)


def test_a_scaled_file_under_fp8_keeps_its_bytes(tmp_path, computation):
    _scaled_file(tmp_path, _stack())
    model = _managed(tmp_path, cfg(("cpu", E4M3), ("cpu", E4M3)))
    source = vram.WeightSource(tmp_path)
    record = vram.managed(model)
    for group in record.groups:
        for entry, stored in zip(group.entries, group.base_tensors()):
            assert stored.dtype == E4M3
            assert torch.equal(stored.view(torch.uint8), source.read(entry.keys[0]).view(torch.uint8))
            assert entry.scales[E4M3] == source.scales()[entry.keys[0]]
    back = vram.disable_vram_management(model)
    assert back.layers[0].weight.dtype == torch.float32
    assert torch.equal(back.layers[0].weight, source.read("layers.0.weight").float() * source.scales()["layers.0.weight"])


def test_load_time_fp8_equals_a_scaled_file(tmp_path, computation):
    """The core's load-time cast and a converted copy hold the same bits and scales."""
    plain_model = _stack()
    (tmp_path / "source").mkdir()
    (tmp_path / "copy").mkdir()
    save_file(plain_model.state_dict(), str(tmp_path / "source" / "model.safetensors"))
    _scaled_file(tmp_path / "copy", plain_model)
    config = cfg(("cpu", E4M3), ("cpu", E4M3))
    loaded, copied = _managed(tmp_path / "source", config), _managed(tmp_path / "copy", config)
    for a, b in zip(vram.managed(loaded).groups, vram.managed(copied).groups):
        for ea, eb, ta, tb in zip(a.entries, b.entries, a.base_tensors(), b.base_tensors()):
            assert ea.scales == eb.scales
            assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x), copied(x))
    vram.release(loaded)
    vram.release(copied)


@pytest.mark.parametrize("tensors, message", [
    ({"w": torch.zeros(2, dtype=E4M3), "w" + SCALE_SUFFIX: torch.ones(2)}, "should be a float32 scalar"),
    ({"w": torch.zeros(2, dtype=E4M3), "w" + SCALE_SUFFIX: torch.tensor(1.0, dtype=torch.float16)},
     "should be a float32 scalar"),
    ({"w" + SCALE_SUFFIX: torch.tensor(1.0)}, "scales no tensor"),
    ({"w": torch.zeros(2), "w" + SCALE_SUFFIX: torch.tensor(1.0)}, "not an fp8 one"),
])
def test_bad_scales_are_named(tmp_path, tensors, message, computation):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=message) as error:
        vram.WeightSource(tmp_path)
    assert "bad.safetensors" in str(error.value)
