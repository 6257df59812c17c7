"""How big a model is, per component, without loading it.

After a download the numbers come from the .safetensors headers (bytes per dtype, the largest
tensor) and from the model class built on the meta device (the largest group the core will
stream: one block); before it, from the registry's recorded parameter counts. Either way the
planner gets the same ``Footprint``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import vram
from vram.casting import casting_rule
from vram.grouping import group_sizes
from pipelines import Family, ModelFilesError
from pipelines.loading import read_model_index, weight_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentSize:
    name: str
    phase: str
    parameters: int                       # elements (all tensors in the files)
    file_bytes: int                       # as stored
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    largest_tensor: int = 0               # elements of the biggest tensor (a layer's worth)
    from_headers: bool = False
    # Parameters the core keeps out of low-precision storage (norms, embeddings, the model's
    # hints): in the computation dtype, and in float32.
    kept_parameters: int = 0
    fp32_parameters: int = 0
    width: int = 0                        # hidden size, from config.json or the registry
    largest_group: int = 0                # elements of the biggest group the core streams (a block)

    @property
    def castable_parameters(self) -> int:
        """Parameters that take the storage dtype a config names (fp8 under fp8_offload)."""
        return self.parameters - self.kept_parameters - self.fp32_parameters


@dataclass(frozen=True)
class Footprint:
    model: str
    components: tuple[ComponentSize, ...]

    @property
    def from_headers(self) -> bool:
        return all(c.from_headers for c in self.components)

    def component(self, name: str) -> ComponentSize:
        return next(c for c in self.components if c.name == name)

    def in_phase(self, phase: str) -> tuple[ComponentSize, ...]:
        return tuple(c for c in self.components if c.phase == phase)

    def total_parameters(self) -> int:
        return sum(c.parameters for c in self.components)


def footprint(family: Family, folder: str | Path | None = None) -> Footprint:
    """Sizes from the files in ``folder`` when it holds the model, else the registry's."""
    sizes = []
    index = None
    if folder is not None and (Path(folder) / "model_index.json").is_file():
        index = read_model_index(Path(folder))
    for component in family.components:
        if index is not None and component.name in index:
            sizes.append(_from_headers(Path(folder), component.name, component.phase, family.variant,
                                       index[component.name]))
        else:
            sizes.append(ComponentSize(component.name, component.phase, component.parameters,
                                       component.parameters * 2, {"bfloat16": component.parameters * 2},
                                       largest_tensor=0, from_headers=False, width=component.width))
    return Footprint(family.key, tuple(sizes))


def _width(config_path: Path) -> int:
    """The hidden size a component's config.json declares (names differ by library)."""
    import json
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return 0
    config = {**config.get("text_config", {}), **config}
    if config.get("num_attention_heads") and config.get("attention_head_dim"):
        heads = config["num_attention_heads"]
        return int((heads[-1] if isinstance(heads, list) else heads) * config["attention_head_dim"])
    for key in ("hidden_size", "d_model", "dim", "inner_dim"):
        if isinstance(config.get(key), int):
            return config[key]
    channels = config.get("block_out_channels")
    return int(channels[-1]) if isinstance(channels, list) and channels and config.get("_class_name", "").startswith(
        "UNet") else 0


def _class_hints(entry) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(float32-kept module names, skip patterns) the model class declares, as the loader
    applies them in bf16: diffusers' ``_keep_in_fp32_modules``, transformers' strict list."""
    import importlib
    try:
        cls = getattr(importlib.import_module(entry[0]), entry[1])
    except (ImportError, AttributeError, TypeError, IndexError):
        return (), ()
    if entry[0] == "transformers":
        keep = getattr(cls, "_keep_in_fp32_modules_strict", None) or ()
    else:
        keep = getattr(cls, "_keep_in_fp32_modules", None) or ()
    return tuple(keep), tuple(getattr(cls, "_skip_layerwise_casting_patterns", None) or ())


def _from_headers(folder: Path, name: str, phase: str, variant: str | None, entry=None) -> ComponentSize:
    try:
        files = weight_files(folder / name, variant)
        source = vram.WeightSource(files)
    except (FileNotFoundError, ValueError) as error:
        raise ModelFilesError(f"cannot size {name}: {error}") from None
    keep_fp32, skip_patterns = _class_hints(entry)
    try:
        by_dtype: dict[str, int] = {}
        parameters = largest = kept = fp32 = 0
        for key, info in source.tensors.items():
            count = info.nbytes // max(1, info.dtype.itemsize)
            parameters += count
            largest = max(largest, count)
            dtype_name = str(info.dtype).removeprefix("torch.")
            by_dtype[dtype_name] = by_dtype.get(dtype_name, 0) + info.nbytes
            rule = casting_rule(key.rpartition(".")[0], key, "", keep_fp32, skip_patterns)
            if rule == "computation":
                kept += count
            elif rule is not None:
                fp32 += count
        return ComponentSize(name, phase, parameters, source.total_bytes, by_dtype, largest, True, kept, fp32,
                             _width(folder / name / "config.json"), _largest_group(folder / name, entry))
    finally:
        source.close()


def _largest_group(component_dir: Path, entry) -> int:
    """Elements of the largest block group, from the class built on the meta device (0 when
    the class cannot be built here)."""
    config = component_dir / "config.json"
    try:
        stamp = config.stat().st_mtime_ns
    except OSError:
        return 0
    return _largest_group_cached(str(component_dir), stamp, tuple(entry or ()))


@functools.lru_cache(maxsize=64)
def _largest_group_cached(component_dir: str, stamp: int, entry: tuple) -> int:
    import torch
    from pipelines.loading import resolve_class, build_model
    try:
        cls = resolve_class(entry[0], entry[1], component_dir)
        model = build_model(cls, Path(component_dir), torch.bfloat16)
    except Exception as error:  # noqa: BLE001 - sizing falls back to the largest tensor
        log.debug("cannot build %s on the meta device to size its groups: %s", component_dir, error)
        return 0
    return max((n for _, n in group_sizes(model)), default=0)
