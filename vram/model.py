"""A model under management: binding it, its model-level states, its run reports.

``enable_vram_management`` splits the model into groups (grouping.py), binds each
parameter to its files or its current value, puts every group's base at the offload
placement, hooks the groups' roots and registers the model with the process's manager. It
returns the model itself, as DiffSynth does; ``managed(model)`` gives the core's record.
The pipeline switches the model between offload and onload; the groups switch themselves
between preparing and computation as forwards run, in the order the schedule learned.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
import types
from typing import Any, Mapping, Sequence

import torch

from .arena import Arena, ArenaPool
from .budget import RunReport, get_manager
from .cache import RamCache
from .casting import FP8_MAX, cast, fp8_plain, tensor_config
from .config import GIB, VramConfig, device_name, is_host, is_standin, parse_device
from .group import Entry, Group, HostCopy, dtypes_at, make_placeholder
from .grouping import GroupPlan, plan_groups, split
from .hooks import Crossings, GroupHooks
from .meta import has_meta_parameters
from .devices import make_mover
from .mover import Landing
from .schedule import Schedule
from .weights import WeightSource

log = logging.getLogger(__name__)

_MANAGED_ATTR = "_vram_managed"


class ModelState(enum.Enum):
    OFFLOAD = "offload"
    ONLOAD = "onload"


def job_size(args, kwargs) -> int:
    """A forward's size, for scaling its activations: the elements of its floating-point
    tensor inputs (latents and embeddings: tokens x batch x frames x channels)."""
    total = 0
    for value in (*args, *kwargs.values()):
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                total += item.numel()
    return total


def _trim_heap() -> None:
    """Hand freed heap memory back to the system after a bulk conversion (glibc only)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Part:
    """The groups of a model that compute on one device, as that device's budget sees them:
    the mover, the cap, the streaming window and what is charged there. A model placed on
    one device is its own only part; a model split over several (``device_map``) has one
    more ``Part`` per other device, each registered with the manager under its own name
    ("transformer@standin:1") so that every device keeps its own ledger, cap and reports."""

    def __init__(self, owner: "ManagedModel", device: torch.device, cap_bytes: int | None, name: str):
        self.owner = owner
        self.name = name
        self.device = device
        self.mover = make_mover(device)
        self.host_computes = is_host(device)  # the CPU: no copies to a device
        self.budget_key = device_name(device)
        self.cap_bytes = cap_bytes
        self.part_groups: list[Group] = []  # this device's groups
        self.max_group_need = 0
        self.window_bytes = 0
        self.job = 0              # the current forward's size (elements of its inputs)
        self.streaming_bytes = 0  # charged for copies that are not kept: in flight or in use
        self.kept_bytes = 0       # charged for copies kept between forwards (what eviction frees)

    def measure(self) -> None:
        self.max_group_need = max((g.need for g in self.part_groups), default=0)
        self.window_bytes = self.max_group_need * (self.owner.config.prefetch + 1)

    def device_resident(self) -> int:
        return sum(g.base_charge[1] for g in self.part_groups if g.base_charge and g.base_charge[0] == self.budget_key)

    def check_cap(self) -> None:
        """A cap that cannot hold the largest group (beside what rests on the device) fails
        before any work."""
        if not self.cap_bytes or not self.part_groups:
            return
        largest = max(self.part_groups, key=lambda g: g.need)
        resident = self.device_resident()
        if largest.need + resident > self.cap_bytes:
            what = (f"group {largest.name!r} needs {largest.need / GIB:.4f} GiB"
                    + (f" on top of {resident / GIB:.4f} GiB of weights resident there" if resident else ""))
            raise ValueError(f"vram_limit={self.cap_bytes / GIB:.4g} GiB is too small for {self.owner.name}: {what} "
                             f"on {self.budget_key}. Raise vram_limit, use an fp8 preparing "
                             f"dtype, or vram_limit=0 to stream every group with no cap.")


