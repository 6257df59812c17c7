"""presets/placement.py and the tree's multi_gpu branch: everything resident over several GPUs,
whole components balanced, a component too large for any one GPU split into runs of blocks.

The numbers (registry sizes, bf16, 1024x1024; simulated cards of N GiB with 95% free, so each
cap is free minus 0.5 GiB, floored to a quarter: 10.75 GiB on a 12, 22.25 GiB on a 24):
* FLUX.1-dev: 31.4 GiB of weights (transformer 22.2, T5 8.9), 0.4 GiB of activations at most.
  2 x 12: 21.5 GiB of caps is too little -> the single-GPU tree (dynamic). 2 x 24: no card
  holds it (basic needs 32.3 GiB) but both do, the 22.2 GiB transformer split -> multi_gpu.
* Qwen-Image: 53.7 GiB of weights, more than 2 x 22.25 GiB -> the single-GPU tree on both.
* Z-Image-Turbo: 19.1 GiB (transformer 11.5, text encoder 7.5): 2 x 12 holds it with the
  transformer split (11.5 GiB > a 10.75 GiB cap) -> multi_gpu; one 24 GB card -> basic.
Nothing is downloaded; the tiny FLUX transformer lives on the meta device.
"""

import pytest
import torch

from pipelines import get_family
from pipelines.loading import execution_component
from presets.footprint import ComponentSize, Footprint, footprint
from presets.placement import PlacementError, plan_placement
from presets.planner import CUDA_CONTEXT_BYTES, Job, activation_bytes
from presets.probe import GPU, Hardware
from presets.tree import MULTI_GPU, TREE_ORDER, decide, next_preset
from test_groups import flux
from vram.grouping import group_sizes, plan_groups

G = 1024**3
JOB = Job(1024, 1024)


def gpus(*sizes_gib: float) -> tuple[GPU, ...]:
    return tuple(GPU(i, f"Simulated GPU {i}", int(s * G), int(s * G * 0.95)) for i, s in enumerate(sizes_gib))


def machine(*sizes_gib: float, ram_gib: int = 128) -> Hardware:
    return Hardware(gpus(*sizes_gib), "ok", ram_gib * G, int(ram_gib * G * 0.9), 500 * G, "/")


def choose(key: str, *sizes_gib: float, **kwargs):
    family = get_family(key)
    kwargs.setdefault("multi_gpu_runs", True)
    return decide(machine(*sizes_gib), family, footprint(family), JOB, baseline_ram=1 * G, **kwargs)


def test_the_tree_runs_a_placement_unless_switched_off():
    decision = choose("flux.1-dev", 24, 24, multi_gpu_runs=None)   # MULTI_GPU_RUNS: the pipelines run it
    assert decision.preset == MULTI_GPU and decision.placement is not None
    assert decision.predictions[MULTI_GPU].per_gpu.keys() == {0, 1}
    off = choose("flux.1-dev", 24, 24, multi_gpu_runs=False)
    assert off.preset == "dynamic" and off.placement is None  # as on one 24 GB card
    text = off.describe()
    assert "multi_gpu: 2 GPUs" in text and "a plan only" in text and "transformer: blocks" in text


def place(key: str, cards, **kwargs):
    family = get_family(key)
    return plan_placement(family, footprint(family), JOB, cards, **kwargs)


# -- the tree -------------------------------------------------------------------------------

@pytest.mark.parametrize("key, card, expected", [
    ("flux.1-dev", 12, "dynamic"),         # 31.4 GiB > 10.75 + 10.75
    ("flux.1-dev", 24, MULTI_GPU),         # no card holds 32.3 GiB; two hold it split
    ("qwen-image", 12, "dynamic"),
    ("qwen-image", 24, "dynamic"),         # 53.7 GiB > 22.25 + 22.25
    ("z-image-turbo", 12, MULTI_GPU),      # 19.1 GiB over 2 x 10.75, its transformer split
    ("z-image-turbo", 24, "basic"),        # one card holds it: no split
])
def test_tree_splits_only_when_no_card_but_all_of_them_hold_the_model(key, card, expected):
    decision = choose(key, card, card)
    assert decision.preset == expected, decision.describe()
    text = decision.describe()
    if expected == MULTI_GPU:
        assert decision.placement is not None and decision.vram_limit is None
        assert "basic: needs" in text and "not enough VRAM" in text
        assert f"{MULTI_GPU}: 2 GPUs, needs 1.0 GiB RAM, " in text and " GiB caps -> yes" in text
        assert "transformer: blocks 0-" in text and text.splitlines()[-1] == f"-> {MULTI_GPU}"
        assert len(decision.placement.used) == 2 and set(decision.placement.splits) == {"transformer"}
    else:
        assert decision.placement is None
        assert (f"{MULTI_GPU}: 2 GPUs -> no: " in text) == (expected != "basic"), text


