"""Process memory readings: resident set size now and at its peak, and the device's peaks.

The peak RSS comes from the kernel (``VmHWM``), which sees every allocation however short;
``reset_peak_rss`` starts a new window (Linux: ``/proc/self/clear_refs``). Where the kernel
offers neither, the peak is the highest reading taken through ``sample_rss``.
"""

from __future__ import annotations

import os
import threading

import psutil
import torch

from .devices import peak_scope
from .mover import PeakScope

_process = psutil.Process(os.getpid())
_lock = threading.Lock()
_sampled_peak = 0


def current_rss() -> int:
    """This process's resident set size now, bytes."""
    return _process.memory_info().rss


def sample_rss() -> int:
    """Read the RSS and fold it into the fallback peak; returns the reading."""
    global _sampled_peak
    rss = current_rss()
    with _lock:
        _sampled_peak = max(_sampled_peak, rss)
    return rss


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> None:
    """Start a new peak-RSS window at the current RSS."""
    global _sampled_peak
    with _lock:
        _sampled_peak = current_rss()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """The highest RSS since the last ``reset_peak_rss`` (or process start), bytes."""
    sample_rss()
    hwm = _vm_hwm()
    with _lock:
        return max(hwm or 0, _sampled_peak)


def device_peak_scope(device: torch.device) -> PeakScope:
    """Start measuring torch's peak allocated and reserved bytes on ``device`` for one run;
    ``close()`` gives them (None on the CPU, where the RSS is the device memory). Runs that
    overlap do not reset each other's peaks."""
    return peak_scope(device)
