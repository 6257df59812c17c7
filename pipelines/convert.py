"""Command line and API: write a pre-converted copy of a diffusers model folder.

    python -m pipelines.convert flux.1-dev models/flux.1-dev-fp8
    python -m pipelines.convert models/sdxl out/sdxl-bf16 --dtype bfloat16 --max-shard-size 2GB

The copy has the source's layout (``model_index.json``, each component's config, tokenizers,
scheduler and every other file as they are) and is what the disk tier reads best:

* Dtypes by the core's own rule (``vram.casting.model_rule``): a tensor the rule keeps
  (float32-kept modules, normalisations, skip patterns) stays exactly as in the source, the
  other float parameters are cast to ``dtype``; non-float tensors and keys that are not
  parameters stay as they are. A copy loaded under a preset of the same storage dtype draws
  what the source draws.
* fp8 is scaled as the core scales it at load time (``vram.casting.fp8_scale``, one power of
  two per tensor), so the bytes equal what the core holds when it loads the source under an
  fp8 preset; each scale is a float32 scalar ``key + ".fp8_scale"`` in its weight's shard,
  all of a shard's scales together at the start of its data. ``fp8_scale="none"`` writes a
  plain cast that any diffusers-compatible loader reads. The VAE is copied as it is under
  fp8 unless named (the fp8 presets keep it in the computation dtype).
* Tensors ordered block by block, in the order of the core's groups
  (``vram.grouping.plan_groups``), whole blocks packed into shards of at most
  ``max_shard_size`` bytes (file size, header included; one tensor larger than that gets a
  shard of its own), so a group is read in one ``preadv``.
* 4 KiB alignment without filler tensors (the format allows no holes between tensors, and
  extra keys would trouble other loaders): in each block the tensors whose size is a
  multiple of 4 KiB come first, so they start on a boundary whenever the block does,
  preceded by a few small ones whose sizes bring a block that starts off the boundary back
  onto it when some do; the header is padded with spaces (the format allows trailing
  whitespace) so that the weights after the scales start on a boundary, or at the shift that
  starts the most bytes on one. The fraction of tensor bytes that start on a boundary is
  recorded (the FLUX, Qwen-Image and Wan transformers at fp8: over 99%).

One tensor is in memory at a time. Nothing is written into the source. The copy is written
into a hidden sibling folder, ``model_index.json`` last, and renamed to ``dest`` when
complete; an error or Ctrl-C removes it. ``dest/conversion.json`` records what was done.

Like generate.py this is an entry point; it imports the pipelines' loading code and the core.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

import vram
from vram.casting import FP8_MAX, SCALE_SUFFIX, cast, fp8_scale, model_rule
from vram.grouping import plan_groups
from vram.weights import SAFETENSORS_DTYPES, TensorInfo

from .loading import (PICKLE_SUFFIXES, ModelFilesError, is_model, resolve_class, build_model, check_folder,
                      checkpoint_key_renamer, keep_fp32_for, read_model_index, weight_files)
from .registry import FAMILIES, Family
from .sources import is_local, locate

log = logging.getLogger(__name__)

DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float32": torch.float32}
FP8_SCALES = ("tensor", "none")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
MIN_SHARD_SIZE = 10**6  # 1MB: below it the per-file overhead (header, 4 KiB padding) dominates
ALIGNMENT = 4096
RECORD = "conversion.json"
_RECORD_BYTES = 2**16  # room for conversion.json in the disk space check
VERSION = 1
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_STORAGE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_SHORT_NAMES = {"float8_e4m3fn": "fp8 e4m3", "float8_e5m2": "fp8 e5m2", "bfloat16": "bf16", "float16": "fp16",
                "float32": "fp32"}

# progress(component, bytes written, bytes the component's shards will hold)
Progress = Callable[[str, int, int], None]


class ConversionError(ValueError):
    """A conversion cannot start or cannot go on; the message names the file, folder or flag."""


@dataclass(frozen=True)
class ComponentReport:
    """One converted component: its shards and what its tensors became."""

    dtype: str
    shards: int
    bytes: int                 # the shards' size on disk
    tensors: int               # the model's tensors (scales not counted)
    kept: int                  # left as in the source: rule-kept, non-float and non-parameter tensors
    aligned_fraction: float    # of tensor bytes starting on a 4 KiB boundary of their file


@dataclass(frozen=True)
class ConversionReport:
    source: Path
    dest: Path
    source_name: str
    dtype: str
    fp8_scale: str
    max_shard_size: int
    components: dict[str, ComponentReport]
    copied: tuple[str, ...]    # weighted components copied as they are
    bytes_written: int         # everything under dest


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A storage dtype by name ("float8_e4m3fn") or as a torch dtype."""
    for name, value in DTYPES.items():
        if dtype == value or dtype == name:
            return value
    raise ConversionError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


