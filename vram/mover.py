"""Moving a group's bytes to the computation device, and that device's memory, behind one
interface.

``Mover.to_device(host, layout, targets)`` copies one host buffer (a group's arena, laid out
as ``layout``) into one new device buffer and gives the per-tensor views, cast to
``targets`` where the dtypes differ; the result is a ``Landing`` whose ``event`` the consumer
waits on before use. Every consumer stream waits (``wait``); a buffer is dropped with
``retire``, which orders its reuse after everything the current stream has queued so far,
the way PyTorch FSDP2 frees its unsharded groups without ``record_stream``. A mover also
speaks for its device's memory: what the allocator holds (``memory``), a cap the allocator
itself enforces (``set_cap``), handing cached blocks back (``empty_cache``) and peaks over one
run (``peaks``) that do not disturb another run's.

* ``CudaMover``: copies on a side stream from pinned memory; ``retire`` makes the side stream
  wait on an event recorded on the compute stream and only then drops the buffer, so the
  caching allocator can hand the block to the next copy at once and that copy cannot start
  before the compute stream is done with it. The cap is the allocator's per-process memory
  fraction.
* ``SyncMover``: any other device (the CPU, MPS): copies complete before they return.
* ``StandIn`` (standin.py): the CPU pretending to be an accelerator, for tests.

The background thread for disk reads (and the casts that follow them) lives here too.
"""

from __future__ import annotations

import atexit
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .arena import CUDA, Layout, Pinner
from .casting import cast


@dataclass
class Landing:
    """A group's tensors on the computation device, usable once ``event`` has completed."""

    buffer: torch.Tensor | None
    tensors: list[torch.Tensor]
    event: object | None = None
    synchronous: bool = False  # the copy blocked the host (pageable source)
    host: tuple | None = None  # (pool, arena): pooled host memory the tensors point into (CPU)


class DeviceMemory(NamedTuple):
    """What the device's allocator holds for this process, bytes."""

    allocated: int   # in live tensors
    reserved: int    # taken from the device (live tensors, cached blocks, fragmentation)
    fragmented: int  # reserved, unused, and not releasable: free pieces of segments in use


class PeakScope:
    """Peak device memory over one run: ``close()`` gives (allocated, reserved) bytes or None."""

    def close(self) -> tuple[int, int] | None:
        return None


def cast_views(views: list[torch.Tensor], targets: tuple, factors: tuple[float, ...] | None = None
               ) -> list[torch.Tensor]:
    """``views`` with each tensor whose dtype is not its target replaced by a cast (times its
    factor, when given: fp8 scales, see vram/casting.py)."""
    if factors is None:
        return [v if v.dtype == d else v.to(d) for v, d in zip(views, targets)]
    return [cast(v, d, f) for v, d, f in zip(views, targets, factors)]


class Mover:
    """Copies to one computation device and speaks for its memory; see the module docstring."""

    asynchronous = False
    separate = False            # the device has memory of its own: weights must be copied there
    pinner: Pinner | None = None  # how host arenas are page-locked for this device (None: never)

    def __init__(self, device: torch.device):
        self.device = device

    def to_device(self, host: torch.Tensor, layout: Layout, targets: tuple,
                  factors: tuple[float, ...] | None = None) -> Landing:
        """``host`` (laid out as ``layout``) copied into one new device buffer, each tensor
        cast there to its dtype in ``targets`` (times its entry in ``factors``)."""
        raise NotImplementedError

    def move(self, tensor: torch.Tensor) -> torch.Tensor:
        """An activation from another device of this kind, on this one, ready for the current
        stream to use (a split model's groups hand theirs across)."""
        return tensor.to(self.device, non_blocking=True)  # CUDA orders a copy between devices

    def wait(self, event) -> None:
        """Make the current stream wait for ``event`` (None: nothing to wait for)."""

    def record(self):
        """An event after the work queued so far on the current stream (None if no streams)."""
        return None

    def retire(self, landing: Landing) -> None:
        """Drop a landing's memory, ordered after the current stream's use of it."""
        landing.buffer = None
        landing.tensors = []

    def host_done(self, event) -> None:
        """Block until ``event`` has completed (a host buffer it reads may then be reused)."""

    def synchronize(self) -> None:
        """Wait for every copy issued so far."""

    # -- the device's memory ---------------------------------------------------------------------
    def memory(self) -> DeviceMemory | None:
        """What the device's allocator holds for this process; None if not known."""
        return None

    def set_cap(self, nbytes: int | None) -> None:
        """Make the allocator refuse memory past ``nbytes`` (None: no cap)."""

    def empty_cache(self) -> None:
        """Hand the allocator's cached, unused blocks back (between phases)."""

    def peaks(self) -> PeakScope:
        """Start measuring one run's peak (other runs' measurements are left alone)."""
        return PeakScope()


