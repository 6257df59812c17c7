"""Writing results: PNG with the generation settings in its metadata (the speed settings
as they ran among them), mp4 for videos.

``out`` is a file name (``cat.png``, ``clip.mp4``; a batch adds ``_1``, ``_2``...) or a
folder (names from the model, seed and time). Existing files are never overwritten: a
counter is appended instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

if TYPE_CHECKING:
    from .pipeline import Result

IMAGE_SUFFIX, VIDEO_SUFFIX = ".png", ".mp4"


def save_result(result: "Result", out: Path) -> list[Path]:
    video = result.videos is not None
    suffix = VIDEO_SUFFIX if video else IMAGE_SUFFIX
    items = result.videos if video else result.images
    if out.suffix:
        if out.suffix.lower() != suffix:
            raise ValueError(f"out: {out.name} should end in {suffix} for {result.family.title}")
        folder, stem = out.parent, out.stem
    else:
        folder = out
        stem = f"{result.family.key}_{result.request.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(items):
        name = stem if len(items) == 1 else f"{stem}_{i + 1}"
        path = _free_name(folder / f"{name}{suffix}")
        if video:
            _write_mp4(item, path, result.request.fps or result.family.fps)
        else:
            _write_png(item, path, {**result.settings, "index": i})
        paths.append(path)
    return paths


def to_pil(image: np.ndarray) -> Image.Image:
    """A float image in [0, 1], (H, W, 3), as an 8-bit PIL image."""
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def _write_png(image: np.ndarray, path: Path, settings: dict) -> None:
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings, default=str))
    for key in ("prompt", "negative_prompt", "model", "seed", "steps", "guidance", "width", "height"):
        if key in settings:
            info.add_text(key, str(settings[key]))
    if "speed" in settings:  # the speed settings as the run used them (attention "auto" resolved)
        info.add_text("speed", json.dumps(settings["speed"], default=str))
    to_pil(image).save(path, pnginfo=info)


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    from diffusers.utils import export_to_video
    try:
        export_to_video(list(frames), str(path), fps=fps, macro_block_size=1)
    except ImportError as error:
        raise RuntimeError(f"writing {path.name} needs imageio and imageio-ffmpeg ({error})") from None


def _free_name(path: Path) -> Path:
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate
