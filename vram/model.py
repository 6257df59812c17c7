"""A model under management: building it, the per-model states, the schedule.

``enable_vram_management`` turns every module that holds parameters into a managed layer
(see layers.py) and registers the model with the process's manager. The pipeline switches the
model between offload and onload; the core switches layers between preparing and computation,
learning the execution order on the first forward (each layer remembers which layer ran after
it) so that the next ``prefetch`` layers are staged while one computes.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import threading
import time
import types
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Mapping, Sequence

import torch

from .config import FP8_DTYPES, GIB, Placement, VramConfig
from .layers import ManagedLayer, Slot, VramLimitError, tier_key
from .manager import RunReport, get_manager
from .meta import has_meta_parameters
from .transfer import Mover, Staged, submit, trim_heap
from .weights import WeightSource

log = logging.getLogger(__name__)

_MANAGED_ATTR = "_vram_managed"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class ModelState(enum.Enum):
    OFFLOAD = "offload"
    ONLOAD = "onload"


class ManagedModel:
    """The core's record of one model. Reach it with ``vram.managed(model)``."""

    def __init__(self, module: torch.nn.Module, config: VramConfig, source: WeightSource | None,
                 name: str):
        self.module = module
        self.config = config
        self.source = source
        self.name = name
        self.state = ModelState.OFFLOAD
        self.mover = Mover(config.computation.device)
        self.layers: list[ManagedLayer] = []
        self.slots: list[Slot] = []
        self.successor: dict[ManagedLayer, ManagedLayer] = {}
        self._last_layer: ManagedLayer | None = None
        self._order_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._runs = 0
        self._run_marks: dict[str, Any] = {}
        self._cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._cache_limit = int(config.ram_cache_gib * GIB)
        self._handles: list[Any] = []
        self._scratch: torch.Tensor | None = None
        self.budget_key = tier_key(config.budget_device)  # the ledger's name for the capped device
        limit = config.vram_limit
        self.cap_bytes = None if not limit else int(limit * GIB)
        self.max_layer_need = 0
        self.window_bytes = 0
        self.runs_done = 0  # completed top-level forwards (or vram.track blocks)
        self.streaming_bytes = 0  # charged for copies that are not kept: in flight or in use
        self.kept_bytes = 0  # charged for copies kept between forwards (what eviction can free)
        self.makes_copies = False  # forwards allocate staged or cast copies (or read from disk)

    # -- policy -----------------------------------------------------------------------------

    def should_keep(self, slot: Slot) -> bool:
        """Whether a staged copy stays after its forward."""
        limit = self.config.vram_limit
        if limit == 0:
            return False
        if limit is None:
            # Without a cap, a CPU that computes from disk keeps nothing: the point of the
            # disk tier is RAM, and the RAM cache is the knob for keeping weights there.
            return not (slot.base is None and slot.config.preparing.device.type == "cpu")
        if not self.runs_done:
            return False  # the first forward streams: its activation peak is not known yet
        # Kept, this copy stops being part of the streaming window; the window (whatever of
        # it is not in flight now) must still fit beside everything kept. The running model
        # comes first: idle models' kept copies make way for it.
        headroom = max(0, self.window_bytes - self.streaming_bytes + slot.prepared_charged)
        return get_manager().make_room(self.budget_key, 0, self, headroom=headroom, own=False)

    def _measure_needs(self) -> None:
        for layer in self.layers:
            layer.need = sum(s.prepared_nbytes + s.compute_nbytes for s in layer.slots)
        self.max_layer_need = max((layer.need for layer in self.layers), default=0)
        self.window_bytes = self.max_layer_need * (self.config.prefetch + 1)
        self.makes_copies = self.max_layer_need > 0 or any(slot.base is None for slot in self.slots)

    def check_cap(self) -> None:
        """A cap that cannot hold the largest layer (or a resident base) fails before any work."""
        if not self.cap_bytes:
            return
        largest = max(self.layers, key=lambda layer: layer.need, default=None)
        resident = sum(s.nbytes(s.base.dtype) for s in self.slots
                       if s.base is not None and s.base_ledger == self.budget_key)
        if largest is not None and self.max_layer_need + resident > self.cap_bytes:
            what = (f"layer {largest.name!r} needs {self.max_layer_need / GIB:.4f} GiB"
                    + (f" on top of {resident / GIB:.4f} GiB of weights resident there" if resident else ""))
            raise ValueError(f"vram_limit={self.config.vram_limit} GiB is too small for {self.name}: {what} "
                             f"on {self.config.budget_device}. Raise vram_limit, use an fp8 preparing "
                             f"dtype, or vram_limit=0 to stream every layer with no cap.")

    # -- weights from disk -------------------------------------------------------------------
    def scratch(self) -> torch.Tensor:
        """A uint8 buffer as large as the largest tensor in the files, for bulk conversions
        (model-level state changes, one thread at a time); freed by ``drop_scratch``."""
        if self._scratch is None:
            largest = max((info.nbytes for info in self.source.tensors.values()), default=0)
            self._scratch = torch.empty(largest, dtype=torch.uint8)
        return self._scratch

    def drop_scratch(self) -> None:
        if self._scratch is not None:
            self._scratch = None
            trim_heap()

    def read_weight(self, slot: Slot, *, stream: bool = False, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """A slot's weights from its file, in the file's dtype.

        ``stream``: for one forward, through the RAM cache when one is configured, into
        pinned memory on CUDA (for asynchronous copies). ``scratch``: into that reused
        buffer. Otherwise: into a new RAM tensor of its own.

        Reads copy (``preadv``) rather than map the file: torch's CPU kernels may round
        differently on weights that are not 64-byte aligned, and tensors inside a
        .safetensors file rarely are, so mapped weights would not be bit-identical.
        """
        key = slot.info.key
        caching = stream and self._cache_limit and slot.info.nbytes <= self._cache_limit
        if caching:
            with self._cache_lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    return cached
        pin = stream and self.mover.is_cuda and self.config.pin_memory
        tensor = self.source.read_info(slot.info, pin_memory=pin, out=scratch)
        manager = get_manager()
        with manager.lock:
            manager.counters.bytes_read_from_disk += slot.info.nbytes
        if caching:
            self._cache_put(key, tensor)
        return tensor

    def _cache_put(self, key: str, tensor: torch.Tensor) -> None:
        manager = get_manager()
        nbytes = tensor.numel() * tensor.element_size()
        with self._cache_lock, manager.lock:
            while self._cache and self._cache_bytes + nbytes > self._cache_limit:
                old_key, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.numel() * old.element_size()
                manager.refund("host", self.name, "(ram cache)", "cache", old.numel() * old.element_size())
            self._cache[key] = tensor
            self._cache_bytes += nbytes
            manager.charge("host", self.name, "(ram cache)", "cache", nbytes)

    def clear_cache(self) -> None:
        manager = get_manager()
        with self._cache_lock, manager.lock:
            if self._cache_bytes:
                manager.refund("host", self.name, "(ram cache)", "cache", self._cache_bytes)
            self._cache.clear()
            self._cache_bytes = 0

    # -- the schedule ---------------------------------------------------------------------------
    def before_layer(self, layer: ManagedLayer) -> None:
        """Learn the order (this layer follows the last one) and prefetch what comes next."""
        with self._order_lock:
            previous, self._last_layer = self._last_layer, layer
            if previous is not None and previous is not layer:
                self.successor[previous] = layer
        # Look ahead `prefetch` layers that carry weight; small ones (norms, biases-only
        # modules) ride along without using up the window, up to 4x the walk.
        upcoming, counted = layer, 0
        for _ in range(4 * self.config.prefetch):
            if counted >= self.config.prefetch:
                break
            upcoming = self.successor.get(upcoming)
            if upcoming is None or upcoming is layer:
                break
            if upcoming.static:
                continue
            if upcoming.need * 8 >= self.max_layer_need:
                counted += 1
            if any(slot.prepared is None and slot.pending is None for slot in upcoming.slots):
                self.prefetch(upcoming)

    def prefetch(self, layer: ManagedLayer) -> None:
        """Stage a layer's weights in the background, as far as the budget has room beside
        the layer computing now: one task for the whole layer."""
        manager = get_manager()
        work: list[tuple[Slot, Future]] = []
        with manager.lock:
            for slot in layer.slots:
                if slot.prepared_is_base or slot.prepared is not None or slot.pending is not None:
                    continue
                need = slot.prepared_nbytes
                if not manager.make_room(self.budget_key, need, self, headroom=self.max_layer_need, own=False):
                    break
                manager.charge(self.budget_key, self.name, slot.layer, "prepared", need)
                slot.prepared_charged = need
                self.streaming_bytes += need
                slot.pending = Future()
                work.append((slot, slot.pending))
        if not work:
            return
        if self.mover.is_cuda and all(slot.base is not None for slot, _ in work):
            self._stage_all(work)  # asynchronous copies on the side stream: nothing to wait for here
        else:
            submit(self._stage_all, work)  # disk reads and CPU casts overlap compute

    @staticmethod
    def _stage_all(work: list[tuple[Slot, Future]]) -> None:
        for slot, future in work:
            ManagedModel._stage_into(slot, future)

    @staticmethod
    def _stage_into(slot: Slot, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(slot.stage())
        except BaseException as error:  # handed to whoever waits for the weights
            future.set_exception(error)

    def acquire(self, slot: Slot) -> tuple[torch.Tensor, int]:
        """The slot's computation tensor, and the bytes charged for it."""
        manager = get_manager()
        counters = manager.counters
        future: Future | None = None
        own: Future | None = None
        with manager.lock:
            slot.users += 1
            slot.last_used = manager.tick()
            if slot.prepared is not None:
                if slot.prepared_charged:
                    counters.prefetch_hits += 1
            elif slot.pending is not None:
                future = slot.pending
                counters.prefetch_hits += 1
            elif slot.prepared_is_base:
                slot.prepared = Staged(slot.base)
            else:
                counters.prefetch_misses += 1
                need = slot.prepared_nbytes
                try:
                    self._reserve(need)
                except VramLimitError:
                    slot.users -= 1
                    raise
                manager.charge(self.budget_key, self.name, slot.layer, "prepared", need)
                slot.prepared_charged = need
                self.streaming_bytes += need
                future = own = Future()
                slot.pending = future
        if own is not None:
            self._stage_into(slot, own)
        if future is not None:
            started = time.perf_counter()
            try:
                staged = future.result()
            except BaseException:
                with manager.lock:
                    slot.users -= 1
                    if slot.pending is future:
                        slot.pending = None
                        slot.drop_prepared()
                raise
            waited = time.perf_counter() - started
            with manager.lock:
                counters.transfer_wait_s += waited
                if slot.pending is future:
                    slot.pending = None
                    slot.prepared = staged
        tensor = slot.prepared.ready_for(self.config.computation.device)
        charged = slot.compute_nbytes
        if charged:
            with manager.lock:
                try:
                    self._reserve(charged)
                except VramLimitError:
                    slot.users -= 1
                    raise
                manager.charge(self.budget_key, self.name, slot.layer, "computation", charged)
                self.streaming_bytes += charged
            tensor = tensor.to(device=self.config.computation.device, dtype=slot.config.computation.dtype)
        return tensor, charged

    def release(self, slot: Slot, tensor: torch.Tensor, charged: int) -> None:
        manager = get_manager()
        with manager.lock:
            if charged:
                manager.refund(self.budget_key, self.name, slot.layer, "computation", charged)
                self.streaming_bytes -= charged
            slot.users -= 1
            if slot.users == 0 and slot.prepared_charged and not slot.kept:
                if self.should_keep(slot):
                    slot.kept = True
                    self.streaming_bytes -= slot.prepared_charged
                    self.kept_bytes += slot.prepared_charged
                else:
                    slot.drop_prepared()

    def _reserve(self, nbytes: int) -> None:
        """Make room for a copy the current forward needs (caller holds the manager lock).

        Evicts idle copies, then drops prefetches nobody uses yet; while another forward on
        the device holds what is missing, waits for it to release (up to a minute).
        """
        manager = get_manager()
        if self.config.vram_limit == 0:
            return
        deadline = time.monotonic() + 60.0
        while True:
            if manager.make_room(self.budget_key, nbytes, self):
                return
            if manager.reclaim_prefetches(self.budget_key):
                continue
            if not manager.busy(self.budget_key, besides=self) or time.monotonic() > deadline:
                break
            manager.room.wait(0.05)
        budget = manager.budget(self.budget_key)
        raise VramLimitError(
            f"{self.name}: {nbytes / GIB:.4f} GiB more on {self.budget_key} would pass its budget "
            f"({manager.resident_bytes(self.budget_key) / GIB:.4f} GiB held by the core, budget "
            f"{(budget or 0) / GIB:.4f} GiB after {manager.activation_reserve(self.budget_key) / GIB:.4f} GiB "
            f"kept for activations). Raise vram_limit or lower the resolution/batch.")

    # -- run reports -----------------------------------------------------------------------------
    def _run_start(self, module, args):
        with self._run_lock:
            self._runs += 1
            if self._runs > 1:
                return None
        device = self.config.computation.device
        manager = get_manager()
        manager.reset_peak(self.budget_key)
        marks = {"t0": time.perf_counter(), "ledger0": manager.resident_bytes(self.budget_key)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            marks["alloc0"] = torch.cuda.memory_allocated(device)
        self._run_marks = marks
        return None

    def _run_end(self, module, args, output):
        with self._run_lock:
            if self._runs == 0:
                return None
            self._runs -= 1
            if self._runs:
                return None
        device = self.config.computation.device
        manager = get_manager()
        marks = self._run_marks
        ledger_peak = manager.peak_bytes(self.budget_key)
        peak_reserved = activations = None
        if device.type == "cuda":
            peak_reserved = torch.cuda.max_memory_reserved(device)
            outside_at_start = marks["alloc0"] - marks["ledger0"]
            activations = max(0, torch.cuda.max_memory_allocated(device) - outside_at_start - ledger_peak)
            manager.note_activations(self.budget_key, activations)
        if device.type == "cpu" and self.makes_copies:
            # Per-layer copies below glibc's mmap threshold come and go from the heap; hand
            # what they freed back after each forward so RAM does not creep up run by run.
            trim_heap()
        self.runs_done += 1
        manager.add_report(RunReport(self.name, str(device), self.cap_bytes, peak_reserved, ledger_peak,
                                     activations, time.perf_counter() - marks["t0"]))
        return None

    # -- model-level states -----------------------------------------------------------------------
    def set_state(self, state: ModelState) -> None:
        manager = get_manager()
        with manager.lock:
            if any(slot.users for slot in self.slots):
                raise RuntimeError(f"{self.name}: cannot switch to {state.value} during a forward")
            for slot in self.slots:
                slot.clear()

        def fits_on(target: Placement):
            def fits(slot: Slot, nbytes: int) -> bool:
                if tier_key(target.device) != self.budget_key or self.cap_bytes is None:
                    return True
                with manager.lock:
                    return manager.make_room(self.budget_key, nbytes, self, headroom=self.window_bytes)
            return fits

        for slot in self.slots:
            # Each slot's own placements: layers kept in float32 or out of fp8 keep that dtype.
            target = slot.config.onload if state is ModelState.ONLOAD else slot.config.offload
            slot.set_base(target, fits=fits_on(target))
        self.drop_scratch()
        self.state = state
        for layer in self.layers:
            layer.refresh_static()
        self._measure_needs()

    def summary(self) -> dict[str, Any]:
        """What planners and UIs need to know about this model, as plain data (bytes)."""
        stored: dict[str, int] = {}
        for slot in self.slots:
            dtype = slot.info.dtype if slot.base is None else slot.base.dtype
            key = "disk" if slot.base is None else str(slot.base_placement)
            stored[key] = stored.get(key, 0) + slot.nbytes(dtype)
        return {
            "config": {k: str(v) if v is not None else None for k, v in self.config.to_dict().items()},
            "layers": len(self.layers), "parameters": sum(slot.numel for slot in self.slots),
            "stored_bytes": stored, "largest_layer_bytes": self.max_layer_need,
            "window_bytes": self.window_bytes, "cap_bytes": self.cap_bytes, "runs": self.runs_done,
        }

    def layer_states(self) -> dict[str, str]:
        return {layer.name: layer.state() for layer in self.layers}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes this model holds now, per ledger device."""
        out: dict[str, int] = {}
        for (device, model, _layer, _kind), nbytes in get_manager().ledger().items():
            if model == self.name:
                out[device] = out.get(device, 0) + nbytes
        return out

    def host_tensor(self, slot: Slot) -> torch.Tensor:
        """The stored weights of a slot, for state_dict(): the base copy, or read from disk."""
        return slot.base if slot.base is not None else slot.read()


# ---------------------------------------------------------------------------------------------
# Building a managed model
# ---------------------------------------------------------------------------------------------

# Layers whose weights stay in the computation dtype under fp8/half storage, whatever the
# model says: normalisations, embeddings of positions/patches and the outermost projections
# are tiny and sensitive (the same defaults as diffusers' layerwise casting).
DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


def _skip_casting(model: torch.nn.Module, module: torch.nn.Module, module_name: str, param_key: str,
                  keep_fp32: Sequence[str] | None = None):
    """The dtype a parameter keeps instead of low-precision storage, from the model's hints.

    ``keep_fp32`` (name components; by default the model's ``_keep_in_fp32_modules``, as
    diffusers applies it) keep float32; ``_skip_layerwise_casting_patterns`` (regexes over
    module names), the defaults above and normalisation layers keep the computation dtype.
    None: the config's dtypes apply.
    """
    if keep_fp32 is None:
        keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    return casting_rule(module_name, param_key, type(module).__name__, keep_fp32,
                        getattr(model, "_skip_layerwise_casting_patterns", None) or ())


def casting_rule(module_name: str, param_key: str, module_type: str, keep_fp32: Sequence[str],
                 skip_patterns: Sequence[str]):
    """The rule of ``_skip_casting`` on names alone (planners use it on checkpoint keys):
    torch.float32, "computation" (stays in the computation dtype) or None (the config's)."""
    if any(name in param_key.split(".") for name in keep_fp32):
        return torch.float32
    patterns = DEFAULT_SKIP_PATTERNS + tuple(skip_patterns)
    if "Norm" in module_type or any(re.search(p, module_name) for p in patterns):
        return "computation"
    return None


def _slot_config(model: torch.nn.Module, module: torch.nn.Module, config: VramConfig, module_name: str,
                 key: str, keep_fp32: Sequence[str] | None = None) -> VramConfig:
    rule = _skip_casting(model, module, module_name, key, keep_fp32)
    if rule is None:
        return config
    low = [p for p in (config.offload, config.onload, config.preparing, config.computation)
           if not p.is_disk and (p.dtype in FP8_DTYPES or p.dtype in _HALF_DTYPES)]
    if rule == torch.float32:
        return config.with_dtype(torch.float32) if low else config
    if any(not p.is_disk and p.dtype != config.computation.dtype
           for p in (config.offload, config.onload, config.preparing)):
        return config.with_dtype(config.computation.dtype)
    return config


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
                           vram_limit: float | None = None,
                           weights: str | os.PathLike | Sequence[str | os.PathLike] | WeightSource | None = None,
                           name: str | None = None,
                           keep_fp32: Sequence[str] | None = None) -> ManagedModel:
    """Put ``model`` under VRAM management and return its record.

    ``vram_config`` is DiffSynth's 8-key dict (plus optional extras) or a ``VramConfig``.
    ``vram_limit`` (GiB) caps this process's peak memory on the computation device; it
    overrides the config's. ``weights`` (.safetensors file, list, or folder) is required when
    a state is "disk" or when the model was built with ``empty_weights()``; its keys must
    match ``model.state_dict()``. ``keep_fp32`` names modules (by name component) whose
    weights stay float32 under a low-precision computation dtype; by default the model's
    ``_keep_in_fp32_modules`` (diffusers' rule; transformers applies that list to float16
    only, so its loaders pass their own). The model starts in the offload state; call
    ``vram.onload(model)`` before the phase that uses it.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _MANAGED_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} is already under VRAM management; "
                         f"call vram.disable_vram_management(model) first")
    config = VramConfig.coerce(vram_config, vram_limit)
    source = weights if isinstance(weights, WeightSource) or weights is None else WeightSource(weights)
    if config.uses_disk and source is None:
        raise ValueError("vram_config: offload/onload device 'disk' needs weights= (the model's .safetensors files)")
    if source is None and has_meta_parameters(model):
        raise ValueError("model has parameters on the meta device; pass weights= to bind them to their files")

    manager = get_manager()
    managed = ManagedModel(model, config, source, name or type(model).__name__)
    managed.name = manager.register(managed)
    try:
        _bind(managed, model, config, source, keep_fp32)
    except BaseException:
        manager.unregister(managed)
        raise
    return managed


def _bind(managed: ManagedModel, model: torch.nn.Module, config: VramConfig, source: WeightSource | None,
          keep_fp32: Sequence[str] | None) -> None:
    # Every name each parameter goes by (tied parameters have several).
    names: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(key)

    plan: list[tuple[str, torch.nn.Module, list[tuple[str, torch.nn.Parameter]]]] = []
    slots_by_param: dict[int, Slot] = {}
    problems: list[str] = []
    for module_name, module in model.named_modules():
        direct = [(n, p) for n, p in module._parameters.items() if p is not None]
        if not direct:
            continue
        plan.append((module_name, module, direct))
        for param_name, param in direct:
            if id(param) in slots_by_param:
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
            slot_config = _slot_config(model, module, config, module_name, keys[0], keep_fp32)
            slots_by_param[id(param)] = Slot(managed, module_name, keys, param.shape, slot_config, info)
    if problems:
        where = f" in {source.describe()}" if source is not None else ""
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"weights do not match {type(model).__name__}{where}: {shown}")
    if source is not None:
        unused = set(source.tensors) - {k for slot in slots_by_param.values() for k in slot.keys} \
            - set(model.state_dict(keep_vars=True).keys())
        if unused:
            log.info("%s: %d key(s) in the weights are not in the model (e.g. %s)", managed.name,
                     len(unused), sorted(unused)[:3])

    _bind_buffers(model, config, source)

    # Bases at the offload placement, one layer at a time so peak RAM stays one layer above
    # the result; the model's own tensors are dropped as soon as their placeholders go in.
    initialized: dict[int, Slot] = {}
    try:
        for module_name, module, direct in plan:
            for param_name, param in direct:
                slot = slots_by_param[id(param)]
                if id(slot) not in initialized:
                    initialized[id(slot)] = slot
                    _initial_base(slot, param, source)
    except BaseException:
        with get_manager().lock:  # a failed bind leaves nothing charged behind
            for slot in initialized.values():
                slot._drop_base()
        raise
    for module_name, module, direct in plan:
        entries = []
        for param_name, param in direct:
            entries.append((param_name, slots_by_param[id(param)]))
        layer = ManagedLayer(managed, module_name, module, entries)
        layer.show_placeholders()
        managed.layers.append(layer)
        module._apply = types.MethodType(_guarded_apply, module)
    managed.slots = list(dict.fromkeys(slots_by_param.values()))
    managed.drop_scratch()
    for layer in managed.layers:
        layer.refresh_static()
    managed._measure_needs()
    managed.check_cap()

    managed._handles = [
        model.register_forward_pre_hook(managed._run_start, prepend=True),
        model.register_forward_hook(managed._run_end, always_call=True),
    ]
    for layer in managed.layers:
        managed._handles.append(layer.module.register_state_dict_post_hook(_state_dict_hook(managed, layer)))
    object.__setattr__(model, _MANAGED_ATTR, managed)
    summary = managed.summary()
    log.info("%s under VRAM management: %d layers, %s; computation %s, vram_limit %s GiB, prefetch %d",
             managed.name, summary["layers"],
             ", ".join(f"{n / GIB:.3f} GiB on {where}" for where, n in summary["stored_bytes"].items()),
             config.computation, config.vram_limit, config.prefetch)


def _initial_base(slot: Slot, param: torch.nn.Parameter, source: WeightSource | None) -> None:
    placement = slot.config.offload
    if placement.is_disk:
        slot.base_placement = placement
        return
    if source is not None or param.device.type == "meta":
        slot.set_base(placement)
        return
    data = param.detach()
    if data.device == placement.device and data.dtype == placement.dtype:
        slot.adopt_base(data, placement)
    else:
        slot.adopt_base(data.to(device=placement.device, dtype=placement.dtype), placement)


def _bind_buffers(model: torch.nn.Module, config: VramConfig, source: WeightSource | None) -> None:
    """Buffers stay plain tensors, moved to the computation device in the dtype the model
    built them with (libraries differ on which buffers stay float32, e.g. rotary tables, so
    the builder decides; ``model.to(dtype)`` still converts them). Persistent buffers present
    in the weights take the file's values."""
    device = config.computation.device
    for module_name, module in model.named_modules():
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


def _state_dict_hook(managed: ManagedModel, layer: ManagedLayer):
    def hook(module, state_dict, prefix, local_metadata):
        for param_name, slot in layer.entries:
            key = prefix + param_name
            if key in state_dict:
                state_dict[key] = managed.host_tensor(slot)
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
    record._run_start(model, ())
    try:
        yield record
    finally:
        record._run_end(model, (), None)


def onload(model: torch.nn.Module) -> None:
    """The model is about to be used: bring its weights to the onload placement."""
    managed(model).set_state(ModelState.ONLOAD)


def offload(model: torch.nn.Module) -> None:
    """The model will not be used for a while: drop staged copies, weights to offload."""
    managed(model).set_state(ModelState.OFFLOAD)


def release(model: torch.nn.Module) -> None:
    """Forget ``model``: free every copy the core holds for it (RAM, device, cache), close
    its weight files and unregister it. The model keeps its placeholders and cannot run
    again; use this when discarding a model, ``disable_vram_management`` to keep it."""
    record = _unhook(model, "release")
    with get_manager().lock:
        for slot in record.slots:
            slot._drop_base()
    _forget(model, record)
    record.drop_scratch()
    if record.source is not None:
        record.source.close()


def _unhook(model: torch.nn.Module, what: str) -> ManagedModel:
    """The first half of leaving management: no forward running, staged copies freed, hooks off."""
    record = managed(model)
    with get_manager().lock:
        if any(slot.users for slot in record.slots):
            raise RuntimeError(f"{record.name}: cannot {what} during a forward")
        for slot in record.slots:
            slot.clear()
    for handle in record._handles:
        handle.remove()
    for layer in record.layers:
        layer.remove_hooks()
    return record


def _forget(model: torch.nn.Module, record: ManagedModel) -> None:
    """The second half: the RAM cache dropped, the manager and the model no longer know it."""
    record.clear_cache()
    get_manager().unregister(record)
    object.__delattr__(model, _MANAGED_ATTR)


def disable_vram_management(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` a plain model again, with real Parameters at the computation placement."""
    record = _unhook(model, "disable management")
    params: dict[int, torch.nn.Parameter] = {}
    for layer in record.layers:
        if "_apply" in layer.module.__dict__:
            del layer.module.__dict__["_apply"]
        for param_name, slot in layer.entries:
            if id(slot) not in params:
                source = slot.base if slot.base is not None else slot.read()
                tensor = source.to(device=slot.config.computation.device, dtype=slot.config.computation.dtype)
                params[id(slot)] = torch.nn.Parameter(tensor, requires_grad=False)
            layer.module._parameters[param_name] = params[id(slot)]
    with get_manager().lock:
        for slot in record.slots:
            slot._drop_base()
    _forget(model, record)
    return model
