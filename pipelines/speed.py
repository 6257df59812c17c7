"""Speed settings on the managed models: the attention backend, regional compilation of the
denoiser's blocks, channels_last convolutions and diffusers' step caches.

Each is a field of ``GenerationRequest`` (``attention``, ``compile``, ``channels_last``,
``cache``), checked there (``check_attention``, ``check_cache``); ``Speed`` applies them to a
loaded pipeline before each run and reports what ran (``SpeedReport``: the run summary and
the PNG metadata carry it). How each composes with the core, which installs a group's
weights at its root module's forward pre-hook and puts placeholders back at its forward
hook (vram/hooks.py):

* attention: ``ModelMixin.set_attention_backend`` on each denoiser. It changes attention
  processors only, never a parameter. diffusers' method also sets a process-wide default
  backend; that is put back, so one pipeline's choice does not leak into another model.
  "auto" is the fastest installed kernel that works on the computation device
  (``fastest_attention``: "native" on the CPU). A UNet's attention (``AttnProcessor2_0``)
  calls torch's SDPA itself, so only "native" applies there.
* compile: ``torch.compile`` on the ``forward`` of each block named by ``_repeated_blocks``
  (diffusers' regional compilation picks the same blocks). ``compile_repeated_blocks`` uses
  ``nn.Module.compile``, which wraps ``_call_impl``, the module's hooks included, and leaves it
  to dynamo whether it traces them; here the core's hooks stay in the eager ``_call_impl``
  around the compiled body, so dynamo never sees a lock or a transfer and the block compiles
  as one graph. A block that the core
  streams leaf by leaf (a cap below the block's size, or leaf granularity) has hooks inside
  it: it stays eager, and the report counts it. dynamo's counters give the run's graphs and
  graph breaks, its timers the seconds spent compiling (the first run pays them).
* channels_last: the core keeps weights in contiguous arenas and swaps them in per forward,
  and ``.to(memory_format=...)`` on a managed module converts buffers only, so the layout
  cannot live on the weights. Each ``Conv2d`` of the denoiser and the VAE gets a forward
  pre-hook that gives it a channels_last input instead: cuDNN and oneDNN take the layout
  from the input or the weight, so the convolution runs and returns channels_last, and the
  network computes bit for bit what diffusers computes after
  ``model.to(memory_format=torch.channels_last)`` (measured on the CPU).
* cache: ``CacheMixin.enable_cache`` on each denoiser before the run, ``disable_cache`` after
  it, so every run starts clean. diffusers' cache hooks replace the blocks' ``forward``,
  which runs inside the core's hooks: a block the cache skips still has its weights staged,
  so under a streaming preset on a GPU a skipped block saves its compute, not its transfer.
  diffusers has caches for denoisers with ``CacheMixin`` whose pipelines set cache contexts
  (FLUX.1, Qwen-Image, Wan); MagCache needs ratios calibrated per model, shipped for FLUX.1.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import RequestError
from .registry import FAMILIES, Family

log = logging.getLogger(__name__)

AUTO = "auto"
NATIVE = "native"
CACHE_OFF = "off"

# Third-party kernels "auto" prefers on a CUDA device computing in a half dtype, fastest first.
# They take no attention mask (diffusers raises if one is passed); the families here attend
# without one.
_FAST_KERNELS = ("_flash_3", "flash", "sage")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CacheKind:
    """One of diffusers' step caches as the ``cache`` field names it: ``name[:value]``."""

    name: str
    config: str          # the diffusers config class
    parameter: str       # the config field ``value`` sets
    whole: bool          # the value is a number of steps


CACHES = {kind.name: kind for kind in (
    # First Block Cache: the other blocks are skipped while the first block's residual differs
    # by less than the threshold (relative mean difference) from the last computed step's.
    CacheKind("first_block", "FirstBlockCacheConfig", "threshold", False),
    # MagCache: whole steps are skipped while the accumulated error of the calibrated
    # magnitude ratios stays under the threshold.
    CacheKind("mag", "MagCacheConfig", "threshold", False),
    # TaylorSeer: every attention output is computed once every cache_interval steps and
    # predicted by a Taylor series in between.
    CacheKind("taylorseer", "TaylorSeerCacheConfig", "cache_interval", True),
)}
# Magnitude ratios calibrated per denoiser class: the name of the table in diffusers.hooks.mag_cache.
_MAG_RATIOS = {"FluxTransformer2DModel": "FLUX_MAG_RATIOS"}


