"""Host storage: one contiguous, page-aligned buffer per group, with a view per tensor.

A ``Layout`` places a group's tensors in one buffer: grouped by dtype (so one split per
dtype gives every view), each tensor starting on an ``ALIGN``-byte boundary (torch's CPU
kernels round differently on weights that are not 64-byte aligned, so views must be). The
same layout is used for the host arena and for the device buffer a group is copied into, so
one copy moves a whole group.

An ``Arena`` is such a buffer in RAM. Its pages are its own (the allocation is padded to
whole pages), so pinning it with ``cudaHostRegister`` cannot collide with another tensor's
registration. It is pinned once, when the group computes on CUDA, and unpinned when it is
closed or collected. A refused pinning is checked, the CUDA error is cleared (otherwise the
next unrelated kernel launch would report it), and the arena stays pageable.

An ``ArenaPool`` is the disk tier's small ring: arenas of one size, allocated and pinned once
and reused for every group read from disk.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

ALIGN = 256
try:
    PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    PAGE = 4096


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Slice:
    """Where one tensor lies in a group's buffer."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Layout:
    """The placement of a group's tensors (given in the group's order) in one buffer."""

    def __init__(self, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]):
        self.slices: list[Slice | None] = [None] * len(specs)
        # (dtype, start byte, end byte, split sizes in elements, [(part, entry index, shape)])
        self.segments: list[tuple[torch.dtype, int, int, list[int], list[tuple[int, int, tuple]]]] = []
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, (dtype, _shape) in enumerate(specs):
            by_dtype.setdefault(dtype, []).append(index)
        offset = 0
        for dtype, indices in by_dtype.items():
            start, sizes, picks = offset, [], []
            for index in indices:
                shape = tuple(specs[index][1])
                numel = 1
                for d in shape:
                    numel *= d
                nbytes = numel * dtype.itemsize
                self.slices[index] = Slice(offset, nbytes, dtype, shape)
                picks.append((len(sizes), index, shape))
                sizes.append(numel)
                padded = _round_up(nbytes, ALIGN)
                if padded > nbytes:
                    sizes.append((padded - nbytes) // dtype.itemsize)
                offset += padded
            self.segments.append((dtype, start, offset, sizes, picks))
        self.nbytes = offset

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed, shaped views into ``buffer`` (uint8, at least ``nbytes``), one per tensor."""
        out: list[torch.Tensor] = [None] * len(self.slices)  # type: ignore[list-item]
        for dtype, start, end, sizes, picks in self.segments:
            parts = buffer[start:end].view(dtype).split(sizes)
            for part, index, shape in picks:
                out[index] = parts[part].view(shape)
        return out

    def byte_views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """uint8 views of each tensor's bytes, for reads straight into the buffer."""
        return [buffer[s.offset:s.offset + s.nbytes] for s in self.slices]


class PinError(RuntimeError):
    """The driver refused to page-lock an arena."""


# The three CUDA runtime calls pinning needs, behind names tests can replace.
def _cuda_register(ptr: int, nbytes: int) -> tuple[int, str]:
    portable = 1  # cudaHostRegisterPortable: pinned for every CUDA context (several GPUs)
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(ptr, nbytes, portable)  # torch's cudaError enum
    code = int(error)
    if code == 0:
        return 0, ""
    try:
        return code, str(cudart.cudaGetErrorString(error))
    except (TypeError, RuntimeError):  # a binding that takes only its enum, or none at all
        return code, f"cudaError {code}"


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


_libcudart: ctypes.CDLL | None | bool = None


def _cuda_clear_error() -> bool:
    """Reset this thread's CUDA 'last error' after a refused call (cudaGetLastError), found in
    the runtime library this process loaded; False if it cannot be found."""
    global _libcudart
    if _libcudart is None:
        _libcudart = False
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libcudart" in line and "/" in line}
            for path in sorted(paths):
                _libcudart = ctypes.CDLL(path)
                break
        except OSError:
            pass
    if not _libcudart:
        return False
    _libcudart.cudaGetLastError()
    return True


class Pinner:
    """Page-locks host pages for one kind of accelerator (``CUDA``; the stand-in has its own)."""

    what = "cudaHostRegister"

    def unavailable(self) -> str | None:
        """Why nothing can be pinned here, or None."""
        return None if torch.cuda.is_available() else "CUDA is not available"

    def register(self, ptr: int, nbytes: int) -> tuple[int, str]:
        return _cuda_register(ptr, nbytes)

    def unregister(self, ptr: int) -> None:
        _cuda_unregister(ptr)

    def clear_error(self) -> bool:
        return _cuda_clear_error()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory is page-locked (copies from it can be asynchronous)."""
        return tensor.is_pinned()


CUDA = Pinner()


class Arena:
    """A page-aligned uint8 buffer of ``nbytes`` in RAM, pinned when asked and allowed.
    ``pin``: a ``Pinner``, True for CUDA's, or False (pageable)."""

    def __init__(self, nbytes: int, *, pin: "bool | Pinner | None" = False):
        self.nbytes = nbytes
        size = _round_up(max(nbytes, 1), PAGE)
        self.size = size  # whole pages: what the arena adds to the RSS once written
        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        self._pages = (raw.data_ptr() + start, size)
        self.buffer = raw[start:start + nbytes]
        self.view = memoryview(self.buffer.numpy())  # for reads straight into it
        self.pinned = False
        self.pin_error: str | None = None
        self.pinner: Pinner = pin if isinstance(pin, Pinner) else CUDA
        if pin:
            self.pin()

    @property
    def data_ptr(self) -> int:
        return self._pages[0]

    def pin(self) -> bool:
        """Page-lock the arena for asynchronous copies; False (and ``pin_error``) if refused."""
        if self.pinned:
            return True
        pinner = self.pinner
        reason = pinner.unavailable()
        if reason is not None:
            self.pin_error = reason
            return False
        code, message = pinner.register(*self._pages)
        if code == 0:
            self.pinned = True
            self.pin_error = None
            return True
        cleared = pinner.clear_error()
        self.pin_error = f"{pinner.what} failed ({code}: {message})" + ("" if cleared else "; error not cleared")
        log.warning("arena of %d bytes stays pageable: %s", self.nbytes, self.pin_error)
        return False

    def close(self) -> None:
        """Unpin (copies from it must have finished). The memory goes when its views do."""
        if self.pinned:
            self.pinned = False
            try:
                self.pinner.unregister(self._pages[0])
            except Exception:  # noqa: BLE001 - interpreter shutdown, a lost context
                pass

    def __del__(self):
        self.close()


class ArenaPool:
    """Arenas of one size for groups read from disk: reused, at most ``keep`` idle.

    An arena handed back with an event (a copy from it still in flight) is reused only after
    ``wait(event)`` returns."""

    def __init__(self, nbytes: int, *, pin: "bool | Pinner | None", keep: int, wait: Callable[[object], None],
                 on_pin_failure: Callable[[], None] | None = None):
        self.nbytes = nbytes
        self.pin = pin
        self.keep = max(1, keep)
        self.allocated = 0  # arenas ever allocated (the ring's size, for tests and reports)
        self.pin_failures = 0
        self._wait = wait
        self._on_pin_failure = on_pin_failure
        self._free: list[tuple[Arena, object]] = []
        self._lock = threading.Lock()

    def acquire(self) -> Arena:
        with self._lock:
            taken = self._free.pop() if self._free else None
        if taken is not None:
            arena, event = taken
            if event is not None:
                self._wait(event)
            return arena
        arena = Arena(self.nbytes, pin=self.pin)
        refused = bool(self.pin) and not arena.pinned
        with self._lock:
            self.allocated += 1
            self.pin_failures += refused
        if refused and self._on_pin_failure is not None:
            self._on_pin_failure()
        return arena

    def release(self, arena: Arena, after: object = None) -> None:
        with self._lock:
            if len(self._free) < self.keep and arena.nbytes == self.nbytes:
                self._free.append((arena, after))
                return
        if after is not None:
            self._wait(after)
        arena.close()

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for arena, event in free:
            if event is not None:
                self._wait(event)
            arena.close()
