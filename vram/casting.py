"""Which tensors keep their dtype when a config stores or computes in low precision.

One rule, shared by the core (at bind time) and by planners (on checkpoint keys alone):

* modules named in ``keep_fp32`` (name components; by default the model's
  ``_keep_in_fp32_modules``, as diffusers applies it) keep float32 under a half or fp8 config;
* normalisation layers, the model's ``_skip_layerwise_casting_patterns`` and the defaults
  below keep the computation dtype instead of fp8 or half storage.

And how a tensor is stored in fp8, shared by the core and by converted checkpoints: *scaled*,
one power of two per tensor (``fp8_scale``) chosen so that the tensor's largest magnitude
lands in the top binade of the fp8 format. e4m3's smallest normal number is 2^-6, and the
weights of large models mostly lie below it, where a plain cast loses precision or flushes
to zero; scaled, they use fp8's full range (the stored value is ``weight / scale``, and
``weight = fp8 * scale`` at compute time). A power of two makes both multiplications exact,
so every path that casts (on the host, on a device, at load time or in a converted copy)
gives the same bits, and a weight's value depends only on its fp8 bits and its scale.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from typing import Iterator, Sequence

import torch

from .config import FP8_DTYPES, VramConfig

# Layers whose weights stay in the computation dtype under fp8/half storage, whatever the
# model says: normalisations, embeddings of positions/patches and the outermost projections
# are tiny and sensitive (the same defaults as diffusers' layerwise casting).
DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# The largest finite value of each fp8 format (e4m3fn has no infinity: past it is NaN).
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# A converted checkpoint stores a tensor's scale as a float32 scalar under this suffix.
SCALE_SUFFIX = ".fp8_scale"


_plain = threading.local()


@contextlib.contextmanager
def plain_fp8() -> Iterator[None]:
    """Models put under management inside this block (in this thread) store fp8 as a plain
    cast, scale 1.0, as DiffSynth and diffusers' layerwise casting do: for comparisons."""
    before = getattr(_plain, "on", False)
    _plain.on = True
    try:
        yield
    finally:
        _plain.on = before


def fp8_plain() -> bool:
    """Inside ``plain_fp8()``."""
    return getattr(_plain, "on", False)


def fp8_scale(values: torch.Tensor, dtype: torch.dtype, values_scale: float = 1.0) -> float:
    """The scale ``values`` (times ``values_scale``: they may be scaled fp8 themselves) get
    when stored as ``dtype``: the smallest power of two ``s`` with ``max|values| / s`` within
    the format's range; 1.0 for a tensor of zeros, an empty one, or one that is not finite
    (that one is cast as it is)."""
    if dtype not in FP8_MAX:
        raise ValueError(f"fp8_scale: {dtype} is not an fp8 dtype")
    if not values.numel():
        return 1.0
    values = values.detach()
    if values.dtype in FP8_MAX:
        values = values.float()  # fp8 has no reductions
    low, high = torch.aminmax(values)
    amax = max(-float(low), float(high)) * values_scale
    if not math.isfinite(amax) or amax == 0.0:
        return 1.0
    mantissa, exponent = math.frexp(amax / FP8_MAX[dtype])  # ratio = mantissa * 2**exponent
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def cast(tensor: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> torch.Tensor:
    """``tensor`` in ``dtype``, multiplied by ``factor`` (the source's scale over the
    target's, a power of two): the tensor itself when nothing changes. A dequantisation
    multiplies in the target dtype, a quantisation in the source's, both exactly."""
    if factor == 1.0:
        return tensor if tensor.dtype == dtype else tensor.to(dtype)
    if tensor.dtype in FP8_MAX:
        wide = torch.float32 if dtype in FP8_MAX else dtype
        out = tensor.to(wide).mul_(factor)
        return out.to(dtype) if wide != dtype else out
    return (tensor * factor).to(dtype)


def copy_cast(out: torch.Tensor, tensor: torch.Tensor, factor: float = 1.0) -> None:
    """``out.copy_`` of ``tensor`` cast to ``out``'s dtype as ``cast`` does."""
    out.copy_(tensor if factor == 1.0 else cast(tensor, out.dtype, factor))


def casting_rule(module_name: str, param_key: str, module_type: str, keep_fp32: Sequence[str],
                 skip_patterns: Sequence[str]):
    """The rule on names alone: torch.float32, "computation" (stays in the computation
    dtype) or None (the config's dtypes apply)."""
    if any(name in param_key.split(".") for name in keep_fp32):
        return torch.float32
    patterns = DEFAULT_SKIP_PATTERNS + tuple(skip_patterns)
    if "Norm" in module_type or any(re.search(p, module_name) for p in patterns):
        return "computation"
    return None


def model_rule(model: torch.nn.Module, module: torch.nn.Module, module_name: str, param_key: str,
               keep_fp32: Sequence[str] | None = None):
    """``casting_rule`` with the hints a model declares."""
    if keep_fp32 is None:
        keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    return casting_rule(module_name, param_key, type(module).__name__, keep_fp32,
                        getattr(model, "_skip_layerwise_casting_patterns", None) or ())


def tensor_config(model: torch.nn.Module, module: torch.nn.Module, config: VramConfig, module_name: str,
                  key: str, keep_fp32: Sequence[str] | None = None) -> VramConfig:
    """The config one parameter follows: the model's, or one with its dtypes kept."""
    rule = model_rule(model, module, module_name, key, keep_fp32)
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
