"""Moving a group's bytes to the computation device, behind one interface.

``Mover.to_device`` copies one host buffer (a group's arena) into one new device buffer and
builds the per-tensor views (and any casts) from it; the result is a ``Landing`` whose
``event`` the consumer waits on before use. Every consumer stream waits (``wait``); a
buffer is dropped with ``retire``, which orders its reuse after everything the current
stream has queued so far, the way PyTorch FSDP2 frees its unsharded groups without
``record_stream``:

* ``CudaMover``: copies on a side stream from pinned memory; ``retire`` makes the side stream
  wait on an event recorded on the compute stream and only then drops the buffer, so the
  caching allocator can hand the block to the next copy at once and that copy cannot start
  before the compute stream is done with it.
* ``SyncMover``: any other device (the CPU, MPS): copies complete before they return.

The background thread for disk reads (and the casts that follow them) lives here too.
"""

from __future__ import annotations

import atexit
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Landing:
    """A group's tensors on the computation device, usable once ``event`` has completed."""

    buffer: torch.Tensor | None
    tensors: list[torch.Tensor]
    event: object | None = None
    synchronous: bool = False  # the copy blocked the host (pageable source)
    host: tuple | None = None  # (pool, arena): pooled host memory the tensors point into (CPU)


class Mover:
    """Copies to one computation device; see the module docstring."""

    asynchronous = False

    def __init__(self, device: torch.device):
        self.device = device

    def to_device(self, host: torch.Tensor, build: Callable[[torch.Tensor], list[torch.Tensor]]) -> Landing:
        raise NotImplementedError

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


class SyncMover(Mover):
    """Devices without streams: a copy is complete when it returns."""

    def to_device(self, host, build):
        buffer = host.to(self.device)
        return Landing(buffer, build(buffer), None, synchronous=self.device.type != "cpu")


class CudaMover(Mover):
    """A side stream for copies, events to order the compute stream after them."""

    asynchronous = True

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)

    def to_device(self, host, build):
        pinned = host.is_pinned()
        with torch.cuda.stream(self.stream):
            buffer = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
            buffer.copy_(host, non_blocking=pinned)
            tensors = build(buffer)
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


def make_mover(device: torch.device) -> Mover:
    return CudaMover(device) if device.type == "cuda" else SyncMover(device)


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
