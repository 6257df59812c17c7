"""The planner's streaming window: a streamed forward needs (prefetch + 1) of its largest groups
in their transfer dtype, its activations and the CUDA context, whatever the cap; checked on
Qwen-Image against DiffSynth-Studio's published figures.

DiffSynth's figures (nvidia-smi, "G"): the pipeline at its default 1328x1328 with CFG, basic
56, model-level CPU offload 40, FP8 storage 21 (docs/*/Pipeline_Usage/VRAM_management.md, in
/work/shared/seeds/); the 20B DiT alone at 1024x1024 under vram_limit=0, streaming layer by
layer: "only 2G" (docs/*/Developer_Guide/Enabling_VRAM_management.md). Nothing is downloaded:
the transformer is built on the meta device from Qwen/Qwen-Image's transformer config.
"""

import dataclasses
import json

import pytest
import torch

from pipelines import get_family
from presets import load_preset
from presets.footprint import _largest_group, footprint
from presets.planner import CUDA_CONTEXT_BYTES, Job, predict
from presets.probe import GPU, Hardware
from presets.tree import decide

G = 1024**3
# Qwen/Qwen-Image's transformer/config.json (diffusers' defaults for this class are the same).
QWEN_TRANSFORMER_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
    "num_layers": 60, "out_channels": 16, "patch_size": 2,
}
DIT_JOB = Job(1024, 1024)                   # DiffSynth's DiT-only forward: one pass, no CFG
PIPELINE_JOB = Job(1328, 1328, cfg=True)    # DiffSynth's pipeline defaults, true CFG at 4


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Qwen-Image's family and footprint, the transformer's largest group from a meta build
    (what footprint() records after a download)."""
    folder = tmp_path_factory.mktemp("qwen-transformer")
    (folder / "config.json").write_text(json.dumps(QWEN_TRANSFORMER_CONFIG))
    largest = _largest_group(folder, ("diffusers", "QwenImageTransformer2DModel"))
    assert 300e6 < largest < 400e6   # one of the 60 blocks, ~340 M parameters
    family = get_family("qwen-image")
    sizes = footprint(family)
    sizes = dataclasses.replace(sizes, components=tuple(
        dataclasses.replace(c, largest_group=largest) if c.name == "transformer" else c for c in sizes.components))
    return family, sizes, largest


def with_prefetch(name: str, prefetch: int, **overrides):
    preset = load_preset(name)
    components = {key: {**raw, "prefetch": prefetch, **overrides} for key, raw in preset.components.items()}
    return dataclasses.replace(preset, name=f"{name}-prefetch{prefetch}", components=components)


@pytest.mark.parametrize("preset", ["dynamic", "disk"])
def test_streaming_at_cap_zero_needs_the_window_activations_and_context(qwen, preset):
    family, sizes, largest = qwen
    p = predict(family, sizes, DIT_JOB, preset, on_gpu=True, vram_limit=0)
    window = largest * (2 + 1) * 2    # prefetch 2, bf16
    assert p.peak_vram_bytes >= window + CUDA_CONTEXT_BYTES
    denoising = p.phases["denoising"]["vram"] + CUDA_CONTEXT_BYTES
    assert p.peak_vram_bytes == denoising             # the DiT's phase is the peak
    # DiffSynth: "2G" streaming one Linear at a time; ours adds two blocks prefetched (1.27 GiB).
    assert 1 * G <= denoising <= 4 * G, denoising / G
    assert p.above_cap and p.parts["streaming_floor_vram"] == p.peak_vram_reserved_bytes


def test_no_cap_and_large_caps_never_go_below_the_window(qwen):
    family, sizes, largest = qwen
    floor = predict(family, sizes, DIT_JOB, "dynamic", on_gpu=True, vram_limit=0).peak_vram_bytes
    for limit in (None, 4, 8, 64):
        p = predict(family, sizes, DIT_JOB, "dynamic", on_gpu=True, vram_limit=limit)
        assert p.peak_vram_bytes >= floor, limit
        if limit is not None and limit * G >= floor:
            # Kept copies fill the cap, the CUDA context sits beside it.
            assert p.peak_vram_reserved_bytes == min(limit * G, p.parts["phase_peak_vram"]) and not p.above_cap


def test_a_cap_below_the_window_predicts_a_peak_above_the_cap(qwen):
    family, sizes, _ = qwen
    floor = predict(family, sizes, DIT_JOB, "dynamic", on_gpu=True, vram_limit=0)
    tight = predict(family, sizes, DIT_JOB, "dynamic", on_gpu=True, vram_limit=1)
    assert tight.above_cap and tight.peak_vram_bytes == floor.peak_vram_bytes > 1 * G
    # The tree turns it down with the reason (the core would raise VramLimitError).
    hardware = Hardware((GPU(0, "Simulated GPU", 24 * G, int(22.8 * G)),), "ok", 16 * G, int(14.4 * G), 500 * G, "/")
    text = decide(hardware, family, sizes, DIT_JOB, baseline_ram=G, vram_limit=1).describe()
    assert "disk: needs" in text and "vram_limit 1 GiB is below the 2.2 GiB its streaming window and activations need" in text


@pytest.mark.parametrize("preparing_dtype, item", [("{dtype}", 2), ("float8_e4m3fn", 1)])
def test_prefetch_depth_moves_the_window_by_whole_groups(qwen, preparing_dtype, item):
    family, sizes, largest = qwen
    peaks = {}
    for prefetch in (0, 2):
        preset = with_prefetch("dynamic", prefetch, preparing_dtype=preparing_dtype)
        peaks[prefetch] = predict(family, sizes, DIT_JOB, preset, on_gpu=True, vram_limit=0)
    grown = peaks[2].phases["denoising"]["vram"] - peaks[0].phases["denoising"]["vram"]
    assert grown == 2 * largest * item                # two more groups, in the dtype they move in
    assert peaks[2].peak_vram_bytes - peaks[0].peak_vram_bytes == grown
    if item == 1:
        # fp8 moves 1 byte per parameter; the running group is cast to bf16 for its forward.
        acts = peaks[0].phases["denoising"]["vram"] - largest * (1 + 2)
        bf16 = predict(family, sizes, DIT_JOB, with_prefetch("dynamic", 0), on_gpu=True, vram_limit=0)
        assert bf16.phases["denoising"]["vram"] - largest * 2 == acts


@pytest.mark.parametrize("preset, diffsynth_gib", [("basic", 56), ("cpu_offload", 40), ("fp8_offload", 21)])
def test_whole_model_presets_match_diffsynth(qwen, preset, diffsynth_gib):
    family, sizes, _ = qwen
    p = predict(family, sizes, PIPELINE_JOB, preset, on_gpu=True, dtype=torch.bfloat16)
    assert abs(p.peak_vram_bytes / G / diffsynth_gib - 1) <= 0.25, p.peak_vram_bytes / G
    assert p.parts["cuda_context"] == CUDA_CONTEXT_BYTES


def test_the_cpu_has_no_context_and_no_vram(qwen):
    family, sizes, _ = qwen
    p = predict(family, sizes, DIT_JOB, "dynamic", on_gpu=False, dtype=torch.float32, vram_limit=0)
    assert p.peak_vram_bytes is None and p.peak_vram_reserved_bytes is None and not p.above_cap
    assert "cuda_context" not in p.parts
