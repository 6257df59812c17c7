"""vram: the layer-wrapping memory core.

    import vram
    model = build_model()                       # or inside `with vram.empty_weights():`
    vram.enable_vram_management(model, {
        "offload_dtype": torch.float8_e4m3fn, "offload_device": "cpu",
        "onload_dtype": torch.float8_e4m3fn, "onload_device": "cpu",
        "preparing_dtype": torch.float8_e4m3fn, "preparing_device": "cuda",
        "computation_dtype": torch.bfloat16, "computation_device": "cuda",
    }, vram_limit=10, weights="transformer/")
    vram.onload(model)
    out = model(x)
    vram.offload(model)
    print(vram.stats())

This package knows nothing of pipelines, presets or the app.
"""

from .config import DISK, GIB, Placement, VramConfig
from .layers import VramLimitError
from .manager import Counters, RunReport, get_manager
from .meta import empty_weights
from .model import (ManagedModel, ModelState, disable_vram_management, enable_vram_management, is_managed,
                    managed, offload, onload, release, track)
from .weights import SafetensorsFile, WeightSource


def stats() -> dict:
    """A snapshot of the manager: bytes per device and model, layer states, counters, runs."""
    return get_manager().stats()


def last_report() -> RunReport | None:
    """The most recent top-level forward's peak against the cap, or None."""
    reports = get_manager().reports
    return reports[-1] if reports else None


__all__ = [
    "DISK", "GIB", "Placement", "VramConfig", "VramLimitError", "Counters", "RunReport", "get_manager",
    "empty_weights", "ManagedModel", "ModelState", "disable_vram_management", "enable_vram_management",
    "is_managed", "managed", "offload", "onload", "release", "track", "SafetensorsFile", "WeightSource", "stats", "last_report",
]
