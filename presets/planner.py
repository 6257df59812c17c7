"""Predicted peak VRAM and RAM of a job under each preset, before a single weight moves.

The model of memory follows what the core does (see vram/):
* weights rest at a component's *offload* placement for the whole run (RAM when "cpu",
  nothing when "disk"); while its phase runs they sit at the *onload* placement (the GPU for
  model-level offload);
* a streamed forward needs at least its prefetch window: (prefetch + 1) of its largest
  groups in the dtype they move in (the preparing dtype), plus the running group cast to the
  computation dtype when that differs, plus its activations. A capped component keeps
  prepared layers beside the window up to ``vram_limit`` (0: none); no cap goes below the
  window, so a cap under it predicts a peak above the cap (``Prediction.above_cap``).
  Uncapped, every staged layer is kept (except a CPU computing from disk, which keeps none);
* on a GPU the process also holds its CUDA context, which torch's allocator does not see: it
  is in ``peak_vram_bytes`` but not in what the cap bounds (``peak_vram_reserved_bytes``);
* the disk tier holds the prefetch window of reads in RAM, and a scratch buffer;
* fp8 storage applies only to layers the core casts (norms, embeddings and the model's
  float32 modules keep their dtype; ``Footprint`` counts them from the checkpoint's names);
* activations grow with tokens (latent patches, text), batch and CFG; the VAE's with pixels,
  unless tiled;
* speed settings (pipelines/speed.py): a step cache keeps hidden states of the denoiser
  between steps on the computation device (``cache_bytes``); compiling adds the compiler's
  RAM (``COMPILE_RAM_BYTES``); attention backends and channels_last add nothing to plan.
Peaks are per phase; RAM adds the process's own baseline. Each run's measured peaks can be
recorded (``Calibration``) and scale later predictions for this machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

import vram
from pipelines import PHASES, Family
from pipelines.loading import config_key_for

from .files import Preset, load_preset
from .footprint import ComponentSize, Footprint

GIB = 1024**3
_LOW = (torch.float16, torch.bfloat16) + tuple(vram.config.FP8_DTYPES)
# Bytes of activations per latent token per unit of width, in the computation dtype: the
# attention inputs/outputs, the MLP's 4x expansion, norms and residuals alive at once.
_ACTIVATION_FACTOR = 12
# The VAE decoder's peak per output pixel: ~128 channels at full resolution, three alive.
_VAE_BYTES_PER_PIXEL = 128 * 3
_VAE_TILE = 512
_TEXT_TOKENS = 512
# RAM the first generation adds besides weights and activations: torch's thread pools and
# kernel caches, tokenizers' buffers (measured ~30 MiB on a 2-core CPU).
_RUNTIME_RAM = 24 * 2**20
# Device memory a process computing on a GPU holds outside torch's allocator: the CUDA
# context (the driver's state and torch's kernels, loaded lazily since CUDA 11.7) with the
# cuBLAS/cuBLASLt handles, about 0.3-0.5 GiB on Ampere/Ada/Hopper cards as nvidia-smi shows
# it for a torch process that has run one matmul. Figures read from nvidia-smi (DiffSynth's
# guide) include it; max_memory_reserved and vram_limit do not. The tree leaves the same
# half GiB free for it (tree.VRAM_MARGIN).
CUDA_CONTEXT_BYTES = 512 * 2**20
# Step caches keep denoiser hidden states (the whole sequence) between steps, one state per
# CFG pass (diffusers keys them by cache context, "cond" and "uncond"): First Block Cache the
# first block's output and residual and the last block's two residuals, MagCache the first
# block's input and the last residual. TaylorSeer keeps max_order + 1 = 2 Taylor factors of
# the output of every attention layer, about one per block.
_CACHE_HIDDEN_STATES = {"first_block": 4, "mag": 2}
_TAYLOR_FACTORS = 2
# RAM that torch.compile adds to the process: dynamo's and inductor's state and the compiled
# kernels, one graph per block class whatever the model's size (peak RSS measured 85 MiB above
# eager on the built-in model and 80-110 MiB on a 6-block FLUX.1 layout, 2-core CPU,
# bench/speed_cpu.py; counted here with a margin). On a GPU inductor keeps no device memory of
# its own beyond what the compiled block's activations take (at most the eager ones).
COMPILE_RAM_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Job:
    width: int
    height: int
    frames: int = 1
    batch: int = 1
    cfg: bool = False              # two denoiser passes per step (batched as one on diffusers)
    vae_tiling: bool = False
    cache: str = "off"             # the request's step cache ("first_block:0.12", ...)
    compile: bool = False          # the denoiser's blocks compiled


@dataclass(frozen=True)
class Prediction:
    """Bytes. ``peak_vram_bytes`` is the GPU's whole use by the process, CUDA context included;
    None when the computation device is the CPU (then the computation's memory is in
    ``peak_ram_bytes``)."""

    preset: str
    peak_vram_bytes: int | None
    peak_ram_bytes: int
    vram_limit: float | None
    phases: dict[str, dict[str, int]] = field(default_factory=dict)   # phase -> {"vram", "ram"}
    parts: dict[str, int] = field(default_factory=dict)               # what the peak is made of
    # Over several GPUs (multi_gpu): CUDA index -> (reserved bytes, cap bytes).
    per_gpu: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def peak_vram_reserved_bytes(self) -> int | None:
        """The part of ``peak_vram_bytes`` torch's allocator reserves: what a run measures
        (``max_memory_reserved``) and what ``vram_limit`` bounds; the CUDA context left out."""
        if self.peak_vram_bytes is None:
            return None
        return self.peak_vram_bytes - self.parts.get("cuda_context", 0)

    @property
    def above_cap(self) -> bool:
        """Whether the streaming window and activations alone need more than ``vram_limit``.
        Always so under ``vram_limit=0`` ("stream everything, keep nothing"); under a positive
        cap the core cannot hold it (``VramLimitError``) and the fallback steps down."""
        reserved = self.peak_vram_reserved_bytes
        return reserved is not None and self.vram_limit is not None and reserved > self.vram_limit * GIB


def _size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def stored_bytes(component: ComponentSize, dtype: torch.dtype, compute: torch.dtype) -> int:
    """A component's bytes with castable weights in ``dtype``, as the core stores them."""
    low = dtype in _LOW
    kept = component.kept_parameters * _size(compute if low else dtype)
    fp32 = component.fp32_parameters * (4 if low else _size(dtype))
    return component.castable_parameters * _size(dtype) + kept + fp32


