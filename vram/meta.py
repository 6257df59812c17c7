"""Build a model without allocating its parameters.

Inside ``empty_weights()`` every parameter a module registers is put on the meta device
(shape and dtype only, no memory), while buffers stay real: rotary tables, position ids and
other buffers computed in ``__init__`` keep their values. ``enable_vram_management`` then
binds the parameters to the model's .safetensors files.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_patch_lock = threading.Lock()
_depth = 0
_original_register_parameter = torch.nn.Module.register_parameter


def _register_parameter_on_meta(module: torch.nn.Module, name: str, param):
    if param is not None and param.device.type != "meta":
        param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _original_register_parameter(module, name, param)


@contextlib.contextmanager
def empty_weights():
    """Parameters registered inside the block live on the meta device; buffers stay real.

    The patch is process-wide while any such block is open, so build models in it, not
    unrelated modules in other threads.
    """
    global _depth
    with _patch_lock:
        _depth += 1
        torch.nn.Module.register_parameter = _register_parameter_on_meta
    try:
        yield
    finally:
        with _patch_lock:
            _depth -= 1
            if _depth == 0:
                torch.nn.Module.register_parameter = _original_register_parameter


def has_meta_parameters(model: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())
