"""The model families this project runs: where their files live and how to drive them.

One ``Family`` per entry: its ModelScope and Hugging Face ids, the diffusers pipeline class,
the components by role (what runs in which phase), the files a download needs, the
constraints on a job (size multiple, frame rule) and the default generation settings.
Model definitions, schedulers and generation loops all come from diffusers/transformers; a
family only says which of them to use.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

# The three phases of a text-to-image/video run, in order.
PHASES = ("text_encoding", "denoising", "vae_decoding")


@dataclass(frozen=True)
class Component:
    """One weighted part of a pipeline: its subfolder, its phase, and its size in the
    published checkpoint (parameters, from the model card; the planner uses it before a
    download, the files' headers after)."""

    name: str              # subfolder and pipeline attribute: "transformer", "text_encoder_2", ...
    phase: str             # one of PHASES
    parameters: int = 0    # approximate parameter count of the published weights
    width: int = 0         # hidden size (activations scale with it); 0 for the VAE


@dataclass(frozen=True)
class Family:
    key: str
    title: str
    pipeline_class: str                      # diffusers class name
    components: tuple[Component, ...]
    modelscope_id: str | None = None
    huggingface_id: str | None = None
    kind: str = "image"                      # "image" or "video"
    variant: str | None = None               # weight file variant to download/load ("fp16")
    size_multiple: int = 16                  # width/height must be multiples of this
    max_side: int = 2048
    defaults: Mapping[str, object] = field(default_factory=dict)
    # How the user's "guidance" maps onto the pipeline's arguments, and whether guidance > 1
    # means classifier-free guidance (two denoiser passes per step; FLUX's is an input instead).
    guidance_argument: str = "guidance_scale"
    guidance_is_cfg: bool = True
    # Wan: frames must be 4k+1.
    frame_step: int | None = None
    fps: int = 16
    description: str = ""
    # Files that ship with this project (the built-in model): used in place, never downloaded.
    bundled: Path | None = None
    # A converted copy (python -m pipelines.convert): made here from the family ``converted_from``
    # in ``converted_dtype``, never downloaded.
    converted_from: str | None = None
    converted_dtype: str | None = None

    @property
    def weighted(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def components_in(self, phase: str) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.phase == phase)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"{self.key} has no component {name!r}; it has {', '.join(self.weighted)}")

    def allow_patterns(self) -> list[str]:
        """The files a download needs: the index, every component's configs, tokenizers,
        the scheduler, and the weights (safetensors only; the variant when there is one)."""
        weights = f"*.{self.variant}.safetensors" if self.variant else "*.safetensors"
        index = f"*.safetensors.index.{self.variant}.json" if self.variant else "*.safetensors.index.json"
        patterns = ["model_index.json", "scheduler/*.json"]
        for name in self.weighted:
            patterns += [f"{name}/*.json", f"{name}/{weights}", f"{name}/{index}"]
            if self.variant:
                # sharded variant files are named model.fp16-00001-of-00002.safetensors
                patterns.append(f"{name}/*.{self.variant}-*.safetensors")
        for name in self.tokenizers:
            patterns += [f"{name}/*.json", f"{name}/*.txt", f"{name}/*.model", f"{name}/*.jinja"]
        return patterns

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(name.replace("text_encoder", "tokenizer") for name in self.components_in("text_encoding"))


def _text(name: str, parameters: int, width: int) -> Component:
    return Component(name, "text_encoding", parameters, width)


def _denoiser(name: str, parameters: int, width: int) -> Component:
    return Component(name, "denoising", parameters, width)


def _vae(parameters: int) -> Component:
    return Component("vae", "vae_decoding", parameters)


_WAN_TEXT = (_text("text_encoder", 5_681_000_000, 4096),)

FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family(
        key="qwen-image", title="Qwen-Image (20B)", pipeline_class="QwenImagePipeline",
        modelscope_id="Qwen/Qwen-Image", huggingface_id="Qwen/Qwen-Image",
        components=(_text("text_encoder", 8_292_000_000, 3584), _denoiser("transformer", 20_430_000_000, 3072),
                    _vae(126_900_000)),
        defaults={"steps": 50, "guidance": 4.0, "width": 1328, "height": 1328},
        guidance_argument="true_cfg_scale",
        description="Alibaba's 20B MMDiT; strong text rendering. CFG needs a negative prompt (' ' by default).",
    ),
    Family(
        key="z-image-turbo", title="Z-Image-Turbo (6B)", pipeline_class="ZImagePipeline",
        modelscope_id="Tongyi-MAI/Z-Image-Turbo", huggingface_id="Tongyi-MAI/Z-Image-Turbo",
        components=(_text("text_encoder", 4_022_000_000, 2560), _denoiser("transformer", 6_155_000_000, 3840),
                    _vae(83_800_000)),
        defaults={"steps": 9, "guidance": 0.0, "width": 1024, "height": 1024},
        description="Tongyi's distilled 6B single-stream DiT: 8 forwards, no CFG.",
    ),
    Family(
        key="flux.1-dev", title="FLUX.1-dev (12B)", pipeline_class="FluxPipeline",
        modelscope_id="black-forest-labs/FLUX.1-dev", huggingface_id="black-forest-labs/FLUX.1-dev",
        components=(_text("text_encoder", 123_000_000, 768), _text("text_encoder_2", 4_762_000_000, 4096),
                    _denoiser("transformer", 11_901_000_000, 3072), _vae(83_800_000)),
        defaults={"steps": 28, "guidance": 3.5, "width": 1024, "height": 1024}, guidance_is_cfg=False,
        description="Guidance-distilled 12B MMDiT; guidance is an input, not CFG (one pass per step).",
    ),
    Family(
        key="wan2.1-t2v-1.3b", title="Wan2.1 T2V 1.3B", pipeline_class="WanPipeline", kind="video",
        modelscope_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", huggingface_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        components=_WAN_TEXT + (_denoiser("transformer", 1_418_000_000, 1536), _vae(126_900_000)),
        defaults={"steps": 50, "guidance": 5.0, "width": 832, "height": 480, "frames": 81},
        frame_step=4, max_side=1280,
        description="Text to video, 480p; frames must be 4k+1.",
    ),
    Family(
        key="sdxl", title="Stable Diffusion XL base 1.0", pipeline_class="StableDiffusionXLPipeline",
        modelscope_id="AI-ModelScope/stable-diffusion-xl-base-1.0",
        huggingface_id="stabilityai/stable-diffusion-xl-base-1.0", variant="fp16",
        components=(_text("text_encoder", 123_000_000, 768), _text("text_encoder_2", 694_700_000, 1280),
                    _denoiser("unet", 2_567_000_000, 1280), _vae(83_700_000)),
        defaults={"steps": 30, "guidance": 5.0, "width": 1024, "height": 1024},
        size_multiple=8,
        description="The 2.6B UNet classic, fp16 weights.",
    ),
)}


# Variants share everything but their ids, weights and defaults.
for _base, _variant in (
    ("flux.1-dev", dict(key="flux.1-schnell", title="FLUX.1-schnell (12B)",
                        modelscope_id="black-forest-labs/FLUX.1-schnell",
                        huggingface_id="black-forest-labs/FLUX.1-schnell",
                        defaults={"steps": 4, "guidance": 0.0, "width": 1024, "height": 1024,
                                  "max_sequence_length": 256},
                        description="Timestep-distilled FLUX: 4 steps.")),
    ("wan2.1-t2v-1.3b", dict(key="wan2.1-t2v-14b", title="Wan2.1 T2V 14B",
                             modelscope_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
                             huggingface_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
                             components=_WAN_TEXT + (_denoiser("transformer", 14_289_000_000, 5120),
                                                     _vae(126_900_000)),
                             defaults={"steps": 50, "guidance": 5.0, "width": 1280, "height": 720, "frames": 81},
                             description="Text to video, 480p or 720p; frames must be 4k+1.")),
):
    # Listed right after the family they vary.
    _keys = list(FAMILIES)
    _keys.insert(_keys.index(_base) + 1, _variant["key"])
    FAMILIES[_variant["key"]] = replace(FAMILIES[_base], **_variant)
    FAMILIES = {k: FAMILIES[k] for k in _keys}


# Converted copies: the same models stored in scaled fp8 e4m3 (pipelines/convert.py), so the
# disk tier reads 0.5-0.64 of the bytes (what the casting rule keeps stays bf16) and fp8
# presets cast nothing at load. Made on first use from the downloaded original by
# ``load_pipeline`` (or beforehand: ``python -m pipelines.convert KEY models/KEY-fp8``).
CONVERTED_SUFFIX = "-fp8"
for _base in ("qwen-image", "z-image-turbo", "flux.1-dev", "flux.1-schnell", "wan2.1-t2v-14b"):
    _family = FAMILIES[_base]
    _key = _base + CONVERTED_SUFFIX
    _keys = list(FAMILIES)
    _keys.insert(_keys.index(_base) + 1, _key)
    FAMILIES[_key] = replace(
        _family, key=_key, title=f"{_family.title}, fp8 e4m3", modelscope_id=None, huggingface_id=None,
        variant=None, converted_from=_base, converted_dtype="float8_e4m3fn",
        description=f"{_family.title} converted here to scaled fp8 (made from {_base} on first use): "
                    f"about half the bytes on disk and in the disk tier's reads. {_family.description}")
    FAMILIES = {k: FAMILIES[k] for k in _keys}


# The model the app and the command line use when none is named: the built-in tiny model
# (pipelines/tiny/), which needs no download and runs on a CPU.
DEFAULT_MODEL = "tiny-shapes"


def register(family: Family) -> None:
    """Add a family (the built-in tiny model does this); replaces one with the same key."""
    unknown = [c.phase for c in family.components if c.phase not in PHASES]
    if unknown:
        raise ValueError(f"{family.key}: unknown phase(s) {unknown}; phases are {', '.join(PHASES)}")
    FAMILIES[family.key] = family


def get_family(key: str) -> Family:
    """The family named ``key``; ValueError listing the known ones (and the closest) if not."""
    if isinstance(key, str) and key in FAMILIES:
        return FAMILIES[key]
    close = difflib.get_close_matches(str(key), FAMILIES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown model {key!r}{hint}; known models: {', '.join(FAMILIES)}, or a local folder")


def family_for_pipeline(pipeline_class: str) -> Family | None:
    """The first registered family driven by ``pipeline_class`` (for local folders)."""
    return next((f for f in FAMILIES.values() if f.pipeline_class == pipeline_class), None)