def parse_size(size: str | int) -> int:
    """Bytes from "5GB" (10^9), "500MB", "2GiB" (2^30), "1.5GB" or a plain byte count; at least 1MB."""
    if isinstance(size, int):
        count = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", str(size), re.IGNORECASE)
        if match is None:
            raise ConversionError(f"--max-shard-size {size!r} is not a size; write e.g. 5GB, 500MB, 2GiB or "
                                  f"a byte count")
        number, unit = match.group(1), _UNITS[(match.group(2) or "b").lower()]
        count = int(number) * unit if number.isdigit() else int(float(number) * unit)
    if count < MIN_SHARD_SIZE:
        raise ConversionError(f"--max-shard-size {size!r} is too small: the minimum is 1MB ({MIN_SHARD_SIZE} bytes)")
    return count


# ---------------------------------------------------------------------------------------------
# Planning: what goes where, before anything is written
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Tensor:
    """One tensor of the copy: where it comes from and how it is stored."""

    info: TensorInfo           # the source tensor; the copy keeps its key
    model_key: str             # the key the WeightSource gives it (renamed to the model's)
    dtype: torch.dtype         # stored dtype
    kept: bool                 # stored exactly as in the source
    scaled: bool               # a scale is stored beside it
    begin: int = 0             # offset in the shard's data section

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def nbytes(self) -> int:
        return math.prod(self.info.shape) * self.dtype.itemsize

    def entry(self) -> dict:
        return {"dtype": _STORAGE_NAMES[self.dtype], "shape": list(self.info.shape),
                "data_offsets": [self.begin, self.begin + self.nbytes]}


@dataclass(eq=False)
class _Shard:
    tensors: list[_Tensor]
    name: str = ""
    header: bytes = b""        # length prefix, JSON and padding

    @property
    def scaled(self) -> list[_Tensor]:
        return [t for t in self.tensors if t.scaled]

    @property
    def data_bytes(self) -> int:
        return 4 * len(self.scaled) + sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes


@dataclass(eq=False)
class _Component:
    name: str
    source: vram.WeightSource
    base: str                  # file name stem: "diffusion_pytorch_model", "model"
    shards: list[_Shard]

    @property
    def data_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    def index(self) -> str | None:
        """The ``*.safetensors.index.json`` of several shards: every key, scales included."""
        if len(self.shards) == 1:
            return None
        weight_map = {}
        for shard in self.shards:
            weight_map.update({t.key + SCALE_SUFFIX: shard.name for t in shard.scaled})
            weight_map.update({t.key: shard.name for t in shard.tensors})
        return json.dumps({"metadata": {"total_size": self.data_bytes}, "weight_map": weight_map}, indent=2) + "\n"


def _resolve_source(source: str | os.PathLike, models_dir: str | os.PathLike | None) -> tuple[Path, Family, str]:
    """The source folder, its family and its name (the registry key, or the folder's name)."""
    if isinstance(source, str) and not is_local(source) and not Path(source).is_dir():
        folder, family = locate(source, models_dir)
        try:
            check_folder(folder, family)
        except ModelFilesError as error:
            if family.bundled is not None:
                raise
            state = "is incomplete" if folder.is_dir() else "is not downloaded"
            dir_flag = f" --models-dir {models_dir}" if models_dir else ""
            raise ConversionError(
                f"{family.key} {state} in {folder} ({error}). Download it first: load it once in the app, or run "
                f"python -m pipelines.generate --model {family.key}{dir_flag} --prompt test --steps 1") from None
        return folder, family, family.key
    folder, family = locate(Path(source))
    check_folder(folder, family)
    return folder, family, family.key if family.bundled is not None else folder.resolve().name


