"""Run a job; when it runs out of memory, free everything, step down one preset and retry once.

Out of memory means torch's ``OutOfMemoryError`` (GPU), Python's ``MemoryError``, the core's
``VramLimitError`` (the cap cannot be held), or system RAM about to run out: the available
RAM is checked at every event, and below ``RAM_FLOOR`` the run stops before the kernel's OOM
killer would end the process.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch

import vram
from pipelines import Event, GenerationRequest, Result, load_pipeline

from .files import preset_configs
from .tree import next_preset

log = logging.getLogger(__name__)

RAM_FLOOR = 256 * 2**20   # bytes of available RAM under which a run is stopped


class RamExhausted(MemoryError):
    """System RAM was about to run out during a run."""


@dataclass
class Outcome:
    result: Result
    preset: str                      # the preset that produced the result
    messages: list[str] = field(default_factory=list)


def out_of_memory(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, (oom, MemoryError, vram.VramLimitError))


def _ram_guard(on_event: Callable[[Event], None] | None, floor: int):
    def guard(event: Event) -> None:
        available = psutil.virtual_memory().available
        if available < floor:
            raise RamExhausted(f"system RAM is about to run out ({available / 2**20:.0f} MiB available)")
        if on_event is not None:
            on_event(event)
    return guard


def generate_with_fallback(model, request: GenerationRequest, preset: str, *, vram_limit: float | None = None,
                           on_event: Callable[[Event], None] | None = None, cancel=None,
                           load: Callable = load_pipeline, load_options: dict | None = None,
                           pipeline_kwargs: dict | None = None, ram_floor: int = RAM_FLOOR,
                           on_message: Callable[[str], None] | None = None) -> Outcome:
    """Generate ``request`` with ``model`` under ``preset``; on running out of memory, retry
    once with the next preset of the tree. ``on_message`` hears what happened and why."""
    messages: list[str] = []

    def say(text: str) -> None:
        messages.append(text)
        log.warning(text)
        if on_message is not None:
            on_message(text)

    current = preset
    for attempt in (1, 2):
        pipe = None
        try:
            pipe = load(model, preset_configs(current, vram_limit=vram_limit), **(load_options or {}))
            result = pipe.generate(request, on_event=_ram_guard(on_event, ram_floor), cancel=cancel,
                                   pipeline_kwargs=pipeline_kwargs)
            return Outcome(result, current, messages)
        except BaseException as error:
            if not out_of_memory(error) or attempt == 2:
                raise
            fallback = next_preset(current)
            if fallback is None:
                raise
            say(f"{current} ran out of memory ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                f"memory released, retrying once with {fallback}")
            current = fallback
        finally:
            if pipe is not None:
                pipe.close()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise AssertionError("unreachable")
