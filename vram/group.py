"""A group: the unit of transfer (one repeated block, or one leaf module) and its states.

A group owns the unique parameters (``Entry``) of the modules in it. Between forwards each
parameter is a *placeholder*: a Parameter with the right shape, the computation dtype and
the computation device that owns a single element (NaN), so code reading
``weight.dtype``/``.device``/``.shape`` sees what it expects while the real weights live in
another tier. Entering the group (its root module's forward pre-hook) installs the real
tensors for every module in it; leaving (the post-hook) puts the placeholders back.

Where the weights rest is the group's *base*, set per model state (offload/onload):

    None         on disk: read into a pooled arena when needed
    HostCopy     in RAM: one page-aligned arena (pinned once on CUDA) with a view per tensor
    Landing      on the computation device: one buffer with a view per tensor

A forward needs them at the preparing placement (``staged``) and then in the computation
dtype. The life of a staged copy is one state machine, changed only by this file's methods
and always under the manager's lock:

    RESTING --stage--> STAGING --landed--> STAGED --enter--> IN_USE --leave--> KEPT | RESTING
    KEPT --enter--> IN_USE;  KEPT --evict--> RESTING;  STAGING/STAGED --reclaim--> RESTING

A group whose base already is its computation tensors (resident, same dtype) is *static*:
its real Parameters stay installed and its hooks do nothing.
"""

from __future__ import annotations

import enum
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .arena import Arena, Layout
from .budget import get_manager
from .casting import FP8_MAX, copy_cast, fp8_scale
from .config import Placement, VramConfig, is_host
from .mover import Landing, cast_views, submit
from .weights import TensorInfo, plan_runs

if TYPE_CHECKING:
    from .model import ManagedModel


class GroupState(enum.Enum):
    RESTING = "resting"   # only the base exists
    STAGING = "staging"   # a copy to the preparing placement is being made (charged)
    STAGED = "staged"     # the copy exists (its event may still be pending); unused
    IN_USE = "in use"     # one or more forwards run the group's modules
    KEPT = "kept"         # staged, kept between forwards while the budget allows


class Prep(enum.Enum):
    """How the staged tensors are made from the base in the current model state."""

    NONE = "none"   # the base tensors are at the preparing placement already
    CAST = "cast"   # same device, other dtypes: one cast per tensor that differs
    COPY = "copy"   # host arena -> one copy into one device buffer (then casts)
    READ = "read"   # disk -> a pooled arena (then a copy on accelerators, casts)


@dataclass(eq=False)
class Entry:
    """One unique parameter (tied parameters share one).

    ``scales`` holds the scale of its value in each fp8 dtype it is stored in (see
    vram/casting.py): read from a scaled file, 1.0 for a plain fp8 file, otherwise computed
    the first time its value passes through the host (``ensure_scales``)."""

    keys: list[str]
    shape: tuple[int, ...]
    config: VramConfig
    info: TensorInfo | None
    placeholder: torch.nn.Parameter
    resident: torch.nn.Parameter | None = None  # the base as a Parameter while static
    scales: dict[torch.dtype, float] = field(default_factory=dict)

    def __post_init__(self):
        placements = (self.config.offload, self.config.onload, self.config.preparing, self.config.computation)
        self.fp8 = tuple(dict.fromkeys(p.dtype for p in placements if not p.is_disk and p.dtype in FP8_MAX))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def scaled(self) -> bool:
        return all(d in self.scales for d in self.fp8)

    def scale(self, dtype: torch.dtype) -> float:
        """The scale of the value stored as ``dtype`` (1.0 outside fp8)."""
        return self.scales[dtype] if dtype in FP8_MAX else 1.0

    def factor(self, source: torch.dtype, target: torch.dtype) -> float:
        """What a cast from ``source`` storage to ``target`` multiplies by."""
        if source == target:
            return 1.0
        return self.scale(source) / self.scale(target)

    def ensure_scales(self, values: torch.Tensor) -> None:
        """Know the scale of every fp8 dtype the config stores this entry in, from its value
        (``values``, stored as its dtype)."""
        for dtype in self.fp8:
            if dtype not in self.scales:
                self.scales[dtype] = fp8_scale(values, dtype, self.scale(values.dtype))


