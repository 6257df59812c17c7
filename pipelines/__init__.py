"""pipelines: model families, downloads, loading onto the core, generation phase by phase.

    from pipelines import load_pipeline
    configs = {"default": {"offload_device": "disk", "onload_device": "disk",
                           "preparing_device": "cuda", "preparing_dtype": "bfloat16",
                           "computation_device": "cuda", "computation_dtype": "bfloat16",
                           "vram_limit": 8}}
    with load_pipeline("z-image-turbo", configs) as pipe:         # ModelScope by default
        result = pipe.generate(prompt="a lighthouse at dawn", seed=1,
                               on_event=lambda e: print(e.kind, e.phase, e.step))
        print(result.save("outputs/"), result.summary.describe())

Imports vram/; never imported by it.
"""

from .loading import ModelFilesError
from .pipeline import Cancelled, Event, ManagedPipeline, Result, RunSummary, load_pipeline
from .registry import DEFAULT_MODEL, FAMILIES, PHASES, Component, Family, get_family, register
from .request import GenerationRequest, RequestError
from .sources import SOURCES, DownloadError, default_models_dir, download, resolve_model
from . import tiny  # noqa: E402,F401  registers the built-in model (DEFAULT_MODEL)

__all__ = [
    "ModelFilesError", "Cancelled", "Event", "ManagedPipeline", "Result", "RunSummary", "load_pipeline",
    "DEFAULT_MODEL", "FAMILIES", "PHASES", "Component", "Family", "get_family", "register", "GenerationRequest", "RequestError",
    "SOURCES", "DownloadError", "default_models_dir", "download", "resolve_model",
]