# ---------------------------------------------------------------------------------------------
# Checking the fields (before anything loads)
# ---------------------------------------------------------------------------------------------

def attention_backends() -> list[str]:
    """Every backend name the ``attention`` field takes: auto, native, then diffusers' others
    that run from installed packages (the ``*_hub`` ones fetch kernels at run time)."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    names = [b.value for b in AttentionBackendName if b.value != NATIVE and not b.value.endswith("_hub")]
    return [AUTO, NATIVE, *sorted(names)]


def _requirement(name: str) -> tuple[str, str] | None:
    """(the flag in diffusers.models.attention_dispatch that says it is installed, what to
    install) for a backend that needs a package beyond torch; None when torch is enough."""
    if name in ("flash", "flash_varlen"):
        return "_CAN_USE_FLASH_ATTN", "the flash-attn package"
    if name in ("_flash_3", "_flash_varlen_3"):
        return "_CAN_USE_FLASH_ATTN_3", "FlashAttention 3 (flash_attn_interface, built from source)"
    if name.startswith(("sage", "_sage")):
        return "_CAN_USE_SAGE_ATTN", "the sageattention package"
    if name == "xformers":
        return "_CAN_USE_XFORMERS_ATTN", "the xformers package"
    if name == "flex":
        return "_CAN_USE_FLEX_ATTN", "torch 2.5 or later"
    if name == "_native_npu":
        return "_CAN_USE_NPU_ATTN", "torch_npu"
    if name == "_native_xla":
        return "_CAN_USE_XLA_ATTN", "torch_xla"
    return None


def _installed(name: str) -> bool:
    requirement = _requirement(name)
    if requirement is None:
        return True
    from diffusers.models import attention_dispatch
    return bool(getattr(attention_dispatch, requirement[0], False))


def _device_needed(name: str) -> str | None:
    """The device type a backend's kernels exist for (None: any torch device)."""
    if name.startswith(("flash", "_flash", "sage", "_sage")) or name in ("xformers", "_native_cudnn",
                                                                          "_native_efficient"):
        return "cuda"
    return {"_native_npu": "npu", "_native_xla": "xla"}.get(name)


def _half_only(name: str) -> bool:
    """Whether diffusers declares the backend for float16/bfloat16 queries only."""
    from diffusers.models import attention_dispatch as dispatch
    checks = dispatch._AttentionBackendRegistry._constraints.get(dispatch.AttentionBackendName(name), [])
    return any(getattr(check, "__name__", "").startswith("_check_qkv_dtype_bf16") for check in checks)


def check_attention(value: Any) -> str:
    """The ``attention`` field, checked and lower-cased: "auto", "native" or a diffusers
    backend whose package is installed. RequestError names the field and what is missing."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"attention: must be a backend name (auto, native, flash, ...), got {value!r}")
    name = value.strip().lower()
    if name == AUTO:
        return name
    from diffusers.models.attention_dispatch import AttentionBackendName
    known = {b.value for b in AttentionBackendName}
    if name not in known:
        close = difflib.get_close_matches(name, attention_backends(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RequestError(f"attention: unknown backend {value!r}{hint}; choose one of {', '.join(attention_backends())}")
    if name.endswith("_hub"):
        raise RequestError(f"attention: {name!r} downloads its kernel from the Hugging Face Hub when it is set; "
                           f"install the kernel's package and use a local backend (flash, _flash_3, sage) instead")
    if not _installed(name):
        raise RequestError(f"attention: {name!r} needs {_requirement(name)[1]} (not installed)")
    return name


def check_cache(value: Any, family: Family) -> str:
    """The ``cache`` field, checked and written as "off" or "kind:value" (the default value
    filled in): a cache diffusers has for ``family``'s denoiser, with a positive value."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", CACHE_OFF, "none")):
        return CACHE_OFF
    if not isinstance(value, str):
        raise RequestError(f"cache: must be text such as 'first_block:0.12' or 'off', got {value!r}")
    name, _, number = value.strip().lower().partition(":")
    kind = CACHES.get(name)
    if kind is None:
        choices = ", ".join(f"{k.name}[:{k.parameter}]" for k in CACHES.values())
        raise RequestError(f"cache: unknown cache {name!r}; choose off, {choices}")
    amount = cache_default(kind) if not number.strip() else _cache_value(kind, number)
    supported = cache_support(family)
    if name not in supported:
        raise RequestError(f"cache: {_unsupported(kind, family, supported)}")
    return f"{name}:{amount:g}"