class ManagedModel(Part):
    """The core's record of one model, and its part on its computation device. Reach it
    with ``vram.managed(model)``."""

    def __init__(self, module: torch.nn.Module, config: VramConfig, source: WeightSource | None, name: str):
        super().__init__(self, config.budget_device, None if not config.vram_limit else int(config.vram_limit * GIB),
                         name)
        self.module = module
        self.config = config
        self.source = source
        self.state = ModelState.OFFLOAD
        # How host arenas are page-locked for asynchronous copies (None: they stay pageable).
        self.pinner = self.mover.pinner if config.pin_memory else None
        self.parts: list[Part] = [self]
        self.entries: list[Entry] = []
        self.schedule: Schedule[Group] = Schedule([], config.prefetch)
        self.pool: ArenaPool | None = None          # read arenas for the disk tier
        self.prep_pool: ArenaPool | None = None     # CPU computation: casts to the preparing dtype
        self.cache: RamCache | None = None
        self.hooks: list[GroupHooks] = []
        self._handles: list[Any] = []
        self._scratch: Arena | None = None
        self._run_lock = threading.Lock()
        self._runs = 0
        self._run_marks: dict[str, Any] = {}
        self.runs_done = 0        # completed top-level forwards (or vram.track blocks)
        self.makes_copies = False
        self.groups: list[Group] = []       # every part's groups, in definition order
        self.crossings: Crossings | None = None  # activations between parts (a split model only)

    # -- sizes ------------------------------------------------------------------------------
    def measure_all(self) -> None:
        for part in self.parts:
            part.measure()
        self.makes_copies = any(not g.static for g in self.groups)

    def check_caps(self) -> None:
        for part in self.parts:
            part.check_cap()

    # -- scratch for bulk conversions ------------------------------------------------------
    def scratch(self) -> Arena:
        """An arena as large as the largest group in the files, reused while one thread
        converts groups at a model-level change; freed by ``drop_scratch``."""
        if self._scratch is None:
            self._scratch = Arena(max(g.file_layout.nbytes for g in self.groups))
        return self._scratch

    def drop_scratch(self) -> None:
        if self._scratch is not None:
            self._scratch = None
            _trim_heap()

    # -- model-level states ----------------------------------------------------------------
    def rest(self, group: Group, state: str, params: list[torch.Tensor] | None = None) -> None:
        """Put a group's base at its placement in ``state`` (no forward, nothing staged)."""
        placement, dtypes = dtypes_at(group, state)
        offload, offload_dtypes = dtypes_at(group, "offload")
        keep_host = offload_dtypes if is_host(offload.device) else None
        manager = get_manager()
        if placement.is_disk:
            group.set_base(None)
        elif is_host(placement.device):
            copy = group.host_copy(dtypes, params, self.scratch)
            group.set_base(copy)
            keep_host = keep_host if keep_host is not None else dtypes
        elif isinstance(group.base, Landing) and group.base_dtypes() == dtypes:
            pass
        else:
            nbytes = sum(e.numel * d.itemsize for e, d in zip(group.entries, dtypes))
            fits = True
            part = group.part
            if part.cap_bytes is not None and device_name(placement.device) == part.budget_key:
                with manager.lock:
                    fits = manager.make_room(part.budget_key, nbytes, part, headroom=part.window_bytes)
            if fits:
                landing = group.land_base(dtypes, params)
                # A resident base is used without hooks (static): the stream that onloads
                # the model, the one that runs it, is ordered after the copy here.
                part.mover.wait(landing.event)
                group.set_base(landing, charge=(part.budget_key, nbytes))
            elif group.base is None and params is not None:
                group.set_base(group.host_copy(offload_dtypes, params, self.scratch))
            else:
                group.set_base(group.base)
        for held in list(group.host_copies):
            if held != keep_host and group.base is not group.host_copies[held]:
                group.drop_host_copy(held)

    def set_state(self, state: ModelState) -> None:
        manager = get_manager()
        with manager.lock:
            if any(g.users for g in self.groups):
                raise RuntimeError(f"{self.name}: cannot switch to {state.value} during a forward")
        for group in self.groups:
            group.settle()
        for group in self.groups:
            self.rest(group, state.value)
        self.drop_scratch()
        # What the last phase left in the allocator's cache would count against the next.
        for part in self.parts:
            part.mover.empty_cache()
        self.state = state
        self.measure_all()

    # -- run reports -----------------------------------------------------------------------
    def _run_start(self, module, args, kwargs):
        with self._run_lock:
            self._runs += 1
            if self._runs > 1:
                return None
        self.schedule.start()
        if self.crossings is not None:
            self.crossings.start((args, kwargs))
        manager = get_manager()
        size = job_size(args, kwargs)
        marks = {"t0": time.perf_counter()}
        for part in self.parts:
            manager.expect_job(part, size)
            memory = part.mover.memory()
            marks[part.name] = {"ledger0": manager.resident_bytes(part.budget_key),
                                "alloc0": memory.allocated if memory else None, "peaks": part.mover.peaks(),
                                "ledger": manager.peak_scope(part.budget_key)}
        self._run_marks = marks
        return None

    def _run_end(self, module, args, kwargs, output):
        with self._run_lock:
            if self._runs == 0:
                return None
            self._runs -= 1
            if self._runs:
                return None
        self.schedule.finish()
        if self.crossings is not None:
            self.crossings.finish()
        manager = get_manager()
        seconds = time.perf_counter() - self._run_marks["t0"]
        for part in self.parts:
            marks = self._run_marks[part.name]
            ledger_peak = marks["ledger"].close()
            peak_reserved = activations = None
            peaks = marks["peaks"].close()
            if peaks is not None and marks["alloc0"] is not None:
                peak_allocated, peak_reserved = peaks
                # Charged but not yet allocated (a prefetch whose copy is still to be issued)
                # is not memory outside the ledger.
                outside_at_start = max(0, marks["alloc0"] - marks["ledger0"])
                activations = max(0, peak_allocated - outside_at_start - ledger_peak)
                manager.note_activations(part, activations)
            limit = self.config.vram_limit if part is self or part.cap_bytes is None else part.cap_bytes / GIB
            manager.add_report(RunReport(part.name, part.budget_key, part.cap_bytes, peak_reserved, ledger_peak,
                                         activations, seconds, limit))
        if self.host_computes and self.makes_copies:
            # Casts below glibc's mmap threshold come and go from the heap; hand what they
            # freed back after each forward so RAM does not creep up run by run.
            _trim_heap()
        self.runs_done += 1
        return None

    # -- views -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What planners and UIs need to know about this model, as plain data (bytes)."""
        stored: dict[str, int] = {}
        for group in self.groups:
            for entry, dtype in zip(group.entries, group.base_dtypes()):
                where = "disk" if group.base is None else (
                    f"cpu/{str(dtype).removeprefix('torch.')}" if isinstance(group.base, HostCopy)
                    else f"{group.device}/{str(dtype).removeprefix('torch.')}")
                stored[where] = stored.get(where, 0) + entry.numel * dtype.itemsize
        return {
            "config": {k: str(v) if v is not None else None for k, v in self.config.to_dict().items()},
            "groups": len(self.groups), "blocks": sum(1 for g in self.groups if g.block),
            "layers": sum(len(g.modules) for g in self.groups),
            "parameters": sum(e.numel for e in self.entries),
            "stored_bytes": stored, "largest_group_bytes": self.max_group_need,
            "window_bytes": self.window_bytes, "cap_bytes": self.cap_bytes, "runs": self.runs_done,
            "granularity": self.config.granularity,
            "devices": {part.budget_key: {"groups": len(part.part_groups), "cap_bytes": part.cap_bytes,
                                          "largest_group_bytes": part.max_group_need,
                                          "window_bytes": part.window_bytes} for part in self.parts},
        }

    def group_states(self) -> dict[str, str]:
        return {group.name: group.state_name() for group in self.groups}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes this model holds now, per ledger device."""
        names = {part.name for part in self.parts}
        out: dict[str, int] = {}
        for (device, model, _group, _kind), nbytes in get_manager().ledger().items():
            if model in names:
                out[device] = out.get(device, 0) + nbytes
        return out

    def group_of(self, module_name: str) -> Group:
        for group in self.groups:
            if module_name in group.modules:
                return group
        raise KeyError(module_name)

    def host_tensor(self, group: Group, index: int) -> torch.Tensor:
        """A parameter's stored value, for state_dict(): its base, or read from disk; a
        scaled fp8 value in the computation dtype (its fp8 bits alone would be wrong)."""
        tensors = group.base_tensors()
        entry = group.entries[index]
        value = tensors[index] if tensors is not None else self.source.read_info(entry.info)
        if entry.scale(value.dtype) != 1.0:
            computation = entry.config.computation.dtype
            return cast(value, computation, entry.factor(value.dtype, computation))
        return value


# ---------------------------------------------------------------------------------------------
# Building a managed model
# ---------------------------------------------------------------------------------------------

def _guarded_apply(module: torch.nn.Module, fn, recurse: bool = True):
    """``module.to()``/``.half()`` on a managed module converts buffers and children only:
    its parameters are placeholders whose tiers the config decides."""
    if recurse:
        for child in module.children():
            child._apply(fn)
    for key, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[key] = fn(buffer)
    return module


def enable_vram_management(model: torch.nn.Module, vram_config: VramConfig | Mapping[str, Any], *,
                           vram_limit: float | Mapping[str, float | None] | None = None,
                           weights: str | os.PathLike | Sequence[str | os.PathLike] | WeightSource | None = None,
                           name: str | None = None,
                           keep_fp32: Sequence[str] | None = None,
                           device_map: Mapping[str, str | torch.device] | None = None,
                           io_device: str | torch.device | None = None) -> torch.nn.Module:
    """Put ``model`` under VRAM management and return it (``vram.managed(model)`` is the
    core's record of it).

    ``vram_config`` is DiffSynth's 8-key dict (plus optional extras) or a ``VramConfig``.
    ``vram_limit`` (GiB) caps this process's peak memory on the computation device; it
    overrides the config's. ``weights`` (.safetensors file, list, or folder) is required when
    a state is "disk" or when the model was built with ``empty_weights()``; its keys must
    match ``model.state_dict()``. ``keep_fp32`` names modules (by name component) whose
    weights stay float32 under a low-precision computation dtype; by default the model's
    ``_keep_in_fp32_modules`` (diffusers' rule; transformers applies that list to float16
    only, so its loaders pass their own). The model starts in the offload state; call
    ``vram.onload(model)`` before the phase that uses it.

    ``device_map`` splits the model over several accelerators of one kind (CUDA GPUs, or
    stand-ins): module name -> device, e.g. ``{"single_transformer_blocks": "cuda:1"}``; a
    group computes on the device of the closest module above it that the map names, else on
    the config's. Each device has its own part: its own ledger, cap and run report, weights
    staged there by its own mover; activations cross to a group's device at its entry (each
    tensor once per forward) and the output comes back to the config's device. With a
    ``device_map``, ``vram_limit`` may give one figure per device (``{"cuda:0": 10,
    "cuda:1": 22}``; a device left out has no cap), or one for all. ``io_device`` is where
    the model's inputs come from and its output goes (default: the config's device): a
    pipeline's execution device, for a component placed on another GPU.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _MANAGED_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} is already under VRAM management; "
                         f"call vram.disable_vram_management(model) first")
    limits = vram_limit if isinstance(vram_limit, Mapping) else None
    if limits is not None:
        home = VramConfig.coerce(vram_config).computation.device
        vram_limit = next((v for k, v in limits.items() if parse_device(k, "vram_limit") == home), None)
    config = VramConfig.coerce(vram_config, vram_limit)
    source = weights if isinstance(weights, WeightSource) or weights is None else WeightSource(weights)
    if config.uses_disk and source is None:
        raise ValueError("vram_config: offload/onload device 'disk' needs weights= (the model's .safetensors files)")
    if source is None and has_meta_parameters(model):
        raise ValueError("model has parameters on the meta device; pass weights= to bind them to their files")

    placement, caps = _check_device_map(device_map, limits, config)
    io = None if io_device is None else parse_device(io_device, "io_device")
    if io_device is not None and (io is None or is_host(io) != is_host(config.computation.device)
                                  or is_standin(io) != is_standin(config.computation.device)):
        raise ValueError(f"io_device: {io_device!r} is not a device of the model's kind "
                         f"({device_name(config.computation.device)})")
    manager = get_manager()
    record = ManagedModel(model, config, source, name or type(model).__name__)
    record.name = manager.register(record)
    try:
        _bind(record, model, config, source, keep_fp32, placement, caps, io)
    except BaseException:
        _teardown(record)
        for part in record.parts:
            manager.unregister(part)
        raise
    return model


