"""The one manager per process: budgets, the ledger, eviction.

Every buffer the core allocates for a group is charged to the ledger under its device, model,
group and kind (``base``: the model-level copy; ``prepared``: staged on the computation
device; ``computation``: the transient copies in the computation dtype; ``cache``: groups
read from disk kept in RAM). A device's budget bounds what may be charged there; when a
charge does not fit, the manager evicts staged copies that no forward is using (other models'
first, least recently used first) before it says no.

All ledger and group-state changes happen under one lock, so models run from several threads
share the device without corrupting each other's state.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Iterable

import torch

from .config import GIB, device_name
from .reports import Counters, RunReport

if TYPE_CHECKING:
    from .group import Group
    from .model import ManagedModel, Part
    from .mover import Mover

log = logging.getLogger(__name__)


class VramLimitError(RuntimeError):
    """A group cannot be brought in without going over the device's budget."""

KINDS = ("base", "prepared", "computation", "cache")


class LedgerPeak:
    """One run's peak of the ledger on one device (``Manager.peak_scope``)."""

    def __init__(self, manager: "Manager", key: str, start: int):
        self.manager, self.key, self.peak = manager, key, start

    def close(self) -> int:
        with self.manager.lock:
            self.manager._scopes[self.key].discard(self)
        return self.peak


