"""Host storage and its movement, on the CPU: arena layouts, pinning (with fakes standing in for
CUDA), the mover interface, coalesced disk reads, short reads, and teardown with reads in flight."""

import copy
import os
import threading
from itertools import cycle

import pytest
import torch
from safetensors.torch import load_file, save_file

import vram
import vram.arena
import vram.weights
from vram.group import dtypes_at
from vram.arena import ALIGN, PAGE, Arena, ArenaPool, Layout
from vram.devices import make_mover
from vram.mover import Landing, SyncMover
from models import Stack, save_weights, stack_files

FP32 = torch.float32
WAIT = 30  # seconds: only a guard against a hang, never an assertion on time
DISK_TO_CPU = {"offload_device": "disk", "offload_dtype": "disk", "onload_device": "disk", "onload_dtype": "disk",
               "preparing_device": "cpu", "preparing_dtype": FP32,
               "computation_device": "cpu", "computation_dtype": FP32}


# -- layout ---------------------------------------------------------------------------------------

SPECS = [(torch.float32, (3, 5)), (torch.bfloat16, (7,)), (torch.float32, (2,)), (torch.float16, (1, 1)),
         (torch.float8_e4m3fn, (300,)), (torch.bfloat16, (4, 33)), (torch.float32, (0,)), (torch.float64, (2, 2))]


