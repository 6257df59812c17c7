"""A model held whole on several GPUs: which component, or which blocks of one, go where.

This is ``basic`` over several GPUs: every weight resident on a GPU in the computation
dtype, no offloading. Each GPU holds its weights and the activations of the component
running now; phases run one at a time, so that is the largest activation among the
components computing there (a split component computes on every GPU it has blocks on).
What the cap bounds is what torch reserves; each GPU's CUDA context sits beside it
(``planner.CUDA_CONTEXT_BYTES``, in ``GpuPlan.peak_bytes``).

Whole components follow diffusers' ``device_map="balanced"``: the largest first, each to the
GPU with the most room left. A component that fits on no single GPU is split once the whole
ones are placed, its blocks filling the room they leave: contiguous runs, one per GPU, on as
few GPUs as hold them (each boundary is one crossing of the activations), each block to the
one of them with the most room left, its non-block weights (embedders, final norm and
projection) on the first run's GPU, where the core computes a split model's groups the map
does not name. When even that cannot fit, ``plan_placement`` raises ``PlacementError`` with
the reason (the tree prints it on its ``multi_gpu`` line).

The VAE goes on the pipeline's execution device, the GPU of the model diffusers takes its
device from (``pipelines.loading.execution_component``): decode is a method, not a forward,
so nothing carries its input to another GPU. Every other component computing elsewhere takes
its inputs from there and hands its output back (the core's ``io_device``).

Block count and size are estimated from the footprint: ``largest_group`` elements make one
block (before a download, a fortieth of the component, the planner's guess), the rest of its
parameters are non-block weights. The loader turns the estimate into a core ``device_map``
over the real blocks with ``Placement.device_map_for``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

import vram
from pipelines import Family
from pipelines.loading import execution_component

from .footprint import ComponentSize, Footprint
from .planner import CUDA_CONTEXT_BYTES, GIB, Calibration, Job, Prediction, activation_bytes, cache_bytes, stored_bytes
from .probe import GPU

MULTI_GPU = "multi_gpu"      # the tree's branch over several GPUs (no preset file: a Placement)
# The planner's guess of a denoiser's depth where the footprint has no block size.
_BLOCKS_GUESS = 40


class PlacementError(ValueError):
    """The model does not fit the GPUs even with its largest components split; the message
    says what is short."""


@dataclass(frozen=True)
class GpuPlan:
    """One GPU's share, bytes. ``cap_bytes`` bounds ``reserved_bytes`` (what torch reserves)."""

    index: int                               # CUDA's index: cuda:<index>
    cap_bytes: int
    components: tuple[str, ...] = ()         # whole on this GPU
    blocks: dict[str, int] = field(default_factory=dict)   # split component -> blocks here
    weights_bytes: int = 0
    activation_bytes: int = 0                # the largest among the components computing here

    @property
    def reserved_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    @property
    def peak_bytes(self) -> int:
        """The GPU's whole use by the process, its CUDA context included."""
        return self.reserved_bytes + CUDA_CONTEXT_BYTES


@dataclass(frozen=True)
class Split:
    """A component's blocks over GPUs: ``runs`` are (GPU index, blocks) in block order, the
    non-block weights on the first run's GPU. Bytes are in the placement's dtype, from the
    footprint's estimate of ``blocks`` equal blocks of ``block_bytes``."""

    runs: tuple[tuple[int, int], ...]
    block_parameters: int                    # elements of one estimated block
    block_bytes: int
    other_bytes: int                         # non-block weights

    @property
    def blocks(self) -> int:
        return sum(count for _, count in self.runs)


