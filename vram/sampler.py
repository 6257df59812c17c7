"""A background sampler of memory: the GPUs as NVML sees them, torch's allocator, the
process's RSS and the system's RAM, read every ``interval`` seconds into a ring buffer.

    sampler = MemorySampler(interval=0.2)
    sampler.start()
    ...
    for sample in sampler.samples(since=t0):
        print(sample.time, sample.rss_bytes, sample.device_used_bytes)
        for gpu in sample.gpus:
            print(gpu.cuda_index, gpu.device_used_bytes)
    sampler.stop()

Every GPU this process's CUDA sees is read, by CUDA index (``vram.gpus`` maps NVML's
numbering onto CUDA's under ``CUDA_VISIBLE_DEVICES``, as the hardware probe does); a sample's
own GPU fields are those of one of them, the sampler's ``device``.

Every reading degrades instead of failing: without the ``pynvml`` module, without a driver,
or with NVML raising, the NVML fields are None and ``nvml_status`` says why; without CUDA
torch (or before CUDA is initialised) the torch fields are None. The sampler never creates a
CUDA context: it reads torch's counters only once something else has initialised CUDA.

This module knows nothing of pipelines, presets or the app.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import psutil

from .gpus import in_cuda_order, nvml_gpus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU's part of a reading: bytes, None where the source is unavailable."""

    cuda_index: int                       # torch.device("cuda", cuda_index)
    torch_allocated_bytes: int | None     # torch's CUDA allocator on this GPU
    torch_reserved_bytes: int | None
    device_used_bytes: int | None         # NVML: used on the GPU, every process counted
    process_device_bytes: int | None      # NVML: this process's share, where the driver reports it


@dataclass(frozen=True, slots=True)
class MemorySample:
    """One reading. ``time`` is the sampler's clock (``time.monotonic`` by default), seconds;
    the rest are bytes, None where the source is unavailable. The GPU fields are the sampled
    device's (``MemorySampler.device``); ``gpus`` has every GPU read, by CUDA index."""

    time: float
    rss_bytes: int                        # this process's resident set
    ram_used_bytes: int                   # the whole system: total minus available
    torch_allocated_bytes: int | None     # torch's CUDA allocator on the sampled device
    torch_reserved_bytes: int | None
    device_used_bytes: int | None         # NVML: used on the device, every process counted
    process_device_bytes: int | None      # NVML: this process's share, where the driver reports it
    gpus: tuple[GpuSample, ...] = ()      # every GPU read (the sampled device's among them), by CUDA index

    def gpu(self, cuda_index: int) -> GpuSample | None:
        """GPU ``cuda_index``'s part of this reading, None where it was not read."""
        return next((gpu for gpu in self.gpus if gpu.cuda_index == cuda_index), None)


class _Nvml:
    """The few NVML calls the sampler makes, on every GPU CUDA sees; closed by ``shutdown``."""

    def __init__(self, module):
        self.module = module
        self.module.nvmlInit()
        try:
            visible = in_cuda_order(nvml_gpus(module))
            if not visible:
                raise LookupError(f"no GPU is visible to CUDA (CUDA_VISIBLE_DEVICES="
                                  f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
            self.handles = {gpu.cuda_index: gpu.handle for gpu in visible}
            self.total_bytes = {index: int(module.nvmlDeviceGetMemoryInfo(handle).total)
                                for index, handle in self.handles.items()}
        except Exception:
            self.shutdown()
            raise

    def read(self, pid: int) -> dict[int, tuple[int, int | None]]:
        """(used on the GPU, used by ``pid``) in bytes, by CUDA index."""
        return {index: self._read(handle, pid) for index, handle in self.handles.items()}

    def _read(self, handle, pid: int) -> tuple[int, int | None]:
        used = int(self.module.nvmlDeviceGetMemoryInfo(handle).used)
        mine = None
        try:
            for process in self.module.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == pid:
                    mine = (mine or 0) + int(process.usedGpuMemory or 0)
        except Exception:  # not supported by every driver, nor inside every container
            pass
        return used, mine

    def shutdown(self) -> None:
        try:
            self.module.nvmlShutdown()
        except Exception:
            pass


def _open_nvml(nvml) -> tuple[_Nvml | None, str]:
    if nvml is False:
        return None, "NVML disabled"
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None, "the nvidia-ml-py package is not installed"
    try:
        return _Nvml(nvml), "ok"
    except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, no visible GPU, ...
        return None, f"NVML unavailable: {type(error).__name__}: {error}"


def _torch_reader() -> Callable[[], dict[int, tuple[int, int]]]:
    """Reads torch's allocated and reserved bytes on every CUDA device, by index ({} before
    CUDA is initialised, or without torch)."""
    try:
        import torch
    except ImportError:
        return dict

    def read() -> dict[int, tuple[int, int]]:
        # is_initialized, not is_available: reading counters must not create a CUDA context.
        if not torch.cuda.is_initialized():
            return {}
        return {index: (torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index))
                for index in range(torch.cuda.device_count())}
    return read


