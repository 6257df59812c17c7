"""The mover for a computation device (CUDA's, the stand-in's, or the synchronous one), and
per-run peak measurements of its memory."""

from __future__ import annotations

import torch

from . import standin
from .config import is_standin
from .mover import CudaMover, Mover, PeakScope, SyncMover, _CudaPeaks


def make_mover(device: torch.device) -> Mover:
    """A new mover for ``device`` (a stand-in's engine is one per process)."""
    if is_standin(device):
        return standin.engine(device)
    if device.type == "cuda":
        return CudaMover(device)
    return SyncMover(device)


def peak_scope(device: torch.device) -> PeakScope:
    """Peak memory on ``device`` over one run (see ``Mover.peaks``) without a mover."""
    if is_standin(device):
        return standin.engine(device).peaks()
    if device.type == "cuda" and torch.cuda.is_available():
        return _CudaPeaks(device)
    return PeakScope()


def empty_cache(device: torch.device) -> None:
    """Hand the allocator's cached, unused blocks on ``device`` back (after a failed run)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