class Manager:
    """Budgets per device, the ledger, eviction. Use ``get_manager()``."""

    def __init__(self):
        self.lock = threading.RLock()
        self.room = threading.Condition(self.lock)  # notified whenever bytes are refunded
        self.counters = Counters()
        self._ledger: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._device_bytes: dict[str, int] = defaultdict(int)
        self._device_peak: dict[str, int] = defaultdict(int)
        self._scopes: dict[str, set[LedgerPeak]] = defaultdict(set)  # open per-run peaks
        self._budgets: dict[str, int] = {}
        self._activation_reserve: dict[str, int] = defaultdict(int)
        # Activations measured per model and job size (elements of its inputs): bytes.
        self._activations: dict[str, dict[int, int]] = defaultdict(dict)
        self._movers: dict[str, "Mover"] = {}  # per device: the mover that speaks for its memory
        self._forgotten: deque[tuple[str, str]] = deque()  # (device, model) collected unregistered
        self._models: "weakref.WeakValueDictionary[str, Part]" = weakref.WeakValueDictionary()  # by name
        self.clock = 0  # ticks of group use, for least-recently-used eviction
        self.reports: list[RunReport] = []  # the latest 256
        self.reports_total = 0              # reports ever added: callers slice "since" with it

    # -- models ---------------------------------------------------------------------------
    def register(self, model: "Part") -> str:
        with self.lock:
            self._settle_forgotten()
            base, name, n = model.name, model.name, 1
            while name in self._models:
                n += 1
                name = f"{base}#{n}"
            self._models[name] = model
            self._movers[model.budget_key] = model.mover
            weakref.finalize(model, self._forget, model.budget_key, name)
            self._refresh_budget(model.budget_key)
            return name

    def unregister(self, model: "Part") -> None:
        with self.lock:
            self._settle_forgotten()
            if self._models.get(model.name) is model:
                del self._models[model.name]
            self._activations.pop(model.name, None)
            self._refresh_budget(model.budget_key)

    def _forget(self, key: str, name: str) -> None:
        """A registered model was collected without being unregistered. This runs wherever the
        garbage collector does, possibly inside a lock of this module or of a mover: it only
        notes the model, and the next registration or budget question settles it."""
        self._forgotten.append((key, name))

    def _settle_forgotten(self) -> None:
        """(lock held) Budgets and caps without the models collected since the last call."""
        while self._forgotten:
            key, name = self._forgotten.popleft()
            if name not in self._models:
                self._activations.pop(name, None)
                # What it held went with it: its charges leave the ledger.
                for entry in [e for e in self._ledger if e[1] == name]:
                    self._device_bytes[entry[0]] -= self._ledger.pop(entry)
                self.room.notify_all()
            self._refresh_budget(key)

    def models(self) -> list["ManagedModel"]:
        """The models registered (a model split over devices once, not once per part)."""
        with self.lock:
            return list({id(m.owner): m.owner for m in self._models.values()}.values())

    def _refresh_budget(self, key: str) -> None:
        """A device's budget is the smallest vram_limit among the models computing on it, and
        its allocator refuses memory past it (an out-of-memory error, not a report)."""
        caps = [m.cap_bytes for m in self._models.values() if m.budget_key == key and m.cap_bytes is not None]
        if caps:
            self._budgets[key] = min(caps)
        else:
            self._budgets.pop(key, None)
        mover = self._movers.get(key)
        if mover is not None:
            mover.set_cap(self._budgets.get(key))

    # -- ledger ---------------------------------------------------------------------------
    def budget(self, device: torch.device | str) -> int | None:
        """Bytes the core may hold on ``device`` (None: unbounded)."""
        if self._forgotten:
            with self.lock:
                self._settle_forgotten()
        key = device_name(device)
        cap = self._budgets.get(key)
        if cap is None:
            return None
        reserve = self._activation_reserve[key]
        mover = self._movers.get(key)
        memory = mover.memory() if mover is not None else None
        if memory is not None:
            # What the allocator holds beyond the ledger counts against the cap too: live
            # tensors the core did not charge (inputs, the current forward's activations,
            # other libraries) and the fragments of its segments it cannot hand back. Cached
            # whole segments do not: the allocator releases them for the next copy, under the
            # cap it enforces. Its rounding gets a 1/32 margin.
            outside = max(0, memory.allocated + memory.fragmented - self._device_bytes[key])
            reserve = max(reserve, outside) + cap // 32
        return max(0, cap - reserve)

    def resident_bytes(self, device: torch.device | str) -> int:
        with self.lock:
            return self._device_bytes[device_name(device)]

    def peak_bytes(self, device: torch.device | str) -> int:
        with self.lock:
            return self._device_peak[device_name(device)]

    def reset_peak(self, device: torch.device | str) -> None:
        """Start ``peak_bytes`` again from now (process-wide: runs use ``peak_scope``)."""
        with self.lock:
            self._device_peak[device_name(device)] = self._device_bytes[device_name(device)]

    def peak_scope(self, device: torch.device | str) -> "LedgerPeak":
        """The ledger's peak on ``device`` from now until ``close()``, for one run: runs that
        overlap each get theirs, and no one's is reset by another's start."""
        key = device_name(device)
        with self.lock:
            scope = LedgerPeak(self, key, self._device_bytes[key])
            self._scopes[key].add(scope)
            return scope

    def charge(self, device: torch.device | str, model: str, group: str, kind: str, nbytes: int) -> None:
        key = device_name(device)
        with self.lock:
            self._ledger[(key, model, group, kind)] += nbytes
            self._device_bytes[key] += nbytes
            now = self._device_bytes[key]
            if now > self._device_peak[key]:
                self._device_peak[key] = now
            for scope in self._scopes.get(key, ()):
                if now > scope.peak:
                    scope.peak = now

    def refund(self, device: torch.device | str, model: str, group: str, kind: str, nbytes: int) -> None:
        key = device_name(device)
        with self.lock:
            entry = (key, model, group, kind)
            self._ledger[entry] -= nbytes
            if self._ledger[entry] <= 0:
                del self._ledger[entry]
            self._device_bytes[key] -= nbytes
            self.room.notify_all()

    def fits(self, device: torch.device, nbytes: int, headroom: int = 0) -> bool:
        budget = self.budget(device)
        return budget is None or self._device_bytes[device_name(device)] + nbytes + headroom <= budget

    def make_room(self, device: torch.device, nbytes: int, requester: "Part",
                  headroom: int = 0, own: bool = True) -> bool:
        """Evict idle prepared copies until ``nbytes`` (+ headroom) fit; True if they do.

        Other models' copies go first, least recently used first; the requester's own kept
        copies go only when ``own`` is set.
        """
        if device_name(device) not in self._budgets:
            return True  # no cap on this device
        if self.fits(device, nbytes, headroom):
            return True
        # Without scanning: can evicting everything evictable make it fit at all?
        evictable = sum(m.kept_bytes for m in self._models.values()
                        if m.budget_key == device_name(device) and (own or m is not requester))
        if not evictable or not self.fits(device, nbytes - evictable, headroom):
            return False
        for group in self._eviction_candidates(device, requester, own):
            group.evict()
            if self.fits(device, nbytes, headroom):
                return True
        return False

    def reserve(self, requester: "Part", nbytes: int) -> None:
        """Make room for a copy the current forward needs (caller holds the lock).

        Evicts idle copies, then drops prefetches nobody uses yet; while another forward on
        the device holds what is missing, waits for it to release (up to a minute).
        """
        device = requester.budget_key
        if device not in self._budgets:
            return  # no model on the device has a cap (vram_limit=0 or None everywhere)
        deadline = time.monotonic() + 60.0
        while True:
            if self.make_room(device, nbytes, requester):
                return
            if self.reclaim_prefetches(device):
                continue
            if not self.busy(device, besides=requester) or time.monotonic() > deadline:
                break
            self.room.wait(0.05)
        budget = self.budget(device)
        raise VramLimitError(
            f"{requester.name}: {nbytes / GIB:.4f} GiB more on {device} would pass its budget "
            f"({self.resident_bytes(device) / GIB:.4f} GiB held by the core, budget "
            f"{(budget or 0) / GIB:.4f} GiB after {self.activation_reserve(device) / GIB:.4f} GiB "
            f"kept for activations). Raise vram_limit or lower the resolution/batch.")

    def keeps(self, model: "Part", group: "Group") -> bool:
        """Whether a group's staged copy stays after its forward (caller holds the lock)."""
        limit = model.owner.config.vram_limit
        if limit == 0:
            return False
        if limit is None:
            # Without a cap, a CPU that computes from disk keeps nothing: the point of the
            # disk tier is RAM, and the RAM cache is the knob for keeping weights there.
            return not (group.base is None and model.budget_key == "cpu")
        if not model.owner.runs_done:
            return False  # the first forward streams: its activation peak is not known yet
        # Kept, this copy stops being part of the streaming window; the window (whatever of
        # it is not in flight now) must still fit beside everything kept. The running model
        # comes first: idle models' kept copies make way for it.
        headroom = max(0, model.window_bytes - model.streaming_bytes + group.charged)
        return self.make_room(device=model.budget_key, nbytes=0, requester=model, headroom=headroom, own=False)

    def reclaim_prefetches(self, device: str) -> bool:
        """Drop staged copies no forward uses yet (finished or not yet started prefetches).
        True if anything was dropped. Caller holds the lock."""
        dropped = False
        for model in self._models.values():
            if model.budget_key != device:
                continue
            for group in model.part_groups:
                if group.reclaim():
                    dropped = True
        return dropped

    def busy(self, device: str, besides: "Part") -> bool:
        """Whether memory on ``device`` will be released soon: another model holds groups in use
        or copies in flight, or a read of the waiting model itself is still running."""
        for model in self._models.values():
            if model.budget_key != device:
                continue
            if model is besides:  # its own forward is the one waiting; only its reads count
                if any(group.reading for group in model.part_groups):
                    return True
            elif any(group.users or group.pending is not None for group in model.part_groups):
                return True
        return False

    def _eviction_candidates(self, device, requester, own) -> Iterable["Group"]:
        others, mine = [], []
        for model in self._models.values():
            if model.budget_key != device:
                continue
            for group in model.part_groups:
                if group.evictable:
                    (mine if model is requester else others).append(group)
        others.sort(key=lambda g: g.last_used)
        # Within the running model keep the earliest groups: a cyclic schedule gains nothing
        # from LRU, and dropping the most recently used keeps the others' order stable.
        mine.sort(key=lambda g: -g.last_used)
        return others + (mine if own else [])


    # -- activations and reports -------------------------------------------------------------
    def note_activations(self, model: "Part", nbytes: int) -> None:
        """Activations one forward of ``model`` measured, for the job size it announced."""
        with self.lock:
            size = getattr(model, "job", 0)
            seen = self._activations[model.name]
            seen[size] = max(nbytes, seen.get(size, 0))

    def expect_job(self, model: "Part", size: int) -> None:
        """A forward of ``model`` on a job of ``size`` input elements begins: room for its
        activations is what that size measured before, or else the measurements scaled to
        it (activations grow with tokens x batch x frames), plus 10%. Kept copies that no
        longer fit beside it are evicted now, before the forward needs the room. Size 0
        (unknown) keeps room for the largest measured."""
        with self.lock:
            model.job = size
            seen = self._activations.get(model.name) or {}
            if size in seen:
                expected = seen[size]
            else:
                scaled = [nbytes * size // known for known, nbytes in seen.items() if known and size]
                expected = max(scaled, default=max(seen.values(), default=0))
            key = model.budget_key
            self._activation_reserve[key] = int(expected * 1.1)
            if key in self._budgets:
                self.make_room(key, 0, model)

    def activation_reserve(self, device: torch.device | str) -> int:
        return self._activation_reserve[device_name(device)]

    def add_report(self, report: RunReport) -> None:
        with self.lock:
            self.reports.append(report)
            self.reports_total += 1
            del self.reports[:-256]
        level = logging.WARNING if report.within_cap is False else logging.DEBUG
        log.log(level, "run: %s", report.describe())

    def reports_since(self, total: int) -> list[RunReport]:
        """The reports added after ``reports_total`` was ``total`` (at most the latest 256)."""
        with self.lock:
            count = min(self.reports_total - total, len(self.reports))
            return self.reports[-count:] if count > 0 else []

    # -- views ----------------------------------------------------------------------------
    def ledger(self) -> dict[tuple[str, str, str, str], int]:
        """(device, model, layer, kind) -> bytes, for everything the core holds now."""
        with self.lock:
            return dict(self._ledger)

    def stats(self) -> dict:
        """A snapshot for graphs and planners: bytes per device and per model, layer states,
        counters. Plain data (ints, floats, strings)."""
        with self.lock:
            per_model: dict[str, dict] = {}
            for (device, model, _layer, kind), nbytes in self._ledger.items():
                entry = per_model.setdefault(model, {}).setdefault(device, dict.fromkeys(KINDS, 0))
                entry[kind] += nbytes
            return {
                "devices": {d: {"resident_bytes": b, "peak_bytes": self._device_peak[d],
                                "budget_bytes": self.budget(d),
                                "activation_reserve_bytes": self._activation_reserve[d]}
                            for d, b in self._device_bytes.items()},
                "models": {name: {"state": m.owner.state.value, "resident": per_model.get(name, {}),
                                  "summary": m.summary() if m.owner is m else {"part of": m.owner.name,
                                                                               "device": m.budget_key},
                                  "groups": {g.name: g.state_name() for g in m.part_groups}}
                           for name, m in self._models.items()},
                "counters": dict(vars(self.counters)),
                "last_runs": [vars(r) | {"within_cap": r.within_cap} for r in self.reports[-8:]],
            }

    def reset_counters(self) -> None:
        with self.lock:
            self.counters = Counters()


_manager = Manager()


def get_manager() -> Manager:
    """The process's manager."""
    return _manager
