"""The CPU stand-in for an accelerator: the core's GPU code paths, run and checked on a CPU.

A model configured with ``computation_device="standin"`` computes on the CPU, but the core
treats the device as one with memory of its own, exactly as it treats CUDA: weights rest in
host arenas (pinned, in the stand-in's sense), every forward copies them into device
buffers through this module's copy engine, and the device's memory has an allocator with a
cap. The engine is built so that the mistakes a GPU punishes silently here give a wrong
answer or an error instead:

* A copy is carried out later, by the engine's own thread (its "copy stream"), in issue
  order, at ``bandwidth`` bytes/s after ``latency`` seconds. Until it has landed, its
  destination reads NaN (all bits set), so a consumer that forgets to wait computes NaN.
* Events are real waitables: ``wait``/``host_done``/``synchronize`` block until the copy has
  landed. The compute stream is the calling thread itself (CPU kernels finish before they
  return), so making it wait is blocking it.
* The engine reads the host buffer when the copy runs, not when it is issued: a host arena
  reused before ``host_done`` says the copy left it gives the copy the wrong bytes.
* A copy from memory that is not pinned blocks the host until it has landed, as a pageable
  ``cudaMemcpyAsync`` does, and is reported as synchronous.
* A retired buffer is poisoned (all bits set) as soon as the copy stream has passed it, and
  never reused: a forward still holding its tensors computes NaN.
* The allocator counts every buffer the engine makes; past the cap (``set_cap``) it raises
  ``torch.OutOfMemoryError``, as CUDA's allocator does past its per-process fraction.
  Activations are ordinary CPU tensors the stand-in cannot see: its ``memory()`` is the
  weights the core copied, no more.

One engine per stand-in device serves the process (``engine()`` for "standin",
``engine(standin_device(1))`` for "standin:1", ...), as one GPU serves all of a process's
models; each has its own copy stream, allocator and cap, and they share one pinning registry
(pinned host memory serves every GPU). ``configure``/``configured`` change the bandwidth and
latency of every engine, and of those made later. ``StandIn.move`` carries an activation from
one stand-in to another through the destination's copy stream, NaN until it lands.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from .arena import Layout, Pinner
from .casting import copy_cast
from .config import STANDIN, device_name, is_standin
from .mover import DeviceMemory, Landing, Mover, PeakScope

PCIE4_BANDWIDTH = 25e9  # bytes/s: PCIe 4.0 x16, host to device, as measured in practice
PCIE4_LATENCY = 10e-6   # s per copy: the launch and DMA setup


class StandInEvent:
    """Completes when the engine's thread has carried out the work recorded before it."""

    __slots__ = ("_done", "error")

    def __init__(self):
        self._done = threading.Event()
        self.error: BaseException | None = None

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"stand-in copy failed: {self.error!r}") from self.error


class StandInPinner(Pinner):
    """Pinning in the stand-in's sense: the page ranges registered, so copies from them are
    asynchronous. ``limit`` bytes (None: any) can be pinned; past it registration is refused,
    the way a driver refuses page-locking past what the OS allows."""

    what = "stand-in pinning"

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self._starts: list[int] = []
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def unavailable(self):
        return None

    def register(self, ptr, nbytes):
        with self._lock:
            if self.limit is not None and sum(self._sizes.values()) + nbytes > self.limit:
                return 2, "out of memory that may be page-locked"
            if ptr in self._sizes:
                return 712, "already registered"
            bisect.insort(self._starts, ptr)
            self._sizes[ptr] = nbytes
            return 0, ""

    def unregister(self, ptr):
        with self._lock:
            if self._sizes.pop(ptr, None) is not None:
                self._starts.remove(ptr)

    def clear_error(self):
        return True

    def is_pinned(self, tensor):
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        with self._lock:
            at = bisect.bisect_right(self._starts, begin) - 1
            if at < 0:
                return False
            start = self._starts[at]
            return end <= start + self._sizes[start]


@dataclass(eq=False)
class _Job:
    """Work on the copy stream: a copy and the casts after it, or a poisoning."""

    event: StandInEvent
    nbytes: int = 0
    source: torch.Tensor | None = None
    target: torch.Tensor | None = None
    casts: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)  # (out, view, factor)
    poison: list[torch.Tensor] = field(default_factory=list)
    issued: float = 0.0


@dataclass(eq=False)
class _Allocation:
    tensors: list[torch.Tensor]  # the buffer, then any cast outputs (emptied once retired)
    nbytes: int
    event: StandInEvent
    key: int = 0                 # the buffer's data_ptr


class _Peaks(PeakScope):
    def __init__(self, engine: "StandIn"):
        self.engine = engine
        self.peak = engine.allocated
        self.closed = False

    def close(self):
        if self.closed:
            return None
        self.closed = True
        with self.engine._lock:
            self.engine._scopes.discard(self)
        return self.peak, self.peak