def _check_device_map(device_map, limits: Mapping[str, Any] | None, config: VramConfig):
    """(device_map with parsed devices, per-device caps in bytes) or (None, None)."""
    if device_map is None:
        if limits is not None:
            raise ValueError("vram_limit: one GiB figure per device needs a device_map (a model on one device "
                             "takes one number)")
        return None, None
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(f"device_map must map module names to devices, got {device_map!r}")
    home = config.computation.device
    if is_host(home):
        raise ValueError("device_map: the model computes on the CPU; split models compute on accelerators")
    placement = {}
    for key, value in device_map.items():
        device = parse_device(value, f"device_map[{key!r}]")
        if device is None or is_host(device) or is_standin(device) != is_standin(home) or device.type != home.type:
            raise ValueError(f"device_map[{key!r}]: {value!r} is not an accelerator of the model's kind "
                             f"({device_name(home)}); a split model's groups compute on devices like its own")
        placement[str(key)] = device
    caps: dict[str, int | None] = {}
    for key, value in (limits or {}).items():
        device = parse_device(key, "vram_limit")
        if device is None or is_host(device):
            raise ValueError(f"vram_limit: {key!r} is not an accelerator")
        caps[device_name(device)] = _limit_bytes(value, f"vram_limit[{key!r}]")
    used = {device_name(d) for d in placement.values()} | {device_name(home)}
    stray = sorted(set(caps) - used)
    if stray:
        raise ValueError(f"vram_limit: {', '.join(stray)} run(s) no group of this model; it uses "
                         f"{', '.join(sorted(used))}")
    if config.vram_limit is not None and limits is None:
        caps = dict.fromkeys(used, _limit_bytes(config.vram_limit, "vram_limit"))
    return placement, caps


