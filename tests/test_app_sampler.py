"""The background memory sampler (vram/sampler.py) with a fake NVML, without NVML, and with
NVML failing half-way; its ring buffer and its thread."""

import os
import sys
import types

import pytest

from app_harness import wait_until
from vram.sampler import MemorySampler

G = 1024**3


class FakeNVML(types.SimpleNamespace):
    """The NVML calls the sampler makes, over one device whose use the test sets."""

    def __init__(self, total=12 * G, used=3 * G, mine=2 * G, fail_reads_after=None):
        super().__init__(total=total, used=used, mine=mine, reads=0, fail_reads_after=fail_reads_after,
                         initialised=False, shut=False)

    def nvmlInit(self):
        self.initialised = True

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index != 0:
            raise RuntimeError("NVMLError_InvalidArgument")
        return "gpu0"

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.reads += 1
        if self.fail_reads_after is not None and self.reads > self.fail_reads_after:
            raise RuntimeError("NVMLError_GpuIsLost")
        return types.SimpleNamespace(total=self.total, used=self.used, free=self.total - self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.mine),
                types.SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=5 * G)]


def test_with_a_fake_nvml_it_reads_the_device_and_this_process():
    nvml = FakeNVML()
    sampler = MemorySampler(interval=0.1, nvml=nvml)
    assert sampler.has_nvml and sampler.nvml_status == "ok" and sampler.device_total_bytes == 12 * G
    first = sampler.sample()
    assert first.device_used_bytes == 3 * G and first.process_device_bytes == 2 * G  # only this pid's share
    assert first.rss_bytes > 0 and 0 < first.ram_used_bytes <= sampler.ram_total_bytes
    nvml.used, nvml.mine = 5 * G, 4 * G
    second = sampler.sample()
    assert (second.device_used_bytes, second.process_device_bytes) == (5 * G, 4 * G)
    assert second.time >= first.time and sampler.latest() is second
    sampler.stop()
    assert nvml.shut and not sampler.has_nvml


def test_without_the_nvml_package_it_samples_ram_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    sampler = MemorySampler(interval=0.1)
    assert not sampler.has_nvml and "nvidia-ml-py" in sampler.nvml_status
    reading = sampler.sample()
    assert reading.device_used_bytes is None and reading.process_device_bytes is None
    assert reading.rss_bytes > 0 and reading.ram_used_bytes > 0
    assert sampler.device_total_bytes is None


def test_without_a_driver_it_says_why():
    class NoDriver(FakeNVML):
        def nvmlInit(self):
            raise RuntimeError("NVMLError_LibraryNotFound: NVML Shared Library Not Found")
    sampler = MemorySampler(nvml=NoDriver())
    assert not sampler.has_nvml and sampler.nvml_status.startswith("NVML unavailable") \
        and "LibraryNotFound" in sampler.nvml_status
    assert sampler.sample().device_used_bytes is None


def test_a_gpu_that_fails_half_way_leaves_ram_sampling_running():
    nvml = FakeNVML(fail_reads_after=2)          # one read at start (total), one sample, then lost
    sampler = MemorySampler(nvml=nvml)
    assert sampler.sample().device_used_bytes == 3 * G
    lost = sampler.sample()
    assert lost.device_used_bytes is None and lost.rss_bytes > 0
    assert "NVML failed" in sampler.nvml_status and "GpuIsLost" in sampler.nvml_status and nvml.shut


def test_the_ring_buffer_keeps_the_last_readings_and_filters_by_time():
    ticks = iter(range(100))
    sampler = MemorySampler(capacity=5, nvml=False, clock=lambda: float(next(ticks)))
    for _ in range(8):
        sampler.sample()
    assert [s.time for s in sampler.samples()] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert [s.time for s in sampler.samples(since=4.5, until=6.0)] == [5.0, 6.0]
    assert sampler.nvml_status == "NVML disabled"


def test_the_thread_samples_in_the_background_until_stopped():
    with MemorySampler(interval=0.05, nvml=FakeNVML()) as sampler:
        assert sampler.running
        wait_until(lambda: len(sampler.samples()) >= 4, timeout=30, what="four background readings")
    assert not sampler.running
    count = len(sampler.samples())
    assert sampler.samples()[-1].device_used_bytes == 3 * G
    assert len(sampler.samples()) == count  # stopped means stopped


@pytest.mark.parametrize("interval, capacity", [(0, 10), (-1, 10), (0.1, 0)])
def test_bad_settings_are_refused(interval, capacity):
    with pytest.raises(ValueError):
        MemorySampler(interval=interval, capacity=capacity, nvml=False)