def _cache_value(kind: CacheKind, text: str) -> float:
    try:
        amount = float(text)
    except ValueError:
        raise RequestError(f"cache: {kind.name}'s {kind.parameter} must be a number, got {text.strip()!r}") from None
    if not math.isfinite(amount) or amount <= 0:
        raise RequestError(f"cache: {kind.name}'s {kind.parameter} must be a positive number, got {text.strip()}")
    if kind.whole and amount != int(amount):
        raise RequestError(f"cache: {kind.name}'s {kind.parameter} is a number of steps, a whole number >= 1; "
                           f"got {text.strip()}")
    return amount


def cache_default(kind: CacheKind) -> float:
    """diffusers' default for the cache's main parameter."""
    import diffusers
    config = getattr(diffusers, kind.config)
    return float(next(f.default for f in dataclasses.fields(config) if f.name == kind.parameter))


def denoiser_classes(family: Family) -> list[type]:
    """The classes of ``family``'s denoisers, as its diffusers pipeline declares them."""
    import diffusers
    hints = typing.get_type_hints(getattr(diffusers, family.pipeline_class).__init__)
    classes = []
    for name in family.components_in("denoising"):
        hint = hints.get(name)
        classes += [c for c in (typing.get_args(hint) or (hint,)) if isinstance(c, type) and c is not type(None)]
    return classes


def cache_support(family: Family) -> tuple[str, ...]:
    """The caches diffusers has for ``family``: none unless every denoiser has CacheMixin;
    MagCache where calibrated ratios ship for the denoiser."""
    from diffusers.models.cache_utils import CacheMixin
    classes = denoiser_classes(family)
    if not classes or not all(issubclass(c, CacheMixin) for c in classes):
        return ()
    kinds = ["first_block", "taylorseer"]
    if all(c.__name__ in _MAG_RATIOS for c in classes):
        kinds.insert(1, "mag")
    return tuple(kinds)


def _unsupported(kind: CacheKind, family: Family, supported: tuple[str, ...]) -> str:
    if supported:
        return (f"{kind.name} needs magnitude ratios calibrated for the model, and diffusers ships them for FLUX.1 "
                f"only; {family.title} takes {' or '.join(supported)}")
    classes = ", ".join(c.__name__ for c in denoiser_classes(family)) or "its denoiser"
    # By model: a registry's variants of one model (its fp8 copy) share its title's first words.
    with_caches = dict.fromkeys(f.title.split(" (")[0].split(",")[0] for f in FAMILIES.values() if cache_support(f))
    return (f"{family.title} has no step cache in diffusers ({classes} has no CacheMixin); caches run on "
            f"{', '.join(with_caches)}; use off")


# ---------------------------------------------------------------------------------------------
# Choosing on the device
# ---------------------------------------------------------------------------------------------

def fastest_attention(device: torch.device, dtype: torch.dtype) -> str:
    """What "auto" means: on a CUDA device computing in float16/bfloat16, the first installed
    of FlashAttention 3, FlashAttention 2 and SageAttention; anywhere else torch's own
    scaled_dot_product_attention ("native", which picks its fused kernels by itself)."""
    if device.type == "cuda" and dtype in _HALF:
        for name in _FAST_KERNELS:
            if _installed(name):
                return name
    return NATIVE


