"""The core's configuration: DiffSynth's eight keys, typed, plus the project's extras.

A config names where a weight lives and in which dtype in each of the four layer states:

* offload      - the model is not about to be used (switched per model by the pipeline)
* onload       - the model is about to be used (switched per model by the pipeline)
* preparing    - a layer's weights staged on the computation device in their storage
                 dtype, kept while the budget allows (switched per layer by the core)
* computation  - a layer's weights in the computation dtype for one forward (per layer)

``"disk"`` as offload/onload device and dtype means the weights stay in the model's
.safetensors files and are read when needed. ``"standin"`` as preparing/computation device is
the CPU stand-in for an accelerator (standin.py): the model computes on the CPU while its
weights move through a simulated copy engine, so the accelerator's code paths run here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch

DISK = "disk"
STATES = ("offload", "onload", "preparing", "computation")
GIB = 1024**3

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2, "fp8_e5m2": torch.float8_e5m2,
    "float64": torch.float64,
}
STORAGE_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64,
                  torch.float8_e4m3fn, torch.float8_e5m2}
COMPUTE_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
FP8_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2}

# The project's own keys, accepted next to DiffSynth's eight.
EXTRA_KEYS = ("vram_limit", "prefetch", "pin_memory", "ram_cache_gib", "granularity")
GRANULARITIES = ("block", "leaf")
MAX_PREFETCH = 32  # groups staged ahead; each costs a group's memory, so more only fills the cap

# The stand-in accelerators: tensors on them are CPU tensors, but the core treats each as a
# device with memory of its own (see standin.py). torch keeps the index on the device object
# and drops it on tensors, so "standin:k" is cpu:k+1, a device that differs from the host's
# while computing there; "standin" is "standin:0".
STANDIN = torch.device("cpu", 1)
STANDIN_NAME = "standin"
MAX_STANDINS = 16


def standin_device(index: int = 0) -> torch.device:
    """The stand-in accelerator ``standin:index``."""
    if not (isinstance(index, int) and 0 <= index < MAX_STANDINS):
        raise ValueError(f"standin:{index}: there are stand-ins 0 to {MAX_STANDINS - 1}")
    return torch.device("cpu", index + 1)


def is_standin(device: torch.device | None) -> bool:
    return device is not None and device.type == "cpu" and device.index is not None and device.index >= 1


def is_host(device: torch.device | None) -> bool:
    """Whether ``device`` is the host's RAM (the CPU, not a stand-in; on the hot path, so
    ``is_standin`` is inlined)."""
    return device is not None and device.type == "cpu" and (device.index is None or device.index < 1)


def device_name(device: torch.device | str | None) -> str:
    """A device as configs, ledgers and reports name it (a name is returned as it is)."""
    if device is None:
        return DISK
    if isinstance(device, str):
        return device
    if is_standin(device):
        return STANDIN_NAME if device.index == 1 else f"{STANDIN_NAME}:{device.index - 1}"
    return str(device)


@dataclass(frozen=True)
class Placement:
    """Where a weight lives in one state: a device and a dtype, or the disk (both None)."""

    device: torch.device | None
    dtype: torch.dtype | None

    @property
    def is_disk(self) -> bool:
        return self.device is None

    def __str__(self) -> str:
        if self.is_disk:
            return DISK
        return f"{device_name(self.device)}/{str(self.dtype).removeprefix('torch.')}"


def parse_dtype(value: Any, field_name: str) -> torch.dtype | None:
    """A dtype from a torch.dtype or a name; ``"disk"`` gives None."""
    if isinstance(value, torch.dtype):
        if value not in STORAGE_DTYPES:
            raise ValueError(f"{field_name}: dtype {value} is not a floating storage dtype "
                             f"(use one of {_names(STORAGE_DTYPES)})")
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name == DISK:
            return None
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise ValueError(f"{field_name}: unknown dtype {value!r} (use one of {_names(STORAGE_DTYPES)} or 'disk')")


def parse_device(value: Any, field_name: str) -> torch.device | None:
    """A device that exists on this machine; ``"disk"`` gives None."""
    if isinstance(value, str) and value.strip().lower() == DISK:
        return None
    if isinstance(value, torch.device) and is_standin(value):
        return value
    if isinstance(value, str) and value.strip().lower().startswith(STANDIN_NAME):
        name, _, index = value.strip().lower().partition(":")
        if name != STANDIN_NAME or (index and not index.isdigit()):
            raise ValueError(f"{field_name}: unknown device {value!r} (the stand-ins are 'standin', 'standin:1', ...)")
        try:
            return standin_device(int(index or 0))
        except ValueError as error:
            raise ValueError(f"{field_name}: {error}") from None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{field_name}: unknown device {value!r} ({error})") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field_name}: device {value!r} asked for, but CUDA is not available here")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"{field_name}: device {value!r} does not exist "
                             f"(this machine has {torch.cuda.device_count()} CUDA device(s))")
        return torch.device("cuda", index)
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ValueError(f"{field_name}: device {value!r} is not available on this machine")


def parse_vram_limit(value: Any) -> float | None:
    """``vram_limit`` in GiB: None (no cap) or a finite number >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"vram_limit must be a number of GiB or None, got {value!r}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"vram_limit must be a finite number of GiB >= 0, got {value!r}")
    return float(value)