@dataclass(frozen=True)
class Placement:
    """Where each component of a model lives on several GPUs, and each GPU's predicted peak."""

    gpus: tuple[GpuPlan, ...]                # every GPU considered, by CUDA index
    whole: dict[str, int]                    # component -> the GPU holding it whole
    splits: dict[str, Split]                 # component -> its runs of blocks
    components: tuple[str, ...]              # the model's, in the footprint's order
    kind: str = "cuda"                       # "cuda", or "standin": simulated GPUs (``on``)

    def gpu(self, index: int) -> GpuPlan:
        return next(g for g in self.gpus if g.index == index)

    def on(self, device: str | torch.device) -> "Placement":
        """The same plan on ``device``'s kind of device: on the stand-in accelerators (GPU i
        as ``standin:i``) when it is one, as tests run it without a GPU; else on CUDA's."""
        standin = vram.config.device_name(device).strip().lower().startswith(vram.config.STANDIN_NAME)
        return replace(self, kind=vram.config.STANDIN_NAME if standin else "cuda")

    def device(self, index: int) -> str:
        """GPU ``index`` as the core names the device ("cuda:1"; "standin", "standin:1")."""
        if self.kind == vram.config.STANDIN_NAME:
            return vram.config.device_name(vram.config.standin_device(index))
        return f"cuda:{index}"

    @property
    def used(self) -> tuple[GpuPlan, ...]:
        """The GPUs that hold anything."""
        return tuple(g for g in self.gpus if g.components or g.blocks)

    def device_of(self, component: str) -> str:
        """The device ``component`` computes on (``computation_device`` in its config): its
        GPU, or for a split one the first run's GPU, which keeps its non-block weights."""
        if component in self.splits:
            return self.device(self.splits[component].runs[0][0])
        return self.device(self.whole[component])

    def caps_for(self, component: str) -> dict[str, float]:
        """The cap (GiB) of each GPU ``component`` computes on, by device name: a split
        component's ``vram_limit`` per device."""
        indices = [index for index, _ in self.splits[component].runs] if component in self.splits \
            else [self.whole[component]]
        return {self.device(i): self.gpu(i).cap_bytes / GIB for i in indices}

    def describe(self) -> tuple[str, ...]:
        """One line per component, then one per GPU holding anything."""
        lines = []
        for name in self.components:
            if name in self.whole:
                lines.append(f"{name}: GPU {self.whole[name]}")
                continue
            split, first, runs = self.splits[name], 0, []
            for index, count in split.runs:
                blocks = f"{first}" if count == 1 else f"{first}-{first + count - 1}"
                runs.append(f"{blocks} on GPU {index}")
                first += count
            lines.append(f"{name}: blocks {', '.join(runs)} ({split.blocks} blocks of ~{_gib(split.block_bytes)}, "
                         f"estimated; non-block weights on GPU {split.runs[0][0]})")
        for gpu in self.used:
            lines.append(f"GPU {gpu.index}: {_gib(gpu.reserved_bytes)} of {gpu.cap_bytes / GIB:g} GiB cap "
                         f"(weights {_gib(gpu.weights_bytes)}, activations {_gib(gpu.activation_bytes)})")
        return tuple(lines)

    def device_map_for(self, component: str, block_names: Sequence[str],
                       block_sizes: Sequence[int] | None = None) -> dict[str, str]:
        """A core ``device_map`` (block name -> "cuda:i") for a split ``component``, given its
        block groups' names in order (``vram.grouping.plan_groups(model, "block")``, the plans
        with ``block`` set); {} for a whole component, which needs none (it computes on
        ``device_of``, as do a split one's non-block groups).

        The plan counted estimated equal blocks; the real ones are cut at the same bytes: each
        run but the last takes blocks while they stay within its planned bytes, the last the
        rest. ``block_sizes`` (elements per block, as ``vram.grouping.group_sizes`` gives them)
        cuts by real size where blocks differ (FLUX's double blocks are 2.4x its single
        ones); without it the blocks are taken as equal. Raises ValueError when the last run
        would pass its GPU's cap."""
        if component in self.whole:
            return {}
        split = self.splits[component]
        if not block_names or (block_sizes is not None and len(block_sizes) != len(block_names)):
            raise ValueError(f"{component}: {len(block_names)} block names and "
                             f"{'no' if block_sizes is None else len(block_sizes)} sizes; need the blocks in order")
        planned_blocks = split.blocks * split.block_bytes
        if block_sizes is None:
            sizes = [planned_blocks / len(block_names)] * len(block_names)
        else:
            per_element = split.block_bytes / split.block_parameters  # the footprint's bytes per element
            sizes = [s * per_element for s in block_sizes]
        # The first run's GPU holds the non-block weights: the real ones are what the blocks leave.
        other = max(0.0, planned_blocks + split.other_bytes - sum(sizes))
        mapping: dict[str, str] = {}
        position = 0
        for run, (index, count) in enumerate(split.runs):
            last = run == len(split.runs) - 1
            target, taken = count * split.block_bytes + (split.other_bytes - other if run == 0 else 0), 0.0
            start = position
            while position < len(sizes) and (last or taken + sizes[position] <= target):
                taken += sizes[position]
                position += 1
            room = target + self.gpu(index).cap_bytes - self.gpu(index).reserved_bytes
            if taken > room:
                raise ValueError(f"{component}: blocks {start}-{position - 1} need {_gib(taken)} on GPU {index}, "
                                 f"which has {_gib(room)} for them; plan again with the model's real sizes")
            mapping.update({name: self.device(index) for name in block_names[start:position]})
        return mapping

    def prediction(self, basic: Prediction) -> Prediction:
        """``multi_gpu``'s prediction beside the presets': RAM is ``basic``'s (the weights go
        straight to the GPUs), the VRAM peak the busiest GPU's, CUDA context included, and
        ``per_gpu`` each GPU's reserved bytes against its cap."""
        busiest = max(self.used, key=lambda g: g.peak_bytes)
        parts = {k: v for k, v in basic.parts.items() if k in ("baseline_ram", "weights_in_ram", "transient_ram")}
        parts["cuda_context"] = CUDA_CONTEXT_BYTES
        return Prediction(MULTI_GPU, busiest.peak_bytes, basic.peak_ram_bytes, None, {}, parts,
                          {g.index: (g.reserved_bytes, g.cap_bytes) for g in self.used})


