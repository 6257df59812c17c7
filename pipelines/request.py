"""A generation job, checked against the model before any work starts."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import speed
from .errors import RequestError
from .registry import Family

MAX_PROMPT_CHARS = 10_000
MAX_STEPS = 1000
MAX_BATCH = 16
MAX_FRAMES = 1025
# Guidance scales in use run from 0 (distilled models) to about 10 (CFG) and 3.5 (FLUX's
# embedded guidance); past 30 images only burn out, and huge values overflow to NaN.
MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``None`` fields take the model's defaults (``Family.defaults``)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None            # None: a random seed, recorded in the result
    batch: int = 1
    frames: int | None = None          # video models only
    fps: int | None = None             # video models only
    vae_tiling: bool = False
    vae_slicing: bool = False
    # Speed settings (pipelines/speed.py): attention backend ("auto": the fastest that works
    # here), regional compilation of the denoiser's blocks, channels_last convolutions, and a
    # diffusers step cache ("off", or "first_block:0.12", "mag:0.06", "taylorseer:5").
    attention: str = "auto"
    compile: bool = False
    channels_last: bool = False
    cache: str = "off"

    def resolved(self, family: Family, size_multiple: int | None = None) -> "GenerationRequest":
        """This request with defaults filled in and every field checked; RequestError names
        the first field that cannot work. ``size_multiple``: what width and height must be
        multiples of (a loaded pipeline knows; else the family's published value)."""
        d = family.defaults
        video = family.kind == "video"
        request = replace(
            self,
            width=self.width if self.width is not None else d.get("width", 1024),
            height=self.height if self.height is not None else d.get("height", 1024),
            steps=self.steps if self.steps is not None else d.get("steps", 30),
            guidance=self.guidance if self.guidance is not None else d.get("guidance", 0.0),
            seed=self.seed if self.seed is not None else random.randrange(2**32),
            frames=(self.frames if self.frames is not None else d.get("frames", 81)) if video else self.frames,
            fps=(self.fps if self.fps is not None else family.fps) if video else self.fps,
        )
        request._check(family, size_multiple or family.size_multiple)
        return replace(request, attention=speed.check_attention(request.attention),
                       cache=speed.check_cache(request.cache, family))

    def _check(self, family: Family, multiple: int) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("prompt: empty; describe what to generate")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise RequestError(f"prompt: {len(self.prompt)} characters; at most {MAX_PROMPT_CHARS}")
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise RequestError(f"negative_prompt: must be text of at most {MAX_PROMPT_CHARS} characters")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise RequestError(f"{name}: must be a positive whole number of pixels, got {value!r}")
            if value % multiple:
                lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
                nearest = f"{lower} or {upper}" if lower else f"{upper}"
                raise RequestError(f"{name}: {value} is not a multiple of {multiple}, which {family.title} "
                                   f"needs; try {nearest}")
            if value > family.max_side:
                raise RequestError(f"{name}: {value} is above {family.max_side}, the largest side "
                                   f"{family.title} supports")
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise RequestError(f"steps: must be a whole number from 1 to {MAX_STEPS}, got {self.steps!r}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) \
                or not math.isfinite(self.guidance) or not 0 <= self.guidance <= MAX_GUIDANCE:
            raise RequestError(f"guidance: must be a finite number from 0 to {MAX_GUIDANCE:g}, got {self.guidance!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise RequestError(f"seed: must be a whole number from 0 to 2**63-1, got {self.seed!r}")
        if not _is_int(self.batch) or not 1 <= self.batch <= MAX_BATCH:
            raise RequestError(f"batch: must be a whole number from 1 to {MAX_BATCH}, got {self.batch!r}")
        if family.kind == "video":
            step = family.frame_step or 1
            if not _is_int(self.frames) or not 1 <= self.frames <= MAX_FRAMES or (self.frames - 1) % step:
                raise RequestError(f"frames: {family.title} needs {step}k+1 frames (5, 9, ..., 81), "
                                   f"at most {MAX_FRAMES}; got {self.frames!r}")
            if not _is_int(self.fps) or not 1 <= self.fps <= 120:
                raise RequestError(f"fps: must be a whole number from 1 to 120, got {self.fps!r}")
        elif self.frames not in (None, 1):
            raise RequestError(f"frames: {family.title} makes images, not videos")
        for name in ("compile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name}: must be true or false, got {getattr(self, name)!r}")

    def as_metadata(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