def _check_dest(source: Path, dest: Path) -> None:
    src, dst = source.resolve(), dest.resolve()
    if dst.is_relative_to(src):
        raise ConversionError(f"destination {dest} is inside the source folder {source}; the source is never "
                              f"written to: choose a folder outside it")
    if src.is_relative_to(dst):
        raise ConversionError(f"destination {dest} contains the source folder {source}; choose another folder")
    if dest.exists() and not dest.is_dir():
        raise ConversionError(f"destination {dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise ConversionError(f"destination {dest} exists and is not empty; name a new or empty folder")


def _weighted(folder: Path, index: dict, family: Family) -> dict[str, tuple[type, list[Path]]]:
    """Components of ``model_index.json`` that are models with .safetensors weights: their
    classes and weight files."""
    found = {}
    for name, entry in index.items():
        sub = folder / name
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            continue
        if not sub.is_dir() or not any(sub.glob("*.safetensors")):
            continue
        cls = resolve_class(entry[0], entry[1], str(sub))
        if is_model(cls):
            found[name] = (cls, weight_files(sub, family.variant))
    return found


def _chosen(components: Sequence[str] | None, weighted: Sequence[str], dtype: torch.dtype,
            family: Family) -> list[str]:
    if components is None:
        # The fp8 presets keep the VAE in the computation dtype: converting it would only lose.
        skip = family.components_in("vae_decoding") if dtype in FP8_MAX else ()
        return [name for name in weighted if name not in skip]
    names = list(dict.fromkeys(components))
    unknown = [name for name in names if name not in weighted]
    if unknown or not names:
        raise ConversionError(f"--components: {', '.join(unknown) or 'none given'}: not a weighted component of "
                              f"this model; choose from {', '.join(weighted)}")
    return names


def _plan(folder: Path, name: str, cls: type, files: list[Path], dtype: torch.dtype, scaled: bool,
          max_shard_size: int) -> _Component:
    """Build ``name`` on the meta device and lay its tensors out in shards."""
    component_dir = folder / name
    model = build_model(cls, component_dir, torch.float32)
    try:
        source = vram.WeightSource(files)
    except (ValueError, FileNotFoundError) as error:
        raise ConversionError(f"{component_dir}: {error}") from None
    try:
        rename = checkpoint_key_renamer(model)
        if rename is not None:
            source.rename_keys(rename)
        blocks = _blocks(model, source, dtype, scaled, keep_fp32_for(model, dtype))
    except ValueError as error:
        source.close()
        raise ConversionError(f"{component_dir}: {error}") from None
    base = re.sub(r"-\d+-of-\d+$", "", files[0].name.split(".")[0])
    shards = _pack(blocks, max_shard_size, _metadata(dtype, scaled))
    for i, shard in enumerate(shards, 1):
        shard.name = f"{base}.safetensors" if len(shards) == 1 else f"{base}-{i:05d}-of-{len(shards):05d}.safetensors"
    return _Component(name, source, base, shards)


def _blocks(model: torch.nn.Module, source: vram.WeightSource, dtype: torch.dtype, scaled: bool,
            keep_fp32: Sequence[str] | None) -> list[list[_Tensor]]:
    """The source's tensors in the core's group order, one list per group; the keys that are
    no parameter's last."""
    names: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(key)
    # The rule as the core applies it: the first module holding a parameter, its first name.
    rules = {}
    for module_name, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in rules:
                rules[id(param)] = model_rule(model, module, module_name, names[id(param)][0], keep_fp32)
    missing, claimed, blocks = [], set(), []
    for plan in plan_groups(model, "block"):
        block = []
        for _, module in plan.members:
            for param in module._parameters.values():
                if param is None or id(param) in claimed:
                    continue
                claimed.add(id(param))
                key = next((k for k in names[id(param)] if k in source), None)
                if key is None:
                    missing.append(names[id(param)][0])
                    continue
                block.append(_tensor(source, key, rules[id(param)] is not None, dtype, scaled))
        blocks.append(block)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the weights lack parameter(s) of {type(model).__name__}: {shown}")
    # Last: a tied parameter's other names (stored as the parameter is; the core reads one),
    # persistent buffers and keys the model does not know (as they are).
    rule_of = {key: rules[param_id] for param_id, keys in names.items() for key in keys}
    placed = {t.model_key for block in blocks for t in block}
    blocks.append([_tensor(source, key, rule_of.get(key, True) is not None, dtype, scaled)
                   for key in source if key not in placed])
    return [block for block in blocks if block]


def _tensor(source: vram.WeightSource, model_key: str, keep: bool, dtype: torch.dtype, scaled: bool) -> _Tensor:
    info = source.info(model_key)
    kept = keep or not info.dtype.is_floating_point
    if kept:  # a scaled source's scale goes along, or the value would change
        return _Tensor(info, model_key, info.dtype, True, model_key in source.scale_infos)
    return _Tensor(info, model_key, dtype, False, scaled and dtype in FP8_MAX)


def _metadata(dtype: torch.dtype, scaled: bool) -> dict[str, str]:
    metadata = {"format": "pt"}
    if dtype in FP8_MAX:
        metadata["lowvram.fp8_scale"] = "tensor" if scaled else "none"
    return metadata


def _pack(blocks: list[list[_Tensor]], max_shard_size: int, metadata: dict) -> list[_Shard]:
    """Whole blocks into shards of at most ``max_shard_size`` bytes each; a block larger than
    a shard starts a new one and is split by tensors."""
    digits = len(str(max_shard_size))
    fixed = 8 + len(json.dumps({"__metadata__": metadata})) + ALIGNMENT  # prefix, metadata, worst padding

    def cost(tensor: _Tensor) -> int:
        # The tensor's bytes and an upper bound on its header entry (and its scale's).
        entry = len(json.dumps(tensor.key)) + 2 + len(json.dumps({**tensor.entry(), "data_offsets": [0, 0]}))
        entry += 2 * (digits - 1)
        if tensor.scaled:
            entry += entry + len(SCALE_SUFFIX) + 4
        return tensor.nbytes + entry

    shards: list[list[_Tensor]] = [[]]
    used = [fixed]
    for block in blocks:
        if used[-1] + sum(cost(t) for t in block) > max_shard_size and shards[-1]:
            shards.append([])
            used.append(fixed)
        offset = sum(t.nbytes for t in shards[-1])
        for tensor in _block_order(block, offset):  # all in one shard, unless the block is larger than one
            if used[-1] + cost(tensor) > max_shard_size and shards[-1]:
                shards.append([])
                used.append(fixed)
            shards[-1].append(tensor)
            used[-1] += cost(tensor)
    return [_layout(tensors, metadata) for tensors in shards if tensors]


def _block_order(block: list[_Tensor], offset: int) -> list[_Tensor]:
    """``block``'s tensors for a start at ``offset`` in the shard's weights: first a few small
    ones whose sizes bring the offset to a 4 KiB boundary (when some do), then those whose
    size is a multiple of 4 KiB (so they all start on a boundary), then the rest."""
    aligned = [t for t in block if t.nbytes % ALIGNMENT == 0]
    rest = [t for t in block if t.nbytes % ALIGNMENT]
    gap = -offset % ALIGNMENT
    lead = _summing_to(rest, gap) if aligned and gap else []
    chosen = {id(t) for t in lead}
    return lead + aligned + [t for t in rest if id(t) not in chosen]


def _summing_to(tensors: list[_Tensor], residue: int) -> list[_Tensor]:
    """Some of ``tensors`` whose sizes add up to ``residue`` modulo 4 KiB, or none: a subset
    sum over the 4096 residues."""
    reached: dict[int, tuple[int, int] | None] = {0: None}  # residue -> (residue before, tensor)
    for i, tensor in enumerate(tensors):
        for before in list(reached):
            reached.setdefault((before + tensor.nbytes) % ALIGNMENT, (before, i))
        if residue in reached:
            break
    if residue not in reached:
        return []
    picked = []
    while (step := reached[residue]) is not None:
        residue, i = step
        picked.append(tensors[i])
    return picked[::-1]


def _layout(tensors: list[_Tensor], metadata: dict) -> _Shard:
    """Offsets and header: the scales first, then the tensors; the header padded with spaces
    so that as many tensor bytes as can start on 4 KiB boundaries of the file (the first
    tensor after the scales, unless a shift serves more)."""
    shard = _Shard(tensors)
    scales = shard.scaled
    header: dict = {"__metadata__": metadata}
    for i, tensor in enumerate(scales):
        header[tensor.key + SCALE_SUFFIX] = {"dtype": "F32", "shape": [], "data_offsets": [4 * i, 4 * i + 4]}
    offset = 4 * len(scales)
    for tensor in tensors:
        tensor.begin = offset
        offset += tensor.nbytes
        header[tensor.key] = tensor.entry()
    # The shift of the weights against the 4 KiB grid that starts the most bytes on it (0
    # when the blocks line up; a block whose size is no multiple of 4 KiB shifts the rest).
    on_grid: dict[int, int] = {}
    for tensor in tensors:
        residue = (tensor.begin - 4 * len(scales)) % ALIGNMENT
        on_grid[residue] = on_grid.get(residue, 0) + tensor.nbytes
    shift = max(sorted(on_grid), key=on_grid.get, default=0)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text) + 4 * len(scales)) - shift) % ALIGNMENT)
    shard.header = struct.pack("<Q", len(text)) + text
    return shard