def plan_placement(family: Family, footprint: Footprint, job: Job, gpus: Sequence[GPU], *,
                   dtype: torch.dtype = torch.bfloat16, vram_limit: float | Mapping[int | str, float] | None = None,
                   calibration: Calibration | None = None) -> Placement:
    """Every component of ``footprint`` resident on ``gpus`` in ``dtype``, for ``job``.

    ``vram_limit`` caps each GPU (GiB, what torch may reserve there): None, each GPU's free
    memory minus the tree's margin (``tree.cap_from_free``); one number, every GPU; a mapping
    CUDA index (or "cuda:i") -> GiB, diffusers' ``max_memory``, where a GPU left out is not
    used. ``calibration`` scales the bytes by this machine's measured ratios for ``basic``,
    whose memory model this is per GPU. The VAE goes whole where the execution component
    computes (its first run's GPU, were it split). Raises ``PlacementError``, saying why, when
    even splitting cannot fit the model."""
    caps = _caps(gpus, vram_limit)
    if not caps:
        raise PlacementError("no GPU to place the model on")
    factor = calibration.factor("basic", "vram") if calibration else 1.0
    weights = {c.name: int(stored_bytes(c, dtype, dtype) * factor) for c in footprint.components}
    acts = {c.name: int((activation_bytes(family, c, job, dtype) + cache_bytes(family, c, job, dtype)) * factor)
            for c in footprint.components}
    total = sum(weights.values()) + max(acts.values(), default=0)
    if total > sum(caps.values()):
        raise PlacementError(f"{_gib(sum(weights.values()))} of weights and {_gib(max(acts.values(), default=0))} "
                             f"of activations need more than the caps {_caps_text(caps)} GiB hold")
    state = {index: _Gpu(cap) for index, cap in caps.items()}
    whole: dict[str, int] = {}
    too_large = []
    leader = execution_component(family)
    vae = next((c for c in footprint.components if c.phase == "vae_decoding" and c.name != leader
                and leader in weights), None)
    for component in sorted(footprint.components, key=lambda c: -weights[c.name]):
        name = component.name
        if component is vae:
            continue   # placed with its leader
        # The leader and the VAE go whole onto one GPU together.
        together = [name] + ([vae.name] if vae is not None and name == leader else [])
        need, peak_acts = sum(weights[n] for n in together), max(acts[n] for n in together)
        fitting = [i for i, gpu in state.items() if gpu.room_for(peak_acts) >= need]
        if not fitting:
            too_large.append(component)   # split once the whole ones are placed: its blocks fill what is left
            continue
        index = max(fitting, key=lambda i: (state[i].room_for(peak_acts), -i))
        for n in together:
            state[index].add(n, weights[n], acts[n])
            whole[n] = index
    splits: dict[str, Split] = {}
    for component in too_large:
        name = component.name
        # A split leader keeps room for the VAE beside its non-block weights on its first GPU.
        follows = name == leader and vae is not None
        split = _split(component, weights[name], max(acts[name], acts[vae.name]) if follows else acts[name], state,
                       beside=weights[vae.name] if follows else 0)
        if split is None:
            rooms = " + ".join(f"{state[i].room_for(acts[name]) / GIB:.1f}" for i in sorted(state))
            raise PlacementError(f"{name} ({_gib(weights[name])}) fits on no GPU, nor split over the room the "
                                 f"other components leave ({rooms} GiB)")
        for run, (index, count) in enumerate(split.runs):
            state[index].add(name, count * split.block_bytes + (split.other_bytes if run == 0 else 0), acts[name],
                             blocks=count)
        splits[name] = split
    if vae is not None and leader in splits:
        index = splits[leader].runs[0][0]
        if state[index].room_for(acts[vae.name]) < weights[vae.name]:
            raise PlacementError(f"{vae.name} ({_gib(weights[vae.name])}) decodes on GPU {index}, where {leader} "
                                 f"computes (the pipeline's execution device), and does not fit beside it")
        state[index].add(vae.name, weights[vae.name], acts[vae.name])
        whole[vae.name] = index
    order = tuple(c.name for c in footprint.components)
    plans = tuple(GpuPlan(index, gpu.cap, tuple(sorted(gpu.components, key=order.index)), dict(gpu.blocks),
                          gpu.weights, gpu.activations) for index, gpu in sorted(state.items()))
    return Placement(plans, whole, splits, order)


