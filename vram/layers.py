"""Managed layers: one per module that holds parameters directly.

A managed module keeps its class, its forward code and its state_dict keys. Between forwards
each of its parameters is a *placeholder*: a Parameter with the right shape, the computation
dtype and the computation device that owns a single element (NaN), so code reading
``layer.weight.dtype``/``.device``/``.shape`` (diffusers' and transformers' own forward
code and pipelines) sees what it expects while the real weights live in another tier. A
forward pre-hook swaps the real tensors in; a post-hook (run even when forward raises) swaps
the placeholders back and lets the manager decide whether the staged copy stays.

Weights move through a ``Slot``, one per unique parameter (tied parameters share a slot):

    base      the model-level copy, at the offload or onload placement (None: on disk)
    prepared  staged at the preparing placement (the base itself when placements match)
    compute   the tensor a forward uses, at the computation placement, dropped after it
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from .config import Placement, VramConfig
from .manager import get_manager
from .transfer import Staged, pin_in_place, unpin_in_place
from .weights import TensorInfo

if TYPE_CHECKING:
    from .model import ManagedModel

_PIN_MIN_BYTES = 1 << 20  # smaller tensors may share pages; they stay pageable


class VramLimitError(RuntimeError):
    """A layer cannot be brought in without going over the device's budget."""


def tier_key(device: torch.device) -> str:
    """The ledger's name for a computation device ("cpu", "cuda:0")."""
    return str(device)


def base_ledger_key(placement: Placement) -> str:
    """Base copies in RAM are the host tier, whatever device computes."""
    return "host" if placement.device.type == "cpu" else tier_key(placement.device)


def make_placeholder(shape: torch.Size, placement: Placement) -> torch.nn.Parameter:
    fill = float("nan") if placement.dtype.is_floating_point else 0
    single = torch.full((), fill, dtype=placement.dtype, device=placement.device)
    return torch.nn.Parameter(single.expand(shape), requires_grad=False)


