"""The two hooks per group: enter before the root module's forward, leave after it.

The layers inside a group run plain torch code; only the group's roots carry hooks. The
post-hook runs even when the forward raises, and does nothing when this thread's pre-hook
did not enter the group (a static group, or an earlier hook raised).

In a model split over devices (``device_map``) the pre-hook also carries the group's tensor
inputs to its device (``Crossings``), and the model's output comes back to its own.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

import torch

from .budget import get_manager
from .config import is_standin
from .devices import make_mover
from .group import GroupState

if TYPE_CHECKING:
    from .group import Group
    from .model import ManagedModel
    from .schedule import Schedule


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (tuples, lists and dicts followed;
    a dict, e.g. diffusers' ``BaseOutput``, is changed in place to keep its class)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        mapped = [_map_tensors(v, fn) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else tuple(mapped)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        for key in list(value):
            value[key] = _map_tensors(value[key], fn)
        return value
    return value


class Crossings:
    """Where a split model's activations are, and their moves between its parts' devices
    (and its home: the device its inputs come from and its output goes to).

    A tensor is where torch says it is; on the stand-ins, whose tensors are all CPU tensors,
    it is where the group that returned it computes, the model's inputs are at home, and a
    tensor neither (what the model's own code computes between groups) is where the last
    group ran.
    At a group's entry every tensor input elsewhere moves through the group's mover, once
    per forward: a tensor that every block takes (the timestep embedding, the rotary table)
    crosses once, and the next blocks on that device reuse the copy."""

    def __init__(self, record: "ManagedModel", home: torch.device):
        self.record = record
        self.home = home            # where the model's inputs come from and its output goes
        self.tagged = is_standin(self.home)
        self._home_mover = None
        self._local = threading.local()

    def start(self, inputs: Any = ()) -> None:
        """A forward begins with ``inputs`` (its arguments) at the home device."""
        local = self._local
        local.here = self.home      # where the last group ran
        local.places: dict[int, tuple[torch.Tensor, torch.device]] = {}  # stand-ins: by id
        local.copies: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        if self.tagged:
            self._tag(inputs, self.home)

    def _tag(self, value: Any, device: torch.device) -> None:
        places = self._local.places

        def tag(tensor):
            places[id(tensor)] = (tensor, device)
            return tensor
        _map_tensors(dict(value) if isinstance(value, dict) else value, tag)

    def finish(self) -> None:
        local = self._local
        local.places = {}
        local.copies = {}

    def _where(self, tensor: torch.Tensor) -> torch.device:
        if not self.tagged:
            return tensor.device
        known = self._local.places.get(id(tensor))
        return known[1] if known is not None and known[0] is tensor else self._local.here

    def _to(self, device: torch.device, mover) -> Callable[[torch.Tensor], torch.Tensor]:
        local = self._local

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if self._where(tensor) == device:
                return tensor
            done = local.copies.get((id(tensor), device))
            if done is not None and done[0] is tensor:
                return done[1]
            copy = mover.move(tensor)
            local.copies[(id(tensor), device)] = (tensor, copy)
            if self.tagged:
                local.places[id(copy)] = (copy, device)
            manager = get_manager()
            with manager.lock:
                manager.counters.activation_moves += 1
                manager.counters.activation_bytes += tensor.numel() * tensor.element_size()
            return copy
        return move

    def enter(self, group: "Group", args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A group's inputs, on its device."""
        if not hasattr(self._local, "here"):
            self.start()  # a group run outside the model's forward (a test calling a block)
        move = self._to(group.device, group.part.mover)
        args, kwargs = _map_tensors(args, move), _map_tensors(kwargs, move)
        self._local.here = group.device
        return args, kwargs

    def left(self, group: "Group", output: Any) -> None:
        """A group's outputs are on its device (noted on the stand-ins)."""
        if self.tagged and hasattr(self._local, "places"):
            self._tag(output, group.device)
            self._local.here = group.device

    def returning(self, module, args, output):
        """The model's output, on the model's own device."""
        if not hasattr(self._local, "here"):
            return None
        return _map_tensors(output, self._to(self.home, self._mover(self.home)))

    def _mover(self, device: torch.device):
        """The mover of ``device``: the part computing there, else (a pipeline's execution
        device that computes none of this model's groups) one of its own."""
        for part in self.record.parts:
            if part.device == device:
                return part.mover
        if self._home_mover is None:
            self._home_mover = make_mover(device)
        return self._home_mover


class GroupHooks:
    def __init__(self, group: "Group", schedule: "Schedule", crossings: Crossings | None = None):
        self.group = group
        self.schedule = schedule
        self.crossings = crossings
        self._local = threading.local()
        self.handles = []
        for root in group.roots:
            if crossings is None:
                self.handles.append(root.register_forward_pre_hook(self.pre))
            else:
                self.handles.append(root.register_forward_pre_hook(self.pre_crossing, with_kwargs=True))
            self.handles.append(root.register_forward_hook(self.post, always_call=True))

    def pre_crossing(self, module, args, kwargs):
        args, kwargs = self.crossings.enter(self.group, args, kwargs)
        self.pre(module, args)
        return args, kwargs

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
        if self.crossings is not None:
            self.crossings.left(self.group, output)
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