def _limit_bytes(value: Any, field_name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{field_name}: must be GiB >= 0 (0: stream every group), got {value!r}")
    return int(value * GIB) or None


def _entries(model: torch.nn.Module, config: VramConfig, source: WeightSource | None,
             keep_fp32: Sequence[str] | None) -> dict[int, Entry]:
    """One Entry per unique parameter, checked against the files."""
    names: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(key)
    entries: dict[int, Entry] = {}
    problems: list[str] = []
    plain = fp8_plain()
    for module_name, module in model.named_modules():
        for param in module._parameters.values():
            if param is None or id(param) in entries:
                continue
            keys = names[id(param)]
            info = None
            if source is not None:
                found = next((k for k in keys if k in source), None)
                if found is None:
                    problems.append(f"missing key {keys[0]!r}")
                    continue
                info = source.info(found)
                if tuple(info.shape) != tuple(param.shape):
                    problems.append(f"shape mismatch for {found!r}: file {tuple(info.shape)} "
                                    f"in {info.file.path.name}, model {tuple(param.shape)}")
                    continue
                if not info.dtype.is_floating_point and param.dtype.is_floating_point:
                    problems.append(f"{found!r} is {info.dtype} in {info.file.path.name}, model expects floats")
                    continue
            if not param.dtype.is_floating_point:
                problems.append(f"parameter {keys[0]!r} has non-float dtype {param.dtype}; not supported")
                continue
            entry_config = tensor_config(model, module, config, module_name, keys[0], keep_fp32)
            entry = Entry(keys, tuple(param.shape), entry_config, info,
                          make_placeholder(param.shape, entry_config.computation))
            if plain:
                entry.scales.update(dict.fromkeys(entry.fp8, 1.0))
            if info is not None and info.dtype in FP8_MAX:
                # A scaled file's scale, or 1.0: a plain fp8 file is its values as they are.
                entry.scales[info.dtype] = source.scales().get(found, 1.0)
            entries[id(param)] = entry
    if problems:
        where = f" in {source.describe()}" if source is not None else ""
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"weights do not match {type(model).__name__}{where}: {shown}")
    if source is not None:
        unused = set(source.tensors) - {k for e in entries.values() for k in e.keys} \
            - set(model.state_dict(keep_vars=True).keys())
        if unused:
            log.info("%s: %d key(s) in the weights are not in the model (e.g. %s)", type(model).__name__,
                     len(unused), sorted(unused)[:3])
    return entries