def test_layout_places_every_tensor_aligned_in_dtype_segments():
    layout = Layout(SPECS)
    assert layout.nbytes % ALIGN == 0
    # One segment per dtype, in first-seen order, back to back from 0 to nbytes.
    dtypes = list(dict.fromkeys(d for d, _ in SPECS))
    assert [segment[0] for segment in layout.segments] == dtypes
    position = 0
    for dtype, start, end, sizes, picks in layout.segments:
        assert start == position and start % ALIGN == 0 and end % ALIGN == 0
        assert sum(sizes) * dtype.itemsize == end - start
        position = end
        for _part, index, shape in picks:
            assert SPECS[index][0] == dtype and tuple(SPECS[index][1]) == shape
            assert start <= layout.slices[index].offset <= layout.slices[index].offset + \
                layout.slices[index].nbytes <= end
    assert position == layout.nbytes
    # Every slice aligned, the right size, and no two overlap.
    for (dtype, shape), piece in zip(SPECS, layout.slices):
        assert piece.offset % ALIGN == 0
        assert piece.dtype == dtype and piece.shape == shape
        assert piece.nbytes == torch.Size(shape).numel() * dtype.itemsize
    spans = sorted((s.offset, s.offset + s.nbytes) for s in layout.slices if s.nbytes)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_layout_views_are_typed_shaped_and_share_the_buffer():
    layout = Layout(SPECS)
    arena = Arena(layout.nbytes)
    views = layout.views(arena.buffer)
    byte_views = layout.byte_views(arena.buffer)
    values = []
    for i, ((dtype, shape), view, piece) in enumerate(zip(SPECS, views, layout.slices)):
        assert view.dtype == dtype and tuple(view.shape) == shape
        assert view.is_contiguous()
        if piece.nbytes:
            assert view.data_ptr() == arena.data_ptr + piece.offset
            assert view.data_ptr() % ALIGN == 0
        value = (torch.arange(view.numel(), dtype=torch.float64) * (i + 1) / 7).to(dtype).reshape(shape)
        view.copy_(value)
        values.append(value)
    for value, view, raw in zip(values, views, byte_views):
        assert raw.dtype == torch.uint8 and raw.numel() == value.numel() * value.dtype.itemsize
        assert torch.equal(view, value)
        assert torch.equal(raw, value.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("nbytes", [1, 255, 4095, 4096, 4097, 3 * 4096 + 17, 1 << 20])
def test_arena_buffers_are_page_aligned(nbytes):
    arena = Arena(nbytes)
    assert arena.data_ptr % PAGE == 0
    assert arena.buffer.data_ptr() == arena.data_ptr
    assert arena.buffer.dtype == torch.uint8 and arena.buffer.numel() == nbytes == arena.nbytes
    assert not arena.pinned
    arena.buffer.fill_(7)  # the whole buffer is writable
    assert int(arena.buffer.sum()) == 7 * nbytes
    arena.close()


def test_pinning_without_cuda_declines_cleanly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    arena = Arena(4096, pin=True)
    assert arena.pinned is False and "CUDA is not available" in arena.pin_error
    arena.close()


# -- the same host memory across model states ---------------------------------------------------

def host_pointers(model):
    return {(group.name, dtypes): c.arena.data_ptr
            for group in vram.managed(model).groups for dtypes, c in group.host_copies.items()}


CPU32 = {"offload_device": "cpu", "offload_dtype": FP32, "onload_device": "cpu", "onload_dtype": FP32,
         "preparing_device": "cpu", "preparing_dtype": FP32, "computation_device": "cpu", "computation_dtype": FP32}
# The onload tier differs (float64 in RAM, computing in float64), the offload tier is float32 in RAM.
CPU32_ONLOAD64 = CPU32 | {"onload_dtype": torch.float64, "preparing_dtype": torch.float64,
                          "computation_dtype": torch.float64}


@pytest.mark.parametrize("with_files", [False, True], ids=["own-tensors", "files"])
@pytest.mark.parametrize("config_name", ["cpu32", "onload64"])
def test_host_arenas_survive_offload_onload_offload(tmp_path, config_name, with_files):
    config = {"cpu32": CPU32, "onload64": CPU32_ONLOAD64}[config_name]
    dtype = config["computation_dtype"]
    torch.manual_seed(0)
    plain = Stack(width=64, depth=3).eval()
    reference = copy.deepcopy(plain).to(dtype)
    x = torch.randn(2, 64, dtype=dtype)
    with torch.no_grad():
        expected = reference(x)
    if with_files:
        path = save_weights(plain, tmp_path)
        with vram.empty_weights():
            model = Stack(width=64, depth=3)
        vram.enable_vram_management(model, config, weights=path)
    else:
        model = copy.deepcopy(plain)
        vram.enable_vram_management(model, config)
    record = vram.managed(model)
    # Normalisations follow the computation dtype (vram/casting.py); the rest stay float32.
    offload_of = {group.name: dtypes_at(group, "offload")[1] for group in record.groups}
    before = host_pointers(model)
    assert sorted(before) == sorted(offload_of.items())
    for _ in range(2):
        vram.onload(model)
        onloaded = host_pointers(model)
        # The offload arenas stay where they were while onloaded (nothing is reallocated)...
        assert {k: v for k, v in onloaded.items() if offload_of[k[0]] == k[1]} == before
        with torch.no_grad():
            assert torch.equal(model(x), expected)
        vram.offload(model)
        # ...and offloading copies nothing back: the very same arenas are the base again.
        assert host_pointers(model) == before
        assert all(group.base is group.host_copies[offload_of[group.name]] for group in record.groups)
        with torch.no_grad():
            assert torch.equal(model(x), expected)
    host = sum(n for (device, name, _, kind), n in vram.get_manager().ledger().items()
               if device == "host" and name == record.name and kind == "base")
    assert host == sum(c.arena.size for g in record.groups for c in g.host_copies.values())  # whole pages
    vram.release(model)


# -- pinning refused by a fake driver -------------------------------------------------------------

class FakeDriver:
    def __init__(self, code=2, message="fake refusal", cleared=True):
        self.code, self.message, self.cleared = code, message, cleared
        self.registered, self.unregistered, self.clears = [], [], 0

    def register(self, ptr, nbytes):
        self.registered.append((ptr, nbytes))
        return self.code, ("" if self.code == 0 else self.message)

    def unregister(self, ptr):
        self.unregistered.append(ptr)

    def clear(self):
        self.clears += 1
        return self.cleared


def fake_cuda(monkeypatch, driver):
    """Only Arena/ArenaPool objects may be built while this is in effect."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vram.arena, "_cuda_register", driver.register)
    monkeypatch.setattr(vram.arena, "_cuda_unregister", driver.unregister)
    monkeypatch.setattr(vram.arena, "_cuda_clear_error", driver.clear)


def test_a_refused_pinning_leaves_a_clean_pageable_arena(monkeypatch):
    driver = FakeDriver()
    with monkeypatch.context() as patch:
        fake_cuda(patch, driver)
        arena = Arena(4096, pin=True)
        assert arena.pinned is False
        assert "fake refusal" in arena.pin_error and "cudaHostRegister failed" in arena.pin_error
        assert "not cleared" not in arena.pin_error
        assert driver.clears == 1                    # the CUDA error was cleared
        assert driver.registered == [(arena.data_ptr, max(4096, PAGE))]  # whole pages of its own
        assert arena.data_ptr % PAGE == 0
        arena.close()
        assert driver.unregistered == []             # never registered, so never unregistered
        # Asking again tries again, and fails the same clean way.
        assert arena.pin() is False and driver.clears == 2 and arena.pinned is False
        arena.close()
        assert driver.unregistered == []
    arena.buffer.fill_(3)  # still an ordinary, usable buffer
    assert int(arena.buffer.sum()) == 3 * 4096 and not arena.buffer.is_pinned()


def test_an_uncleared_refusal_says_so(monkeypatch):
    driver = FakeDriver(cleared=False)
    with monkeypatch.context() as patch:
        fake_cuda(patch, driver)
        arena = Arena(100, pin=True)
        assert arena.pinned is False and "not cleared" in arena.pin_error
        assert driver.registered == [(arena.data_ptr, PAGE)]
        arena.close()
        assert driver.unregistered == []


def test_an_accepted_pinning_is_undone_once(monkeypatch):
    driver = FakeDriver(code=0)
    with monkeypatch.context() as patch:
        fake_cuda(patch, driver)
        arena = Arena(5000, pin=True)
        assert arena.pinned is True and arena.pin_error is None and driver.clears == 0
        assert arena.pin() is True and len(driver.registered) == 1  # pinned once
        arena.close()
        arena.close()
        assert driver.unregistered == [arena.data_ptr]


def test_the_pool_counts_refused_pinnings_and_reuses_arenas(monkeypatch):
    driver = FakeDriver()
    waited = []
    with monkeypatch.context() as patch:
        fake_cuda(patch, driver)
        pool = ArenaPool(8192, pin=True, keep=2, wait=waited.append)
        first, second = pool.acquire(), pool.acquire()
        assert pool.allocated == 2 and pool.pin_failures == 2 and driver.clears == 2
        assert not first.pinned and not second.pinned and "fake refusal" in first.pin_error
        assert first.data_ptr % PAGE == 0 and first.buffer.numel() == 8192
        event = object()
        pool.release(first, after=event)
        again = pool.acquire()                    # reused: no new arena, no new pinning attempt
        assert again is first and waited == [event]
        assert pool.allocated == 2 and pool.pin_failures == 2 and driver.clears == 2
        pool.release(again)
        pool.release(second)
        third = Arena(8192)
        pool.release(third)                      # more than keep: closed, not kept
        pool.close()
        assert driver.unregistered == []


# -- the mover interface on the CPU ---------------------------------------------------------------

def test_sync_mover_on_the_cpu():
    mover = SyncMover(torch.device("cpu"))
    assert isinstance(make_mover(torch.device("cpu")), SyncMover) and not mover.asynchronous
    layout = Layout([(FP32, (4, 4)), (torch.bfloat16, (3,))])
    arena = Arena(layout.nbytes)
    values = [torch.randn(4, 4), torch.randn(3).to(torch.bfloat16)]
    for view, value in zip(layout.views(arena.buffer), values):
        view.copy_(value)
    landing = mover.to_device(arena.buffer[:layout.nbytes], layout, (FP32, torch.bfloat16))
    assert isinstance(landing, Landing)
    assert landing.buffer.dtype == torch.uint8 and landing.buffer.numel() == layout.nbytes
    assert landing.event is None and landing.synchronous is False and landing.host is None
    assert landing.buffer.device.type == "cpu"
    for tensor, value in zip(landing.tensors, values):
        assert tensor.device.type == "cpu" and torch.equal(tensor, value)
    assert mover.record() is None
    mover.wait(None)
    mover.wait(landing.event)
    mover.host_done(None)
    mover.synchronize()
    mover.retire(landing)
    assert landing.buffer is None and landing.tensors == []
    mover.retire(landing)  # twice is harmless


# -- coalesced disk reads -------------------------------------------------------------------------

def expected_runs(infos):
    """Maximal sequences, by offset within one file, of tensors that start where the previous ended."""
    runs = 0
    by_file = {}
    for info in infos:
        if info.nbytes:
            by_file.setdefault(info.file.path, []).append(info)
    for items in by_file.values():
        items.sort(key=lambda i: i.offset)
        end = None
        for info in items:
            if info.offset != end:
                runs += 1
            end = info.offset + info.nbytes
    return runs


def check_targets(source, keys, files_values):
    targets = [(source.info(k), torch.full((source.info(k).nbytes,), 0xAB, dtype=torch.uint8)) for k in keys]
    before = source.preadv_calls
    read_before = source.bytes_read
    calls = source.read_into(targets)
    assert calls == expected_runs([info for info, _ in targets])
    assert source.preadv_calls - before == calls
    assert source.bytes_read - read_before == sum(info.nbytes for info, _ in targets)
    for (info, buffer), key in zip(targets, keys):
        value = files_values[key]
        assert torch.equal(buffer.view(info.dtype).reshape(info.shape), value), key
    return calls


@pytest.fixture
def two_files(tmp_path):
    g = torch.Generator().manual_seed(5)
    first = {"a": torch.randn(10, generator=g), "b": torch.randn(3, 3, generator=g),
             "c": torch.randn(7, generator=g).to(torch.bfloat16), "d": torch.randn(5, generator=g),
             "e": torch.randn(2, generator=g, dtype=torch.float64), "z": torch.randn(4, generator=g)}
    second = {"f": torch.randn(6, generator=g), "g": torch.randn(8, generator=g)}
    save_file(first, str(tmp_path / "one.safetensors"))
    save_file(second, str(tmp_path / "two.safetensors"))
    values = load_file(str(tmp_path / "one.safetensors")) | load_file(str(tmp_path / "two.safetensors"))
    return vram.WeightSource(tmp_path), values


def test_read_into_makes_one_preadv_per_run(two_files):
    source, values = two_files
    one = vram.SafetensorsFile(source.files[0].path).tensors
    order = [k for k, _ in sorted(one.items(), key=lambda item: item[1].offset)]
    # safetensors orders by dtype size, then name: e (f64), a b d z (f32), c (bf16).
    assert order == ["e", "a", "b", "d", "z", "c"]
    assert check_targets(source, order, values) == 1                       # the whole file: one run
    assert check_targets(source, ["b", "a"], values) == 1                  # adjacent, in any order
    assert check_targets(source, ["a", "d"], values) == 2                  # b lies between them
    assert check_targets(source, ["e", "b", "z", "c"], values) == 3        # e | b | z c
    assert check_targets(source, ["a", "f", "g", "d"], values) == 3        # a | d, and f g in the other file
    assert check_targets(source, ["c"], values) == 1


class Mixed(torch.nn.Module):
    """Blocks whose Linear is bfloat16 and LayerNorm float32: in the file each block's two
    dtypes lie in different sections, with the other blocks' tensors between them."""

    def __init__(self, depth=3, width=16):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width, dtype=torch.bfloat16), torch.nn.LayerNorm(width))
            for _ in range(depth))

    def forward(self, x):
        for linear, norm in self.blocks:
            x = norm(linear(x.to(torch.bfloat16)).float())
        return x


