"""The two hooks per group: enter before the root module's forward, leave after it.

The layers inside a group run plain torch code; only the group's roots carry hooks. The
post-hook runs even when the forward raises, and does nothing when this thread's pre-hook
did not enter the group (a static group, or an earlier hook raised).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .group import GroupState

if TYPE_CHECKING:
    from .group import Group
    from .schedule import Schedule


class GroupHooks:
    def __init__(self, group: "Group", schedule: "Schedule"):
        self.group = group
        self.schedule = schedule
        self._local = threading.local()
        self.handles = []
        for root in group.roots:
            self.handles.append(root.register_forward_pre_hook(self.pre))
            self.handles.append(root.register_forward_hook(self.post, always_call=True))

    def pre(self, module, args):
        group = self.group
        if group.static:
            return None
        group.enter()
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        resting = GroupState.RESTING
        for upcoming in self.schedule.next(group):
            if upcoming.state is resting and not upcoming.static:
                upcoming.prefetch()
        return None

    def post(self, module, args, output):
        local = self._local
        depth = getattr(local, "depth", 0)
        if not depth:
            return None
        local.depth = depth - 1
        self.group.leave()
        return None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