def _make_group(record: ManagedModel, plan: GroupPlan, entries: dict[int, Entry]) -> tuple[Group, list]:
    group_entries: list[Entry] = []
    index: dict[int, int] = {}
    installs = []
    params = []
    for _, module in plan.members:
        for param_name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in index:
                index[id(param)] = len(group_entries)
                group_entries.append(entries[id(param)])
                params.append(param)
            installs.append((module._parameters, param_name, index[id(param)]))
    group = Group(record, plan.name, [m for _, m in plan.roots], group_entries, installs,
                  [n for n, _ in plan.members])
    group.block = plan.block
    group.part = next(part for part in record.parts if part.device == group.device)
    return group, params


def _place(plans: list[GroupPlan], device_map: Mapping[str, torch.device], home: torch.device) -> list[torch.device]:
    """The device of each group: the ``device_map`` entry naming its root module or the
    closest module above it (keys are module names, as ``named_modules`` gives them), else
    the model's own computation device."""
    used: set[str] = set()
    out = []
    for plan in plans:
        device = home
        for root, _ in plan.roots:
            parts = root.split(".")
            for n in range(len(parts), -1, -1):
                key = ".".join(parts[:n])
                if key in device_map:
                    device = device_map[key]
                    used.add(key)
                    break
        out.append(device)
    unused = [key for key in device_map if key not in used]
    if unused:
        raise ValueError(f"device_map: {', '.join(map(repr, unused[:5]))} name(s) no group's module or a module "
                         f"above one; use module names as model.named_modules() gives them, e.g. "
                         f"{plans[len(plans) // 2].roots[0][0]!r}")
    return out


