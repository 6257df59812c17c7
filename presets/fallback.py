"""Run a job; when it runs out of memory, free everything, step down one preset and retry once.

Out of memory means torch's ``OutOfMemoryError`` (GPU), Python's ``MemoryError``, the core's
``VramLimitError`` (the cap cannot be held), or system RAM about to run out: the available
RAM is checked at every event, and below ``RAM_FLOOR`` the run stops before the kernel's OOM
killer would end the process.

A ``multi_gpu`` run (a ``placement.Placement``) that runs out on one of its GPUs steps down
to the single-GPU tree below ``basic``, with a message naming the GPU.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import psutil
import torch

import vram
from pipelines import Event, GenerationRequest, Result, load_pipeline

from .files import load_preset, preset_configs
from .placement import MULTI_GPU, Placement
from .tree import cap_from_free, next_preset

# After the GPU ran out: presets that need less VRAM, in order (fp8_offload onloads whole
# models, so a capped layer-level preset is the step down from it).
_VRAM_LADDER = {"basic": "cpu_offload", "cpu_offload": "dynamic", "fp8_offload": "dynamic", "dynamic": "disk"}

log = logging.getLogger(__name__)

RAM_FLOOR = 256 * 2**20   # bytes of available RAM under which a run is stopped
# A device in an out-of-memory message: the core's and the stand-ins' name it ("standin:1",
# "cuda:1"), CUDA's allocator by its index ("GPU 1 has a total capacity of ...").
_DEVICE_IN_MESSAGE = re.compile(r"\b(cuda|standin):(\d+)\b|\b(standin)\b|\bGPU (\d+)\b")


class RamExhausted(MemoryError):
    """System RAM was about to run out during a run."""


class Loader(Protocol):
    """Where a run's pipeline comes from and where it goes after: ``acquire`` loads (or
    reuses) a pipeline for ``model`` with ``configs``; ``release`` hands it back with the
    error the run ended with (None after success). A loader must free the pipeline's memory
    when released after running out of memory, since the retry needs it."""

    def acquire(self, model, configs, **options): ...

    def release(self, pipe, error: BaseException | None) -> None: ...


@dataclass
class FreshLoads:
    """The plain loader: a new pipeline per run, closed after it."""

    load: Callable = load_pipeline

    def acquire(self, model, configs, **options):
        return self.load(model, configs, **options)

    def release(self, pipe, error: BaseException | None) -> None:
        pipe.close()


@dataclass
class Outcome:
    result: Result
    preset: str                      # the preset that produced the result
    messages: list[str] = field(default_factory=list)
    vram_limit: float | None = None  # the cap it ran under (GiB), where the preset takes one


def out_of_memory(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, (oom, MemoryError, vram.VramLimitError))


def step_down(preset: str, error: BaseException) -> str | None:
    """The preset to retry with: one that needs less of what ran out (RAM: the tree's order,
    toward disk; the GPU: toward layer-level management under a cap)."""
    if isinstance(error, MemoryError):
        return next_preset(preset)
    return _VRAM_LADDER.get(preset, next_preset(preset))


def named_gpu(error: BaseException) -> str | None:
    """The GPU an out-of-memory error names, as "cuda:1 (GPU 1)"; None when it names none."""
    found = _DEVICE_IN_MESSAGE.search(str(error))
    if found is None:
        return None
    kind, index, standin, gpu = found.groups()
    if gpu is not None:
        kind, index = "cuda", gpu
    elif standin is not None:
        kind, index = "standin", "0"
    return f"{kind}:{index} (GPU {index})"


def multi_gpu_configs(placement: Placement, dtype: torch.dtype | str | None) -> dict[str, vram.VramConfig]:
    """Each component's config for a ``multi_gpu`` run: ``basic``'s (every weight resident in
    the computation dtype) on the GPU it computes on, under that GPU's cap."""
    configs = {}
    for name in placement.components:
        device = placement.device_of(name)
        basic = preset_configs("basic", device=device, dtype=dtype)["default"]
        configs[name] = dataclasses.replace(basic, vram_limit=placement.caps_for(name)[device])
    return configs