def _poison(tensor: torch.Tensor) -> None:
    """All bits set: NaN in every floating dtype the core stores."""
    with torch.no_grad():
        tensor.reshape(-1).view(torch.uint8).fill_(0xFF)


class StandIn(Mover):
    """The copy engine and allocator of the stand-in accelerator (see the module docstring)."""

    asynchronous = True
    separate = True

    def __init__(self, bandwidth: float = PCIE4_BANDWIDTH, latency: float = PCIE4_LATENCY,
                 device: torch.device = STANDIN, pinner: StandInPinner | None = None):
        if not is_standin(device):
            raise ValueError(f"{device} is not a stand-in device")
        super().__init__(device)
        self.bandwidth = bandwidth
        self.latency = latency
        self.pinner = pinner if pinner is not None else StandInPinner()
        self.allocated = 0
        self.peak = 0
        self.cap: int | None = None
        self.copies = 0            # copies carried out
        self.bytes_copied = 0
        self.busy_s = 0.0          # simulated time the copy stream spent copying
        self.empty_cache_calls = 0
        self._live: dict[int, _Allocation] = {}  # buffer data_ptr -> its allocation
        # Landings collected without ``retire`` (a model dropped without release): noted by
        # the garbage collector, which may run inside this engine's lock, and freed later.
        self._collected: deque[_Allocation] = deque()
        self._scopes: set[_Peaks] = set()
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._clock = 0.0  # when the copy stream is next free (time.perf_counter)
        self._seconds_per_byte = 0.0  # what the real copies take here (a running average)
        self._last: StandInEvent | None = None
        self._thread: threading.Thread | None = None

    # -- the allocator -------------------------------------------------------------------------
    def _settle_collected(self) -> None:
        """(lock held) Free what landings collected without ``retire`` held."""
        while self._collected:
            allocation = self._collected.popleft()
            if self._live.get(allocation.key) is allocation:
                del self._live[allocation.key]
                self.allocated -= allocation.nbytes

    def _landing_collected(self, allocation: _Allocation) -> None:
        self._collected.append(allocation)

    def _allocate(self, numel: int, dtype: torch.dtype, shape=None) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        with self._lock:
            self._settle_collected()
            if self.cap is not None and self.allocated + nbytes > self.cap:
                raise torch.OutOfMemoryError(
                    f"stand-in accelerator {device_name(self.device)}: tried to allocate {nbytes} bytes with "
                    f"{self.allocated} of {self.cap} allowed (the cap) already allocated")
            self.allocated += nbytes
            if self.allocated > self.peak:
                self.peak = self.allocated
            for scope in self._scopes:
                if self.allocated > scope.peak:
                    scope.peak = self.allocated
        # Ordinary tensors whatever the caller's mode: the engine's thread writes them outside
        # any inference_mode block (as a GPU's copy engine writes whatever torch thinks).
        with torch.inference_mode(False):
            tensor = torch.empty(numel if shape is None else shape, dtype=dtype)
        _poison(tensor)
        return tensor

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.allocated -= nbytes

    def memory(self):
        with self._lock:
            self._settle_collected()
            return DeviceMemory(self.allocated, self.allocated, 0)  # nothing cached, nothing fragmented

    def set_cap(self, nbytes):
        with self._lock:
            self.cap = nbytes

    def empty_cache(self):
        self.empty_cache_calls += 1  # nothing is cached: freed buffers go at once

    def peaks(self):
        scope = _Peaks(self)
        with self._lock:
            self._scopes.add(scope)
        return scope

    # -- the copy stream -------------------------------------------------------------------------
    def _enqueue(self, job: _Job) -> None:
        job.issued = time.perf_counter()
        with self._ready:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="vram-standin-copies", daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._last = job.event
            self._ready.notify()

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._ready:
                    while not self._queue:
                        self._ready.wait()
                    job = self._queue.popleft()
                try:
                    self._carry_out(job)
                except BaseException as error:  # noqa: BLE001 - handed to whoever waits
                    job.event.error = error
                    job.event._done.set()

    def _carry_out(self, job: _Job) -> None:
        if job.poison:
            for tensor in job.poison:
                _poison(tensor)
            job.event._done.set()
            return
        # The destination reads NaN until the copy lands: wait out the simulated transfer
        # less what the real copy is expected to take, then copy.
        begin = max(self._clock, job.issued)
        finish = begin + self.latency + job.nbytes / self.bandwidth
        ahead = finish - job.nbytes * self._seconds_per_byte - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        started = time.perf_counter()
        if job.source is not None:
            job.target.copy_(job.source)
        for out, view, factor in job.casts:
            copy_cast(out, view, factor)
        landed = time.perf_counter()
        if job.nbytes:
            rate = (landed - started) / job.nbytes
            self._seconds_per_byte += 0.25 * (rate - self._seconds_per_byte)
        self._clock = max(finish, landed)
        self.copies += 1
        self.bytes_copied += job.nbytes
        self.busy_s += self._clock - begin
        job.event._done.set()

    def to_device(self, host, layout: Layout, targets, factors=None):
        pinned = self.pinner.is_pinned(host)
        nbytes = host.numel()
        buffer = self._allocate(nbytes, torch.uint8)
        tensors = layout.views(buffer)
        owned = [buffer]
        casts = []
        try:
            for index, (view, dtype) in enumerate(zip(tensors, targets)):
                if view.dtype != dtype:
                    out = self._allocate(view.numel(), dtype, view.shape)
                    casts.append((out, view, 1.0 if factors is None else factors[index]))
                    owned.append(out)
                    tensors[index] = out
        except BaseException:
            for tensor in owned:
                self._free(tensor.numel() * tensor.element_size())
            raise
        event = StandInEvent()
        allocation = _Allocation(owned, sum(t.numel() * t.element_size() for t in owned), event, buffer.data_ptr())
        with self._lock:
            self._live[buffer.data_ptr()] = allocation
        self._enqueue(_Job(event, nbytes, host, buffer, casts))
        if not pinned:
            event.synchronize()  # pageable memory: the host waits for the copy, as CUDA's does
        landing = Landing(buffer, tensors, event, synchronous=not pinned)
        weakref.finalize(landing, self._landing_collected, allocation)
        return landing

    def move(self, tensor):
        """Through this device's copy stream: the copy reads NaN until it lands, so a
        consumer that did not wait would compute NaN. Activations are ordinary tensors,
        outside the allocator (see the module docstring)."""
        with torch.inference_mode(False):
            target = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        _poison(target)
        event = StandInEvent()
        self._enqueue(_Job(event, tensor.numel() * tensor.element_size(), tensor, target))
        self.wait(event)
        return target

    def wait(self, event) -> None:
        if event is not None:
            event.synchronize()

    def record(self):
        return None  # the compute stream is the calling thread: its work is done already

    def retire(self, landing: Landing) -> None:
        buffer = landing.buffer
        if buffer is not None:
            with self._lock:
                allocation = self._live.pop(buffer.data_ptr(), None)
            if allocation is not None:
                self._free(allocation.nbytes)
                tensors, allocation.tensors = allocation.tensors, []
                if allocation.event.query():
                    for tensor in tensors:
                        _poison(tensor)
                else:  # still being copied into: poisoned once the copy stream has passed it
                    self._enqueue(_Job(StandInEvent(), poison=tensors))
        super().retire(landing)

    def host_done(self, event) -> None:
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        with self._ready:
            last = self._last
        if last is not None:
            last.synchronize()

    # -- for tests and benchmarks --------------------------------------------------------------
    @property
    def live_buffers(self) -> int:
        with self._lock:
            self._settle_collected()
            return len(self._live)


