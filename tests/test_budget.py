"""Budgets: what the core holds never passes vram_limit; eviction frees room for others."""

import threading

import pytest
import torch

import vram
from models import Stack, stack_files

pytestmark = pytest.mark.standin  # each test runs on the CPU and on the stand-in accelerator

GIB = vram.GIB
DISK_TO_CPU = {"offload_device": "disk", "offload_dtype": "disk", "onload_device": "disk", "onload_dtype": "disk",
               "preparing_device": "cpu", "preparing_dtype": torch.float32,
               "computation_device": "cpu", "computation_dtype": torch.float32}
LAYER_BYTES = 256 * 256 * 4 + 256 * 4  # one Linear of the stack


def managed_stack(folder, limit, seed=0, **extra):
    plain, path = stack_files(folder, seed=seed)
    with vram.empty_weights():
        model = Stack()
    vram.enable_vram_management(model, DISK_TO_CPU | extra, vram_limit=limit, weights=path, name=f"stack{seed}")
    return plain, model


def key(model) -> str:
    """The ledger device the model computes on ("cpu", or "standin" under the stand-in)."""
    return vram.managed(model).budget_key


def test_resident_bytes_never_pass_the_budget(tmp_path, computation):
    limit = 4.5 * LAYER_BYTES / GIB
    plain, model = managed_stack(tmp_path, limit)
    manager = vram.get_manager()
    budget = manager.budget(key(model))
    cap = int(limit * GIB)
    # A device with an allocator of its own keeps 1/32 of the cap for its rounding.
    assert budget == (cap - cap // 32 if computation == "standin" else cap)
    x = torch.randn(3, 256)
    with torch.no_grad():
        expected = plain(x)
        for _ in range(3):
            assert torch.equal(model(x), expected)
            assert manager.peak_bytes(key(model)) <= budget
    # Some layers stay prepared (the budget has room beyond the streaming window), not all.
    states = vram.managed(model).group_states()
    prepared = [name for name, state in states.items() if state == "preparing"]
    assert 0 < len(prepared) < len(states)
    assert vram.stats()["models"]["stack0"]["resident"][key(model)]["prepared"] <= budget
    vram.disable_vram_management(model)


def test_eviction_makes_room_for_another_model(tmp_path):
    limit = 6.5 * LAYER_BYTES / GIB
    plain_a, model_a = managed_stack(tmp_path / "a", limit, seed=1)
    plain_b, model_b = managed_stack(tmp_path / "b", limit, seed=2)
    manager = vram.get_manager()
    before = manager.counters.evictions
    x = torch.randn(2, 256)
    with torch.no_grad():
        assert torch.equal(model_a(x), plain_a(x))
        assert torch.equal(model_a(x), plain_a(x))
        held_by_a = vram.managed(model_a).resident_bytes().get(key(model_a), 0)
        assert held_by_a > 0
        assert torch.equal(model_b(x), plain_b(x))
        assert torch.equal(model_b(x), plain_b(x))
    assert manager.counters.evictions > before
    assert vram.managed(model_a).resident_bytes().get(key(model_a), 0) < held_by_a
    assert manager.peak_bytes(key(model_a)) <= manager.budget(key(model_a))
    ledger = manager.ledger()
    assert any(model == "stack2" and kind == "prepared" for (_, model, _, kind) in ledger)
    vram.disable_vram_management(model_a)
    vram.disable_vram_management(model_b)


def test_offload_releases_everything_staged(tmp_path):
    plain, model = managed_stack(tmp_path, None, ram_cache_gib=0)
    vram.onload(model)
    with torch.no_grad():
        model(torch.randn(1, 256))
    vram.offload(model)
    assert vram.managed(model).resident_bytes().get(key(model), 0) == 0
    assert vram.managed(model).streaming_bytes == 0 and vram.managed(model).kept_bytes == 0
    assert set(vram.managed(model).group_states().values()) == {"offload"}
    vram.disable_vram_management(model)


def test_cap_smaller_than_a_layer_fails_before_any_work(tmp_path):
    _, path = stack_files(tmp_path)
    with vram.empty_weights():
        model = Stack()
    with pytest.raises(ValueError, match="vram_limit=.* too small .*blocks"):
        vram.enable_vram_management(model, DISK_TO_CPU, vram_limit=0.5 * LAYER_BYTES / GIB, weights=path)
    assert not vram.is_managed(model)


def test_ram_cache_spares_the_second_read(tmp_path):
    plain, model = managed_stack(tmp_path, 0, ram_cache_gib=1.0)
    counters = vram.get_manager().counters
    x = torch.randn(2, 256)
    with torch.no_grad():
        start = counters.bytes_read_from_disk
        assert torch.equal(model(x), plain(x))
        first = counters.bytes_read_from_disk - start
        assert torch.equal(model(x), plain(x))
        second = counters.bytes_read_from_disk - start - first
    assert first >= 8 * LAYER_BYTES
    assert second == 0
    assert vram.get_manager().ledger().get(("host", "stack0", "(ram cache)", "cache"), 0) >= first
    vram.disable_vram_management(model)


def test_two_models_in_two_threads_stay_correct(tmp_path):
    limit = 5.5 * LAYER_BYTES / GIB
    plain_a, model_a = managed_stack(tmp_path / "a", limit, seed=3)
    plain_b, model_b = managed_stack(tmp_path / "b", limit, seed=4)
    inputs = [torch.randn(2, 256, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with torch.no_grad():
        expected = {("a", i): plain_a(x) for i, x in enumerate(inputs)} | \
                   {("b", i): plain_b(x) for i, x in enumerate(inputs)}
    failures = []
    barrier = threading.Barrier(2)

    def work(tag, model):
        barrier.wait()
        with torch.no_grad():
            for _ in range(4):
                for i, x in enumerate(inputs):
                    if not torch.equal(model(x), expected[(tag, i)]):
                        failures.append((tag, i))

    threads = [threading.Thread(target=work, args=("a", model_a)), threading.Thread(target=work, args=("b", model_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    manager = vram.get_manager()
    assert manager.peak_bytes(key(model_a)) <= manager.budget(key(model_a))
    # Nothing is left in use; prefetches still in flight for a next forward finish cleanly.
    for model in (model_a, model_b):
        groups = vram.managed(model).groups
        assert all(group.users == 0 for group in groups)
        for group in groups:
            if group.pending is not None:
                group.pending.result(timeout=30)
    vram.disable_vram_management(model_a)
    vram.disable_vram_management(model_b)


def test_one_model_shared_by_two_threads(tmp_path):
    plain, model = managed_stack(tmp_path, 0)
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = plain(x)
    results = []

    def work():
        with torch.no_grad():
            for _ in range(5):
                results.append(torch.equal(model(x), expected))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 10
    vram.disable_vram_management(model)


def test_onload_to_ram_and_track(tmp_path):
    """Onloading a disk-tier model to RAM reads it once; vram.track reports work done
    outside forward against the cap."""
    plain, path = stack_files(tmp_path)
    with vram.empty_weights():
        model = Stack()
    config = dict(DISK_TO_CPU, onload_device="cpu", onload_dtype=torch.float32,
                  offload_device="disk", offload_dtype="disk")
    vram.enable_vram_management(model, config, vram_limit=6 * LAYER_BYTES / GIB, weights=path)
    vram.onload(model)
    record = vram.managed(model)
    # On the CPU the onload tier is host RAM, not the budget device: everything fits.
    assert record.resident_bytes()["host"] >= 8 * LAYER_BYTES
    x = torch.randn(2, 256)
    with torch.no_grad(), vram.track(model) as tracked:
        assert torch.equal(model(x), plain(x))
    report = vram.last_report()
    assert report.model == tracked.name and report.within_cap
    vram.disable_vram_management(model)


def test_the_order_is_learned_and_later_forwards_are_prefetched(tmp_path):
    plain, model = managed_stack(tmp_path, 0)
    counters = vram.get_manager().counters
    x = torch.randn(2, 256)
    misses = []
    with torch.no_grad():
        for _ in range(3):
            before = counters.prefetch_misses
            assert torch.equal(model(x), plain(x))
            misses.append(counters.prefetch_misses - before)
    groups = len(vram.managed(model).groups)
    assert misses[0] == 1              # the first group; the guess (definition order) prefetched the rest
    assert misses[1] <= 1              # the first group, before the loop closed
    assert misses[2] == 0              # the end of one forward prefetches the next one's start
    vram.disable_vram_management(model)


def test_three_models_three_threads_under_one_tight_cap(tmp_path):
    """Interleaved forwards of three models share a cap that holds a few layers: they evict
    each other's kept copies and wait for each other's memory, and every output is exact."""
    limit = 4.5 * LAYER_BYTES / GIB
    pairs = [managed_stack(tmp_path / str(i), limit, seed=10 + i) for i in range(3)]
    inputs = [torch.randn(2, 256, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        expected = [[plain(x) for x in inputs] for plain, _ in pairs]
    failures, errors = [], []
    barrier = threading.Barrier(3)

    def work(index):
        _, model = pairs[index]
        barrier.wait()
        try:
            with torch.no_grad():
                for round_ in range(5):
                    for i, x in enumerate(inputs):
                        if not torch.equal(model(x), expected[index][i]):
                            failures.append((index, round_, i))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and failures == []
    manager = vram.get_manager()
    assert manager.peak_bytes(key(pairs[0][1])) <= manager.budget(key(pairs[0][1]))


def test_a_runs_ledger_peak_is_not_reset_by_another_runs_start():
    manager = vram.get_manager()
    first = manager.peak_scope("test-device")
    manager.charge("test-device", "m", "g", "prepared", 100)
    manager.refund("test-device", "m", "g", "prepared", 100)
    second = manager.peak_scope("test-device")   # another run starts: the first keeps its peak
    manager.charge("test-device", "m", "g", "prepared", 10)
    assert second.close() == 10
    assert first.close() == 100  # its own peak, not the 10 the ledger held when the second began
    manager.refund("test-device", "m", "g", "prepared", 10)