def _names(dtypes) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


@dataclass(frozen=True)
class VramConfig:
    """The typed form of a vram_config.

    ``vram_limit`` caps this process's peak memory on the computation device in GiB
    (None: no cap; 0: keep nothing resident, stream every group). ``prefetch`` is how many
    groups ahead are brought in while one computes. ``pin_memory`` pins the host arenas once
    for asynchronous copies on CUDA. ``ram_cache_gib`` keeps groups read from disk in RAM up
    to that size so the next generation need not read them again. ``granularity`` is the
    unit of transfer: ``"block"`` (one group per repeated block, the default) or ``"leaf"``
    (one group per module that holds parameters).
    """

    offload: Placement
    onload: Placement
    preparing: Placement
    computation: Placement
    vram_limit: float | None = None
    prefetch: int = 2
    pin_memory: bool = True
    ram_cache_gib: float = 0.0
    granularity: str = "block"

    def __post_init__(self):
        for state in ("preparing", "computation"):
            if getattr(self, state).is_disk:
                raise ValueError(f"{state}_device: 'disk' is allowed only for offload/onload")
        if self.preparing.device != self.computation.device:
            raise ValueError(f"preparing_device ({device_name(self.preparing.device)}) must be the computation "
                             f"device ({device_name(self.computation.device)}): preparing stages weights where "
                             f"they compute")
        for state in ("offload", "onload"):
            device = getattr(self, state).device
            if is_standin(device) and device != self.computation.device:
                raise ValueError(f"{state}_device: {device_name(device)!r} is a stand-in accelerator; it can hold "
                                 f"weights only for a model that computes there")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.computation.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"computation_dtype: {device_name(self.computation.device)} cannot compute in "
                             f"{self.computation.dtype}; use one of {_names(COMPUTE_DTYPES)}")
        if self.computation.device.type == "cuda" and self.computation.dtype == torch.bfloat16 \
                and not torch.cuda.is_bf16_supported():
            raise ValueError(f"computation_dtype: {self.computation.device} cannot compute in bfloat16 "
                             f"(pre-Ampere GPU); use float16")
        parse_vram_limit(self.vram_limit)
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or not 0 <= self.prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be a whole number of groups from 0 to {MAX_PREFETCH}, got {self.prefetch!r}")
        if not isinstance(self.ram_cache_gib, (int, float)) or not math.isfinite(self.ram_cache_gib) \
                or self.ram_cache_gib < 0:
            raise ValueError(f"ram_cache_gib must be a finite number >= 0, got {self.ram_cache_gib!r}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides) -> "VramConfig":
        """Parse DiffSynth's 8-key dict (pasted verbatim) plus the project's extra keys.

        Missing state keys fall back to the computation placement, so
        ``{"computation_device": "cuda", "computation_dtype": torch.bfloat16}`` means "all
        resident". Unknown keys are an error naming the key.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"vram_config must be a dict or VramConfig, got {type(config).__name__}")
        allowed = {f"{s}_{k}" for s in STATES for k in ("device", "dtype")} | set(EXTRA_KEYS)
        for key in config:
            if key not in allowed:
                raise ValueError(f"vram_config: unknown key {key!r}; expected some of "
                                 f"{', '.join(sorted(allowed))}")
        default_device = "cuda" if torch.cuda.is_available() else "cpu"
        computation = _placement(config.get("computation_device", default_device),
                                 config.get("computation_dtype", torch.bfloat16), "computation")
        placements = {"computation": computation}
        for state in ("preparing", "onload", "offload"):
            device_key, dtype_key = f"{state}_device", f"{state}_dtype"
            if device_key not in config and dtype_key not in config:
                placements[state] = computation
                continue
            device = config.get(device_key, computation.device if computation.device else default_device)
            dtype = config.get(dtype_key, DISK if _is_disk(device) else computation.dtype)
            placements[state] = _placement(device, dtype, state)
        extras = {k: config[k] for k in EXTRA_KEYS if k in config}
        extras.update({k: v for k, v in overrides.items() if v is not None})
        if "vram_limit" in extras:
            extras["vram_limit"] = parse_vram_limit(extras["vram_limit"])
        return cls(**placements, **extras)

    @classmethod
    def coerce(cls, config: "VramConfig | Mapping[str, Any]", vram_limit: float | None = None) -> "VramConfig":
        """Accept a VramConfig or a dict; an explicit ``vram_limit`` overrides the config's."""
        if isinstance(config, VramConfig):
            if vram_limit is not None:
                return replace(config, vram_limit=parse_vram_limit(vram_limit))
            return config
        return cls.from_dict(config, vram_limit=parse_vram_limit(vram_limit))

    @classmethod
    def resident(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "VramConfig":
        """Everything on ``device`` in ``dtype``: the 'basic' case."""
        return cls.from_dict({"computation_device": device, "computation_dtype": dtype})

    def to_dict(self) -> dict[str, Any]:
        """The DiffSynth 8-key form plus extras (dtypes as torch.dtype, 'disk' as a string)."""
        out: dict[str, Any] = {}
        for state in STATES:
            placement = getattr(self, state)
            out[f"{state}_dtype"] = DISK if placement.is_disk else placement.dtype
            out[f"{state}_device"] = device_name(placement.device)
        out.update(vram_limit=self.vram_limit, prefetch=self.prefetch,
                   pin_memory=self.pin_memory, ram_cache_gib=self.ram_cache_gib, granularity=self.granularity)
        return out

    # -- derived facts --------------------------------------------------------------------
    @property
    def uses_disk(self) -> bool:
        return self.offload.is_disk or self.onload.is_disk

    @property
    def budget_device(self) -> torch.device:
        """The device whose memory ``vram_limit`` caps."""
        return self.computation.device

    def on_device(self, device: torch.device) -> "VramConfig":
        """The same tiers with ``device`` wherever the computation device was: for the groups
        of a model placed on another device of its kind (``enable_vram_management``'s
        ``device_map``)."""
        here = self.computation.device

        def move(p: Placement) -> Placement:
            return Placement(device, p.dtype) if p.device == here else p
        return replace(self, offload=move(self.offload), onload=move(self.onload),
                       preparing=move(self.preparing), computation=move(self.computation))

    def with_dtype(self, dtype: torch.dtype) -> "VramConfig":
        """The same tiers with every non-disk dtype replaced: for layers kept out of fp8."""
        def swap(p: Placement) -> Placement:
            return p if p.is_disk else Placement(p.device, dtype)
        return replace(self, offload=swap(self.offload), onload=swap(self.onload),
                       preparing=swap(self.preparing), computation=swap(self.computation))


def _is_disk(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == DISK


def _placement(device: Any, dtype: Any, state: str) -> Placement:
    parsed_device = parse_device(device, f"{state}_device")
    parsed_dtype = parse_dtype(dtype, f"{state}_dtype")
    if (parsed_device is None) != (parsed_dtype is None):
        raise ValueError(f"{state}_device and {state}_dtype: 'disk' must be given for both or neither "
                         f"(got device={device!r}, dtype={dtype!r})")
    return Placement(parsed_device, parsed_dtype)