class MemorySampler:
    """Samples memory every ``interval`` seconds (0.1-0.25 s suits a live graph) on a daemon
    thread, keeping the last ``capacity`` readings.

    Every GPU CUDA sees is read; ``device`` is the CUDA index whose readings fill a sample's
    own GPU fields. ``nvml`` replaces the ``pynvml`` module (tests pass a fake); ``False``
    turns NVML off. ``pid`` is whose RSS and GPU share are read (default: this process);
    ``clock`` gives ``MemorySample.time``."""

    def __init__(self, interval: float = 0.2, capacity: int = 9000, *, device: int = 0, nvml=None,
                 pid: int | None = None, clock: Callable[[], float] = time.monotonic):
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity!r}")
        self.interval = float(interval)
        self.device = device
        self.clock = clock
        self.pid = os.getpid() if pid is None else pid
        self._process = psutil.Process(self.pid)
        self._buffer: deque[MemorySample] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml, self.nvml_status = _open_nvml(nvml)
        self._torch = _torch_reader()
        self.ram_total_bytes = psutil.virtual_memory().total

    # -- what the sampler can see --------------------------------------------------------------
    @property
    def has_nvml(self) -> bool:
        return self._nvml is not None

    @property
    def device_total_bytes(self) -> int | None:
        """The sampled GPU's memory, bytes (None without NVML, or if CUDA does not see it)."""
        return self._nvml.total_bytes.get(self.device) if self._nvml is not None else None

    # -- sampling ------------------------------------------------------------------------------
    def sample(self) -> MemorySample:
        """Take one reading now, keep it and return it."""
        rss = self._process.memory_info().rss
        ram = psutil.virtual_memory()
        torch_readings = self._torch()
        nvml_readings: dict[int, tuple[int, int | None]] = {}
        if self._nvml is not None:
            try:
                nvml_readings = self._nvml.read(self.pid)
            except Exception as error:  # a GPU that fell off the bus must not kill the sampler
                log.warning("NVML read failed, sampling without NVML from now on: %s", error)
                self.nvml_status = f"NVML failed: {type(error).__name__}: {error}"
                self._nvml.shutdown()
                self._nvml = None
        gpus = tuple(GpuSample(index, *torch_readings.get(index, (None, None)),
                               *nvml_readings.get(index, (None, None)))
                     for index in sorted(torch_readings.keys() | nvml_readings.keys()))
        own = next((gpu for gpu in gpus if gpu.cuda_index == self.device), None) \
            or GpuSample(self.device, None, None, None, None)
        reading = MemorySample(self.clock(), rss, ram.total - ram.available, own.torch_allocated_bytes,
                               own.torch_reserved_bytes, own.device_used_bytes, own.process_device_bytes, gpus)
        with self._lock:
            self._buffer.append(reading)
        return reading

    def start(self) -> "MemorySampler":
        """Start the background thread (a second call does nothing)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.sample()
            except psutil.Error as error:  # the sampled process ended
                log.warning("memory sampler stopped: %s", error)
                self.nvml_status = f"sampler stopped: {error}"
                return
            except Exception as error:  # one bad reading must not end the graphs silently
                log.warning("memory sampler: a reading failed (%s: %s)", type(error).__name__, error)
            # Sleep what is left of the interval, so readings stay evenly spaced.
            self._stop.wait(max(0.0, self.interval - (self.clock() - started)))

    def stop(self) -> None:
        """Stop the thread and release NVML; the readings stay readable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 1)
            self._thread = None
        if self._nvml is not None:
            self._nvml.shutdown()
            self._nvml = None
            self.nvml_status = "NVML closed"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- reading -------------------------------------------------------------------------------
    def samples(self, since: float | None = None, until: float | None = None) -> list[MemorySample]:
        """The kept readings with ``since <= time <= until``, oldest first."""
        with self._lock:
            readings = list(self._buffer)
        return [s for s in readings if (since is None or s.time >= since) and (until is None or s.time <= until)]

    def latest(self) -> MemorySample | None:
        with self._lock:
            return self._buffer[-1] if self._buffer else None

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