def _move_entries(plan: GroupPlan, entries: dict[int, Entry], device: torch.device) -> None:
    """The parameters of one group computing on ``device`` instead of the model's device."""
    for _, module in plan.members:
        for param in module._parameters.values():
            if param is not None:
                entry = entries[id(param)]
                entry.config = entry.config.on_device(device)
                entry.placeholder = make_placeholder(entry.shape, entry.config.computation)


def _expected_need(group: Group, state: str) -> int:
    """What a forward of the group adds on the device with its base at ``state``'s placement."""
    placement, dtypes = dtypes_at(group, state)
    if placement.is_disk:
        dtypes = tuple(e.info.dtype for e in group.entries)
    casts = sum(e.numel * p.itemsize for e, d, p in zip(group.entries, dtypes, group.preparing) if d != p)
    compute = sum(e.numel * c.itemsize for e, p, c in zip(group.entries, group.preparing, group.computing) if p != c)
    on_device = not placement.is_disk and placement.device == group.device
    moved = 0 if on_device else sum(e.numel * d.itemsize for e, d in zip(group.entries, dtypes))
    return moved + casts + compute


def _count_pin_failure() -> None:
    manager = get_manager()
    with manager.lock:
        manager.counters.pin_failures += 1


def _bind(record: ManagedModel, model: torch.nn.Module, config: VramConfig, source: WeightSource | None,
          keep_fp32: Sequence[str] | None, device_map: Mapping[str, torch.device] | None = None,
          caps: Mapping[str, int | None] | None = None, io_device: torch.device | None = None) -> None:
    entries = _entries(model, config, source, keep_fp32)
    plans = plan_groups(model, config.granularity)
    module_devices: dict[str, torch.device] = {}
    if device_map:
        devices = _place(plans, device_map, config.computation.device)
        manager = get_manager()
        for device in dict.fromkeys(devices):
            if device != config.computation.device:
                key = device_name(device)
                part = Part(record, device, (caps or {}).get(key), f"{record.name}@{key}")
                part.name = manager.register(part)
                record.parts.append(part)
        for plan, device in zip(plans, devices):
            if device != config.computation.device:
                _move_entries(plan, entries, device)
            module_devices.update(dict.fromkeys((name for name, _ in plan.members), device))
    if device_map or (io_device is not None and io_device != config.computation.device):
        record.crossings = Crossings(record, io_device or config.computation.device)
    made = [_make_group(record, plan, entries) for plan in plans]
    if any(part.cap_bytes for part in record.parts):
        # A block larger than the cap streams leaf by leaf.
        resplit = []
        for plan, (group, params) in zip(plans, made):
            need = max(_expected_need(group, "offload"), _expected_need(group, "onload"))
            cap = group.part.cap_bytes
            if cap and plan.block and len(plan.members) > 1 and need > cap:
                log.info("%s: block %r needs %.4f GiB, more than vram_limit=%.4g GiB on %s: streamed leaf by leaf",
                         record.name, plan.name, need / GIB, cap / GIB, group.part.budget_key)
                resplit.extend(_make_group(record, leaf, entries) for leaf in split(plan))
            else:
                resplit.append((group, params))
        made = resplit
    record.groups = [group for group, _ in made]
    for part in record.parts:
        part.part_groups = [group for group in record.groups if group.part is part]
    record.entries = list(entries.values())
    if source is not None:
        largest = max(g.file_layout.nbytes for g in record.groups) if record.groups else 0
        record.pool = ArenaPool(largest, pin=record.pinner, keep=config.prefetch + 1, wait=record.mover.host_done,
                                on_pin_failure=_count_pin_failure)
        if config.uses_disk and config.ram_cache_gib:
            record.cache = RamCache(record.name, int(config.ram_cache_gib * GIB), record.pinner)

    if record.host_computes:
        record.prep_pool = ArenaPool(max((g.prep_layout.nbytes for g in record.groups), default=0),
                                     pin=False, keep=config.prefetch + 1, wait=record.mover.host_done)

    _bind_buffers(model, config, source, module_devices)
    for part in record.parts:
        largest_need = max((max(_expected_need(g, "offload"), _expected_need(g, "onload")) for g in part.part_groups),
                           default=0)
        part.window_bytes = largest_need * (config.prefetch + 1)

    # Bases at the offload placement, one group at a time so peak RAM stays one group above
    # the result; the model's own tensors go as soon as the placeholders are in.
    for group, params in made:
        use = None if source is not None or any(p.device.type == "meta" for p in params) else params
        record.rest(group, "offload", use)
        del params[:]
    record.drop_scratch()
    record.measure_all()
    record.check_caps()

    record.schedule = Schedule(record.groups, config.prefetch)
    record.hooks = [GroupHooks(group, record.schedule, record.crossings) for group in record.groups]
    for group in record.groups:
        for module_name in group.modules:
            module = model.get_submodule(module_name)
            module._apply = types.MethodType(_guarded_apply, module)
            record._handles.append(module.register_state_dict_post_hook(_state_dict_hook(record, group, module)))
    record._handles += [
        model.register_forward_pre_hook(record._run_start, prepend=True, with_kwargs=True),
        model.register_forward_hook(record._run_end, always_call=True, with_kwargs=True),
    ]
    if record.crossings is not None:  # the output comes back to the model's own device, before the report
        record._handles.append(model.register_forward_hook(record.crossings.returning, prepend=True))
    object.__setattr__(model, _MANAGED_ATTR, record)
    summary = record.summary()
    log.info("%s under VRAM management: %d groups (%d blocks), %s; computation %s, vram_limit %s GiB, prefetch %d",
             record.name, summary["groups"], summary["blocks"],
             ", ".join(f"{n / GIB:.3f} GiB on {where}" for where, n in summary["stored_bytes"].items()),
             config.computation, config.vram_limit, config.prefetch)