class SyncMover(Mover):
    """Devices without streams: a copy is complete when it returns."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.separate = device.type != "cpu"

    def to_device(self, host, layout, targets, factors=None):
        buffer = host.to(self.device)
        return Landing(buffer, cast_views(layout.views(buffer), targets, factors), None, synchronous=self.separate)


FRAGMENTATION_TTL_S = 0.005  # how stale CudaMover.memory()'s fragmentation figure may be

_peak_lock = threading.Lock()
_open_peaks: dict[int, int] = {}  # CUDA device index -> runs measuring their peak now


class _CudaPeaks(PeakScope):
    """torch keeps one peak per device for the whole process: it is reset only when no other
    run is measuring, so a run alone gets its own peak and overlapping runs each get the
    peak since the earliest of them began (never less than their own)."""

    def __init__(self, device: torch.device):
        self.device = device
        with _peak_lock:
            if not _open_peaks.get(device.index, 0):
                torch.cuda.reset_peak_memory_stats(device)
            _open_peaks[device.index] = _open_peaks.get(device.index, 0) + 1
        self.closed = False

    def close(self):
        if self.closed:
            return None
        self.closed = True
        peak = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        with _peak_lock:
            _open_peaks[self.device.index] -= 1
        return peak


class CudaMover(Mover):
    """A side stream for copies, events to order the compute stream after them."""

    asynchronous = True
    separate = True
    pinner = CUDA

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)
        self._fragmented = 0
        self._fragmented_at = float("-inf")

    def to_device(self, host, layout, targets, factors=None):
        pinned = self.pinner.is_pinned(host)
        with torch.cuda.stream(self.stream):
            buffer = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
            buffer.copy_(host, non_blocking=pinned)
            tensors = cast_views(layout.views(buffer), targets, factors)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Landing(buffer, tensors, event, synchronous=not pinned)

    def wait(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def record(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def retire(self, landing: Landing) -> None:
        if landing.buffer is not None or landing.tensors:
            self.stream.wait_event(self.record())
        super().retire(landing)

    def host_done(self, event) -> None:
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def memory(self):
        allocated = torch.cuda.memory_allocated(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        # Fragmentation needs the full statistics (a dict of a few hundred entries): read at
        # most every few milliseconds, and never more than what is reserved and unused.
        now = time.monotonic()
        if now - self._fragmented_at > FRAGMENTATION_TTL_S:
            stats = torch.cuda.memory_stats(self.device)
            self._fragmented = stats.get("inactive_split_bytes.all.current", 0)
            self._fragmented_at = now
        return DeviceMemory(allocated, reserved, min(self._fragmented, max(0, reserved - allocated)))

    def set_cap(self, nbytes):
        total = torch.cuda.get_device_properties(self.device).total_memory
        fraction = 1.0 if nbytes is None else min(1.0, max(0.0, nbytes / total))
        torch.cuda.set_per_process_memory_fraction(fraction, self.device)

    def empty_cache(self):
        torch.cuda.empty_cache()

    def peaks(self):
        return _CudaPeaks(self.device)


_reader: ThreadPoolExecutor | None = None
_reader_lock = threading.Lock()


def reader() -> ThreadPoolExecutor:
    """The process's background thread for disk reads and the casts after them."""
    global _reader
    with _reader_lock:
        if _reader is None:
            _reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vram-reader")
            atexit.register(_reader.shutdown, wait=False, cancel_futures=True)
        return _reader


def submit(fn, *args) -> Future:
    return reader().submit(fn, *args)