def _is_weight_file(path: Path) -> bool:
    return (path.name.endswith(".safetensors") or path.suffix in PICKLE_SUFFIXES
            or re.search(r"\.safetensors\.index(\.\w+)?\.json$", path.name) is not None)


def _copy_plan(folder: Path, converted: set[str]) -> list[tuple[Path, Path]]:
    """(source, path relative to dest) of every file copied as it is, ``model_index.json``
    last. Hidden entries (a hub client's ``.cache/``) are left out; so are the weight files
    of converted components and the record of an earlier conversion (the copy has its own)."""
    copies = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if relative.parts[0] in converted and len(relative.parts) == 2 and _is_weight_file(path):
            continue
        if relative not in (Path("model_index.json"), Path(RECORD)):
            copies.append((path, relative))
    return copies + [(folder / "model_index.json", Path("model_index.json"))]


def _check_space(dest: Path, need: int) -> None:
    existing = dest.parent.resolve()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        raise ConversionError(f"not enough disk space for {dest}: the copy needs {need} bytes "
                              f"({need / 2**30:.2f} GiB) but {existing} has {free} bytes ({free / 2**30:.2f} GiB) "
                              f"free; nothing was written")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _stored(value: torch.Tensor, tensor: _Tensor, source_scale: float) -> tuple[torch.Tensor, float]:
    """What the copy stores for ``value`` (the source's bytes, scaled by ``source_scale`` when
    they are scaled fp8), and its scale: the core's load-time cast (vram/group.py ``Entry``)."""
    if tensor.kept:
        return value, source_scale
    if tensor.scaled:
        scale = source_scale if value.dtype == tensor.dtype else fp8_scale(value, tensor.dtype, source_scale)
        return cast(value, tensor.dtype, source_scale / scale), scale
    return cast(value, tensor.dtype, source_scale), 1.0


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data):]