def _bind_buffers(model: torch.nn.Module, config: VramConfig, source: WeightSource | None,
                  module_devices: Mapping[str, torch.device] | None = None) -> None:
    """Buffers stay plain tensors, moved to the computation device (their group's, in a
    split model) in the dtype the model built them with (libraries differ on which buffers
    stay float32, e.g. rotary tables, so the builder decides; ``model.to(dtype)`` still
    converts them). Persistent buffers present in the weights take the file's values."""
    for module_name, module in model.named_modules():
        device = (module_devices or {}).get(module_name, config.computation.device)
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            key = f"{module_name}.{buffer_name}" if module_name else buffer_name
            persistent = buffer_name not in module._non_persistent_buffers_set
            if source is not None and persistent and key in source:
                value = source.read(key).to(device=device, dtype=buffer.dtype)
            elif buffer.device.type == "meta":
                raise ValueError(f"buffer {key!r} is on the meta device and not in the weights; build the "
                                 f"model inside vram.empty_weights(), which keeps buffers real")
            else:
                value = buffer.to(device=device)
            module._buffers[buffer_name] = value


def _state_dict_hook(record: ManagedModel, group: Group, module: torch.nn.Module):
    where = [(name, index) for params, name, index in group.installs if params is module._parameters]

    def hook(module, state_dict, prefix, local_metadata):
        for param_name, index in where:
            key = prefix + param_name
            if key in state_dict:
                state_dict[key] = record.host_tensor(group, index)
        return None
    return hook


