"""The stand-in accelerator (vram/standin.py): it punishes what a GPU punishes.

A copy reads NaN until it lands, its source is read when it runs, a retired buffer is
poisoned, the allocator refuses memory past the cap. The model-level tests take one wait
out of the core (monkeypatched) and check that the answer goes wrong: the stand-in catches
what it is there to catch, so the equivalence tests that pass under it mean something."""

import threading
import time
import types

import pytest
import torch

import vram
from models import Stack, cfg, stack_files
from presets.fallback import out_of_memory
from vram import standin
from vram.arena import Arena, ArenaPool, Layout
from vram.mover import CudaMover, _CudaPeaks

GIB = vram.GIB
FP32 = torch.float32
HOST = ("cpu", FP32)
DEVICE = ("standin", FP32)
DISK = ("disk", "disk")


def host_buffer(engine, values, pinned=True):
    layout = Layout([(v.dtype, tuple(v.shape)) for v in values])
    arena = Arena(layout.nbytes, pin=engine.pinner if pinned else False)
    for view, value in zip(layout.views(arena.buffer), values):
        view.copy_(value)
    return arena, layout


# -- the engine ------------------------------------------------------------------------------------

def test_a_copy_reads_nan_until_it_lands():
    engine = standin.StandIn(bandwidth=1e9, latency=0.5)  # long enough for a loaded machine
    values = [torch.randn(64), torch.randn(8, 8).to(torch.bfloat16)]
    arena, layout = host_buffer(engine, values)
    assert arena.pinned and engine.pinner.is_pinned(arena.buffer[:layout.nbytes])
    landing = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32, FP32))
    assert not landing.synchronous and not landing.event.query()
    assert all(t.isnan().all() for t in landing.tensors)  # not there yet: NaN, cast output too
    engine.wait(landing.event)
    assert landing.event.query()
    assert torch.equal(landing.tensors[0], values[0])
    assert torch.equal(landing.tensors[1], values[1].to(FP32))
    assert engine.allocated == layout.nbytes + 64 * 4 and engine.copies == 1
    engine.retire(landing)
    assert engine.allocated == 0 and engine.live_buffers == 0


def test_a_pageable_copy_blocks_the_host_and_says_so():
    engine = standin.StandIn(bandwidth=1e9, latency=0.02)
    values = [torch.randn(32)]
    arena, layout = host_buffer(engine, values, pinned=False)
    started = time.perf_counter()
    landing = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    assert time.perf_counter() - started >= 0.02
    assert landing.synchronous and landing.event.query()
    assert torch.equal(landing.tensors[0], values[0])
    engine.retire(landing)


def test_the_source_is_read_when_the_copy_runs():
    """What a pinned arena holds when the copy stream gets to it is what lands: a host buffer
    reused before ``host_done`` gives the device the wrong bytes."""
    engine = standin.StandIn(bandwidth=1e9, latency=0.05)
    arena, layout = host_buffer(engine, [torch.zeros(16)])
    landing = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    layout.views(arena.buffer)[0].fill_(7.0)  # too early
    engine.host_done(landing.event)
    assert torch.equal(landing.tensors[0], torch.full((16,), 7.0))
    engine.retire(landing)


def test_a_retired_buffer_is_poisoned_once_the_copy_stream_has_passed_it():
    engine = standin.StandIn(bandwidth=1e9, latency=0.05)
    values = [torch.randn(16)]
    arena, layout = host_buffer(engine, values)
    in_flight = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    held = in_flight.tensors[0]  # a forward that keeps a tensor past retire
    engine.retire(in_flight)
    assert in_flight.buffer is None and engine.allocated == 0
    engine.synchronize()
    assert held.isnan().all()  # the copy landed, then the poison after it
    landed = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    engine.wait(landed.event)
    held = landed.tensors[0]
    assert torch.equal(held, values[0])
    engine.retire(landed)
    assert held.isnan().all()  # landed copies are poisoned at once