def _write_shard(path: Path, shard: _Shard, source: vram.WeightSource, report: Callable[[int], None]) -> None:
    scales = source.scales()
    values = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        _write_all(fd, memoryview(shard.header))
        _write_all(fd, memoryview(bytes(4 * len(shard.scaled))))  # the scales, written once known
        for tensor in shard.tensors:
            stored, values[tensor.key] = _stored(source.read(tensor.model_key), tensor,
                                                 scales.get(tensor.model_key, 1.0))
            _write_all(fd, memoryview(stored.reshape(-1).view(torch.uint8).numpy()))
            report(tensor.nbytes)
        if shard.scaled:
            os.pwrite(fd, struct.pack(f"<{len(shard.scaled)}f", *(values[t.key] for t in shard.scaled)),
                      len(shard.header))
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_component(root: Path, component: _Component, dtype: str, progress: Progress | None) -> ComponentReport:
    folder = root / component.name
    folder.mkdir(parents=True, exist_ok=True)
    total, done = component.data_bytes, 0

    def report(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(component.name, done, total)

    for shard in component.shards:
        _write_shard(folder / shard.name, shard, component.source, report)
        report(4 * len(shard.scaled))
    index = component.index()
    if index is not None:
        (folder / f"{component.base}.safetensors.index.json").write_text(index)
    tensors = [t for s in component.shards for t in s.tensors]
    weights = sum(t.nbytes for t in tensors)
    aligned = sum(t.nbytes for s in component.shards for t in s.tensors
                  if (len(s.header) + t.begin) % ALIGNMENT == 0)
    return ComponentReport(dtype, len(component.shards), sum(s.file_bytes for s in component.shards), len(tensors),
                           sum(t.kept for t in tensors), aligned / weights if weights else 1.0)


def _rule_text(dtype: torch.dtype, scaled: bool) -> str:
    name = next(n for n, d in DTYPES.items() if d == dtype)
    how = " scaled per tensor by a power of two (vram.casting.fp8_scale)" if scaled and dtype in FP8_MAX else ""
    return (f"vram.casting.model_rule with keep_fp32 = keep_fp32_for(model, {name}): tensors it keeps stay as in "
            f"the source; other float parameters cast to {name}{how}; non-float tensors and non-parameter keys "
            f"as in the source")


def convert(source: str | os.PathLike, dest: str | os.PathLike, *, dtype: str | torch.dtype = "float8_e4m3fn",
            max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, components: Sequence[str] | None = None,
            fp8_scale: str = "tensor", progress: Progress | None = None,
            models_dir: str | os.PathLike | None = None) -> ConversionReport:
    """Write a converted copy of ``source`` (a model folder, or a registry key already
    downloaded into ``models_dir``) into ``dest``, a new or empty folder.

    ``dtype``: the storage dtype (see ``DTYPES``); ``max_shard_size``: bytes per shard file
    ("5GB", "2GiB", or an int; at least 1MB); ``components``: which weighted components to
    convert (default: all with .safetensors weights, the VAE excepted under fp8), the others
    are copied as they are; ``fp8_scale``: "tensor" (scaled fp8, as the core stores it) or
    "none" (a plain cast); ``progress(component, bytes done, bytes total)``.

    Raises ConversionError (a ValueError) naming the flag, file or folder at fault, before
    anything is written when it can be known then (disk space included)."""
    target = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if fp8_scale not in FP8_SCALES:
        raise ConversionError(f"--fp8-scale {fp8_scale!r}: choose one of {', '.join(FP8_SCALES)}")
    scaled = fp8_scale == "tensor"
    folder, family, source_name = _resolve_source(source, models_dir)
    dest = Path(dest)
    _check_dest(folder, dest)
    weighted = _weighted(folder, read_model_index(folder), family)
    names = _chosen(components, list(weighted), target, family)
    dtype_name = next(n for n, d in DTYPES.items() if d == target)
    copied = tuple(n for n in weighted if n not in names)
    plans: list[_Component] = []
    try:
        for name in names:
            cls, files = weighted[name]
            plans.append(_plan(folder, name, cls, files, target, scaled, shard_bytes))
        copies = _copy_plan(folder, set(names))
        _check_space(dest, sum(s.file_bytes for p in plans for s in p.shards)
                     + sum(len(p.index() or "") for p in plans)
                     + sum(path.stat().st_size for path, _ in copies) + _RECORD_BYTES)
        record = {"tool": "pipelines.convert", "version": VERSION, "source": str(folder.resolve()),
                  "source_name": source_name, "dtype": dtype_name, "fp8_scale": fp8_scale,
                  "rule": _rule_text(target, scaled), "max_shard_size": shard_bytes, "components": {},
                  "copied": list(copied)}
        written = _write(dest, plans, copies, record, progress)
    finally:
        for plan in plans:
            plan.source.close()
    return ConversionReport(folder.resolve(), dest, source_name, dtype_name, fp8_scale, shard_bytes, written, copied,
                            sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()))