@dataclass(eq=False)
class HostCopy:
    """A group's weights in RAM: the arena, its layout, a view per entry."""

    arena: Arena
    layout: Layout
    views: list[torch.Tensor]
    dtypes: tuple[torch.dtype, ...]


def make_placeholder(shape, placement: Placement) -> torch.nn.Parameter:
    single = torch.full((), float("nan"), dtype=placement.dtype, device=placement.device)
    return torch.nn.Parameter(single.expand(shape), requires_grad=False)


class Group:
    """A transfer unit: its entries, the modules they are installed in, its base and state."""

    def __init__(self, model: "ManagedModel", name: str, roots: list[torch.nn.Module],
                 entries: list[Entry], installs: list[tuple[dict, str, int]], modules: list[str]):
        self.model = model
        self.part = model           # the part of the model on this group's device (model.py's Part)
        self.name = name
        self.roots = roots
        self.entries = entries
        self.installs = installs      # (module._parameters, name, entry index)
        self.modules = modules        # qualified names of the member modules
        self.block = False            # one repeated block (not leaves or the rest)
        self.device = entries[0].config.computation.device
        self.preparing = tuple(e.config.preparing.dtype for e in entries)
        self.computing = tuple(e.config.computation.dtype for e in entries)
        self.manager = get_manager()
        self.file_layout = None
        self.file_dtypes: tuple | None = None
        self.read_plan: list = []  # (file, offset, bytes, [(start, end) in the arena], key)
        self.file_nbytes = 0
        if entries[0].info is not None:
            self.file_dtypes = tuple(e.info.dtype for e in entries)
            self.file_layout = Layout([(e.info.dtype, e.shape) for e in entries])
            self.read_plan = self.plan_reads(self.file_layout)
            self.file_nbytes = sum(e.info.nbytes for e in entries)
        self.prep_layout = self.layout_for(self.preparing)
        # Tensors whose preparing dtype is not their computation dtype (fp8 storage): cast at
        # each entry, dropped at exit.
        self._casts_compute = [i for i, (p, c) in enumerate(zip(self.preparing, self.computing)) if p != c]
        self._factors: dict[tuple, tuple[float, ...] | None] = {}  # (sources, targets) -> factors()
        self._scaled = False
        self.compute_scales: dict[int, float] = {}  # entry -> what the compute cast multiplies by
        if all(e.scaled for e in entries):
            self._became_scaled()
        self.host_copies: dict[tuple, HostCopy] = {}
        self.base: HostCopy | Landing | None = None
        self.base_charge: tuple[str, int] | None = None  # (ledger device, bytes) of a device base
        # The plan for the current model state (see plan()).
        self.prep = Prep.NONE
        self.static = False
        self.prepared_charge = 0
        self.compute_charge = 0
        # The state machine.
        self.state = GroupState.RESTING
        self.staged: Landing | None = None
        self.pending: Future | None = None
        self.users = 0
        self.charged = 0
        self.last_used = 0
        self.ready_event = None
        self._compute_charged = 0
        self._entry_lock = threading.RLock()

    # -- facts ------------------------------------------------------------------------------
    @property
    def evictable(self) -> bool:
        return self.state is GroupState.KEPT

    @property
    def reading(self) -> bool:
        """A background staging task is running (its memory will be released or used soon)."""
        return self.pending is not None and not self.pending.done()

    @property
    def need(self) -> int:
        """Bytes a forward of this group adds on the computation device."""
        return self.prepared_charge + self.compute_charge

    def base_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.base is None:
            return tuple(e.info.dtype for e in self.entries)
        if isinstance(self.base, HostCopy):
            return self.base.dtypes
        return tuple(t.dtype for t in self.base.tensors)

    def base_tensors(self) -> list[torch.Tensor] | None:
        if isinstance(self.base, HostCopy):
            return self.base.views
        if isinstance(self.base, Landing):
            return self.base.tensors
        return None

    def layout_for(self, dtypes: tuple) -> Layout:
        """The group's tensors laid out in ``dtypes`` (one per entry)."""
        return Layout(list(zip(dtypes, (e.shape for e in self.entries))))

    def ensure_scales(self, values: list[torch.Tensor]) -> None:
        """Every entry's fp8 scales known, from its value in ``values`` (host tensors, one
        per entry, in their stored dtypes): the first time the values pass through here."""
        if self._scaled:
            return
        for entry, value in zip(self.entries, values):
            entry.ensure_scales(value)
        self._became_scaled()

    def _became_scaled(self) -> None:
        """Every scale is known (a KeyError names an entry whose scale is not)."""
        factors = self.factors(self.preparing, self.computing)
        self.compute_scales = {i: factors[i] for i in self._casts_compute if factors and factors[i] != 1.0}
        self._scaled = True

    def factors(self, sources: tuple, targets: tuple) -> tuple[float, ...] | None:
        """Per entry, what a cast from ``sources`` to ``targets`` multiplies by (None: 1.0
        for every entry, a plain cast). Fixed once the scales are known: worked out once."""
        key = (sources, targets)
        found = self._factors.get(key, False)
        if found is not False:
            return found
        out = tuple(e.factor(s, t) for e, s, t in zip(self.entries, sources, targets))
        out = None if all(f == 1.0 for f in out) else out
        if self._scaled:
            self._factors[key] = out
        return out

    # -- the plan for a model state ---------------------------------------------------------
    def plan(self) -> None:
        """Derive how staging works from the current base (call after the base changed)."""
        dtypes = self.base_dtypes()
        compute_bytes = sum(self.entries[i].numel * self.computing[i].itemsize for i in self._casts_compute)
        cast_bytes = sum(e.numel * p.itemsize for e, d, p in zip(self.entries, dtypes, self.preparing) if d != p)
        on_cpu = is_host(self.device)
        if on_cpu and cast_bytes:
            cast_bytes = self.prep_layout.nbytes  # cast into a pooled arena of the preparing layout
        on_device = isinstance(self.base, Landing) or (isinstance(self.base, HostCopy) and on_cpu)
        if self.base is None:
            self.prep = Prep.READ
            self.prepared_charge = self.file_layout.nbytes + cast_bytes
        elif on_device:
            self.prep = Prep.NONE if dtypes == self.preparing else Prep.CAST
            self.prepared_charge = cast_bytes
        else:
            self.prep = Prep.COPY
            self.prepared_charge = self.base.layout.nbytes + cast_bytes
        self.compute_charge = compute_bytes
        self.static = self.prep is Prep.NONE and not self._casts_compute
        if self.static:
            for entry, tensor in zip(self.entries, self.base_tensors()):
                if entry.resident is None or entry.resident.data_ptr() != tensor.data_ptr():
                    entry.resident = torch.nn.Parameter(tensor, requires_grad=False)
            self.install([e.resident for e in self.entries])
        else:
            for entry in self.entries:
                entry.resident = None
            self.show_placeholders()

    def install(self, tensors: list[torch.Tensor]) -> None:
        for params, name, index in self.installs:
            params[name] = tensors[index]

    def show_placeholders(self) -> None:
        for params, name, index in self.installs:
            params[name] = self.entries[index].placeholder

    # -- staging ----------------------------------------------------------------------------
    def _stage(self) -> Landing:
        """Make the staged copy from the base (any thread: the state says it is ours to make)."""
        prep = self.prep
        if prep is Prep.CAST:
            if is_host(self.device):
                return self._cast_pooled(self.base_tensors())
            # On the device, maybe on the reader thread: its stream may not be the consumer's.
            mover = self.part.mover
            factors = self.factors(self.base_dtypes(), self.preparing)
            return Landing(None, cast_views(self.base_tensors(), self.preparing, factors), mover.record())
        if prep is Prep.COPY:
            base = self.base
            return self._to_device(base.arena.buffer[:base.layout.nbytes], base.layout, self.preparing,
                                   self.factors(base.dtypes, self.preparing))
        model = self.model
        cache = model.cache
        arena = cache.get(self) if cache is not None else None
        pooled = False
        if arena is None:
            if cache is not None and cache.admits(self):
                arena = cache.new_arena(self)
                self.read_into(arena)
                cache.put(self, arena)
            else:
                arena, pooled = model.pool.acquire(), True
                self.read_into(arena)
        layout = self.file_layout
        files = self.file_dtypes
        if not self._scaled:
            self.ensure_scales(layout.views(arena.buffer))
        if not is_host(self.device):
            landing = self._to_device(arena.buffer[:layout.nbytes], layout, self.preparing,
                                      self.factors(files, self.preparing))
            if pooled:
                model.pool.release(arena, after=landing.event)
            else:
                # A cached arena may be evicted (and unpinned, freed) by the next put: this
                # background thread waits for the copy out of it first.
                self.part.mover.host_done(landing.event)
            return landing
        views = layout.views(arena.buffer)
        if files == self.preparing:
            return Landing(None, views, host=(model.pool, arena) if pooled else None)
        landing = self._cast_pooled(views)
        if pooled:
            model.pool.release(arena)
        return landing

    def _cast_pooled(self, tensors: list[torch.Tensor]) -> Landing:
        """On the CPU: ``tensors`` in the preparing dtypes, in a pooled arena (every tensor
        copied, so the source can be reused at once)."""
        pool = self.model.prep_pool
        arena = pool.acquire()
        out = self.prep_layout.views(arena.buffer)
        factors = self.factors(tuple(t.dtype for t in tensors), self.preparing)
        for i, (target, source) in enumerate(zip(out, tensors)):
            if factors is None or factors[i] == 1.0:
                target.copy_(source)
            else:
                copy_cast(target, source, factors[i])
        return Landing(None, out, host=(pool, arena))

    def _to_device(self, host: torch.Tensor, layout: Layout, targets: tuple,
                   factors: tuple[float, ...] | None = None) -> Landing:
        """One copy of ``host`` (laid out as ``layout``) to the device, cast there to
        ``targets`` where the dtypes differ (times ``factors``, see ``factors()``)."""
        landing = self.part.mover.to_device(host, layout, targets, factors)
        counters = self.manager.counters
        counters.bytes_to_device += layout.nbytes
        if landing.synchronous:
            counters.sync_copies += 1
        return landing

    def plan_reads(self, layout: Layout) -> list:
        """The group's reads for an arena laid out as ``layout``: one per run of its tensors
        adjacent in a file, each scattered to where the tensors lie in the arena."""
        infos = [e.info for e in self.entries]
        slices = layout.slices
        return [(file, offset, nbytes, [(slices[i].offset, slices[i].offset + slices[i].nbytes) for i in indices], key)
                for file, offset, nbytes, indices, key in plan_runs(infos)]

    def read_into(self, arena: Arena, layout: Layout | None = None) -> None:
        """The group's tensors from its files, straight into ``arena`` (in the file's dtypes;
        ``layout`` must be a layout of those dtypes, by default the file layout)."""
        plan = self.read_plan if layout is None else self.plan_reads(layout)
        view = arena.view
        calls = self.model.source.read_runs([(file, offset, nbytes, [view[a:b] for a, b in spans], key)
                                             for file, offset, nbytes, spans, key in plan])
        counters = self.manager.counters
        counters.bytes_read_from_disk += self.file_nbytes
        counters.preadv_calls += calls

    def _landed(self, landing: Landing) -> None:
        """STAGING -> IN_USE or STAGED: the copy is there (caller holds the lock)."""
        self.staged = landing
        self.pending = None
        self.state = GroupState.IN_USE if self.users else GroupState.STAGED

    def prefetch(self) -> None:
        """Stage ahead of use, as far as the budget has room beside the running group."""
        if self.state is not GroupState.RESTING or self.prep is Prep.NONE:
            return
        model = self.model
        manager = self.manager
        with manager.lock:
            if self.state is not GroupState.RESTING:
                return
            if not manager.make_room(self.part.budget_key, self.prepared_charge, self.part,
                                     headroom=self.part.max_group_need, own=False):
                return
            self._charge(self.prepared_charge)
            self.state = GroupState.STAGING
            if not (self.prep is Prep.COPY and self.part.mover.asynchronous):
                self.pending = submit(self._stage)
                return
            # An asynchronous copy: issuing it is all the work there is, done here, under the
            # lock, so that no other thread sees this group staging without a task.
            try:
                self._landed(self._stage())
            except BaseException:
                self._drop()
                raise

    def _charge(self, nbytes: int) -> None:
        model = self.model
        if nbytes:
            self.manager.charge(self.part.budget_key, self.part.name, self.name, "prepared", nbytes)
        self.charged = nbytes
        self.part.streaming_bytes += nbytes

    # -- a forward --------------------------------------------------------------------------
    def enter(self) -> None:
        """The group's forward begins: its computation tensors installed."""
        with self._entry_lock:
            model = self.model
            if self.users:  # nested, or another thread runs it: the tensors are in place
                self.users += 1
                if self.ready_event is not None:
                    self.part.mover.wait(self.ready_event)
                return
            manager = self.manager
            counters = manager.counters
            future = None
            own = False
            try:
                with manager.lock:
                    counters.hook_entries += 1
                    manager.clock += 1
                    self.last_used = manager.clock
                    state = self.state
                    if self.prep is Prep.NONE:
                        self.state = GroupState.IN_USE
                    elif state is GroupState.RESTING:
                        counters.prefetch_misses += 1
                        manager.reserve(self.part, self.prepared_charge)
                        self._charge(self.prepared_charge)
                        self.state = GroupState.STAGING
                        own = True
                    else:
                        counters.prefetch_hits += 1
                        if state is GroupState.KEPT:
                            self.part.kept_bytes -= self.charged
                            self.part.streaming_bytes += self.charged
                        if state is GroupState.STAGING:
                            future = self.pending
                        else:
                            self.state = GroupState.IN_USE
                    self.users = 1
                    if self.compute_charge:
                        manager.reserve(self.part, self.compute_charge)
                        manager.charge(self.part.budget_key, self.part.name, self.name, "computation",
                                       self.compute_charge)
                        self.part.streaming_bytes += self.compute_charge
                        self._compute_charged = self.compute_charge
                if self.prep is Prep.NONE:
                    tensors, event = self.base_tensors(), None
                else:
                    if own or future is not None:
                        started = time.perf_counter()
                        landing = self._stage() if own else future.result()
                        counters.transfer_wait_s += time.perf_counter() - started
                        with manager.lock:
                            self._landed(landing)
                    tensors, event = self.staged.tensors, self.staged.event
                mover = self.part.mover
                if event is not None:
                    mover.wait(event)
                if self._casts_compute:
                    tensors = list(tensors)
                    computing = self.computing
                    if not self._scaled:  # staging always knows them first: a KeyError here is a bug
                        self._became_scaled()
                    # cast() inlined (no Python call per tensor per forward): the scales multiply
                    # in the wider computation dtype, all of a group's in one kernel launch.
                    scale_at, scaled, factors = self.compute_scales, [], []
                    for i in self._casts_compute:
                        tensors[i] = tensor = tensors[i].to(computing[i])
                        factor = scale_at.get(i)
                        if factor is not None:
                            scaled.append(tensor)
                            factors.append(factor)
                    if scaled:
                        torch._foreach_mul_(scaled, factors)
                    event = mover.record()
                self.ready_event = event
                for params, name, index in self.installs:
                    params[name] = tensors[index]
            except BaseException:
                with manager.lock:
                    self.users = 0
                    pending = self.pending
                    if pending is not None and pending.done():
                        self._collect(pending)
                        self.pending = None
                    self._leave_locked(keep=False)
                raise

    def leave(self) -> None:
        """The group's forward ended (or raised): placeholders back, the copy kept or dropped."""
        with self._entry_lock:
            self.users -= 1
            if self.users:
                return
            with self.manager.lock:
                self._leave_locked(keep=True)

    def _leave_locked(self, keep: bool) -> None:
        model = self.model
        manager = self.manager
        entries = self.entries
        for params, name, index in self.installs:
            params[name] = entries[index].placeholder
        self.ready_event = None
        if self._compute_charged:
            manager.refund(self.part.budget_key, self.part.name, self.name, "computation", self._compute_charged)
            self.part.streaming_bytes -= self._compute_charged
            self._compute_charged = 0
        if self.state is GroupState.STAGING and self.pending is not None:
            return  # a failed entry left its prefetch running: it lands as STAGED
        if keep and self.staged is not None and self.charged and manager.keeps(self.part, self):
            self.state = GroupState.KEPT
            self.part.streaming_bytes -= self.charged
            self.part.kept_bytes += self.charged
        else:
            self._drop()

    # -- dropping ---------------------------------------------------------------------------
    def _drop(self) -> None:
        """Any state but IN_USE -> RESTING: the staged copy freed, its charge refunded
        (caller holds the lock and has made sure no read is still writing it)."""
        model = self.model
        manager = self.manager
        staged = self.staged
        if staged is not None:
            self.staged = None
            if staged.host is not None:
                pool, arena = staged.host
                pool.release(arena)
                staged.host = None
            self.part.mover.retire(staged)
        if self.charged:
            manager.refund(self.part.budget_key, self.part.name, self.name, "prepared", self.charged)
            if self.state is GroupState.KEPT:
                self.part.kept_bytes -= self.charged
            else:
                self.part.streaming_bytes -= self.charged
            self.charged = 0
        self.pending = None
        self.state = GroupState.RESTING

    def evict(self) -> None:
        """KEPT -> RESTING, to make room (caller holds the lock)."""
        counters = self.manager.counters
        counters.evictions += 1
        counters.evicted_bytes += self.charged
        self._drop()

    def reclaim(self) -> bool:
        """Drop a prefetch no forward uses yet, if it has finished or not started (lock held)."""
        if self.users:
            return False
        if self.state is GroupState.STAGED:
            self._drop()
            return True
        if self.state is GroupState.STAGING and self.pending is not None:
            future = self.pending
            if future.cancel():
                self._drop()
                return True
            if future.done():
                self._collect(future)
                self._drop()
                return True
        return False

    def _collect(self, future: Future) -> None:
        """Take a finished background result so that dropping frees it."""
        try:
            landing = future.result()
        except BaseException:  # noqa: BLE001 - the error belonged to a prefetch nobody used
            return
        self.staged = landing

    def settle(self) -> None:
        """Wait for (or cancel) a background stage, then drop any staged copy. For model-level
        changes: no forward may be running."""
        manager = self.manager
        with manager.lock:
            future = self.pending
        if future is not None and not future.cancel():
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - dropped below either way
                pass
        with manager.lock:
            if future is not None and future.done() and not future.cancelled():
                self._collect(future)
            if self.state is not GroupState.RESTING or self.staged is not None:
                self._drop()

    # -- the base ---------------------------------------------------------------------------
    def host_copy(self, dtypes: tuple, params: list[torch.Tensor] | None, scratch: Callable[[], Arena]) -> HostCopy:
        """The group's weights in RAM in ``dtypes``: an existing copy, or a new arena filled
        from another host copy, the model's own tensors, or the files."""
        found = self.host_copies.get(dtypes)
        if found is not None:
            return found
        model = self.model
        layout = self.layout_for(dtypes)
        arena = Arena(layout.nbytes, pin=model.pinner)
        if model.pinner is not None and not arena.pinned:
            self.manager.counters.pin_failures += 1
        views = layout.views(arena.buffer)
        source = next(iter(self.host_copies.values()), None)
        if source is not None:
            values = source.views
        elif params is not None:
            values = [p.detach() for p in params]
        elif dtypes == self.file_dtypes:
            self.read_into(arena, layout)  # straight into the arena: no intermediate buffer
            values = None
            self.ensure_scales(views)
        else:
            temporary = scratch()
            self.read_into(temporary)
            values = self.file_layout.views(temporary.buffer)
        if values is not None:
            self.ensure_scales(values)
            for entry, view, tensor in zip(self.entries, views, values):
                copy_cast(view, tensor, entry.factor(tensor.dtype, view.dtype))
        copy = HostCopy(arena, layout, views, dtypes)
        self.host_copies[dtypes] = copy
        self.manager.charge("host", model.name, self.name, "base", arena.size)
        return copy

    def drop_host_copy(self, dtypes: tuple) -> None:
        copy = self.host_copies.pop(dtypes, None)
        if copy is None:
            return
        if self.base is copy:
            self.base = None
        if copy.arena.pinned:
            self.part.mover.synchronize()  # no copy may still read pages being unpinned
        copy.arena.close()
        self.manager.refund("host", self.model.name, self.name, "base", copy.arena.size)

    def land_base(self, dtypes: tuple, params: list[torch.Tensor] | None) -> Landing:
        """The group's weights on the computation device in ``dtypes``, in one copy: from a
        host copy, the model's own tensors, or the files."""
        model = self.model
        source = self.host_copies.get(dtypes) or next(iter(self.host_copies.values()), None)
        if source is not None:
            self.ensure_scales(source.views)
            return self._to_device(source.arena.buffer[:source.layout.nbytes], source.layout, dtypes,
                                   self.factors(source.dtypes, dtypes))
        if params is not None:
            values = [p.detach() for p in params]
            self.ensure_scales(values)
            layout = self.layout_for(dtypes)
            temporary = Arena(layout.nbytes)
            for entry, view, tensor in zip(self.entries, layout.views(temporary.buffer), values):
                copy_cast(view, tensor, entry.factor(tensor.dtype, view.dtype))
            landing = self._to_device(temporary.buffer[:layout.nbytes], layout, dtypes)
            self.part.mover.host_done(landing.event)
            return landing
        arena = model.pool.acquire()
        self.read_into(arena)
        self.ensure_scales(self.file_layout.views(arena.buffer))
        landing = self._to_device(arena.buffer[:self.file_layout.nbytes], self.file_layout, dtypes,
                                  self.factors(self.file_dtypes, dtypes))
        model.pool.release(arena, after=landing.event)
        return landing

    def _drop_device_base(self) -> None:
        """Free a base that rests on the computation device, and refund its charge."""
        if isinstance(self.base, Landing):
            self.part.mover.retire(self.base)
        if self.base_charge is not None:
            device, nbytes = self.base_charge
            self.manager.refund(device, self.part.name, self.name, "base", nbytes)
            self.base_charge = None

    def set_base(self, base: HostCopy | Landing | None, charge: tuple[str, int] | None = None) -> None:
        """Switch the base (caller: no staged copy, no forward). A device base is charged."""
        if self.base is not base:
            self._drop_device_base()
        if charge is not None:
            self.manager.charge(charge[0], self.part.name, self.name, "base", charge[1])
            self.base_charge = charge
        self.base = base
        self.plan()

    def free(self) -> None:
        """Forget the base and every host copy (teardown: nothing staged, no forward)."""
        self._drop_device_base()
        self.base = None
        for dtypes in list(self.host_copies):
            self.drop_host_copy(dtypes)

    def state_name(self) -> str:
        """For stats(): the model state while resting, else the staged copy's state."""
        if self.state is GroupState.RESTING:
            return self.model.state.value
        if self.state is GroupState.KEPT or self.state is GroupState.STAGED:
            return "preparing"
        if self.state is GroupState.IN_USE:
            return "computation"
        return self.state.value


def dtypes_at(group: Group, state: str) -> tuple[Placement, tuple]:
    """The placement of the group's base in a model state: (placement of the first entry,
    every entry's dtype). Entries differ only in dtype."""
    placements = [getattr(e.config, state) for e in group.entries]
    return placements[0], tuple(p.dtype for p in placements)


__all__ = ["Entry", "Group", "GroupState", "HostCopy", "Prep", "dtypes_at", "make_placeholder"]