@dataclass
class _Gpu:
    """A GPU's running totals while components are placed."""

    cap: int
    components: list[str] = field(default_factory=list)
    blocks: dict[str, int] = field(default_factory=dict)
    weights: int = 0
    activations: int = 0

    def room_for(self, activations: int) -> int:
        """Bytes of weights that still fit beside a component with ``activations`` running here."""
        return self.cap - self.weights - max(self.activations, activations)

    def add(self, name: str, weights: int, activations: int, blocks: int = 0) -> None:
        """``name`` whole, or ``blocks`` of it (its non-block weights in ``weights`` on its first GPU)."""
        if blocks:
            self.blocks[name] = blocks
        else:
            self.components.append(name)
        self.weights += weights
        self.activations = max(self.activations, activations)


def _split(component: ComponentSize, weights: int, acts: int, state: dict[int, _Gpu], beside: int = 0) -> Split | None:
    """``component``'s blocks over the fewest GPUs (most room first) that hold them, each
    block to the one with the most room left (diffusers' balanced rule, per block), one run
    per GPU in index order, ``beside`` bytes left free on the first; None when all the GPUs
    together cannot hold them."""
    parameters = max(1, component.parameters)
    block_parameters = min(parameters, component.largest_group or max(1, parameters // _BLOCKS_GUESS))
    blocks = parameters // block_parameters
    block_bytes = max(1, weights * block_parameters // parameters)
    other = weights - blocks * block_bytes
    by_room = sorted(state, key=lambda i: (-state[i].room_for(acts), i))
    for count in range(2, len(by_room) + 1):
        chosen = sorted(by_room[:count])
        room = {i: state[i].room_for(acts) - (other + beside if i == chosen[0] else 0) for i in chosen}
        if sum(max(0, r) // block_bytes for r in room.values()) < blocks:
            continue
        counts = dict.fromkeys(chosen, 0)
        for _ in range(blocks):
            index = max(chosen, key=lambda i: (room[i], -i))
            counts[index] += 1
            room[index] -= block_bytes
        if counts[chosen[0]]:   # the first GPU keeps the non-block weights beside its blocks
            return Split(tuple((i, n) for i, n in counts.items() if n), block_parameters, block_bytes, other)
    return None

def _caps(gpus: Sequence[GPU], vram_limit: float | Mapping[int | str, float] | None) -> dict[int, int]:
    """Bytes each GPU may reserve, by CUDA index."""
    from .tree import cap_from_free  # the tree imports this module; its margin is the one rule
    if vram_limit is None:
        return {gpu.index: int(cap_from_free(gpu.free_bytes) * GIB) for gpu in gpus}
    if not isinstance(vram_limit, Mapping):
        if vram_limit < 0:
            raise ValueError(f"vram_limit must be >= 0 GiB, got {vram_limit!r}")
        return {gpu.index: int(vram_limit * GIB) for gpu in gpus}
    known = {gpu.index for gpu in gpus}
    caps = {}
    for key, gib in vram_limit.items():
        text = str(key).removeprefix("cuda:")
        index = int(text) if text.isdigit() else None
        if index not in known:
            names = ", ".join(f"cuda:{i}" for i in sorted(known))
            raise ValueError(f"vram_limit: {key!r} is not one of the GPUs ({names})")
        if gib < 0:
            raise ValueError(f"vram_limit[{key!r}] must be >= 0 GiB, got {gib!r}")
        caps[index] = int(gib * GIB)
    return dict(sorted(caps.items()))


def _caps_text(caps: Mapping[int, int]) -> str:
    return " + ".join(f"{cap / GIB:g}" for cap in caps.values())


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"
