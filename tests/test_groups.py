"""Groups: which modules form the unit of transfer, and that streaming by blocks or by leaves
computes exactly what the plain model computes (FLUX and Qwen-Image at full depth, tiny width)."""

import copy
import logging
from collections import Counter

import pytest
import torch

import vram
from vram.grouping import block_classes, plan_groups
from models import CASES, Stack, cfg, save_weights, stack_files

FP32, FP64 = torch.float32, torch.float64
GRANULARITIES = ("block", "leaf")


RESIDENT = cfg(("cpu", FP32), ("cpu", FP32))
DISK = cfg(("disk", "disk"), ("cpu", FP32))
# Host streaming: float32 storage in RAM, staged and computed in float64 (exact casts).
HOST_STREAMING = cfg(("cpu", FP32), ("cpu", FP64), ("cpu", FP64))


@pytest.fixture(autouse=True, scope="module")
def one_compute_thread():
    """These models' matrices are tiny: with two OpenMP threads that spin between kernels
    (conftest imports torch before vram can ask for a passive wait policy) a forward takes
    seconds instead of milliseconds on a busy two-core machine. One thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the two large layouts, at tiny width ---------------------------------------------------------

def flux():
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=32, pooled_projection_dim=16, in_channels=16,
                                  axes_dims_rope=(4, 6, 6))


def qwen_image():
    from diffusers import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel(num_layers=60, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=32, in_channels=16, out_channels=4,
                                       axes_dims_rope=(4, 6, 6))


def flux_inputs(dtype):
    """16 image tokens (a 4x4 latent grid, packed), 4 text tokens."""
    g = torch.Generator().manual_seed(7)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1] = torch.arange(16) // 4
    img_ids[:, 2] = torch.arange(16) % 4
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, 4, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(1, 16, generator=g).to(dtype),
                timestep=torch.tensor([0.5], dtype=dtype), img_ids=img_ids, txt_ids=torch.zeros(4, 3))


def qwen_inputs(dtype):
    """16 image tokens (img_shapes 1x4x4), 4 text tokens, the last one masked out."""
    g = torch.Generator().manual_seed(8)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, 4, 32, generator=g).to(dtype),
                encoder_hidden_states_mask=torch.tensor([[1, 1, 1, 0]], dtype=torch.bool),
                timestep=torch.tensor([0.5], dtype=dtype), img_shapes=[[(1, 4, 4)]])


FAMILIES = {"flux": (flux, flux_inputs, 19 + 38), "qwen-image": (qwen_image, qwen_inputs, 60)}


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def build(make, seed=0):
    torch.manual_seed(seed)
    return make().eval()


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """``family_files(family)``: the seeded plain model, its saved weights, and its outputs in
    float32 and float64; built once per module."""
    built = {}

    def get(family):
        if family not in built:
            make, inputs, _ = FAMILIES[family]
            plain = build(make)
            path = save_weights(plain, tmp_path_factory.mktemp(family))
            references = {dtype: forward(copy.deepcopy(plain).to(dtype), inputs(dtype)) for dtype in (FP32, FP64)}
            built[family] = (plain, path, references)
        return built[family]
    return get


# -- grouping -------------------------------------------------------------------------------------

def outermost_blocks(model):
    """The modules of the classes the model names as its repeated blocks, outermost only."""
    classes = block_classes(model)
    found = []

    def walk(module):
        for child in module.children():
            if type(child).__name__ in classes:
                found.append(child)
            else:
                walk(child)
    walk(model)
    return found


def check_partition(model, record, granularity):
    """Every parameter slot is installed by exactly one group; every parameter (tied ones
    once) is an entry of exactly one group; every module holding parameters is in one group."""
    slots = Counter()
    for group in record.groups:
        for params, name, index in group.installs:
            assert 0 <= index < len(group.entries)
            slots[(id(params), name)] += 1
    expected_slots = {(id(m._parameters), n) for m in model.modules() for n, p in m._parameters.items()
                      if p is not None}
    assert set(slots) == expected_slots
    assert all(count == 1 for count in slots.values())
    owners = Counter(id(entry) for group in record.groups for entry in group.entries)
    assert all(count == 1 for count in owners.values())
    assert set(owners) == {id(entry) for entry in record.entries}
    modules = Counter(name for group in record.groups for name in group.modules)
    assert all(count == 1 for count in modules.values())
    assert set(modules) == {name for name, m in model.named_modules()
                            if any(p is not None for p in m._parameters.values())}
    if granularity == "leaf":
        assert not any(group.block for group in record.groups)


def tied_sets(model):
    keys = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        keys.setdefault(id(param), []).append(key)
    return [names for names in keys.values() if len(names) > 1]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_cases_partition_into_groups(case_name, granularity):
    case = CASES[case_name]
    model = case.make()
    keys = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    ties = tied_sets(model)
    blocks = outermost_blocks(model)
    plain_params = {id(p) for p in model.parameters()}
    # The plan alone: every parameter is held by the members of exactly one plan.
    plans = plan_groups(model, granularity)
    held = Counter()
    for plan in plans:
        params = {id(p) for _, m in plan.members for p in m._parameters.values() if p is not None}
        held.update(params)
    assert set(held) == plain_params and all(n == 1 for n in held.values())

    vram.enable_vram_management(model, RESIDENT | {"granularity": granularity})
    record = vram.managed(model)
    check_partition(model, record, granularity)
    assert {k for e in record.entries for k in e.keys} == keys
    for names in ties:  # tied parameters: one entry, in one merged group
        modules = [name.rsplit(".", 1)[0] if "." in name else "" for name in names]
        assert len({id(record.group_of(m)) for m in modules}) == 1, names
        assert len([e for e in record.entries if set(names) <= set(e.keys)]) == 1, names
    if granularity == "block":
        assert sum(group.block for group in record.groups) == len(blocks)
        roots = {id(group.roots[0]) for group in record.groups if group.block}
        assert roots == {id(b) for b in blocks}
    summary = record.summary()
    assert summary["groups"] == len(record.groups) and summary["granularity"] == granularity
    vram.release(model)


def test_named_ties_land_in_one_group():
    for case_name, pairs in (("gpt2", ("lm_head", "transformer.wte")), ("zoo", ("head", "embed"))):
        for granularity in GRANULARITIES:
            model = CASES[case_name].make()
            vram.enable_vram_management(model, RESIDENT | {"granularity": granularity})
            record = vram.managed(model)
            group = record.group_of(pairs[0])
            assert group is record.group_of(pairs[1]), (case_name, granularity)
            assert len(group.roots) >= 2 and "+" in group.name
            vram.release(model)


def test_expected_blocks_of_the_small_cases():
    counts = {name: len(outermost_blocks(CASES[name].make())) for name in CASES}
    assert counts["t5"] == 2 and counts["gpt2"] == 2 and counts["wan"] == 2 and counts["zoo"] == 0
    assert counts["zimage"] == 4  # 2 layers, 1 noise refiner, 1 context refiner


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_depth_layouts_group_by_block(family_files, family, granularity):
    make, _, n_blocks = FAMILIES[family]
    _, path, _ = family_files(family)
    with vram.empty_weights():
        model = make()
    vram.enable_vram_management(model, DISK | {"granularity": granularity}, vram_limit=0, weights=path)
    record = vram.managed(model)
    check_partition(model, record, granularity)
    blocks = [group for group in record.groups if group.block]
    if granularity == "block":
        assert len(blocks) == n_blocks == len(outermost_blocks(model))
        classes = block_classes(model)
        assert all(type(g.roots[0]).__name__ in classes and len(g.roots) == 1 for g in blocks)
        assert record.summary()["blocks"] == n_blocks
        # The rest of the model: a few groups beside the blocks.
        assert len(record.groups) - n_blocks < 12
    else:
        assert blocks == []
        assert len(record.groups) == sum(1 for m in model.modules()
                                         if any(p is not None for p in m._parameters.values()))
    vram.release(model)


# -- equivalence under both granularities ---------------------------------------------------------


@pytest.mark.standin
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("tier", ["disk", "host-streaming"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streaming_is_bit_identical(family_files, family, tier, granularity):
    make, make_inputs, _ = FAMILIES[family]
    plain, path, references = family_files(family)
    if tier == "disk":
        dtype = FP32
        with vram.empty_weights():
            model = make()
        returned = vram.enable_vram_management(model, DISK | {"granularity": granularity}, vram_limit=0,
                                               weights=path)
    else:
        dtype = FP64
        model = copy.deepcopy(plain)
        returned = vram.enable_vram_management(model, HOST_STREAMING | {"granularity": granularity}, vram_limit=0)
    assert returned is model
    record = vram.managed(model)
    # On disk every group streams. In RAM, groups holding only layers kept in the computation
    # dtype (normalisations, proj_out: vram/casting.py) are resident there already (static:
    # their hooks do nothing); every block streams.
    streamed = [group for group in record.groups if not group.static]
    if tier == "disk":
        assert len(streamed) == len(record.groups)
    assert all(not group.static for group in record.groups if group.block)
    assert len(streamed) > len(record.groups) // 2
    inputs = make_inputs(dtype)
    counters = vram.get_manager().counters
    sync = counters.sync_copies
    for _ in range(2):  # the second forward runs the learned order, with prefetch
        entries = counters.hook_entries
        out = forward(model, inputs)
        assert torch.equal(out, references[dtype])
        assert counters.hook_entries - entries == len(streamed)
        assert counters.sync_copies == sync
    assert all(group.users == 0 for group in record.groups)
    vram.release(model)


# -- a cap smaller than a block -------------------------------------------------------------------

LINEAR_BYTES = 256 * 256 * 4 + 256 * 4
BLOCK_BYTES = LINEAR_BYTES + 2 * 256 * 4


def test_a_block_larger_than_the_cap_streams_leaf_by_leaf(tmp_path, caplog):
    plain, path = stack_files(tmp_path, depth=4)
    cap = LINEAR_BYTES + 1024
    assert LINEAR_BYTES < cap < BLOCK_BYTES
    with vram.empty_weights():
        model = Stack(depth=4)
    with caplog.at_level(logging.INFO, logger="vram.model"):
        vram.enable_vram_management(model, DISK, vram_limit=cap / vram.GIB, weights=path, name="capped")
    record = vram.managed(model)
    assert len(record.groups) == 8
    assert not any(group.block for group in record.groups)
    assert all(group.need <= record.cap_bytes for group in record.groups)
    assert [g.name for g in record.groups] == [f"blocks.{i}.{j}" for i in range(4) for j in range(2)]
    check_partition(model, record, "leaf")
    said = [r.getMessage() for r in caplog.records if r.name == "vram.model" and "leaf by leaf" in r.getMessage()]
    assert len(said) == 4 and all("streamed leaf by leaf" in m for m in said)
    assert "'blocks.0'" in said[0]
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = plain(x)
        for _ in range(2):
            assert torch.equal(model(x), expected)
    manager = vram.get_manager()
    assert manager.peak_bytes("cpu") <= manager.budget("cpu")
    vram.release(model)


def test_a_cap_that_holds_a_block_keeps_blocks(tmp_path, caplog):
    plain, path = stack_files(tmp_path, depth=4)
    with vram.empty_weights():
        model = Stack(depth=4)
    with caplog.at_level(logging.INFO, logger="vram.model"):
        vram.enable_vram_management(model, DISK, vram_limit=1.5 * BLOCK_BYTES / vram.GIB, weights=path)
    record = vram.managed(model)
    assert [g.block for g in record.groups] == [True] * 4
    assert not any("leaf by leaf" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 256)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    vram.release(model)


# -- the returned model ---------------------------------------------------------------------------

def test_enable_returns_the_model_itself():
    torch.manual_seed(0)
    plain = Stack(width=32, depth=2).eval()
    model = copy.deepcopy(plain)
    returned = vram.enable_vram_management(model, HOST_STREAMING, vram_limit=0)
    assert returned is model and vram.is_managed(returned)
    assert isinstance(vram.managed(returned), vram.ManagedModel) and vram.managed(returned).module is model
    x = torch.randn(3, 32, dtype=FP64)
    with torch.no_grad():
        assert torch.equal(returned(x), copy.deepcopy(plain).double()(x))
    assert vram.disable_vram_management(returned) is model
    assert not vram.is_managed(model)
