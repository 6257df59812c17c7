"""From what a page or an API call sent to a checked plan, and from errors to messages.

Values arrive loosely typed (a Number field sends 512.0, an empty one None, an API client
may send NaN or a string); ``JobInputs.request`` turns them into a ``GenerationRequest``
with one clear message per bad field, and ``Session.plan`` checks the rest (model, preset,
vram_limit, what fits this machine). ``user_errors`` turns any of those messages into a
``gr.Error``, which Gradio shows on the page and returns to API clients, and the server
keeps serving.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import gradio as gr

from pipelines import GenerationRequest, RequestError
from presets.session import AUTO, CUSTOM, Session, SessionPlan

log = logging.getLogger(__name__)


def whole(value: Any, name: str) -> int | None:
    """An optional whole number: None or "" is None; 512.0 is 512; 512.5, NaN, "abc" are errors."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise RequestError(f"{name}: must be a whole number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RequestError(f"{name}: must be a whole number, got {value!r}") from None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise RequestError(f"{name}: must be a whole number, got {value!r}")
        return int(value)
    if isinstance(value, int):
        return value
    raise RequestError(f"{name}: must be a whole number, got {value!r}")


def number(value: Any, name: str) -> float | None:
    """An optional number, NaN and infinities kept (the checks downstream name them)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise RequestError(f"{name}: must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name}: must be a number, got {value!r}") from None


def flag(value: Any, name: str) -> bool:
    """An on/off setting: a checkbox's bool; None (an API client that left it out) is off."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise RequestError(f"{name}: must be true or false, got {value!r}")


@dataclass(frozen=True)
class JobInputs:
    """One job as typed into the page or sent to the API (None: the model's default)."""

    prompt: Any
    model: Any = None
    negative_prompt: Any = ""
    preset: Any = AUTO
    vram_limit: Any = None
    width: Any = None
    height: Any = None
    steps: Any = None
    guidance: Any = None
    seed: Any = None
    frames: Any = None
    vae_tiling: bool = False
    configs: Any = None                 # the user's own configs (JSON text), with preset "custom"
    attention: Any = "auto"             # the speed settings (pipelines/speed.py)
    compile: Any = False
    channels_last: Any = False
    cache: Any = "off"

    def request(self) -> GenerationRequest:
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise RequestError(f"prompt: must be text, got {type(self.prompt).__name__}")
        return GenerationRequest(
            prompt=self.prompt or "", negative_prompt=self.negative_prompt or "",
            width=whole(self.width, "width"), height=whole(self.height, "height"),
            steps=whole(self.steps, "steps"), guidance=number(self.guidance, "guidance"),
            seed=whole(self.seed, "seed"), frames=whole(self.frames, "frames"), vae_tiling=bool(self.vae_tiling),
            attention="auto" if self.attention in (None, "") else self.attention, compile=flag(self.compile, "compile"),
            channels_last=flag(self.channels_last, "channels_last"), cache=self.cache)

    def with_seed(self, seed: int) -> "JobInputs":
        return replace(self, seed=seed)


def make_plan(session: Session, inputs: JobInputs, *, preset: str | None = None) -> SessionPlan:
    """Check ``inputs`` and plan the run (``preset`` overrides the inputs' preset)."""
    model = inputs.model if inputs.model not in (None, "") else session.default_model()
    preset = preset or inputs.preset or AUTO
    vram_limit = number(inputs.vram_limit, "vram_limit")
    configs = inputs.configs if preset == CUSTOM else None
    return session.plan(model, inputs.request(), preset=preset, vram_limit=vram_limit, configs=configs)


def user_errors(fn: Callable) -> Callable:
    """Raise a ``gr.Error`` with the message of any bad-input error ``fn`` raises (a
    ``ValueError``: RequestError, PresetError, ModelFilesError; a missing file). Works for
    plain functions and generators; keeps the signature Gradio reads."""
    bad_input = (ValueError, FileNotFoundError)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except bad_input as error:
                log.info("refused: %s", error)
                raise gr.Error(str(error), print_exception=False) from None
        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except bad_input as error:
            log.info("refused: %s", error)
            raise gr.Error(str(error), print_exception=False) from None
    return plain
