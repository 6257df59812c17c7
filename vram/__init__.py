"""vram: the memory core. Groups of layers (one repeated block each, by default) move
between disk, RAM and the computation device under a VRAM cap.

    import vram
    with vram.empty_weights():                  # or a model with real weights
        model = build_model()
    model = vram.enable_vram_management(model, {
        "offload_dtype": torch.float8_e4m3fn, "offload_device": "cpu",
        "onload_dtype": torch.float8_e4m3fn, "onload_device": "cpu",
        "preparing_dtype": torch.float8_e4m3fn, "preparing_device": "cuda",
        "computation_dtype": torch.bfloat16, "computation_device": "cuda",
    }, vram_limit=10, weights="transformer/")
    vram.onload(model)
    out = model(x)
    vram.offload(model)
    print(vram.managed(model).summary(), vram.stats()["counters"])

Modules, imports pointing down the list: config, reports, casting, weights, arena, mover,
standin (the CPU stand-in accelerator), devices, budget, cache, group, grouping, schedule,
hooks, model (the glue), monitor, gpus (NVML devices as CUDA numbers them) and sampler.
This package knows nothing of pipelines, presets or the app.

``computation_device="standin"`` runs a model on the CPU through the stand-in's copy engine
and allocator (vram/standin.py): the accelerator's code paths, checked without one.
"""

import os as _os
import sys as _sys

# The disk tier's reader thread needs a core while torch computes. OpenMP's default is to
# let idle compute threads spin between kernels, which on a machine with few cores takes
# the reader's CPU time (measured on 2 cores: the disk tier 0.24 s per forward spinning,
# 0.18 s passive, the same compute either way). OpenMP reads the policy once, when torch
# loads it, so it can be set only if torch is not imported yet; an explicit setting wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .budget import VramLimitError, get_manager
from .config import DISK, GIB, STANDIN, Placement, VramConfig
from .devices import empty_cache
from .group import GroupState
from .meta import empty_weights
from .model import (ManagedModel, ModelState, disable_vram_management, enable_vram_management, is_managed,
                    managed, offload, onload, release, track)
from .reports import Counters, RunReport
from .weights import SafetensorsFile, WeightSource


def stats() -> dict:
    """A snapshot of the manager: bytes per device and model, group states, counters, runs."""
    return get_manager().stats()


def last_report() -> RunReport | None:
    """The most recent top-level forward's peak against the cap, or None."""
    reports = get_manager().reports
    return reports[-1] if reports else None


__all__ = [
    "DISK", "GIB", "STANDIN", "Placement", "empty_cache", "VramConfig", "VramLimitError", "Counters", "RunReport", "get_manager",
    "empty_weights", "GroupState", "ManagedModel", "ModelState", "disable_vram_management", "enable_vram_management",
    "is_managed", "managed", "offload", "onload", "release", "track", "SafetensorsFile", "WeightSource", "stats",
    "last_report",
]
