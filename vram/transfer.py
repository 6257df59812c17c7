"""Moving one tensor between tiers: casts, host->device copies, disk reads.

Two small interfaces hide what only CUDA has:

* ``Mover.convert`` puts a tensor at a placement. On CUDA it copies on a side stream from
  pinned memory and returns a ``Staged`` whose event the compute stream waits on (no
  ``synchronize()``); on the CPU it is a plain cast that is ready at once.
* ``reader()`` is the process's one background thread for work that should overlap compute
  on any device: reading weights from disk, and the casts that follow.
"""

from __future__ import annotations

import atexit
import ctypes
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .config import Placement
from .manager import get_manager


@dataclass
class Staged:
    """A tensor at its target placement, usable once ``event`` has completed (None: now)."""

    tensor: torch.Tensor
    event: "torch.cuda.Event | None" = None
    side_stream: bool = False  # allocated on the side stream: record the compute stream on use

    def ready_for(self, device: torch.device) -> torch.Tensor:
        """Make the current stream of ``device`` wait for the copy, then return the tensor."""
        if self.event is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(self.event)
            if self.side_stream:
                self.tensor.record_stream(stream)
            self.event = None
            self.side_stream = False
        return self.tensor


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Mover:
    """Converts tensors to a placement on one computation device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.is_cuda else None

    def synchronize(self) -> None:
        """Wait for this device's side-stream copies (only on state changes, never per layer)."""
        if self.stream is not None:
            self.stream.synchronize()

    def convert(self, tensor: torch.Tensor, placement: Placement) -> Staged:
        """``tensor`` at ``placement``; a new tensor unless it is already there."""
        device, dtype = placement.device, placement.dtype
        if tensor.device == device and tensor.dtype == dtype:
            return Staged(tensor)
        to_accelerator = device.type != "cpu" and tensor.device.type == "cpu"
        if not to_accelerator:
            # Casts on one device, or device->host: ordered on the current stream.
            return Staged(tensor.to(device=device, dtype=dtype, copy=True))
        manager = get_manager()
        with manager.lock:  # the process-wide counter the graphs read
            manager.counters.bytes_to_device += min(tensor.element_size(), dtype.itemsize) * tensor.numel()
        if not self.is_cuda:
            return Staged(_cast_then_move(tensor, device, dtype, non_blocking=False))
        # Side stream: copy (in the smaller of the two dtypes) then cast on the device.
        # The side stream waits for nothing on the compute stream: it only writes memory it
        # allocated itself, which the caching allocator keeps apart until record_stream.
        with torch.cuda.stream(self.stream):
            out = _cast_then_move(tensor, device, dtype, non_blocking=tensor.is_pinned())
            event = torch.cuda.Event()
            event.record(self.stream)
        return Staged(out, event, side_stream=True)


def _cast_then_move(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype,
                    non_blocking: bool) -> torch.Tensor:
    if tensor.element_size() > dtype.itemsize:
        return tensor.to(dtype=dtype).to(device, non_blocking=non_blocking)
    return tensor.to(device, non_blocking=non_blocking).to(dtype=dtype)


def pin_in_place(tensor: torch.Tensor) -> bool:
    """Page-lock a host tensor's own memory (no copy), so copies from it are asynchronous.

    Returns False where that is not possible (no CUDA, a view into a shared storage, or the
    driver refusing); the tensor then stays pageable and copies from it are synchronous.
    """
    if not torch.cuda.is_available() or tensor.device.type != "cpu" or tensor.is_pinned():
        return tensor.is_pinned() if tensor.device.type == "cpu" else False
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return False
    portable = 1  # cudaHostRegisterPortable: pinned for every CUDA context (several GPUs)
    result = torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), portable)
    return int(result) == 0


def unpin_in_place(tensor: torch.Tensor) -> None:
    if torch.cuda.is_available() and tensor.device.type == "cpu":
        torch.cuda.cudart().cudaHostUnregister(tensor.untyped_storage().data_ptr())


def trim_heap() -> None:
    """Hand freed heap memory back to the system after a bulk conversion (glibc only).

    Casting many tensors one after another frees buffers below glibc's mmap threshold into
    the heap, where the results allocated between them pin it; RSS would then stay at the
    size of what was freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