def _write(dest: Path, plans: list[_Component], copies: list[tuple[Path, Path]], record: dict,
           progress: Progress | None) -> dict[str, ComponentReport]:
    """Everything into a hidden sibling of ``dest``, ``model_index.json`` last, then a rename."""
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}-{threading.get_ident()}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier process of this id
        partial.mkdir()
        written = {plan.name: _write_component(partial, plan, record["dtype"], progress) for plan in plans}
        record = {**record, "components": {name: asdict(c) for name, c in written.items()},
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (partial / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        for path, relative in copies:
            (partial / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, partial / relative)
        if dest.is_dir():
            dest.rmdir()  # empty: _check_dest said so
        os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return written


def describe(folder: str | os.PathLike) -> str | None:
    """One line for a model card from ``folder/conversion.json``: "FLUX.1-dev (12B), fp8 e4m3
    (scaled), 14 shards"; None when the folder is not a converted copy."""
    path = Path(folder) / RECORD
    try:
        record = json.loads(path.read_text())
        name, dtype = record["source_name"], record["dtype"]
        shards = sum(int(c["shards"]) for c in record["components"].values())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("%s: not a readable conversion record (%s)", path, error)
        return None
    title = FAMILIES[name].title if name in FAMILIES else name
    text = _SHORT_NAMES.get(dtype, dtype)
    if dtype in DTYPES and DTYPES[dtype] in FP8_MAX and record.get("fp8_scale") == "tensor":
        text += " (scaled)"
    return f"{title}, {text}, {shards} shard{'' if shards == 1 else 's'}"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.convert", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a diffusers model folder, or a registry model already downloaded "
                                       f"({', '.join(FAMILIES)})")
    parser.add_argument("dest", help="a new (or empty) folder for the copy")
    parser.add_argument("--dtype", default="float8_e4m3fn", help=f"storage dtype: {', '.join(DTYPES)} "
                                                                 "(default: float8_e4m3fn)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 5GB (10^9 bytes), "
                                                                "500MB, 2GiB; at least 1MB (default: 5GB)")
    parser.add_argument("--components", help="comma-separated components to convert, e.g. transformer,text_encoder_2 "
                                             "(default: every weighted one; under fp8 the VAE is copied as it is)")
    parser.add_argument("--fp8-scale", default="tensor", choices=FP8_SCALES,
                        help="tensor: one power-of-two scale per tensor, as the core stores fp8 (default); "
                             "none: a plain cast that any loader reads")
    parser.add_argument("--models-dir", help="where registry models are downloaded (default: $LOWVRAM_MODELS_DIR "
                                             "or ./models)")
    return parser


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class _Printer:
    """One line per component: its percentage, redrawn in place on a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.shown: tuple[str, int] | None = None

    def __call__(self, component: str, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if self.shown == (component, percent):
            return
        self.shown = (component, percent)
        line = f"{component}: {percent:3d}% ({_size(done)} of {_size(total)})"
        live = self.stream.isatty()
        if percent == 100:
            print(f"\r{line}" if live else line, file=self.stream)
        elif live:
            print(f"\r{line}", end="", file=self.stream, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    try:
        report = convert(args.source, args.dest, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         components=components, fp8_scale=args.fp8_scale, progress=_Printer(),
                         models_dir=args.models_dir)
    except KeyboardInterrupt:
        print("interrupted; no copy was left behind", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:  # bad input, missing or damaged files, a full disk
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, component in report.components.items():
        print(f"{name}: {component.dtype}, {component.shards} shard(s), {_size(component.bytes)}, "
              f"{component.kept} of {component.tensors} tensors kept as they were, "
              f"{component.aligned_fraction:.0%} of bytes 4 KiB-aligned")
    if report.copied:
        print(f"copied as they are: {', '.join(report.copied)}")
    print(f"wrote {report.dest}: {describe(report.dest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