@pytest.mark.parametrize("kind", ["gaps", "adjacent"])
def test_a_group_is_read_in_one_preadv_per_run(tmp_path, kind):
    torch.manual_seed(0)
    plain = (Mixed() if kind == "gaps" else Stack(width=32, depth=3)).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().clone() for k, v in plain.state_dict().items()}, str(path))
    values = load_file(str(path))
    with vram.empty_weights():
        model = Mixed() if kind == "gaps" else Stack(width=32, depth=3)
    vram.enable_vram_management(model, DISK_TO_CPU, vram_limit=0, weights=path)
    record = vram.managed(model)
    header = vram.SafetensorsFile(path).tensors
    counters = vram.get_manager().counters
    blocks = [group for group in record.groups if group.block]
    assert len(blocks) == 3
    for group in blocks:
        infos = [header[entry.keys[0]] for entry in group.entries]
        runs = expected_runs(infos)
        assert runs == (2 if kind == "gaps" else 1)
        arena = Arena(group.file_layout.nbytes)
        before, counted = record.source.preadv_calls, counters.preadv_calls
        group.read_into(arena)
        assert record.source.preadv_calls - before == runs
        assert counters.preadv_calls - counted == runs
        for entry, view in zip(group.entries, group.file_layout.views(arena.buffer)):
            assert torch.equal(view, values[entry.keys[0]]), entry.keys[0]
    vram.release(model)