def derived_limit(device: str | None) -> float:
    """A cap for a layer-level preset the user gave none for: free VRAM minus the margin
    (0, "stream every layer", on the CPU)."""
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return cap_from_free(free)
    return 0.0


def attempt_configs(preset: str, *, vram_limit: float | None, device: str | None, dtype: torch.dtype | str | None,
                    placement: Placement | None = None) -> tuple[dict, float | None, dict]:
    """(configs, the cap they run under, extra load options) of one attempt at ``preset``: a
    layer-level preset the user gave no cap gets free VRAM minus the margin; ``multi_gpu``
    loads ``placement`` (its caps are per GPU), on the stand-ins when ``device`` is one."""
    if preset == MULTI_GPU:
        placement = placement.on(device) if device is not None else placement
        return multi_gpu_configs(placement, dtype), vram_limit, {"placement": placement}
    if vram_limit is None and load_preset(preset).uses_vram_limit:
        vram_limit = derived_limit(device)
    return preset_configs(preset, vram_limit=vram_limit, device=device, dtype=dtype), vram_limit, {}


def _ram_guard(on_event: Callable[[Event], None] | None, floor: int):
    def guard(event: Event) -> None:
        available = psutil.virtual_memory().available
        if available < floor:
            raise RamExhausted(f"system RAM is about to run out ({available / 2**20:.0f} MiB available)")
        if on_event is not None:
            on_event(event)
    return guard


def generate_with_fallback(model, request: GenerationRequest, preset: str, *, vram_limit: float | None = None,
                           device: str | None = None, dtype: torch.dtype | str | None = None,
                           on_event: Callable[[Event], None] | None = None, cancel=None,
                           load: Callable = load_pipeline, load_options: dict | None = None,
                           pipeline_kwargs: dict | None = None, ram_floor: int = RAM_FLOOR,
                           on_message: Callable[[str], None] | None = None,
                           loader: Loader | None = None, placement: Placement | None = None) -> Outcome:
    """Generate ``request`` with ``model`` under ``preset``; on running out of memory, retry
    once with the next preset of the tree. ``on_message`` hears what happened and why.
    ``loader`` supplies the pipeline (default: ``load`` a fresh one and close it after the
    run; ``presets.cache.PipelineCache`` keeps it for the next run). ``preset`` "multi_gpu"
    runs ``placement`` (on the stand-ins when ``device`` is one); a fallback from it runs on
    ``device``."""
    if preset == MULTI_GPU and placement is None:
        raise ValueError(f"preset {MULTI_GPU!r} needs a placement (the tree's decision carries one)")
    loader = loader or FreshLoads(load)
    messages: list[str] = []

    def say(text: str) -> None:
        messages.append(text)
        log.warning(text)
        if on_message is not None:
            on_message(text)

    current, limit = preset, vram_limit
    for attempt in (1, 2):
        pipe = None
        try:
            configs, limit, options = attempt_configs(current, vram_limit=limit, device=device, dtype=dtype,
                                                      placement=placement)
            pipe = loader.acquire(model, configs, **(load_options or {}), **options)
            result = pipe.generate(request, on_event=_ram_guard(on_event, ram_floor), cancel=cancel,
                                   pipeline_kwargs=pipeline_kwargs)
            loader.release(pipe, None)
            pipe = None
            return Outcome(result, current, messages, limit)
        except BaseException as error:
            if pipe is not None:
                # Released before the retry loads anything: a loader frees an OOM'd pipeline.
                loader.release(pipe, error)
                pipe = None
            if not out_of_memory(error) or attempt == 2:
                raise
            fallback = step_down(current, error)
            if fallback is None:
                raise
            gpu = named_gpu(error) if current == MULTI_GPU else None
            say(f"{current} ran out of memory{f' on {gpu}' if gpu else ''} "
                f"({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}); "
                f"memory released, retrying once with {fallback}")
            current = fallback
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise AssertionError("unreachable")