_engines: dict[int, StandIn] = {}
_engine_lock = threading.Lock()
_pinner = StandInPinner()  # one registry: pinned host memory serves every device
_settings = {"bandwidth": PCIE4_BANDWIDTH, "latency": PCIE4_LATENCY}


def engine(device: torch.device = STANDIN) -> StandIn:
    """The process's stand-in accelerator ``device`` ("standin" by default)."""
    if not is_standin(device):
        raise ValueError(f"{device} is not a stand-in device")
    with _engine_lock:
        found = _engines.get(device.index)
        if found is None:
            found = _engines[device.index] = StandIn(device=device, pinner=_pinner, **_settings)
        return found


def engines() -> list[StandIn]:
    """Every stand-in made so far."""
    with _engine_lock:
        return list(_engines.values())


def configure(*, bandwidth: float | None = None, latency: float | None = None,
              pin_limit: int | None | bool = False) -> StandIn:
    """Set every engine's bandwidth (bytes/s) and latency (s), now and for engines made later,
    and the pinnable bytes (None: any). Returns the "standin" engine."""
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth!r}")
    if latency is not None and not latency >= 0:
        raise ValueError(f"latency must be >= 0 s, got {latency!r}")
    stand_in = engine()
    with _engine_lock:
        if bandwidth is not None:
            _settings["bandwidth"] = float(bandwidth)
        if latency is not None:
            _settings["latency"] = float(latency)
        for each in _engines.values():
            each.bandwidth, each.latency = _settings["bandwidth"], _settings["latency"]
    if pin_limit is not False:
        _pinner.limit = pin_limit
    return stand_in


@contextlib.contextmanager
def configured(**settings):
    """``configure`` for the duration of a block, then the settings before it."""
    stand_in = engine()
    before = dict(_settings, pin_limit=_pinner.limit)
    configure(**settings)
    try:
        yield stand_in
    finally:
        for each in engines():
            each.synchronize()
        configure(**before)


__all__ = ["PCIE4_BANDWIDTH", "PCIE4_LATENCY", "StandIn", "StandInEvent", "StandInPinner", "configure",
           "configured", "engine", "engines"]
