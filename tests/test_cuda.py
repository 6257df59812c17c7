"""The CUDA paths: side-stream copies ordered by events, pinned arenas, the cap.

Marked `cuda`; skipped on machines without an NVIDIA GPU (CI has none)."""

import copy

import pytest
import torch

import vram
from models import CASES, Stack, save_weights

pytestmark = pytest.mark.cuda
GIB = vram.GIB


def config(offload, preparing_dtype=torch.bfloat16, computation_dtype=torch.bfloat16, **extra):
    device, dtype = offload
    return {"offload_device": device, "offload_dtype": dtype, "onload_device": device, "onload_dtype": dtype,
            "preparing_device": "cuda", "preparing_dtype": preparing_dtype,
            "computation_device": "cuda", "computation_dtype": computation_dtype, **extra}


@pytest.mark.parametrize("name", ["zimage", "wan", "vae", "t5"])
@pytest.mark.parametrize("offload", [("cuda", torch.float32), ("cpu", torch.float32), ("disk", "disk")])
def test_cuda_equivalence(tmp_path, name, offload):
    case = CASES[name]
    plain = case.make()
    save_weights(plain, tmp_path)
    reference = copy.deepcopy(plain).cuda()
    inputs = [x.cuda() if isinstance(x, torch.Tensor) else x for x in _flat(case.inputs(torch.float32))]
    inputs = _unflat(case.inputs(torch.float32), inputs)
    with torch.no_grad():
        expected = case.run(reference, inputs)
    with vram.empty_weights():
        model = case.make()
    vram.enable_vram_management(model, config(offload, torch.float32, torch.float32), vram_limit=0, weights=tmp_path)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(case.run(model, inputs), expected)
    vram.disable_vram_management(model)


def test_streaming_respects_the_cap_and_prefetches(tmp_path):
    torch.manual_seed(0)
    plain = Stack(width=4096, depth=16, dtype=torch.bfloat16)  # 512 MiB of bf16 weights
    path = save_weights(plain, tmp_path)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = plain.cuda()(x)
    del plain
    torch.cuda.empty_cache()
    # Half the weights, GiB: room for the prefetch window (3 groups of 32 MiB) and some kept
    # groups beside cuBLAS's workspace, which the allocator holds under the cap too.
    limit = 0.5 * 0.5
    with vram.empty_weights():
        model = Stack(width=4096, depth=16, dtype=torch.bfloat16)
    vram.enable_vram_management(model, config(("cpu", torch.bfloat16)), vram_limit=limit, weights=path)
    vram.onload(model)
    counters = vram.get_manager().counters
    hits, sync, failures = counters.prefetch_hits, counters.sync_copies, counters.pin_failures
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)
    report = vram.last_report()
    assert report.cap_bytes == int(limit * GIB)
    assert report.within_cap, report.describe()
    assert counters.prefetch_hits > hits
    assert counters.bytes_to_device > 0
    # Every copy came from a pinned arena, asynchronously.
    assert counters.sync_copies == sync and counters.pin_failures == failures
    vram.disable_vram_management(model)


@pytest.mark.parametrize("with_files", [False, True])
def test_host_arenas_are_pinned_once(tmp_path, with_files):
    """Bound from its files or from its own tensors, every group's host arena is pinned, and
    the same pinned pages survive onload/offload (model-level offload copies nothing back)."""
    model = Stack(width=1024, depth=2)
    weights = save_weights(model, tmp_path) if with_files else None
    if with_files:
        with vram.empty_weights():
            model = Stack(width=1024, depth=2)
    cfg = config(("cpu", torch.float32), torch.float32, torch.float32)
    cfg.update(onload_device="cuda", onload_dtype=torch.float32)
    vram.enable_vram_management(model, cfg, weights=weights)
    record = vram.managed(model)
    arenas = [held.arena for group in record.groups for held in group.host_copies.values()]
    assert arenas and all(arena.pinned and arena.buffer.is_pinned() for arena in arenas)
    pointers = [arena.data_ptr for arena in arenas]
    x = torch.randn(4, 1024, device="cuda")
    for _ in range(2):
        vram.onload(model)
        with torch.no_grad():
            model(x)
        vram.offload(model)
    assert [arena.data_ptr for group in record.groups for arena in
            (c.arena for c in group.host_copies.values())] == pointers
    vram.release(model)
    assert not any(arena.pinned for arena in arenas)


def test_the_cap_is_the_allocators(tmp_path):
    """Past vram_limit the allocator itself refuses memory (an out-of-memory error the preset
    fallback steps down on), and the cap goes with the last model that set it."""
    from presets.fallback import out_of_memory
    model = Stack(width=1024, depth=4, dtype=torch.bfloat16)
    path = save_weights(model, tmp_path)
    with vram.empty_weights():
        model = Stack(width=1024, depth=4, dtype=torch.bfloat16)
    limit = 0.0625  # GiB
    vram.enable_vram_management(model, config(("cpu", torch.bfloat16)), vram_limit=limit, weights=path)
    torch.cuda.empty_cache()
    with pytest.raises(torch.OutOfMemoryError) as caught:
        torch.empty(int(2 * limit * GIB), dtype=torch.uint8, device="cuda")
    assert out_of_memory(caught.value)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)
    report = vram.last_report()
    assert report.within_cap and report.peak_reserved_bytes <= int(limit * GIB), report.describe()
    vram.disable_vram_management(model)
    del model
    big = torch.empty(int(2 * limit * GIB), dtype=torch.uint8, device="cuda")  # the cap is gone
    del big


def test_a_runs_peak_is_its_own_while_another_run_measures(tmp_path):
    from vram.devices import peak_scope
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    outer = peak_scope(device)
    first = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    del first
    inner = peak_scope(device)  # must not reset the outer run's peak
    small = torch.empty(2**20, dtype=torch.uint8, device=device)
    inner_peak = inner.close()
    outer_peak = outer.close()
    assert outer_peak[0] >= 64 * 2**20 and inner_peak[0] >= 2**20
    del small


def _flat(inputs):
    if isinstance(inputs, (list, tuple)):
        return [y for x in inputs for y in _flat(x)]
    return [inputs]


def _unflat(template, flat):
    flat = list(flat)

    def build(t):
        if isinstance(t, (list, tuple)):
            return type(t)(build(x) for x in t)
        return flat.pop(0)
    return build(template)
