"""The disk tier's RAM cache: groups read from disk kept in RAM, least recently used first out.

``ram_cache_gib`` bounds it; what it holds is charged to the ledger as ``cache`` on the host,
so the next generation reads from RAM what fits and from disk the rest."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from .arena import Arena, Pinner
from .budget import get_manager

if TYPE_CHECKING:
    from .group import Group

CACHE_LEDGER = "(ram cache)"


class RamCache:
    def __init__(self, model_name: str, limit_bytes: int, pin: Pinner | None):
        self.model_name = model_name
        self.limit = limit_bytes
        self.pin = pin
        self.nbytes = 0
        self._arenas: "OrderedDict[Group, Arena]" = OrderedDict()
        self._lock = threading.Lock()

    def admits(self, group: "Group") -> bool:
        return group.file_layout.nbytes <= self.limit

    def get(self, group: "Group") -> Arena | None:
        with self._lock:
            arena = self._arenas.get(group)
            if arena is not None:
                self._arenas.move_to_end(group)
            return arena

    def new_arena(self, group: "Group") -> Arena:
        return Arena(group.file_layout.nbytes, pin=self.pin)

    def put(self, group: "Group", arena: Arena) -> None:
        manager = get_manager()
        with self._lock, manager.lock:
            if group in self._arenas:
                return
            while self._arenas and self.nbytes + arena.nbytes > self.limit:
                _, old = self._arenas.popitem(last=False)
                self.nbytes -= old.nbytes
                manager.refund("host", self.model_name, CACHE_LEDGER, "cache", old.nbytes)
            self._arenas[group] = arena
            self.nbytes += arena.nbytes
            manager.charge("host", self.model_name, CACHE_LEDGER, "cache", arena.nbytes)

    def clear(self) -> None:
        """Forget every cached group (copies from them must have finished)."""
        manager = get_manager()
        with self._lock, manager.lock:
            if self.nbytes:
                manager.refund("host", self.model_name, CACHE_LEDGER, "cache", self.nbytes)
            self._arenas.clear()
            self.nbytes = 0