def test_short_reads_still_fill_every_buffer(two_files, monkeypatch):
    source, values = two_files
    real = os.preadv
    limits = cycle([1000, 1, 999, 64, 3])
    made = []

    def short(fd, buffers, offset, *rest):
        left, views = next(limits), []
        for buffer in buffers:
            if left <= 0:
                break
            views.append(buffer[:left])
            left -= len(views[-1])
        made.append(sum(len(v) for v in views))
        return real(fd, views, offset, *rest)

    monkeypatch.setattr(vram.weights.os, "preadv", short)
    keys = sorted(values)
    targets = [(source.info(k), torch.zeros(source.info(k).nbytes, dtype=torch.uint8)) for k in keys]
    calls = source.read_into(targets)
    assert calls == len(made) > expected_runs([info for info, _ in targets])
    for (info, buffer), key in zip(targets, keys):
        assert torch.equal(buffer.view(info.dtype).reshape(info.shape), values[key]), key
    # Single reads too, into a fresh tensor and into a reused buffer.
    scratch = torch.zeros(1024, dtype=torch.uint8)
    for key in keys:
        assert torch.equal(source.read(key), values[key]), key
        assert torch.equal(source.read(key, out=scratch), values[key]), key


def test_bigger_tensors_read_short(tmp_path, monkeypatch):
    """A read cut inside a tensor, and a run longer than one read, land exactly."""
    g = torch.Generator().manual_seed(6)
    tensors = {"big": torch.randn(3000, generator=g), "mid": torch.randn(257, generator=g),
               "one": torch.randn(1, generator=g)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    source = vram.WeightSource(tmp_path / "w.safetensors")
    real = os.preadv
    monkeypatch.setattr(vram.weights.os, "preadv",
                        lambda fd, buffers, offset, *rest: real(fd, [buffers[0][:1000]], offset, *rest))
    targets = [(source.info(k), torch.zeros(source.info(k).nbytes, dtype=torch.uint8)) for k in tensors]
    calls = source.read_into(targets)
    assert calls >= -(-sum(t.numel() * 4 for t in tensors.values()) // 1000)
    for (info, buffer), (key, value) in zip(targets, tensors.items()):
        assert torch.equal(buffer.view(FP32).reshape(info.shape), value), key


def test_end_of_file_is_an_error_and_frees_the_file(two_files, monkeypatch):
    source, _ = two_files
    monkeypatch.setattr(vram.weights.os, "preadv", lambda fd, buffers, offset, *rest: 0)
    info = source.info("a")
    with pytest.raises(ValueError, match="unexpected end of file"):
        source.read_into([(info, torch.zeros(info.nbytes, dtype=torch.uint8))])
    assert info.file._reading == 0
    monkeypatch.undo()
    source.close()  # returns: no read is counted as in flight
    assert info.file._fd is None


# -- teardown with reads in flight ----------------------------------------------------------------

def test_release_with_reads_in_flight(tmp_path):
    plain, path = stack_files(tmp_path, width=64, depth=8)
    with vram.empty_weights():
        model = Stack(width=64, depth=8)
    vram.enable_vram_management(model, DISK_TO_CPU, vram_limit=0, weights=path, name="inflight")
    record = vram.managed(model)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # the schedule is learned
    manager = vram.get_manager()

    source = record.source
    original = source.read_runs
    started, gate = threading.Event(), threading.Event()
    readers = []

    def slow_read_runs(runs):
        readers.append(threading.current_thread().name)
        started.set()
        gate.wait(WAIT)
        return original(runs)

    source.read_runs = slow_read_runs
    groups = record.groups
    for group in groups[2:6]:
        group.prefetch()
    assert started.wait(WAIT)
    assert readers and readers[0].startswith("vram-reader")
    assert any(g.reading for g in groups[2:6])
    charged = [k for k in manager.ledger() if k[1] == "inflight"]
    assert charged and all(kind == "prepared" for (_, _, _, kind) in charged)

    # The blocked read is let go only once release has begun.
    settle = groups[0].settle

    def settle_then_let_go():
        gate.set()
        settle()

    groups[0].settle = settle_then_let_go
    vram.release(model)
    assert gate.is_set()
    assert not [k for k in manager.ledger() if k[1] == "inflight"]
    assert not vram.is_managed(model)
    assert all(m.name != "inflight" for m in manager.models())
    assert all(g.state is vram.GroupState.RESTING and g.staged is None and not g.reading for g in groups)
    assert all(f._fd is None for f in source.files)
    assert record.streaming_bytes == 0 and record.kept_bytes == 0
    # The reader thread is free for the next model.
    assert vram.mover.submit(lambda: 42).result(WAIT) == 42


def test_close_waits_for_a_read_in_flight(two_files, monkeypatch):
    source, values = two_files
    file = source.files[0]
    real = os.preadv
    inside, gate = threading.Event(), threading.Event()
    events = []

    def blocking(fd, buffers, offset, *rest):
        inside.set()
        gate.wait(WAIT)
        got = real(fd, buffers, offset, *rest)
        events.append("read")
        return got

    class Signalling(threading.Condition):
        """close() is waiting: let the read go on."""

        def wait(self, timeout=None):
            events.append("close waits")
            gate.set()
            return super().wait(timeout)

    file._idle = Signalling(file._fd_lock)
    monkeypatch.setattr(vram.weights.os, "preadv", blocking)
    results, errors = [], []

    def read():
        try:
            results.append(file.read("a"))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    assert inside.wait(WAIT)
    file.close()
    events.append("closed")
    reader.join(WAIT)
    assert not reader.is_alive()
    assert errors == []
    assert events[0] == "close waits" and events.index("read") < events.index("closed")
    assert file._fd is None and file._reading == 0
    assert torch.equal(results[0], values["a"])
    monkeypatch.undo()
    assert torch.equal(file.read("b"), values["b"])  # a later read reopens the file
    file.close()


def test_disk_reads_run_on_the_reader_thread(tmp_path, monkeypatch):
    """After the first forward taught the order, groups are read ahead, in the background."""
    from models import Stack, stack_files
    plain, path = stack_files(tmp_path)
    with vram.empty_weights():
        model = Stack()
    vram.enable_vram_management(model, {"offload_device": "disk", "offload_dtype": "disk",
                                        "onload_device": "disk", "onload_dtype": "disk",
                                        "computation_device": "cpu", "computation_dtype": torch.float32},
                                weights=path)
    source = vram.managed(model).source
    threads = []
    original = source.read_runs

    def spy(runs):
        threads.append(threading.current_thread().name)
        return original(runs)

    monkeypatch.setattr(source, "read_runs", spy)
    x = torch.randn(2, 256)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), plain(x))
    assert sum(name.startswith("vram-reader") for name in threads) > len(threads) // 2
