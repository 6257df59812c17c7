"""Which tensors keep their dtype when a config stores or computes in low precision.

One rule, shared by the core (at bind time) and by planners (on checkpoint keys alone):

* modules named in ``keep_fp32`` (name components; by default the model's
  ``_keep_in_fp32_modules``, as diffusers applies it) keep float32 under a half or fp8 config;
* normalisation layers, the model's ``_skip_layerwise_casting_patterns`` and the defaults
  below keep the computation dtype instead of fp8 or half storage.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from .config import FP8_DTYPES, VramConfig

# Layers whose weights stay in the computation dtype under fp8/half storage, whatever the
# model says: normalisations, embeddings of positions/patches and the outermost projections
# are tiny and sensitive (the same defaults as diffusers' layerwise casting).
DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


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
