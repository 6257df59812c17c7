"""The mover for a computation device: CUDA's, the stand-in's, or the synchronous one."""

from __future__ import annotations

import torch

from . import standin
from .config import STANDIN
from .mover import CudaMover, Mover, SyncMover


def make_mover(device: torch.device) -> Mover:
    """A new mover for ``device`` (the stand-in's engine is one per process)."""
    if device == STANDIN:
        return standin.engine()
    if device.type == "cuda":
        return CudaMover(device)
    return SyncMover(device)
