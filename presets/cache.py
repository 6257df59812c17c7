"""Keep the loaded pipeline between runs: load once, generate many.

A ``PipelineCache`` holds at most one pipeline, keyed by the model and the exact configs it
was loaded with. ``acquire`` returns it while they stay the same and closes it (releasing
every weight the core holds) before loading another, so two pipelines never share the
memory. It is a ``presets.fallback.Loader``: after a run that ran out of memory it closes
the pipeline, since the retry needs that memory; after a success, a cancel or a bad setting
it keeps it.

    cache = PipelineCache()
    generate_with_fallback(model, request, "dynamic", loader=cache)   # loads
    generate_with_fallback(model, request, "dynamic", loader=cache)   # reuses
    cache.close()
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import vram
from pipelines import Cancelled, RequestError, load_pipeline
from pipelines.sources import is_local

log = logging.getLogger(__name__)

# Options that change what is loaded; others (a progress callback) do not.
_KEYED_OPTIONS = ("source", "models_dir", "family", "placement")


def configs_fingerprint(configs: Any) -> str:
    """A canonical text of a config or a dict of configs per component (dtypes by name)."""
    def plain(value):
        if isinstance(value, vram.VramConfig):
            return plain(value.to_dict())
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return str(value)  # torch.dtype, torch.device, Path
    return json.dumps(plain(configs), sort_keys=True)


@dataclass(frozen=True)
class CacheKey:
    model: str
    configs: str
    options: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CachedInfo:
    """What the cache holds, for display."""

    model: str
    family: str
    loaded_at: float        # time.time()
    load_seconds: float
    runs: int


class PipelineCache:
    """One loaded pipeline, reused while model and configs are unchanged (thread-safe)."""

    def __init__(self, load: Callable = load_pipeline):
        self._load = load
        self._lock = threading.RLock()
        self._key: CacheKey | None = None
        self._pipe = None
        self._info: CachedInfo | None = None
        self.loads = 0          # how many times a pipeline was loaded (for tests and the UI)
        self.hits = 0           # how many acquires reused the loaded one

    @staticmethod
    def key(model, configs, options: Mapping[str, Any]) -> CacheKey:
        model_text = str(Path(model).resolve()) if is_local(model) else str(model)
        keyed = tuple(sorted((k, str(options[k])) for k in _KEYED_OPTIONS if options.get(k) is not None))
        return CacheKey(model_text, configs_fingerprint(configs), keyed)

    def acquire(self, model, configs, **options):
        """The pipeline for ``model`` with ``configs``: the loaded one when both match, else a
        fresh load (the previous one is closed first)."""
        key = self.key(model, configs, options)
        with self._lock:
            if self._pipe is not None and self._key == key and self._pipe.pipe is not None:
                self.hits += 1
                return self._pipe
            self._close_locked()
            started = time.perf_counter()
            pipe = self._load(model, configs, **options)
            self.loads += 1
            self._pipe, self._key = pipe, key
            self._info = CachedInfo(str(model), pipe.family.key, time.time(), time.perf_counter() - started, 0)
            log.info("loaded %s in %.2f s (kept for the next run)", model, self._info.load_seconds)
            return pipe

    def holds(self, model, configs, options: Mapping[str, Any] | None = None) -> bool:
        """Whether ``acquire`` with these arguments would reuse the kept pipeline."""
        key = self.key(model, configs, options or {})
        with self._lock:
            return self._pipe is not None and self._key == key and self._pipe.pipe is not None

    def release(self, pipe, error: BaseException | None) -> None:
        """After a run: keep ``pipe`` unless the run failed for a reason other than a cancel
        or a bad setting (out of memory above all: the next attempt needs the memory)."""
        with self._lock:
            if error is None or isinstance(error, (Cancelled, RequestError)):
                if pipe is self._pipe and self._info is not None:
                    self._info = CachedInfo(self._info.model, self._info.family, self._info.loaded_at,
                                            self._info.load_seconds, self._info.runs + 1)
                    return
            if pipe is self._pipe:
                self._close_locked()
            else:
                pipe.close()

    @property
    def info(self) -> CachedInfo | None:
        with self._lock:
            return self._info

    def close(self) -> None:
        """Close the kept pipeline, if any (it waits for a run in progress)."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._pipe is None:
            return
        pipe, self._pipe, self._key, self._info = self._pipe, None, None, None
        try:
            pipe.close()
        finally:
            log.info("closed the kept pipeline of %s", pipe.family.key)
