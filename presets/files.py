"""Preset files: reading, checking and filling in the machine's device and dtype."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import vram

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
PRESETS_DIR_ENV = "LOWVRAM_PRESETS_DIR"
# How the built-in presets are listed (the order); the tree's own order is tree.TREE_ORDER.
ORDER = ("basic", "cpu_offload", "fp8_offload", "dynamic", "disk")
_COMPONENT_KEY = re.compile(r"^(default|text_encoders|denoiser|vae|text_encoding|denoising|vae_decoding|"
                            r"text_encoder(_\d+)?|transformer(_\d+)?|unet)$")


class PresetError(ValueError):
    """A preset that does not exist or whose file cannot be used; names the file and field."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    components: dict[str, dict[str, Any]]   # raw, with {device}/{dtype} placeholders
    uses_vram_limit: bool
    path: Path


def _folders() -> list[Path]:
    folders = [BUILTIN_DIR]
    user = os.environ.get(PRESETS_DIR_ENV)
    if user:
        folders.append(Path(user))
    return folders


def list_presets() -> list[str]:
    """Every preset name: built-in ones first, fastest to most frugal, then the user's."""
    names = {p.stem for folder in _folders() if folder.is_dir() for p in folder.glob("*.json")}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def load_preset(name: str) -> Preset:
    """The preset ``name`` (a user file of the same name overrides a built-in one)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise PresetError(f"preset: {name!r} is not a preset name; known presets: {', '.join(list_presets())}")
    path = next((folder / f"{name}.json" for folder in reversed(_folders()) if (folder / f"{name}.json").is_file()),
                None)
    if path is None:
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PresetError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("components"), dict) or not data["components"]:
        raise PresetError(f"{path}: needs a 'components' object with at least a 'default' config")
    for key, config in data["components"].items():
        if not isinstance(config, dict):
            raise PresetError(f"{path}: components.{key} must be an object of vram config keys")
        if not _COMPONENT_KEY.match(key):
            raise PresetError(f"{path}: components.{key}: not a component; use 'default', a role (text_encoders, "
                              f"denoiser, vae), a phase or a component name (text_encoder_2, transformer, unet)")
    if "default" not in data["components"]:
        raise PresetError(f"{path}: components needs a 'default' config (the others override it per component)")
    preset = Preset(name=name, description=str(data.get("description", "")), components=data["components"],
                    uses_vram_limit=bool(data.get("uses_vram_limit", False)), path=path)
    # Fill in against the CPU so that every field is checked now, whatever the machine.
    _fill(preset, torch.device("cpu"), torch.float32, None)
    return preset


def default_compute() -> tuple[torch.device, torch.dtype]:
    """The computation device and dtype here: CUDA in bf16 (fp16 before Ampere), else the
    CPU in float32 (faster than bf16 on most CPUs, and exact)."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda", torch.cuda.current_device()), dtype
    return torch.device("cpu"), torch.float32


def preset_configs(name: str, *, vram_limit: float | None = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | str | None = None) -> dict[str, vram.VramConfig]:
    """The per-component configs of preset ``name`` on this machine (or ``device``/``dtype``).
    ``vram_limit`` (GiB) applies to presets that manage layers under a cap."""
    preset = load_preset(name)
    default_device, default_dtype = default_compute()
    device = vram.config.parse_device(device, "device") if device is not None else default_device
    dtype = vram.config.parse_dtype(dtype, "dtype") if isinstance(dtype, str) else (dtype or default_dtype)
    return _fill(preset, device, dtype, vram_limit if preset.uses_vram_limit else None)


def _fill(preset: Preset, device: torch.device, dtype: torch.dtype, vram_limit: float | None):
    names = {"{device}": vram.config.device_name(device), "{dtype}": str(dtype).removeprefix("torch.")}
    out = {}
    for key, raw in preset.components.items():
        config = {k: names.get(v, v) if isinstance(v, str) else v for k, v in raw.items()}
        if vram_limit is not None:
            config["vram_limit"] = vram_limit
        try:
            out[key] = vram.VramConfig.from_dict(config)
        except ValueError as error:
            raise PresetError(f"{preset.path}: components.{key}: {error}") from None
    return out