def test_the_allocator_refuses_memory_past_the_cap():
    engine = standin.StandIn(latency=0.0)
    arena, layout = host_buffer(engine, [torch.randn(256)])
    engine.set_cap(layout.nbytes - 1)
    with pytest.raises(torch.OutOfMemoryError, match="stand-in accelerator") as caught:
        engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    assert out_of_memory(caught.value)  # what the preset fallback steps down on
    assert engine.allocated == 0
    # A cast output past the cap gives back the buffer it already had.
    engine.set_cap(layout.nbytes + 100)
    with pytest.raises(torch.OutOfMemoryError):
        engine.to_device(arena.buffer[:layout.nbytes], layout, (torch.float64,))
    assert engine.allocated == 0 and engine.live_buffers == 0
    engine.set_cap(None)
    engine.retire(engine.to_device(arena.buffer[:layout.nbytes], layout, (torch.float64,)))


def test_a_failed_copy_is_an_error_for_whoever_waits_not_a_hang():
    engine = standin.StandIn(latency=0.0)
    arena, layout = host_buffer(engine, [torch.randn(8)])

    def fail(job):
        raise RuntimeError("the copy engine broke")
    engine._carry_out = fail
    landing = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    with pytest.raises(RuntimeError, match="stand-in copy failed.*the copy engine broke"):
        engine.wait(landing.event)
    del engine._carry_out  # the engine's thread survives and carries on
    again = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    engine.wait(again.event)
    assert torch.equal(again.tensors[0], layout.views(arena.buffer)[0])


def test_copies_made_under_inference_mode_are_ordinary_tensors():
    engine = standin.StandIn(latency=0.0)
    arena, layout = host_buffer(engine, [torch.randn(8)])
    with torch.inference_mode():
        landing = engine.to_device(arena.buffer[:layout.nbytes], layout, (torch.float64,))
        engine.wait(landing.event)
    assert not landing.buffer.is_inference() and not landing.tensors[0].is_inference()
    engine.retire(landing)


def test_peaks_are_per_run_and_overlapping_runs_do_not_reset_each_other():
    engine = standin.StandIn(latency=0.0)
    arena, layout = host_buffer(engine, [torch.randn(256)])
    first = engine.peaks()
    a = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    b = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    engine.retire(a)
    engine.retire(b)
    second = engine.peaks()  # opened after the first run's peak
    c = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    assert second.close() == (layout.nbytes, layout.nbytes)
    assert first.close() == (2 * layout.nbytes, 2 * layout.nbytes)
    assert first.close() is None  # closed once
    engine.retire(c)


def test_copies_take_bytes_over_bandwidth():
    engine = standin.StandIn(bandwidth=200e6, latency=0.001)
    arena, layout = host_buffer(engine, [torch.randn(250_000)])  # 1 MB: 5 ms at 200 MB/s
    started = time.perf_counter()
    landings = [engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,)) for _ in range(4)]
    engine.synchronize()
    elapsed = time.perf_counter() - started
    expected = 4 * (0.001 + layout.nbytes / 200e6)
    assert expected <= elapsed < expected + 0.5
    assert engine.busy_s == pytest.approx(expected, rel=0.3)
    for landing in landings:
        engine.retire(landing)


def test_pinning_past_the_limit_is_refused_cleanly():
    engine = standin.StandIn()
    engine.pinner.limit = 3 * 4096
    first = Arena(2 * 4096, pin=engine.pinner)
    second = Arena(2 * 4096, pin=engine.pinner)
    assert first.pinned and not second.pinned and "stand-in pinning failed" in second.pin_error
    assert not engine.pinner.is_pinned(second.buffer)
    first.close()
    assert engine.pinner.pinned_bytes == 0 and not engine.pinner.is_pinned(first.buffer)
    assert second.pin() and engine.pinner.is_pinned(second.buffer[100:200])
    second.close()


def test_cuda_peaks_reset_only_when_no_other_run_measures(monkeypatch):
    """A fake of torch's one peak per device: a reset while another run measures would
    hand that run a peak lower than its own, and the fake records that as a failure."""
    state = {"now": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: state.update(peak=state["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: state["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: state["peak"])

    def allocate(n):
        state["now"] += n
        state["peak"] = max(state["peak"], state["now"])

    device = torch.device("cuda", 0)
    allocate(100)
    first = _CudaPeaks(device)
    allocate(50)     # the first run's peak: 150
    allocate(-50)
    second = _CudaPeaks(device)  # must not reset: the first run is still measuring
    allocate(10)
    assert second.close()[0] >= 110
    assert first.close() == (150, 150)
    third = _CudaPeaks(device)   # alone again: its own peak
    assert third.close() == (110, 110)


def test_the_cuda_cap_is_the_allocators_memory_fraction(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    mover = types.SimpleNamespace(device=torch.device("cuda", 0))
    CudaMover.set_cap(mover, 20 * GIB)
    CudaMover.set_cap(mover, None)
    CudaMover.set_cap(mover, 100 * GIB)
    assert calls == [(0.25, mover.device), (1.0, mover.device), (1.0, mover.device)]


# -- the core under the stand-in ---------------------------------------------------------------------

@pytest.fixture
def slow_copies():
    """Copies slow enough that a consumer always gets there first."""
    with standin.configured(bandwidth=200e6, latency=0.01) as engine:
        yield engine


def managed(folder, config, limit=None, seed=0):
    plain, path = stack_files(folder, seed=seed)
    with vram.empty_weights():
        model = Stack()
    vram.enable_vram_management(model, config, vram_limit=limit, weights=path)
    return plain, model


def outputs(model, x, n=3):
    with torch.no_grad():
        return [model(x) for _ in range(n)]


@pytest.mark.parametrize("offload", [HOST, DISK], ids=["ram", "disk"])
def test_the_core_waits_for_every_copy(tmp_path, slow_copies, offload, monkeypatch):
    plain, model = managed(tmp_path, cfg(offload, DEVICE, DEVICE), limit=0)
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = plain(x)
    assert all(torch.equal(y, expected) for y in outputs(model, x))
    counters = vram.get_manager().counters
    assert counters.sync_copies == 0 and counters.pin_failures == 0  # every copy asynchronous
    # The same run with the consumer's wait taken out computes from weights not yet there.
    monkeypatch.setattr(standin.StandIn, "wait", lambda self, event: None)
    assert any(y.isnan().any() for y in outputs(model, x))


def test_a_read_arena_reused_before_its_copy_left_it_gives_wrong_weights(tmp_path, slow_copies, monkeypatch):
    plain, model = managed(tmp_path, cfg(DISK, DEVICE, DEVICE, prefetch=2), limit=0)
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = plain(x)
    assert all(torch.equal(y, expected) for y in outputs(model, x))
    # The pool hands an arena back out without waiting for the copy out of it.
    release = ArenaPool.release
    monkeypatch.setattr(ArenaPool, "release", lambda self, arena, after=None: release(self, arena))
    assert any(not torch.equal(y, expected) for y in outputs(model, x, n=4))


def test_offload_and_onload_with_copies_in_flight(tmp_path, slow_copies):
    """A forward leaves the next forward's prefetches in flight; switching the model's state
    then waits for them, frees every device buffer, and the next forward is exact."""
    plain, model = managed(tmp_path, cfg(HOST, DEVICE, DEVICE, onload=DEVICE), limit=None)
    engine = slow_copies
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = plain(x)
    for _ in range(2):
        assert all(torch.equal(y, expected) for y in outputs(model, x, n=2))
        vram.onload(model)        # resident on the device: one copy per group, in flight now
        assert torch.equal(outputs(model, x, n=1)[0], expected)
        vram.offload(model)
        engine.synchronize()
        assert engine.allocated == 0 and engine.live_buffers == 0
        assert vram.managed(model).resident_bytes().get("standin", 0) == 0
    assert engine.empty_cache_calls >= 4  # every state switch hands the allocator's cache back


def test_the_cap_is_the_allocators_and_overruns_are_out_of_memory(tmp_path, slow_copies, monkeypatch):
    layer = 256 * 256 * 4 + 256 * 4
    limit = 4.5 * layer / GIB
    plain, model = managed(tmp_path, cfg(HOST, DEVICE, DEVICE), limit=limit)
    engine = slow_copies
    assert engine.cap == int(limit * GIB)
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = plain(x)
    scope = engine.peaks()
    assert all(torch.equal(y, expected) for y in outputs(model, x))
    report = vram.last_report()
    assert report.peak_reserved_bytes is not None and report.within_cap
    assert scope.close()[1] <= engine.cap
    # A budget that ignored the cap would keep every copy: the allocator says no.
    monkeypatch.setattr(vram.get_manager(), "budget", lambda device: None)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        outputs(model, x, n=2)
    assert out_of_memory(caught.value)
    monkeypatch.undo()
    vram.disable_vram_management(model)
    assert engine.cap is None and engine.allocated == 0


def test_the_budget_counts_what_the_allocator_holds(tmp_path, slow_copies):
    """Memory on the device that the ledger does not know of (another library's buffers)
    shrinks the budget."""
    layer = 256 * 256 * 4 + 256 * 4
    limit = 6.5 * layer / GIB
    plain, model = managed(tmp_path, cfg(HOST, DEVICE, DEVICE), limit=limit)
    engine = slow_copies
    manager = vram.get_manager()
    cap = int(limit * GIB)
    assert manager.budget("standin") == cap - cap // 32
    arena, layout = host_buffer(engine, [torch.randn(2 * layer // 4)])
    foreign = engine.to_device(arena.buffer[:layout.nbytes], layout, (FP32,))
    assert manager.budget("standin") == cap - (layout.nbytes + cap // 32)
    engine.retire(foreign)
    assert manager.budget("standin") == cap - cap // 32


def test_the_activation_reserve_scales_to_a_bigger_job(tmp_path):
    plain, model = managed(tmp_path, cfg(HOST, DEVICE, DEVICE), limit=0.01)
    record = vram.managed(model)
    manager = vram.get_manager()
    manager.expect_job(record, 1000)
    manager.note_activations(record, 10_000)
    manager.expect_job(record, 1000)
    assert manager.activation_reserve("standin") == 11_000
    manager.expect_job(record, 4000)      # four times the tokens x batch: four times the room
    assert manager.activation_reserve("standin") == 44_000
    manager.expect_job(record, 500)       # smaller: scaled down, not the largest seen
    assert manager.activation_reserve("standin") == 5_500
    manager.note_activations(record, 6_000)
    manager.expect_job(record, 500)       # measured at this size now
    assert manager.activation_reserve("standin") == 6_600
    manager.expect_job(record, 0)         # unknown size: the largest measured
    assert manager.activation_reserve("standin") == 11_000


def test_vram_limit_zero_streams_everything_and_says_so(tmp_path, slow_copies):
    plain, model = managed(tmp_path, cfg(HOST, DEVICE, DEVICE), limit=0)
    x = torch.randn(2, 256)
    outputs(model, x)
    report = vram.last_report()
    assert report.cap_bytes is None and report.vram_limit == 0
    assert "every group streamed, none kept" in report.describe()
    assert slow_copies.cap is None
    assert set(vram.managed(model).group_states().values()) <= {"offload", "staging", "preparing"}
    assert vram.managed(model).kept_bytes == 0


def test_two_threads_share_one_model_under_slow_copies(tmp_path, slow_copies):
    """Every consumer waits: a second thread entering a group the first is staging (or has
    staged) reads it only once it has landed."""
    plain, model = managed(tmp_path, cfg(HOST, DEVICE, DEVICE, prefetch=1), limit=None)
    inputs = [torch.randn(2, 256, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        expected = [plain(x) for x in inputs]
    failures = []
    barrier = threading.Barrier(2)

    def work():
        barrier.wait()
        with torch.no_grad():
            for _ in range(3):
                for x, want in zip(inputs, expected):
                    if not torch.equal(model(x), want):
                        failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize("with_files", [False, True])
def test_host_arenas_are_pinned_once(tmp_path, with_files):
    """tests/test_cuda.py's test of the same name, under the stand-in: bound from its files or
    from its own tensors, every group's host arena is pinned, and the same pinned pages
    survive onload/offload (model-level offload copies nothing back)."""
    engine = standin.engine()
    model = Stack(width=128, depth=2)
    weights = stack_files(tmp_path, width=128, depth=2)[1] if with_files else None
    if with_files:
        with vram.empty_weights():
            model = Stack(width=128, depth=2)
    vram.enable_vram_management(model, cfg(HOST, DEVICE, DEVICE, onload=DEVICE), weights=weights)
    record = vram.managed(model)
    arenas = [held.arena for group in record.groups for held in group.host_copies.values()]
    assert arenas and all(arena.pinned and engine.pinner.is_pinned(arena.buffer) for arena in arenas)
    pointers = [arena.data_ptr for arena in arenas]
    x = torch.randn(4, 128)
    for _ in range(2):
        vram.onload(model)
        with torch.no_grad():
            model(x)
        vram.offload(model)
    assert [arena.data_ptr for group in record.groups for arena in
            (c.arena for c in group.host_copies.values())] == pointers
    vram.release(model)
    assert not any(arena.pinned for arena in arenas)


@pytest.mark.parametrize("offload", [HOST, DISK], ids=["ram", "disk"])
def test_refused_pinning_is_counted_and_copies_fall_back_to_synchronous(tmp_path, offload):
    """The driver refuses to page-lock any more memory: arenas stay pageable, each refusal is
    counted once, every copy from them blocks the host (and says so), results stay exact."""
    with standin.configured(bandwidth=1e9, latency=0.002, pin_limit=0):
        counters = vram.get_manager().counters
        failures, sync = counters.pin_failures, counters.sync_copies
        plain, model = managed(tmp_path, cfg(offload, DEVICE, DEVICE, prefetch=1), limit=0)
        x = torch.randn(2, 256)
        with torch.no_grad():
            expected = plain(x)
        assert all(torch.equal(y, expected) for y in outputs(model, x))
        record = vram.managed(model)
        arenas = ([c.arena for g in record.groups for c in g.host_copies.values()] if offload is HOST
                  else [None] * record.pool.allocated)
        assert counters.pin_failures - failures == len(arenas) > 0
        assert counters.sync_copies - sync >= 3 * len(record.groups)


def test_a_streaming_model_beside_a_capped_one_keeps_to_the_cap(tmp_path, slow_copies):
    """A cap is the device's: a vram_limit=0 model computing beside a capped one streams within
    that cap (its copies wait for room, the capped model's kept copies make way), rather than
    running into the allocator's refusal."""
    layer = 256 * 256 * 4 + 256 * 4
    limit = 4.5 * layer / GIB
    plain_a, capped = managed(tmp_path / "a", cfg(HOST, DEVICE, DEVICE), limit=limit, seed=1)
    plain_b, streaming = managed(tmp_path / "b", cfg(HOST, DEVICE, DEVICE), limit=0, seed=2)
    x = torch.randn(2, 256)
    scope = slow_copies.peaks()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(capped(x), plain_a(x))
            assert torch.equal(streaming(x), plain_b(x))
    assert scope.close()[1] <= slow_copies.cap == int(limit * GIB)


def test_a_model_collected_without_release_gives_its_cap_back(tmp_path):
    """The garbage collector may run anywhere, inside the engine's or the manager's locks: a
    collected model is only noted there, and the next budget question drops its cap."""
    import gc
    engine = standin.engine()
    layer = 256 * 256 * 4 + 256 * 4
    limit = 4.5 * layer / GIB
    _, model = managed(tmp_path, cfg(HOST, DEVICE, DEVICE), limit=limit)
    with torch.no_grad():
        model(torch.randn(2, 256))
    assert engine.cap == int(limit * GIB)
    del model  # never released: its record goes with it
    gc.collect()
    assert not vram.get_manager().models()
    manager = vram.get_manager()
    assert manager.budget("standin") is None and engine.cap is None
    assert manager.resident_bytes("standin") == 0 and engine.live_buffers == 0 and engine.allocated == 0