def usable_attention(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """RequestError unless backend ``name`` runs on ``device`` in ``dtype``."""
    needed = _device_needed(name)
    if needed is not None and device.type != needed:
        raise RequestError(f"attention: {name!r} needs a {needed.upper()} device; this run computes on "
                           f"{device.type}; use auto or native")
    if _half_only(name) and dtype not in _HALF:
        raise RequestError(f"attention: {name!r} takes float16 or bfloat16 only; this run computes in "
                           f"{str(dtype).removeprefix('torch.')}")


def _dispatches(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention goes through diffusers' backends (a processor with an
    ``_attention_backend``), which ``set_attention_backend`` switches."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in model.modules())


def cache_config(cache: str, model: torch.nn.Module, steps: int, dtype: torch.dtype):
    """The diffusers config for a checked ``cache`` ("kind:value") on ``model``, for a run of
    ``steps`` denoising steps computing in ``dtype`` (TaylorSeer keeps its factors in it)."""
    import diffusers
    name, _, number = cache.partition(":")
    kind = CACHES[name]
    value = float(number)
    options: dict[str, Any] = {kind.parameter: int(value) if kind.whole else value}
    if name == "mag":
        from diffusers.hooks import mag_cache
        options.update(num_inference_steps=steps, mag_ratios=getattr(mag_cache, _MAG_RATIOS[type(model).__name__]))
    elif name == "taylorseer":
        options.update(taylor_factors_dtype=dtype)
    return getattr(diffusers, kind.config)(**options)


# ---------------------------------------------------------------------------------------------
# Applying them, run by run
# ---------------------------------------------------------------------------------------------

@dataclass
class SpeedReport:
    """The speed settings a run used, as it ran them."""

    attention: str = NATIVE              # the backend the denoiser's attention ran on
    compile: bool = False
    compiled_blocks: int = 0
    eager_blocks: int = 0                # repeated blocks left eager: the core streams them leaf by leaf
    compile_seconds: float | None = None  # dynamo and inductor in this run (about 0 once compiled)
    graphs: int | None = None            # graphs dynamo made in this run
    graph_breaks: int | None = None      # in this run's compiled code: 0 when every block is one graph
    channels_last: bool = False
    channels_last_convolutions: int = 0
    cache: str = CACHE_OFF

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        parts = [f"attention {self.attention}"]
        if self.compile:
            compiled = f"compile on ({self.compiled_blocks} blocks"
            if self.eager_blocks:
                compiled += f", {self.eager_blocks} eager: streamed leaf by leaf"
            if self.compile_seconds is not None:
                compiled += f", {self.compile_seconds:.2f} s compiling this run"
            if self.graph_breaks is not None:
                compiled += f", {self.graph_breaks} graph breaks"
            parts.append(compiled + ")")
        else:
            parts.append("compile off")
        parts.append(f"channels_last on ({self.channels_last_convolutions} convolutions)" if self.channels_last
                     else "channels_last off")
        parts.append(f"cache {self.cache}")
        return ", ".join(parts)


def _compile_counters() -> tuple[float | None, int, int]:
    """(seconds dynamo and inductor have spent compiling, graphs made, graph breaks) so far in
    this process: dynamo's own timers and counters."""
    from torch._dynamo import utils
    metrics = getattr(utils, "compilation_time_metrics", None)
    seconds = sum(metrics.get("_compile.compile_inner", ())) if metrics is not None else None
    counters = utils.counters
    return seconds, int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["graph_break"].values()))


def _channels_last_input(module: torch.nn.Module, args: tuple):
    """A Conv2d's forward pre-hook: its input in channels_last (see the module's docstring)."""
    x = args[0]
    if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


