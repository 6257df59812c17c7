"""The decision tree of DiffSynth-Studio's guide, run on this machine's numbers.

Enough VRAM -> basic; else enough VRAM for the largest model -> model-level offload; else
enough RAM for the whole model -> dynamic layer-level management under ``vram_limit``; else
enough RAM for it in fp8 (and VRAM for its largest model in fp8) -> fp8_offload; else the
disk tier. Every branch is decided by the planner's predicted peaks against what is free, and
the explanation lists each branch with its numbers.

With two or more GPUs, a branch of its own comes between basic and model-level offload:
``multi_gpu``, everything resident over the GPUs (``placement.plan_placement``: whole
components balanced, the largest split into runs of blocks when no GPU holds it). It is a
plan, not a preset file: the ``Decision`` carries it (``placement``) and its prediction
(``Placement.prediction``: each GPU's peak against its cap), and a run of it that runs out of
memory falls back to the single-GPU tree below it (``next_preset``: the preset after basic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipelines import Family

from . import files
from .footprint import Footprint
from .placement import MULTI_GPU, Placement, PlacementError, plan_placement
from .planner import GIB, Calibration, Job, Prediction, predict
from .probe import Hardware

# The tree's order, fastest first; a failed run falls back to the next one.
TREE_ORDER = ("basic", "cpu_offload", "dynamic", "fp8_offload", "disk")
# Whether the tree may choose multi_gpu (the pipelines run a placement); off, it prints the
# plan and goes on down the single-GPU branches.
MULTI_GPU_RUNS = True
VRAM_MARGIN = 0.5 * GIB      # left free on the GPU: CUDA context, fragmentation
RAM_MARGIN = 0.10            # of available RAM kept for the OS and the app


@dataclass(frozen=True)
class Decision:
    preset: str
    vram_limit: float | None                 # GiB, for presets that take one
    device: str
    explanation: tuple[str, ...]
    predictions: dict[str, Prediction] = field(default_factory=dict)
    placement: Placement | None = None       # where everything goes, for ``multi_gpu``

    def describe(self) -> str:
        return "\n".join(self.explanation)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def decide(hardware: Hardware, family: Family, footprint: Footprint, job: Job, *, baseline_ram: int = 0,
           vram_limit: float | None = None, calibration: Calibration | None = None,
           dtype: torch.dtype | None = None, multi_gpu_runs: bool | None = None) -> Decision:
    """The preset and ``vram_limit`` for ``job`` on ``hardware``, with the reasons.

    ``vram_limit`` (GiB) is the user's own cap; by default the free VRAM minus a margin.
    ``multi_gpu_runs``: whether a ``multi_gpu`` plan may be chosen (default ``MULTI_GPU_RUNS``)."""
    available = [n for n in TREE_ORDER if n in files.list_presets()]
    gpu = max(hardware.gpus, key=lambda g: g.free_bytes) if hardware.gpus else None
    ram_budget = int(hardware.ram_available_bytes * (1 - RAM_MARGIN)) + baseline_ram
    lines = [f"model {family.title}: {_count(footprint.total_parameters())} parameters"
             + (" (sizes from the files)" if footprint.from_headers else " (sizes from the registry)")]
    if gpu is None:
        device = "cpu"
        lines.append(f"no NVIDIA GPU ({hardware.gpu_status}): computing on the CPU")
        free_vram = None
        # On the CPU the "device" is RAM: layer-level presets stream every layer unless told.
        cap = vram_limit if vram_limit is not None else 0.0
    else:
        device = f"cuda:{gpu.index}"
        free_vram = gpu.free_bytes
        cap = vram_limit if vram_limit is not None else cap_from_free(free_vram)
        lines.append(f"GPU {gpu.index} {gpu.name}: {_gib(free_vram)} free; vram_limit {cap:g} GiB"
                     + (" (yours)" if vram_limit is not None else " (free minus 0.5 GiB, rounded down to a quarter)"))
    lines.append(f"RAM: {_gib(hardware.ram_available_bytes)} available")

    predictions = {}
    for name in available:
        predictions[name] = predict(family, footprint, job, name, on_gpu=gpu is not None,
                                    dtype=dtype or (torch.bfloat16 if gpu else torch.float32), vram_limit=cap,
                                    baseline_ram=baseline_ram, calibration=calibration)
    chosen = None
    for name in available:
        p = predictions[name]
        ram_ok = p.peak_ram_bytes <= ram_budget
        vram_ok = True
        if gpu is not None and p.vram_limit is None:
            # The margin covers the CUDA context, so it is left out of the peak here.
            vram_ok = p.peak_vram_reserved_bytes <= free_vram - VRAM_MARGIN
        elif gpu is not None and p.vram_limit > 0:
            vram_ok = not p.above_cap   # the core cannot stream under a cap below its window
        needs = f"needs {_gib(p.peak_ram_bytes)} RAM" + (
            f", {_gib(p.peak_vram_bytes)} VRAM" if p.peak_vram_bytes is not None else "")
        short_of_vram = "not enough VRAM" if p.vram_limit is None else \
            f"vram_limit {p.vram_limit:g} GiB is below the {_gib(p.parts.get('streaming_floor_vram', 0))} its " \
            "streaming window and activations need"
        verdict = "yes" if ram_ok and vram_ok else "no: " + " and ".join(
            w for w, bad in ((short_of_vram, not vram_ok), ("not enough RAM", not ram_ok)) if bad)
        lines.append(f"{name}: {needs} -> {verdict}")
        if ram_ok and vram_ok:
            chosen = name
            break
        if name == "basic" and len(hardware.gpus) > 1:
            placement = _multi_gpu(hardware, family, footprint, job, p, ram_budget, vram_limit, calibration,
                                   dtype or torch.bfloat16, lines)
            if placement is not None:
                if not (MULTI_GPU_RUNS if multi_gpu_runs is None else multi_gpu_runs):
                    lines.append("  (a plan only: runs over several GPUs are switched off; on with one GPU)")
                    continue
                lines.append(f"-> {MULTI_GPU}")
                predictions[MULTI_GPU] = placement.prediction(p)
                # The device is the single-GPU tree's, where a fallback runs.
                return Decision(MULTI_GPU, None, device, tuple(lines), predictions, placement)
    if chosen is None:
        chosen = "disk" if "disk" in available else available[-1]
        lines.append(f"nothing fits with margin: {chosen}, the most frugal; expect swapping or an error")
    limit = cap if files.load_preset(chosen).uses_vram_limit else None
    lines.append(f"-> {chosen}" + (f", vram_limit {limit:g} GiB" if limit is not None else ""))
    return Decision(chosen, limit, device, tuple(lines), predictions)


def _multi_gpu(hardware: Hardware, family: Family, footprint: Footprint, job: Job, basic: Prediction,
               ram_budget: int, vram_limit: float | None, calibration: Calibration | None, dtype: torch.dtype,
               lines: list[str]) -> Placement | None:
    """The ``multi_gpu`` branch: its line (and the placement's, when it fits) added to ``lines``.
    Its RAM is basic's: weights go straight to the GPUs."""
    head = f"{MULTI_GPU}: {len(hardware.gpus)} GPUs"
    try:
        placement = plan_placement(family, footprint, job, hardware.gpus, dtype=dtype, vram_limit=vram_limit,
                                   calibration=calibration)
    except PlacementError as error:
        lines.append(f"{head} -> no: {error}")
        return None
    needs = " + ".join(f"{g.reserved_bytes / GIB:.1f}" for g in placement.gpus)
    caps = " + ".join(f"{g.cap_bytes / GIB:g}" for g in placement.gpus)
    ram_ok = basic.peak_ram_bytes <= ram_budget
    lines.append(f"{head}, needs {_gib(basic.peak_ram_bytes)} RAM, {needs} GiB VRAM of {caps} GiB caps -> "
                 + ("yes" if ram_ok else "no: not enough RAM"))
    if not ram_ok:
        return None
    lines.extend(f"  {line}" for line in placement.describe())
    return placement


def cap_from_free(free_bytes: int) -> float:
    """The vram_limit (GiB) the tree and the fallback derive from free VRAM: minus the margin,
    floored to a quarter GiB, so that a few bytes of drift between two readings (the cuBLAS
    workspace, other processes) give the same configs and a kept pipeline stays reusable."""
    return max(0.0, math.floor((free_bytes - VRAM_MARGIN) / GIB * 4) / 4)


def next_preset(preset: str) -> str | None:
    """The preset to fall back to after ``preset`` ran out of memory (None after the last);
    after ``multi_gpu``, the single-GPU tree's next step after basic."""
    order = [n for n in TREE_ORDER if n in files.list_presets()]
    if preset == MULTI_GPU and "basic" in order:
        preset = "basic"
    if preset not in order:
        return order[-1] if order and preset != order[-1] else None
    index = order.index(preset)
    return order[index + 1] if index + 1 < len(order) else None
