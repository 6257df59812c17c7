"""The execution order of a model's groups, learned, and the lookahead it gives.

Before the first forward the order is a guess: the groups in definition order. Every top-level
forward records the groups it enters; when a forward strays from the known order, its record
becomes the order. At each group entry the next ``lookahead`` groups of the order are the ones
to prefetch, wrapping around to the start (the next forward of a denoising loop begins where
this one began). Positions are per thread, so two threads running one model each keep theirs.
"""

from __future__ import annotations

import threading
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")


class Schedule(Generic[T]):
    def __init__(self, groups: Sequence[T], lookahead: int):
        self.order: list[T] = list(groups)
        self.lookahead = lookahead
        self.learned = False
        self._local = threading.local()

    def start(self) -> None:
        """A top-level forward begins on this thread."""
        local = self._local
        local.pos = 0
        local.record = []
        local.strayed = not self.learned

    def finish(self) -> None:
        """A top-level forward ended: a forward that strayed teaches the order."""
        local = self._local
        record = getattr(local, "record", None)
        if record and local.strayed:
            self.order = record
            self.learned = True
        local.record = None

    def next(self, group: T) -> list[T]:
        """Note that ``group`` runs now; the groups expected after it."""
        local = self._local
        record = getattr(local, "record", None)
        if record is not None:
            record.append(group)
        pos = getattr(local, "pos", 0)
        order = self.order
        if pos >= len(order) or order[pos] is not group:
            local.strayed = True
            try:
                pos = order.index(group, pos)
            except ValueError:
                try:
                    pos = order.index(group)
                except ValueError:
                    local.pos = pos
                    return []
        local.pos = pos + 1
        want = self.lookahead
        upcoming = order[pos + 1:pos + 1 + want]
        if len(upcoming) < want:
            upcoming = upcoming + order[:min(pos, want - len(upcoming))]
        return upcoming