class Speed:
    """The speed settings on one pipeline's models, switched run by run: ``begin`` before a
    run (checks everything first, then applies), ``end`` after it (caches off, the report)."""

    def __init__(self, family: Family, denoisers: list[torch.nn.Module], vae: torch.nn.Module,
                 device: torch.device, dtype: torch.dtype, groups_of: Callable[[torch.nn.Module], list]):
        self.family = family
        self.denoisers = denoisers
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.groups_of = groups_of              # a managed model's groups (vram.managed(m).groups)
        self.attention: str | None = None       # the backend set on the processors
        self.compiled: list[tuple[torch.nn.Module, Callable]] = []
        self.eager_blocks = 0
        self.conv_hooks: list = []
        self.cached: list[torch.nn.Module] = []
        self.report: SpeedReport | None = None
        self._counters0: tuple[float | None, int, int] | None = None

    # -- a run -----------------------------------------------------------------------------------
    def begin(self, request) -> None:
        """Apply ``request``'s settings (a resolved GenerationRequest). RequestError, naming
        the field, before anything changes when one cannot work here."""
        plain = [type(m).__name__ for m in self.denoisers if not _dispatches(m)]
        attention = request.attention
        if attention == AUTO:
            attention = NATIVE if plain else fastest_attention(self.device, self.dtype)
        usable_attention(attention, self.device, self.dtype)
        if attention != NATIVE and plain:
            raise RequestError(f"attention: {self.family.title}'s {', '.join(plain)} calls torch's "
                               f"scaled_dot_product_attention itself (AttnProcessor2_0), not diffusers' "
                               f"backends; use auto or native")
        if request.compile and not all(getattr(m, "_repeated_blocks", None) for m in self.denoisers):
            raise RequestError(f"compile: {self.family.title}'s denoiser names no repeated blocks to compile")
        convolutions = self._convolutions()
        if request.channels_last and not convolutions:
            raise RequestError(f"channels_last: {self.family.title} has no 2-D convolution in its denoiser or VAE")

        try:
            self._set_attention(attention)
            self._set_compiled(request.compile)
            self._set_channels_last(convolutions if request.channels_last else [])
            for model in self.denoisers if request.cache != CACHE_OFF else ():
                model.enable_cache(cache_config(request.cache, model, request.steps, self.dtype))
                self.cached.append(model)
        except BaseException:
            self.end()
            raise
        self.report = SpeedReport(attention=attention, compile=request.compile,
                                  compiled_blocks=len(self.compiled), eager_blocks=self.eager_blocks,
                                  channels_last=request.channels_last,
                                  channels_last_convolutions=len(self.conv_hooks), cache=request.cache)
        self._counters0 = _compile_counters() if request.compile else None

    def end(self) -> SpeedReport:
        """After the run (or its failure): caches off; what the run used and, compiled, what
        compiling cost it."""
        for model in self.cached:
            model.disable_cache()
        self.cached = []
        report = self.report or SpeedReport()
        if self._counters0 is not None:
            seconds0, graphs0, breaks0 = self._counters0
            seconds, graphs, breaks = _compile_counters()
            report.compile_seconds = None if seconds is None else round(seconds - seconds0, 3)
            report.graphs, report.graph_breaks = graphs - graphs0, breaks - breaks0
        self.report, self._counters0 = None, None
        return report

    def close(self) -> None:
        """Everything off: plain modules again (the pipeline is being closed)."""
        self.end()
        self._set_compiled(False)
        self._set_channels_last([])

    # -- the settings ----------------------------------------------------------------------------
    def _set_attention(self, backend: str) -> None:
        if backend == self.attention:
            return
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        default, _ = _AttentionBackendRegistry.get_active_backend()
        try:
            for model in self.denoisers:
                if _dispatches(model):
                    model.set_attention_backend(backend)
        finally:
            _AttentionBackendRegistry.set_active_backend(default)
        self.attention = backend

    def _set_compiled(self, on: bool) -> None:
        if on == bool(self.compiled or self.eager_blocks):
            return
        if not on:
            for module, compiled in self.compiled:
                if module.__dict__.get("forward") is compiled:
                    del module.__dict__["forward"]
            self.compiled, self.eager_blocks = [], 0
            return
        for model in self.denoisers:
            roots = {id(root) for group in self.groups_of(model) for root in group.roots}
            for block in _repeated_blocks(model):
                if any(id(inner) in roots for inner in block.modules() if inner is not block):
                    self.eager_blocks += 1  # the core's hooks inside: dynamo would trace them
                    continue
                compiled = torch.compile(block.forward)
                block.forward = compiled
                self.compiled.append((block, compiled))
        if self.eager_blocks:
            log.warning("compile: %d of %d blocks stay eager: the core streams them leaf by leaf",
                        self.eager_blocks, self.eager_blocks + len(self.compiled))

    def _convolutions(self) -> list[torch.nn.Conv2d]:
        return [m for model in (*self.denoisers, self.vae) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    def _set_channels_last(self, convolutions: list[torch.nn.Conv2d]) -> None:
        if bool(convolutions) == bool(self.conv_hooks):
            return
        for handle in self.conv_hooks:
            handle.remove()
        self.conv_hooks = [conv.register_forward_pre_hook(_channels_last_input) for conv in convolutions]


def _repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules of the classes ``model._repeated_blocks`` names, in order."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    found: list[torch.nn.Module] = []

    def walk(module: torch.nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in names:
                found.append(child)
            else:
                walk(child)
    walk(model)
    return found
