"""What the core reports: counters of what moved, and one report per top-level forward."""

from __future__ import annotations

from dataclasses import dataclass

from .config import GIB


@dataclass
class Counters:
    """What moved since the process started (or since ``reset_counters``)."""

    bytes_to_device: int = 0      # host -> accelerator copies
    bytes_read_from_disk: int = 0
    transfer_wait_s: float = 0.0  # time forwards waited for weights not yet there
    prefetch_hits: int = 0        # a layer's weights were already staged when it ran
    prefetch_misses: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    hook_entries: int = 0         # group pre-hooks that did work (one per group per forward)
    sync_copies: int = 0          # host -> accelerator copies that blocked the host (pageable)
    pin_failures: int = 0         # arenas the driver refused to page-lock (they stay pageable)
    preadv_calls: int = 0         # disk reads: one per run of adjacent tensors in a file
    activation_moves: int = 0     # tensors a split model carried to another device
    activation_bytes: int = 0


@dataclass
class RunReport:
    """One top-level forward of a managed model: peak memory against the cap."""

    model: str
    device: str
    cap_bytes: int | None
    peak_reserved_bytes: int | None  # the allocator's reserved peak (CUDA, stand-in); None on the CPU
    peak_ledger_bytes: int           # the core's own charges on the device at their peak
    activation_bytes: int | None
    seconds: float
    vram_limit: float | None = None  # GiB as configured: 0 streams every group and keeps none

    @property
    def within_cap(self) -> bool | None:
        if self.cap_bytes is None:
            return None
        peak = self.peak_reserved_bytes if self.peak_reserved_bytes is not None else self.peak_ledger_bytes
        return peak <= self.cap_bytes

    def describe(self) -> str:
        def gib(n):
            return "n/a" if n is None else f"{n / GIB:.3f} GiB"
        cap = ("vram_limit=0: every group streamed, none kept, no cap" if self.vram_limit == 0
               else "no cap" if self.cap_bytes is None else f"cap {gib(self.cap_bytes)}")
        verdict = {None: "", True: " (within cap)", False: " (ABOVE CAP)"}[self.within_cap]
        return (f"{self.model} on {self.device}: peak reserved {gib(self.peak_reserved_bytes)}, "
                f"core peak {gib(self.peak_ledger_bytes)}, {cap}{verdict}, {self.seconds:.3f} s")