def activation_bytes(family: Family, component: ComponentSize, job: Job, compute: torch.dtype) -> int:
    """Peak activations of one component's forward (or the VAE's decode)."""
    item = _size(compute)
    if component.phase == "vae_decoding":
        side_w, side_h = (min(job.width, _VAE_TILE), min(job.height, _VAE_TILE)) if job.vae_tiling \
            else (job.width, job.height)
        frames = 1 if family.kind == "image" else min(job.frames, 4)  # Wan decodes a few frames at a time
        return side_w * side_h * frames * job.batch * _VAE_BYTES_PER_PIXEL * item // 2
    width = component.width or _width_guess(component)
    if component.phase == "text_encoding":
        return _TEXT_TOKENS * width * _ACTIVATION_FACTOR * item * job.batch
    passes = 2 if job.cfg else 1
    return _denoiser_tokens(family, job) * width * _ACTIVATION_FACTOR * item * job.batch * passes


def cache_bytes(family: Family, component: ComponentSize, job: Job, compute: torch.dtype) -> int:
    """What ``job``'s step cache keeps on the computation device for one denoiser."""
    kind = job.cache.partition(":")[0]
    if component.phase != "denoising" or kind not in (*_CACHE_HIDDEN_STATES, "taylorseer"):
        return 0
    width = component.width or _width_guess(component)
    states = _CACHE_HIDDEN_STATES.get(kind) or _TAYLOR_FACTORS * max(1, component.parameters // (12 * width**2))
    passes = 2 if job.cfg else 1
    return _denoiser_tokens(family, job) * width * _size(compute) * states * job.batch * passes


def _denoiser_tokens(family: Family, job: Job) -> int:
    """The denoiser's sequence: latent patches (16 x 16 pixels each) and text tokens."""
    latent_frames = 1 if family.kind == "image" else (job.frames - 1) // 4 + 1
    return (job.width // 16) * (job.height // 16) * latent_frames + _TEXT_TOKENS


def _width_guess(component: ComponentSize) -> int:
    # A transformer of P parameters in ~L blocks of 12*w^2 has w ~ sqrt(P / (12 L)); L ~ 40.
    return max(64, int((component.parameters / (12 * 40)) ** 0.5))


@dataclass(frozen=True)
class Tier:
    """A placement as the planner sees it: "gpu", "cpu" or "disk", and a dtype."""
    where: str
    dtype: torch.dtype | None


@dataclass(frozen=True)
class PlanConfig:
    offload: Tier
    onload: Tier
    preparing: Tier
    computation: Tier
    prefetch: int
    ram_cache_gib: float
    vram_limit: float | None


def plan_configs(preset: Preset, dtype: torch.dtype, vram_limit: float | None,
                 on_gpu: bool) -> dict[str, PlanConfig]:
    """A preset's per-component placements for a machine that may not be this one (the
    planner answers "what if" for any GPU): ``{device}`` is the GPU, or the CPU without one."""
    out = {}
    for key, raw in preset.components.items():
        def tier(state: str) -> Tier:
            device = raw.get(f"{state}_device", raw.get("computation_device", "{device}"))
            if device == "disk":
                return Tier("disk", None)
            name = raw.get(f"{state}_dtype", raw.get("computation_dtype", "{dtype}"))
            where = ("gpu" if on_gpu else "cpu") if device == "{device}" else \
                ("gpu" if str(device).startswith("cuda") else "cpu")
            return Tier(where, dtype if name == "{dtype}" else vram.config.parse_dtype(name, f"{key}.{state}_dtype"))
        out[key] = PlanConfig(tier("offload"), tier("onload"), tier("preparing"), tier("computation"),
                              int(raw.get("prefetch", 2)), float(raw.get("ram_cache_gib", 0.0)),
                              vram_limit if preset.uses_vram_limit else None)
    return out


def predict(family: Family, footprint: Footprint, job: Job, preset: Preset | str, *, on_gpu: bool,
            dtype: torch.dtype = torch.bfloat16, vram_limit: float | None = None, baseline_ram: int = 0,
            calibration: "Calibration | None" = None) -> Prediction:
    """Peak VRAM and RAM of ``job`` under ``preset`` on a machine with (``on_gpu``) or without
    a GPU, computing in ``dtype``, capped at ``vram_limit`` GiB where the preset takes a cap."""
    preset = preset if isinstance(preset, Preset) else load_preset(preset)
    configs = plan_configs(preset, dtype, vram_limit, on_gpu)
    cfgs = {c.name: configs[config_key_for(configs, family.component(c.name))] for c in footprint.components}
    limit = vram_limit if preset.uses_vram_limit else None
    resident = {"cpu": 0, "gpu": 0}
    for component in footprint.components:
        cfg = cfgs[component.name]
        if cfg.offload.where != "disk":
            resident[cfg.offload.where] += stored_bytes(component, cfg.offload.dtype, cfg.computation.dtype)
    phase_peaks: dict[str, dict[str, int]] = {}
    floor_vram = 0   # what the phases cannot do without on the device: windows and activations
    for phase in PHASES:
        device_need = host_need = floor = 0
        for component in footprint.in_phase(phase):
            need = _phase_bytes(family, component, cfgs[component.name], job)
            device_need += need.device
            host_need += need.host
            floor += need.device_floor
        if not on_gpu:
            host_need, device_need = host_need + device_need, 0
        phase_peaks[phase] = {"vram": device_need, "ram": host_need}
        floor_vram = max(floor_vram, floor)
    transient_vram = max(p["vram"] for p in phase_peaks.values())
    transient_ram = max(p["ram"] for p in phase_peaks.values())
    scale_ram = calibration.factor(preset.name, "ram") if calibration else 1.0
    scale_vram = calibration.factor(preset.name, "vram") if calibration else 1.0
    peak_ram = baseline_ram + int((resident["cpu"] + transient_ram + _RUNTIME_RAM) * scale_ram)
    peak_vram = None
    parts = {"baseline_ram": baseline_ram, "weights_in_ram": resident["cpu"], "transient_ram": transient_ram,
             "weights_on_gpu_always": resident["gpu"], "phase_peak_vram": transient_vram}
    if on_gpu:
        reserved = int((resident["gpu"] + transient_vram) * scale_vram)
        floor = int((resident["gpu"] + floor_vram) * scale_vram)
        if limit is not None:
            # Kept copies fill up to the cap; the windows and activations are a floor under it.
            reserved = min(reserved, max(int(limit * GIB), floor))
        peak_vram = reserved + CUDA_CONTEXT_BYTES
        parts.update(streaming_floor_vram=floor, cuda_context=CUDA_CONTEXT_BYTES)
    return Prediction(preset.name, peak_vram, peak_ram, limit, phase_peaks, parts)


class PhaseBytes(NamedTuple):
    device: int          # on the computation device, kept copies included
    host: int            # in RAM
    device_floor: int    # on the device whatever the cap: the streaming window and activations


def _phase_bytes(family: Family, component: ComponentSize, cfg: PlanConfig, job: Job) -> PhaseBytes:
    """Bytes while ``component``'s phase runs, beyond what rests at its offload placement all
    run long."""
    compute = cfg.computation.dtype
    # A step cache's states are live activations to the planner: on the device all phase long.
    acts = activation_bytes(family, component, job, compute) + cache_bytes(family, component, job, compute)
    compiler = COMPILE_RAM_BYTES if job.compile and component.phase == "denoising" else 0
    # The streaming unit is a group (one block); before a download, about 1/40 of a model.
    largest = component.largest_group or component.largest_tensor or component.parameters // 40
    # Onloading moves the weights unless they already rest there (then they are counted once).
    moved = cfg.onload != cfg.offload
    if cfg.onload == cfg.computation:
        # Onloaded whole in the computation dtype (basic, model-level offload): plain forwards.
        device = (stored_bytes(component, compute, compute) if moved else 0) + acts
        return PhaseBytes(device, compiler, device)
    if cfg.onload.where == cfg.computation.where:
        # Onloaded whole in a storage dtype (fp8): one group at a time has its castable
        # weights cast for compute (the kept ones already are in the computation dtype).
        share = component.castable_parameters / max(1, component.parameters)
        cast = int(largest * share * _size(compute))
        device = (stored_bytes(component, cfg.onload.dtype, compute) if moved else 0) + cast + acts
        return PhaseBytes(device, compiler, device)
    # Layer-level streaming from RAM or disk to the computation device.
    storage = cfg.preparing.dtype
    # The running group and `prefetch` more move in the preparing dtype; a staged copy already
    # in the computation placement is the one the forward uses, else the running group is
    # cast for its forward (one group at a time).
    window = (cfg.prefetch + 1) * largest * _size(storage)
    if cfg.preparing != cfg.computation:
        window += largest * _size(compute)
    weights = stored_bytes(component, storage, compute)
    floor = min(weights, window) + acts
    from_disk_on_cpu = cfg.onload.where == "disk" and cfg.preparing.where == "cpu"
    if cfg.vram_limit is not None:
        device = max(floor, min(weights, int(cfg.vram_limit * GIB) - acts) + acts)
    elif from_disk_on_cpu:
        device = window + acts   # uncapped, a CPU computing from disk keeps nothing (vram/ says why)
    else:
        device = weights + acts  # uncapped: every staged layer is kept
    host = 0
    if cfg.onload.where == "disk":
        file_item = max(1, component.file_bytes // max(1, component.parameters))
        # One reader thread: one pooled read arena in use at a time; on an accelerator each
        # stays until its copy has landed, so the pool holds the prefetch window of them.
        in_flight = (1 if from_disk_on_cpu else cfg.prefetch + 1) * largest * file_item
        if from_disk_on_cpu and file_item == _size(storage):
            in_flight = 0            # the read buffers are the staged copies themselves
        host = in_flight + int(cfg.ram_cache_gib * GIB)
    return PhaseBytes(device, host + compiler, floor)


class Calibration:
    """Measured / predicted ratios per (preset, "ram" | "vram"), kept in a small JSON file per
    machine (``$LOWVRAM_CALIBRATION``, else ``~/.cache/lowvram/calibration.json``)."""

    def __init__(self, path: str | os.PathLike | None = None):
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowvram" / "calibration.json"
        self.path = Path(path or os.environ.get("LOWVRAM_CALIBRATION", default))
        try:
            self.records = json.loads(self.path.read_text()).get("records", [])
        except (OSError, json.JSONDecodeError, AttributeError):
            self.records = []

    def record(self, preset: str, kind: str, predicted: int, measured: int, baseline: int = 0) -> float:
        """Add one run (the ratio kept is on the part above ``baseline``); returns the error of the
        whole peak, measured / predicted - 1, or 0.0 for a run that did not grow past the baseline."""
        predicted_part, measured_part = predicted - baseline, measured - baseline
        if predicted_part <= 0 or measured_part <= 0:
            return 0.0
        self.records.append({"preset": preset, "kind": kind, "ratio": measured_part / predicted_part})
        self.records = self.records[-200:]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"records": self.records}, indent=1))
        except OSError:
            pass  # a read-only home: calibration stays in memory
        return measured / predicted - 1

    def factor(self, preset: str, kind: str) -> float:
        """The median ratio of the last runs of ``preset`` (1.0 without any), kept in [0.5, 2]."""
        ratios = sorted(r["ratio"] for r in self.records[-50:] if r.get("preset") == preset and r.get("kind") == kind)
        if not ratios:
            return 1.0
        return min(2.0, max(0.5, ratios[len(ratios) // 2]))


def spread(footprint: Footprint, gpus, *, dtype: torch.dtype = torch.bfloat16,
           margin: int = int(0.5 * GIB)) -> dict[str, int] | None:
    """Components over several GPUs by their free memory (diffusers' device_map="balanced"
    with max_memory, at component granularity): the largest component first, each to the GPU
    with the most room left. ``gpus``: objects with ``index`` and ``free_bytes``. None when
    some component fits on no GPU (then layer-level management is the way)."""
    room = {gpu.index: gpu.free_bytes - margin for gpu in gpus}
    placement: dict[str, int] = {}
    for component in sorted(footprint.components, key=lambda c: -c.parameters):
        need = stored_bytes(component, dtype, dtype)
        index = max(room, key=lambda i: room[i], default=None)
        if index is None or room[index] < need:
            return None
        placement[component.name] = index
        room[index] -= need
    return placement
