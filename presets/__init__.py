"""presets: named memory strategies as data files, and (issue 4) the probe, tree and planner.

A preset is a JSON file in ``presets/builtin/`` (or the user's folder, ``$LOWVRAM_PRESETS_DIR``):
a name, a description, and a vram config per component ("default", or a component name or
role: "text_encoders", "denoiser", "vae"). ``{device}`` and ``{dtype}`` stand for the
computation device and dtype of this machine, so one file serves a GPU and a CPU.

    from presets import preset_configs
    configs = preset_configs("disk", vram_limit=6)     # {"default": {...}, "vae": {...}}

For an app, ``presets.session.Session`` checks what users type, plans every preset and runs
jobs on a kept pipeline (``presets.cache.PipelineCache``: load once, generate many).

Imports pipelines/ and vram/; never imported by them.
"""

from .files import (BUILTIN_DIR, PRESETS_DIR_ENV, Preset, PresetError, default_compute, list_presets, load_preset,
                    preset_configs)

__all__ = ["BUILTIN_DIR", "PRESETS_DIR_ENV", "Preset", "PresetError", "default_compute", "list_presets",
           "load_preset", "preset_configs"]