class Slot:
    """One unique parameter and its copies in the tiers."""

    def __init__(self, model: "ManagedModel", layer: str, keys: list[str], shape: torch.Size,
                 config: VramConfig, info: TensorInfo | None):
        self.model = model
        self.layer = layer
        self.keys = keys
        self.shape = shape
        self.numel = shape.numel()
        self.config = config
        self.info = info
        self.placeholder = make_placeholder(shape, config.computation)
        self.prepared_key = tier_key(config.preparing.device)  # where staged copies are charged
        self._same_preparing_computation = config.preparing == config.computation
        self.base: torch.Tensor | None = None
        self.prepared_is_base = False  # the base already sits at the preparing placement
        self._base_placement: Placement | None = None
        self.base_ledger: str | None = None  # where the base copy is charged
        self.base_pinned = False
        self._resident_param: torch.nn.Parameter | None = None
        self.prepared: Staged | None = None
        self.prepared_charged = 0
        self.pending: Future | None = None
        self.users = 0
        self.kept = False
        self.last_used = 0

    # -- sizes and facts ----------------------------------------------------------------
    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * dtype.itemsize

    @property
    def base_placement(self) -> Placement | None:
        return self._base_placement

    @base_placement.setter
    def base_placement(self, placement: Placement | None) -> None:
        self._base_placement = placement
        self.prepared_is_base = placement == self.config.preparing

    @property
    def prepared_nbytes(self) -> int:
        """Bytes a staged copy adds on the preparing device (0 when the base is used)."""
        return 0 if self.prepared_is_base else self.nbytes(self.config.preparing.dtype)

    @property
    def compute_nbytes(self) -> int:
        return 0 if self._same_preparing_computation else self.nbytes(self.config.computation.dtype)

    @property
    def static(self) -> bool:
        """The base is the computation tensor: nothing to move, ever, in this state."""
        return self.prepared_is_base and self._same_preparing_computation

    def evictable_on(self, device_key: str) -> bool:
        return (self.prepared is not None and self.prepared_charged > 0 and self.users == 0
                and self.pending is None and self.prepared_key == device_key)

    # -- base copy (model-level states) ------------------------------------------------
    def set_base(self, placement: Placement, *, fits=lambda slot, nbytes: True) -> None:
        """Move the base copy to ``placement`` (disk: drop it; the file keeps the weights).

        ``fits`` says whether a copy on the budget device may be made; when not, the base
        stays where it is and the layer streams from there.
        """
        manager = get_manager()
        if placement == self.base_placement:
            return
        if placement.is_disk:
            new = None
        else:
            if not fits(self, self.nbytes(placement.dtype)):
                return
            if self.base is not None:
                new = self.base.to(device=placement.device, dtype=placement.dtype, copy=True)
            elif self.info.dtype == placement.dtype and placement.device.type == "cpu":
                new = self.read()  # the read buffer becomes the base
            else:
                # Converted on the way in: read into the model's reused scratch buffer so no
                # file-dtype copy is allocated (and freed) per tensor.
                new = self.read(scratch=self.model.scratch()).to(
                    device=placement.device, dtype=placement.dtype, copy=True)
        with manager.lock:
            self._drop_base()
            self.base, self.base_placement = new, placement
            if new is not None:
                self.base_ledger = base_ledger_key(placement)
                manager.charge(self.base_ledger, self.model.name, self.layer, "base", self.nbytes(placement.dtype))
        if new is not None and placement.device.type == "cpu" and self.config.computation.device.type == "cuda" \
                and self.config.pin_memory and self.nbytes(placement.dtype) >= _PIN_MIN_BYTES:
            try:
                self.base_pinned = pin_in_place(new)
            except Exception:  # the driver may refuse; copies then stay synchronous
                self.base_pinned = False

    def adopt_base(self, tensor: torch.Tensor, placement: Placement) -> None:
        """Use an existing tensor (the model's own parameter) as the base copy."""
        with get_manager().lock:
            self.base, self.base_placement = tensor, placement
            self.base_ledger = base_ledger_key(placement)
            get_manager().charge(self.base_ledger, self.model.name, self.layer, "base", self.nbytes(placement.dtype))

    def _drop_base(self) -> None:
        if self.base is not None:
            if self.base_pinned:
                # Copies issued from this memory must finish before it is pageable again.
                self.model.mover.synchronize()
                unpin_in_place(self.base)
                self.base_pinned = False
            get_manager().refund(self.base_ledger, self.model.name, self.layer, "base",
                                 self.nbytes(self.base.dtype))
        self.base, self.base_placement, self.base_ledger = None, None, None
        self._resident_param = None

    def resident_parameter(self) -> torch.nn.Parameter:
        """The base as a Parameter, one object per slot so tied weights stay tied."""
        if self._resident_param is None or self._resident_param.data_ptr() != self.base.data_ptr():
            self._resident_param = torch.nn.Parameter(self.base, requires_grad=False)
        return self._resident_param

    def read(self, *, stream: bool = False, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The weights from disk, in the file's dtype: a RAM copy of their own; with
        ``stream``, staged for one forward (see ManagedModel.read_weight); with ``scratch``,
        a view into that buffer, valid until the next read into it."""
        return self.model.read_weight(self, stream=stream, scratch=scratch)

    # -- staging (per layer, driven by the core) -----------------------------------------
    def stage(self) -> Staged:
        """The weights at the preparing placement; a new tensor unless the base is there."""
        if self.prepared_is_base:
            return Staged(self.base)
        source = self.base if self.base is not None else self.read(stream=True)
        return self.model.mover.convert(source, self.config.preparing)

    def drop_prepared(self) -> None:
        """Forget the staged copy (caller holds the manager lock)."""
        if self.prepared_charged:
            get_manager().refund(self.prepared_key, self.model.name, self.layer,
                                 "prepared", self.prepared_charged)
            if self.kept:
                self.model.kept_bytes -= self.prepared_charged
            else:
                self.model.streaming_bytes -= self.prepared_charged
        self.prepared, self.prepared_charged, self.kept = None, 0, False

    def evict(self) -> None:
        manager = get_manager()
        manager.counters.evictions += 1
        manager.counters.evicted_bytes += self.prepared_charged
        self.drop_prepared()

    def clear(self) -> None:
        """Drop every copy but the base (caller holds the manager lock)."""
        if self.pending is not None:
            self.pending.cancel()  # a no-op once the read has started; its result is dropped
            self.pending = None
        self.drop_prepared()


class ManagedLayer:
    """The hooks and the swap for one module's direct parameters."""

    def __init__(self, model: "ManagedModel", name: str, module: torch.nn.Module,
                 entries: list[tuple[str, Slot]]):
        self.model = model
        self.name = name
        self.module = module
        self.entries = entries
        self.static = False
        self.need = 0  # bytes its forward adds on the computation device (staged + cast copies)
        self._lock = threading.RLock()
        self._local = threading.local()
        self._active: list[tuple[Slot, torch.Tensor, int]] = []
        self._handles = [
            module.register_forward_pre_hook(self._pre_forward),
            module.register_forward_hook(self._post_forward, always_call=True),
        ]

    @property
    def slots(self) -> list[Slot]:
        return [slot for _, slot in self.entries]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def install(self, tensors: dict[str, torch.Tensor]) -> None:
        for param_name, tensor in tensors.items():
            self.module._parameters[param_name] = tensor

    def show_placeholders(self) -> None:
        self.install({name: slot.placeholder for name, slot in self.entries})

    def refresh_static(self) -> None:
        """In a state where every weight is already its computation tensor, leave the real
        Parameters in place and skip the hooks' work."""
        self.static = all(slot.static for slot in self.slots)
        if self.static:
            self.install({name: slot.resident_parameter() for name, slot in self.entries})
        else:
            self.show_placeholders()

    def state(self) -> str:
        if self._active:
            return "computation"
        if all(s.prepared is not None and not s.prepared_is_base for s in self.slots):
            return "preparing"
        return self.model.state.value

    # -- hooks ----------------------------------------------------------------------------
    def _pre_forward(self, module, args):
        if self.static:
            return None
        self._lock.acquire()
        self._local.depth = getattr(self._local, "depth", 0) + 1
        if self._local.depth == 1:
            self.model.before_layer(self)
            tensors = {}
            for param_name, slot in self.entries:
                tensor, charged = self.model.acquire(slot)
                self._active.append((slot, tensor, charged))
                tensors[param_name] = tensor
            self.install(tensors)
        return None

    def _post_forward(self, module, args, output):
        depth = getattr(self._local, "depth", 0)
        if depth == 0:  # our pre-hook did not run (static, or an earlier hook raised)
            return None
        self._local.depth = depth - 1
        try:
            if depth == 1:
                self.show_placeholders()
                active, self._active = self._active, []
                for slot, tensor, charged in active:
                    self.model.release(slot, tensor, charged)
        finally:
            self._lock.release()
        return None