def managed(model: torch.nn.Module) -> ManagedModel:
    """The record of a managed model; ValueError if it is not managed."""
    record = getattr(model, _MANAGED_ATTR, None)
    if record is None:
        raise ValueError(f"{type(model).__name__} is not under VRAM management")
    return record


def is_managed(model: torch.nn.Module) -> bool:
    return getattr(model, _MANAGED_ATTR, None) is not None


@contextlib.contextmanager
def track(model: torch.nn.Module):
    """Report peak memory against the cap for work that does not go through
    ``model.forward`` (``vae.decode(...)``, ``text_encoder.generate(...)``)."""
    record = managed(model)
    record._run_start(model, (), {})
    try:
        yield record
    finally:
        record._run_end(model, (), {}, None)


def onload(model: torch.nn.Module) -> None:
    """The model is about to be used: bring its weights to the onload placement."""
    managed(model).set_state(ModelState.ONLOAD)


def offload(model: torch.nn.Module) -> None:
    """The model will not be used for a while: staged copies freed, weights at the offload
    placement (host arenas are kept: nothing is copied back)."""
    managed(model).set_state(ModelState.OFFLOAD)


def _teardown(record: ManagedModel) -> None:
    """Free every copy the core holds for a model: reads in flight waited for first."""
    for group in record.groups:
        group.settle()
    for part in record.parts:
        part.mover.synchronize()
    with get_manager().lock:
        for group in record.groups:
            group.free()
    if record.cache is not None:
        record.cache.clear()
    for pool in (record.pool, record.prep_pool):
        if pool is not None:
            pool.close()
    record.drop_scratch()


def _unhook(model: torch.nn.Module, what: str) -> ManagedModel:
    """The first half of leaving management: no forward running, hooks off."""
    record = managed(model)
    with get_manager().lock:
        if any(group.users for group in record.groups):
            raise RuntimeError(f"{record.name}: cannot {what} during a forward")
    for group in record.groups:
        group.settle()
    for handle in record._handles:
        handle.remove()
    for hooks in record.hooks:
        hooks.remove()
    return record


def _forget(model: torch.nn.Module, record: ManagedModel) -> None:
    manager = get_manager()
    for part in reversed(record.parts):
        manager.unregister(part)
    object.__delattr__(model, _MANAGED_ATTR)


def release(model: torch.nn.Module) -> None:
    """Forget ``model``: free every copy the core holds for it (RAM, device, cache), close
    its weight files and unregister it. The model keeps its placeholders and cannot run
    again; use this when discarding a model, ``disable_vram_management`` to keep it."""
    record = _unhook(model, "release")
    for group in record.groups:  # static groups had their real tensors installed
        group.show_placeholders()
        for entry in group.entries:
            entry.resident = None
    _teardown(record)
    _forget(model, record)
    if record.source is not None:
        record.source.close()


def disable_vram_management(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` a plain model again, with real Parameters at the computation placement."""
    record = _unhook(model, "disable management")
    for group in record.groups:
        tensors = group.base_tensors()
        values = []
        for index, entry in enumerate(group.entries):
            value = tensors[index] if tensors is not None else record.source.read_info(entry.info)
            computation = entry.config.computation
            plain = cast(value.to(device=computation.device), computation.dtype,
                         entry.factor(value.dtype, computation.dtype))
            value = plain.clone() if plain.data_ptr() == value.data_ptr() else plain  # never the core's memory
            values.append(torch.nn.Parameter(value, requires_grad=False))
        group.install(values)
        for module_name in group.modules:
            module = model.get_submodule(module_name)
            module.__dict__.pop("_apply", None)
    _teardown(record)
    _forget(model, record)
    return model
