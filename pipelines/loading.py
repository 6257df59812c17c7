"""Build a pipeline's components on the meta device and bind them to their files via the core.

A diffusers folder (``model_index.json`` plus one subfolder per component) is read the way
``DiffusionPipeline.from_pretrained`` reads it, with one difference: no weight is loaded
here. Each model is built inside ``vram.empty_weights()`` under the computation dtype (as
``from_pretrained(torch_dtype=...)`` builds it, so buffers made in ``__init__`` get the same
dtypes), then ``vram.enable_vram_management`` binds its parameters to the .safetensors
files straight into the tier the component's config names. Tokenizers and schedulers are
small files and load as usual.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

import vram

from .registry import FAMILIES, PHASES, Component, Family, family_for_pipeline, get_family

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_dtype_lock = threading.Lock()


class ModelFilesError(ValueError):
    """A model folder lacks a file, or holds one that cannot be used."""


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------

def read_model_index(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise ModelFilesError(f"{folder} is not a diffusers model folder: model_index.json is missing")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFilesError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ModelFilesError(f"{path}: no _class_name; not a diffusers pipeline index")
    return index


def weight_files(component_dir: Path, variant: str | None = None) -> list[Path]:
    """The .safetensors files that hold one component: the shards its index names, or its
    single file. ``variant`` ("fp16") prefers ``model.fp16.safetensors``-style files and falls
    back to the plain ones. Pickle formats are refused, since loading them can run code."""
    component_dir = Path(component_dir)
    if not component_dir.is_dir():
        raise ModelFilesError(f"{component_dir}: folder missing")
    for tag in ([f".{variant}"] if variant else []) + [""]:
        indexes = sorted(component_dir.glob(f"*.safetensors.index{tag}.json"))
        if indexes:
            return _shards(indexes[0])
        singles = sorted(p for p in component_dir.glob(f"*{tag}.safetensors") if tag or p.name.count(".") == 1)
        if len(singles) == 1:
            return singles
        if len(singles) > 1:
            raise ModelFilesError(f"{component_dir}: several weight files and no index: "
                                  f"{', '.join(p.name for p in singles)}")
    pickles = sorted(p.name for p in component_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFilesError(f"{component_dir}: only pickle weights ({', '.join(pickles)}); they are refused "
                              f"because loading them can run arbitrary code. Convert them to .safetensors.")
    raise ModelFilesError(f"{component_dir}: no .safetensors weights")


def _shards(index: Path) -> list[Path]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFilesError(f"{index}: not a valid safetensors index ({error})") from None
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise ModelFilesError(f"{index.name} in {index.parent} names shard(s) that are missing: {', '.join(missing)}")
    return [index.parent / name for name in shards]


def check_folder(folder: Path, family: Family) -> None:
    """Every file ``family`` needs is in ``folder`` and every weight file's header is sound
    (a truncated download shows up here, by file name). Reads headers only."""
    folder = Path(folder)
    index = read_model_index(folder)
    problems = []
    for name in family.weighted:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            problems.append(f"model_index.json has no component {name!r}")
            continue
        sub = folder / name
        if not (sub / "config.json").is_file():
            problems.append(f"{name}/config.json")
            continue
        try:
            for path in weight_files(sub, family.variant):
                vram.SafetensorsFile(path).close()
        except (ModelFilesError, ValueError, FileNotFoundError) as error:
            problems.append(str(error))
    for name in family.tokenizers + ("scheduler",):
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] and not (folder / name).is_dir():
            problems.append(f"{name}/ folder")
    if problems:
        raise ModelFilesError(f"{family.key} in {folder} is incomplete or damaged: " + "; ".join(problems))


def family_of_folder(folder: Path) -> Family:
    """The registered family a local folder belongs to, by its pipeline class (FLUX dev and
    schnell share one class: the transformer's guidance input tells them apart)."""
    index = read_model_index(folder)
    class_name = index["_class_name"]
    for family in FAMILIES.values():
        if family.bundled is not None and family.bundled.resolve() == Path(folder).resolve():
            return family
    if class_name == "FluxPipeline":
        config = _read_json(Path(folder) / "transformer" / "config.json")
        return get_family("flux.1-dev" if config.get("guidance_embeds", True) else "flux.1-schnell")
    family = family_for_pipeline(class_name)
    if family is None:
        raise ModelFilesError(f"{folder}: pipeline {class_name} is not one this project drives")
    return family


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFilesError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFilesError(f"{path}: not valid JSON ({error})") from None


# ---------------------------------------------------------------------------------------------
# Building components
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build under ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` does (process-wide)."""
    with _dtype_lock:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def resolve_class(library: str, class_name: str, where: str):
    allowed = ("diffusers", "transformers")
    if library not in allowed:
        raise ModelFilesError(f"{where}: library {library!r} is not supported (only {', '.join(allowed)})")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ModelFilesError(f"{where}: {library} has no class {class_name!r} (diffusers/transformers too old?)")
    return cls


def is_model(cls) -> bool:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel
    return issubclass(cls, (ModelMixin, PreTrainedModel))


@dataclass
class LoadedComponent:
    name: str
    phase: str
    module: torch.nn.Module
    config: vram.VramConfig
    files: list[Path]


def build_model(cls, component_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """``cls`` from its config, parameters on the meta device, buffers real, built under
    ``dtype`` exactly as the library's from_pretrained builds it."""
    from diffusers import ModelMixin
    if issubclass(cls, ModelMixin):
        config = cls.load_config(component_dir)
        with vram.empty_weights(), _default_dtype(dtype):
            model = cls.from_config(config)
    else:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(component_dir)
        with vram.empty_weights():
            model = cls._from_config(config, dtype=dtype)
    return model.eval()


def keep_fp32_for(model: torch.nn.Module, dtype: torch.dtype) -> list[str] | None:
    """Modules the library keeps in float32 at ``dtype``: transformers applies
    ``_keep_in_fp32_modules`` to float16 only and ``_keep_in_fp32_modules_strict`` to both half
    types; diffusers applies ``_keep_in_fp32_modules`` always (the core's default: None)."""
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        return None
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return sorted(keep)


def checkpoint_key_renamer(model: torch.nn.Module):
    """A function from checkpoint keys to this model's keys, or None. transformers renames
    modules between versions (Qwen2.5-VL's ``model.layers`` became ``model.language_model.layers``)
    and loads old checkpoints through renaming rules; the same rules apply here."""
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # older transformers: no renaming rules
        return None
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    expected = dict.fromkeys(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [], prefix, expected)[0]
    return rename


class ModelPlacement(Protocol):
    """A pipeline's components over several accelerators, as the loader asks it (a split
    component's blocks and its caps; ``presets.placement.Placement`` is one)."""

    def device_map_for(self, component: str, block_names: Sequence[str],
                       block_sizes: Sequence[int] | None = None) -> dict[str, str]:
        """The core ``device_map`` of ``component`` from its blocks in order and their sizes
        (elements); {} for a component on one device."""

    def caps_for(self, component: str) -> dict[str, float]:
        """GiB per device name for each device ``component`` computes on."""


def blocks_of(model: torch.nn.Module, granularity: str) -> tuple[list[str], list[int]]:
    """The names of ``model``'s repeated blocks in order, and their sizes (elements): what a
    ``device_map`` over runs of blocks is cut from (none for a model without blocks)."""
    from vram.grouping import group_sizes, plan_groups
    sizes = dict(group_sizes(model, granularity))
    names = [plan.name for plan in plan_groups(model, granularity) if plan.block]
    return names, [sizes[name] for name in names]


def split_map(model: torch.nn.Module, granularity: str, runs) -> dict[str, str]:
    """A core ``device_map`` from ``runs``, (device, number of blocks) pairs: the model's
    repeated blocks in order, the first n on the first device, and so on (the last run takes
    what is left); the rest of the model stays on its config's device."""
    blocks, _ = blocks_of(model, granularity)
    if not blocks:
        raise ModelFilesError(f"{type(model).__name__} has no repeated blocks to split over devices")
    out: dict[str, str] = {}
    start = 0
    for i, (device, count) in enumerate(runs):
        if not (isinstance(count, int) and count >= 0):
            raise ValueError(f"split: {count!r} blocks on {device}: a count of blocks is a whole number >= 0")
        end = len(blocks) if i == len(runs) - 1 else min(len(blocks), start + count)
        out.update(dict.fromkeys(blocks[start:end], str(device)))
        start = end
    return out


def load_component(folder: Path, name: str, phase: str, entry: list, config: vram.VramConfig,
                   variant: str | None = None, label: str | None = None, *, split=None,
                   io_device: torch.device | None = None,
                   vram_limit: Mapping[str, float] | None = None) -> LoadedComponent:
    """Build component ``name`` on the meta device and put it under the core with ``config``.
    ``split`` spreads its blocks over devices: (device, number of blocks) runs (``split_map``),
    or a function from its block names and sizes to a ``device_map``
    (``Placement.device_map_for``); ``vram_limit`` then caps each device (GiB by device name).
    ``io_device`` is the pipeline's execution device when the component computes elsewhere."""
    component_dir = Path(folder) / name
    cls = resolve_class(entry[0], entry[1], f"{component_dir}")
    if not is_model(cls):
        raise ModelFilesError(f"{component_dir}: {entry[1]} is not a model class")
    files = weight_files(component_dir, variant)
    config = _vae_upcast(cls, component_dir, config)
    model = build_model(cls, component_dir, config.computation.dtype)
    source = vram.WeightSource(files)
    try:
        rename = checkpoint_key_renamer(model)
        if rename is not None:
            source.rename_keys(rename)
        device_map = None
        if callable(split):
            device_map = split(*blocks_of(model, config.granularity)) or None
        elif split:
            device_map = split_map(model, config.granularity, split)
        vram.enable_vram_management(model, config, weights=source, name=label or name,
                                    keep_fp32=keep_fp32_for(model, config.computation.dtype),
                                    device_map=device_map, io_device=io_device,
                                    vram_limit=vram_limit if device_map else None)
    except ValueError as error:
        source.close()
        raise ModelFilesError(f"{component_dir}: {error}") from None
    except BaseException:
        source.close()
        raise
    return LoadedComponent(name, phase, model, config, files)


def _vae_upcast(cls, component_dir: Path, config: vram.VramConfig) -> vram.VramConfig:
    """A VAE whose config says ``force_upcast`` (SDXL's overflows in float16) computes in
    float32 when the rest computes in float16: the pipeline's own ``vae.to(float32)`` would
    reach only buffers of a managed model."""
    if config.computation.dtype != torch.float16:
        return config
    if not _read_json(component_dir / "config.json").get("force_upcast", False):
        return config
    return config.with_dtype(torch.float32)


def load_plain_component(folder: Path, name: str, entry: list):
    """A tokenizer, scheduler or processor: loaded by its own class from its subfolder."""
    component_dir = Path(folder) / name
    cls = resolve_class(entry[0], entry[1], f"{component_dir}")
    if is_model(cls):
        raise ModelFilesError(f"{component_dir}: {entry[1]} is a model, but the family does not list it")
    try:
        return cls.from_pretrained(component_dir)
    except (OSError, ValueError) as error:
        raise ModelFilesError(f"{component_dir}: cannot load {entry[1]}: {error}") from None


ROLES = {"text_encoding": "text_encoders", "denoising": "denoiser", "vae_decoding": "vae"}


def config_key_for(configs: Mapping[str, Any], component: Component) -> str:
    """Which entry of ``configs`` applies to a component: its name ("text_encoder_2"), else
    its role ("text_encoders", "denoiser", "vae"), else its phase, else "default"."""
    role = ROLES[component.phase]
    for key in (component.name, role, component.phase, "default"):
        if key in configs:
            return key
    raise ValueError(f"no config for component {component.name!r}: give one under {component.name!r}, "
                     f"{role!r} or 'default'")


def _signature_models(family: Family) -> list[str]:
    """The family's models in the order ``DiffusionPipeline.device`` looks at them: the
    pipeline's signature keys."""
    import diffusers
    pipeline_class = getattr(diffusers, family.pipeline_class)
    modules, _ = pipeline_class._get_signature_keys(pipeline_class)
    return [name for name in modules if name in family.weighted]


def execution_component(family: Family) -> str:
    """The component whose device diffusers' pipeline makes its own tensors on (latents, the
    prompt's ids) when every model computes on an accelerator: ``DiffusionPipeline.device``
    is the device of the first model among the pipeline's signature keys that is off the CPU."""
    return _signature_models(family)[0]


def execution_device(family: Family, configs: Mapping[str, vram.VramConfig]) -> torch.device:
    """The device diffusers' pipeline computes on with these configs (by component name), by
    ``DiffusionPipeline.device``'s rule: the first model of its signature keys computing off
    the CPU (a stand-in counts as a GPU), else the first model's."""
    devices = [configs[name].computation.device for name in _signature_models(family)]
    return next((d for d in devices if not vram.config.is_host(d)), devices[0])


def config_for(configs: Mapping[str, Any], component: Component) -> vram.VramConfig:
    """The config for one component (see ``config_key_for``), checked."""
    key = config_key_for(configs, component)
    try:
        return vram.VramConfig.coerce(configs[key])
    except ValueError as error:
        raise ValueError(f"config for {component.name} ({key!r}): {error}") from None


def check_config_keys(configs: Mapping[str, Any], family: Family) -> None:
    known = set(family.weighted) | {"text_encoders", "denoiser", "vae", "default"} | set(PHASES)
    unknown = sorted(set(configs) - known)
    if unknown:
        raise ValueError(f"configs: unknown key(s) {unknown} for {family.key}; use component names "
                         f"({', '.join(family.weighted)}), roles (text_encoders, denoiser, vae) or 'default'")