def test_flux_on_two_24s_is_explained_with_each_gpus_share():
    decision = choose("flux.1-dev", 24, 24)
    lines = decision.explanation
    branch = next(line for line in lines if line.startswith(MULTI_GPU))
    assert branch.endswith("GiB VRAM of 22.25 + 22.25 GiB caps -> yes"), branch
    placement = decision.placement
    for gpu in placement.gpus:
        assert gpu.reserved_bytes <= gpu.cap_bytes
        assert gpu.peak_bytes == gpu.reserved_bytes + CUDA_CONTEXT_BYTES
        assert f"  GPU {gpu.index}: {gpu.reserved_bytes / G:.1f} GiB of 22.25 GiB cap" in "\n".join(lines)
    assert placement.device_of("transformer") == "cuda:0"   # its non-block weights sit with its first run
    assert next_preset(decision.preset) == "cpu_offload"   # a failed run falls back below basic


def test_a_failed_split_leaves_the_single_gpu_tree_as_it_was():
    one, two = choose("qwen-image", 24), choose("qwen-image", 24, 24)
    extra = [line for line in two.explanation if line not in one.explanation]
    assert extra == [f"{MULTI_GPU}: 2 GPUs -> no: 53.7 GiB of weights and 0.4 GiB of activations need more than "
                     "the caps 22.25 + 22.25 GiB hold"]
    assert (two.preset, two.vram_limit) == (one.preset, one.vram_limit)


def test_single_gpu_machines_never_weigh_the_branch():
    for key, card in (("flux.1-dev", 24), ("z-image-turbo", 12), ("qwen-image", 80)):
        decision = choose(key, card)
        assert decision.placement is None and MULTI_GPU not in decision.describe()
    assert MULTI_GPU not in TREE_ORDER
    assert [next_preset(p) for p in TREE_ORDER] == ["cpu_offload", "dynamic", "fp8_offload", "disk", None]


def test_the_users_cap_applies_to_every_gpu():
    decision = choose("flux.1-dev", 24, 24, vram_limit=20)
    assert decision.preset == MULTI_GPU
    assert [g.cap_bytes for g in decision.placement.gpus] == [20 * G, 20 * G]
    assert choose("flux.1-dev", 24, 24, vram_limit=15).preset != MULTI_GPU   # 30 GiB < 31.4


# -- caps -----------------------------------------------------------------------------------

def test_caps_default_to_free_minus_margin_or_take_one_number():
    by_default = place("flux.1-dev", gpus(24, 16))
    assert [g.cap_bytes for g in by_default.gpus] == [int(22.25 * G), int(14.5 * G)]
    one_number = place("flux.1-dev", gpus(24, 24), vram_limit=18.5)
    assert [g.cap_bytes for g in one_number.gpus] == [int(18.5 * G)] * 2


def test_caps_as_a_mapping_like_max_memory():
    cards = gpus(24, 24, 24)
    placement = place("flux.1-dev", cards, vram_limit={0: 12, "cuda:2": 22})
    assert [g.index for g in placement.gpus] == [0, 2]   # a GPU left out is not used
    assert [g.cap_bytes for g in placement.gpus] == [12 * G, 22 * G]
    assert all(g.reserved_bytes <= g.cap_bytes for g in placement.gpus)
    with pytest.raises(ValueError, match="'cuda:5' is not one of the GPUs"):
        place("flux.1-dev", cards, vram_limit={"cuda:5": 10})
    with pytest.raises(PlacementError, match="need more than the caps 4 \\+ 4 GiB hold"):
        place("flux.1-dev", cards, vram_limit={0: 4, 1: 4})


# -- runs of blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["flux.1-dev", "qwen-image", "z-image-turbo", "wan2.1-t2v-14b"])
@pytest.mark.parametrize("cards", [(12, 12), (16, 16), (24, 16), (24, 24), (12, 12, 12), (16, 16, 16, 16),
                                   (24, 12, 12)])
def test_splits_are_contiguous_runs_on_as_few_gpus_as_hold_them(key, cards):
    family = get_family(key)
    sizes = footprint(family)
    try:
        placement = plan_placement(family, sizes, JOB, gpus(*cards))
    except PlacementError as error:
        assert "need more than the caps" in str(error) or "fits on no GPU" in str(error)
        return
    assert set(placement.whole) | set(placement.splits) == {c.name for c in sizes.components}
    for gpu in placement.gpus:
        assert gpu.reserved_bytes <= gpu.cap_bytes, placement.describe()
    for name, split in placement.splits.items():
        indices = [index for index, _ in split.runs]
        assert len(indices) == len(set(indices)), split.runs         # one run per GPU
        assert indices == sorted(indices) and all(count > 0 for _, count in split.runs)
        assert all(placement.gpu(index).blocks[name] == count for index, count in split.runs)
        assert len(indices) >= 2                                      # else it would be whole
    lines = placement.describe()
    assert len(lines) == len(sizes.components) + len(placement.used)
    # The VAE decodes on the pipeline's execution device: where its first model computes.
    assert placement.device_of("vae") == placement.device_of(execution_component(family))


def test_a_component_that_fits_whole_is_never_split():
    placement = place("flux.1-dev", gpus(32, 32))        # the 22.2 GiB transformer fits a 29.75 GiB cap
    assert placement.splits == {} and placement.whole["transformer"] != placement.whole["text_encoder_2"]
    assert placement.device_map_for("transformer", ["transformer_blocks.0"]) == {}


# -- device_map_for on a real block list ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_flux():
    """A tiny FLUX transformer on the meta device: its 57 block names in order (19 double blocks,
    then 38 single ones 2.4x smaller) and their sizes, and its footprint as the files would give it."""
    with torch.device("meta"):
        model = flux()
    names = [plan.name for plan in plan_groups(model, "block") if plan.block]
    by_name = dict(group_sizes(model))
    parameters = sum(p.numel() for p in model.parameters())
    transformer = ComponentSize("transformer", "denoising", parameters, parameters * 2, {"bfloat16": parameters * 2},
                                from_headers=True, width=32, largest_group=max(by_name[n] for n in names))
    return names, [by_name[n] for n in names], Footprint("tiny-flux", (transformer,))


def runs_of(mapping: dict[str, str], names: list[str]) -> list[tuple[str, int]]:
    runs: list[tuple[str, int]] = []
    for name in names:
        device = mapping[name]
        if runs and runs[-1][0] == device:
            runs[-1] = (device, runs[-1][1] + 1)
        else:
            runs.append((device, 1))
    return runs


def test_device_map_for_maps_every_real_block_in_runs(tiny_flux):
    names, _, _ = tiny_flux
    placement = choose("flux.1-dev", 24, 24).placement      # 40 blocks estimated from the registry
    split = placement.splits["transformer"]
    mapping = placement.device_map_for("transformer", names)
    assert set(mapping) == set(names) and names[0] == "transformer_blocks.0"
    runs = runs_of(mapping, names)
    assert [device for device, _ in runs] == [f"cuda:{i}" for i, _ in split.runs]   # contiguous, in order
    first_share = split.runs[0][1] / split.blocks
    assert abs(runs[0][1] / len(names) - first_share) <= 1 / len(names)            # the planned share
    assert placement.device_map_for("vae", names) == {}                            # whole: no map


def test_device_map_for_cuts_by_real_size(tiny_flux):
    names, sizes, sizes_footprint = tiny_flux
    family = get_family("flux.1-dev")
    job = Job(16, 16)
    transformer = sizes_footprint.components[0]
    # Each GPU holds three quarters of the weights beside the activations.
    cap = 0.75 * transformer.parameters * 2 + activation_bytes(family, transformer, job, torch.bfloat16)
    placement = plan_placement(family, sizes_footprint, job, gpus(1, 1), vram_limit=cap / G)
    assert set(placement.splits) == {"transformer"}
    sized = placement.device_map_for("transformer", names, sizes)
    equal = placement.device_map_for("transformer", names)
    for mapping in (sized, equal):
        assert len(runs_of(mapping, names)) == 2
    # The double blocks come first and are larger: cut by size, GPU 0 takes fewer of them.
    assert runs_of(sized, names)[0][1] < runs_of(equal, names)[0][1]
    non_block = transformer.parameters - sum(sizes)
    for gpu in placement.gpus:
        device = f"cuda:{gpu.index}"
        real = 2 * sum(s for n, s in zip(names, sizes) if sized[n] == device)
        real += 2 * non_block if device == placement.device_of("transformer") else 0
        assert real + gpu.activation_bytes <= gpu.cap_bytes, (device, real, gpu)
    with pytest.raises(ValueError, match="57 block names and 3 sizes"):
        placement.device_map_for("transformer", names, sizes[:3])
