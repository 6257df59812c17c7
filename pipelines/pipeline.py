"""A diffusers pipeline whose models live under the core, driven phase by phase.

``load_pipeline`` resolves a model (a registry key or a local folder), fetches its files,
builds every weighted component on the meta device and binds it to its files with the
component's config; tokenizers and the scheduler load as usual; diffusers' own pipeline
class is then assembled around them, so its generation loop runs unchanged.

While it runs, each component announces itself (a forward pre-hook on text encoders and the
denoiser, a wrapper around ``vae.decode``): entering a new phase offloads the previous
phase's models and onloads this one's, so only the current phase's models are onloaded.
Phase boundaries and denoising steps become ``Event``s; a cancel flag is checked at each.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

import vram
from vram import monitor

from . import loading
from .registry import Family, get_family
from .request import GenerationRequest, RequestError
from .errors import Cancelled
from .sources import is_local, locate, resolve_model
from .speed import Speed, SpeedReport

log = logging.getLogger(__name__)

# Pipelines whose latents are packed 2x2 before the transformer: sizes must be multiples of
# twice the VAE's downscale factor.
_PACKED_LATENTS = {"QwenImagePipeline", "ZImagePipeline", "FluxPipeline"}
# Multiples a pipeline's own input check insists on, whatever its VAE.
_PIPELINE_MULTIPLE = {"StableDiffusionXLPipeline": 8}
_CONFIG_KEYS = {f"{state}_{what}" for state in ("offload", "onload", "preparing", "computation")
                for what in ("device", "dtype")}


@dataclass(frozen=True)
class Event:
    """A point in a run. ``kind``: run_start, phase_start, step, phase_end, run_end, cancelled.
    ``time`` is seconds since the run started; ``step`` counts from 1 to ``total``."""

    kind: str
    time: float
    phase: str | None = None
    step: int | None = None
    total: int | None = None
    component: str | None = None


@dataclass
class DeviceUse:
    """One accelerator's peak against its cap, in a run over several. Bytes."""

    device: str
    peak_vram_bytes: int | None
    vram_limit_bytes: int | None
    within_cap: bool | None

    def describe(self) -> str:
        return f"{self.device} {_peak_against_cap(self.peak_vram_bytes, self.vram_limit_bytes, self.within_cap, 'n/a')}"


def _peak_against_cap(peak: int | None, cap: int | None, within: bool | None, no_peak: str) -> str:
    """'1.20 GiB (cap 2.00 GiB, within cap)', the form every peak of a summary takes."""
    gib = vram.GIB
    peak_text = no_peak if peak is None else f"{peak / gib:.2f} GiB"
    cap_text = "no cap" if cap is None else f"cap {cap / gib:.2f} GiB"
    verdict = {None: "", True: ", within cap", False: ", ABOVE CAP"}[within]
    return f"{peak_text} ({cap_text}{verdict})"


@dataclass
class RunSummary:
    """Measured over one ``generate`` call. Bytes and seconds. Over several accelerators
    ``devices`` has each one's peak and cap; then ``peak_vram_bytes`` is the highest of them,
    ``vram_limit_bytes`` that device's cap, and ``within_cap`` whether every one kept to its own."""

    model: str
    device: str
    seconds: float
    phase_seconds: dict[str, float]
    steps: int
    seconds_per_step: float | None
    peak_ram_bytes: int                 # process RSS at its highest
    peak_vram_bytes: int | None         # torch's reserved peak on CUDA; None on the CPU
    vram_limit_bytes: int | None
    within_cap: bool | None
    bytes_to_device: int
    bytes_read_from_disk: int
    speed: SpeedReport = field(default_factory=SpeedReport)   # the speed settings as they ran
    devices: list[DeviceUse] = field(default_factory=list)    # over several accelerators only

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        gib = vram.GIB
        phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phase_seconds.items())
        per_step = "n/a" if self.seconds_per_step is None else f"{self.seconds_per_step:.3f} s/step"
        if self.devices:
            vram_line = "peak VRAM per device: " + "; ".join(d.describe() for d in self.devices)
        else:
            vram_line = "peak VRAM " + _peak_against_cap(self.peak_vram_bytes, self.vram_limit_bytes, self.within_cap,
                                                         "n/a (CPU)")
        return (f"{vram_line}; peak RAM {self.peak_ram_bytes / gib:.2f} GiB\n"
                f"time {self.seconds:.2f} s: {phases}; {self.steps} steps, {per_step}\n"
                f"moved to device {self.bytes_to_device / gib:.2f} GiB, read from disk "
                f"{self.bytes_read_from_disk / gib:.2f} GiB\n"
                f"speed: {self.speed.describe()}")


@dataclass
class Result:
    """Images as float arrays in [0, 1], shape (batch, H, W, 3); videos as (batch, frames, H, W, 3)."""

    family: Family
    request: GenerationRequest
    images: np.ndarray | None
    videos: np.ndarray | None
    summary: RunSummary
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, out: str | Path) -> list[Path]:
        from .output import save_result
        return save_result(self, Path(out))


class _Run:
    """Per-generation state: timing, events, cancellation."""

    def __init__(self, on_event: Callable[[Event], None] | None, cancel: threading.Event | None, total_steps: int):
        self.on_event = on_event
        self.cancel = cancel
        self.total_steps = total_steps
        self.t0 = time.perf_counter()
        self.phase: str | None = None
        self.phase_t0 = self.t0
        self.phase_seconds: dict[str, float] = {}
        self.step_times: list[float] = []
        self.denoise_t0: float | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def emit(self, kind: str, **fields) -> None:
        if self.on_event is not None:
            self.on_event(Event(kind, self.now(), **fields))

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by the user")

    def start_phase(self, phase: str, component: str) -> None:
        self.end_phase()
        self.phase, self.phase_t0 = phase, time.perf_counter()
        if phase == "denoising":
            self.denoise_t0 = self.phase_t0
        self.emit("phase_start", phase=phase, component=component,
                  total=self.total_steps if phase == "denoising" else None)

    def end_phase(self) -> None:
        if self.phase is None:
            return
        seconds = time.perf_counter() - self.phase_t0
        self.phase_seconds[self.phase] = self.phase_seconds.get(self.phase, 0.0) + seconds
        self.emit("phase_end", phase=self.phase)
        self.phase = None

    def step_done(self, index: int, total: int) -> None:
        self.step_times.append(time.perf_counter())
        self.emit("step", phase="denoising", step=index + 1, total=total)
        self.check_cancel()


class ManagedPipeline:
    """A diffusers pipeline (``.pipe``) on managed components. Use ``generate``; ``close``
    (or a ``with`` block) releases everything the core holds for it."""

    def __init__(self, family: Family, folder: Path, pipe, components: dict[str, loading.LoadedComponent]):
        self.family = family
        self.folder = folder
        self.pipe = pipe
        self.components = components
        self.size_multiple = _size_multiple(pipe)
        self._onloaded: set[str] = set()
        self._run: _Run | None = None
        self._lock = threading.Lock()    # one generation at a time per pipeline
        self._handles = []
        self._install_phase_hooks()
        denoisers = family.components_in("denoising")
        self.speed = Speed(family, [components[n].module for n in denoisers], components["vae"].module,
                           self.computation_device, components[denoisers[0]].config.computation.dtype,
                           lambda model: vram.managed(model).groups)

    # -- phases ----------------------------------------------------------------------------------
    def _install_phase_hooks(self) -> None:
        for name, component in self.components.items():
            module = component.module
            if component.phase == "vae_decoding":
                for method in ("decode", "encode"):
                    if hasattr(module, method):
                        original = getattr(module, method)
                        setattr(module, method, self._wrap_vae_call(name, original))
            else:
                def pre_hook(_module, _args, name=name):
                    self._enter(name)
                self._handles.append(module.register_forward_pre_hook(pre_hook, prepend=True))

    def _wrap_vae_call(self, name: str, original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            self._enter(name)
            with vram.track(self.components[name].module):
                return original(*args, **kwargs)
        return call

    def _enter(self, name: str) -> None:
        """Component ``name`` is about to run: switch phases if it starts a new one."""
        component = self.components[name]
        run = self._run
        new_phase = run is not None and run.phase != component.phase
        if run is not None:
            run.check_cancel()
            if new_phase:
                run.end_phase()
        for other in list(self._onloaded):
            if self.components[other].phase != component.phase:
                vram.offload(self.components[other].module)
                self._onloaded.discard(other)
        if new_phase:
            run.start_phase(component.phase, name)  # its time includes onloading its models
        if name not in self._onloaded:
            vram.onload(component.module)
            self._onloaded.add(name)

    def offload_all(self) -> None:
        for name in list(self._onloaded):
            vram.offload(self.components[name].module)
            self._onloaded.discard(name)

    @property
    def computation_device(self) -> torch.device:
        return self.components[self.family.components_in("denoising")[0]].config.computation.device

    @property
    def devices(self) -> list[torch.device]:
        """Every device the models compute on, the computation device first: one, unless the
        pipeline was placed over several accelerators."""
        devices = {self.computation_device: None}
        for component in self.components.values():
            devices.update(dict.fromkeys(part.device for part in vram.managed(component.module).parts))
        return list(devices)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest | None = None, *, on_event: Callable[[Event], None] | None = None,
                 cancel: threading.Event | None = None, pipeline_kwargs: Mapping[str, Any] | None = None,
                 **fields) -> Result:
        """Run one job. ``request`` or its fields as keywords (``prompt=..., steps=...``).
        ``on_event`` receives every ``Event``; setting ``cancel`` stops the run at the next
        step or phase boundary with ``Cancelled``, after releasing its memory.
        ``pipeline_kwargs`` go to the diffusers pipeline as they are (e.g. max_sequence_length)."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(GenerationRequest)}
        if unknown:
            raise RequestError(f"unknown setting(s) {sorted(unknown)}; settings are "
                               f"{', '.join(f.name for f in dataclasses.fields(GenerationRequest))}")
        if request is None:
            request = GenerationRequest(**fields)
        elif fields:
            request = dataclasses.replace(request, **fields)
        request = request.resolved(self.family, self.size_multiple)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this pipeline is already generating; wait for that run or load another")
        if self.pipe is None:
            self._lock.release()
            raise RuntimeError("this pipeline was closed; load it again")
        try:
            return self._generate(request, on_event, cancel, dict(pipeline_kwargs or {}))
        finally:
            self._lock.release()

    def _generate(self, request: GenerationRequest, on_event, cancel, extra: dict[str, Any]) -> Result:
        self._set_vae_options(request)
        call = self._call_arguments(request)
        call.update(extra)
        run = _Run(on_event, cancel, request.steps)
        call["callback_on_step_end"] = self._step_callback(run)
        self.speed.begin(request)

        manager = vram.get_manager()
        counters0 = dataclasses.replace(manager.counters)
        reports0 = manager.reports_total
        monitor.reset_peak_rss()
        device = self.computation_device
        scopes = {d: monitor.device_peak_scope(d) for d in self.devices}
        self._run = run
        run.emit("run_start")
        try:
            run.check_cancel()
            with torch.inference_mode():
                output = self.pipe(**call)
            run.end_phase()
        except BaseException as error:
            run.end_phase()
            self._release()
            if isinstance(error, Cancelled):
                run.emit("cancelled")
            raise
        finally:
            self._run = None
            device_peaks = {d: scope.close() for d, scope in scopes.items()}
            speed = self.speed.end()
        self.offload_all()
        summary = self._summary(run, request, manager, counters0, reports0, device, device_peaks)
        summary.speed = speed
        run.emit("run_end")
        images = videos = None
        if self.family.kind == "video":
            videos = np.asarray(output.frames, dtype=np.float32)
        else:
            images = np.asarray(output.images, dtype=np.float32)
        settings = {"model": self.family.key, "pipeline": self.family.pipeline_class,
                    **request.as_metadata(), "configs": self.describe_configs(), "speed": speed.as_dict()}
        return Result(self.family, request, images, videos, summary, settings)

    def _release(self) -> None:
        """After a failed or cancelled run: nothing stays onloaded or staged."""
        self.offload_all()
        gc.collect()
        for device in self.devices:
            vram.empty_cache(device)

    def _step_callback(self, run: _Run):
        def callback(pipe, index, timestep, callback_kwargs):
            total = getattr(pipe, "_num_timesteps", None) or run.total_steps
            run.step_done(index, total)
            return callback_kwargs
        return callback

    def _call_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        family = self.family
        video = family.kind == "video"
        call: dict[str, Any] = {
            "prompt": request.prompt,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            family.guidance_argument: request.guidance,
            "generator": torch.Generator("cpu").manual_seed(request.seed),
            "output_type": "np",
            ("num_videos_per_prompt" if video else "num_images_per_prompt"): request.batch,
        }
        if video:
            call["num_frames"] = request.frames
        if "max_sequence_length" in family.defaults:
            call["max_sequence_length"] = family.defaults["max_sequence_length"]
        negative = request.negative_prompt
        if family.guidance_argument == "true_cfg_scale":
            # Qwen-Image runs CFG only when a negative prompt is given; " " is its neutral one.
            if request.guidance > 1:
                call["negative_prompt"] = negative or " "
        elif negative and family.pipeline_class != "FluxPipeline":
            call["negative_prompt"] = negative
        return call

    def _set_vae_options(self, request: GenerationRequest) -> None:
        vae = self.components["vae"].module
        for wanted, on, off, what in ((request.vae_tiling, "enable_tiling", "disable_tiling", "vae_tiling"),
                                      (request.vae_slicing, "enable_slicing", "disable_slicing", "vae_slicing")):
            if wanted and not hasattr(vae, on):
                raise ValueError(f"{what}: the VAE of {self.family.title} ({type(vae).__name__}) does not support it")
            if hasattr(vae, on):
                getattr(vae, on if wanted else off)()

    def _summary(self, run: _Run, request, manager, counters0, reports0, device, device_peaks) -> RunSummary:
        seconds = run.now()
        reports = manager.reports_since(reports0)
        peaks = [r.peak_reserved_bytes for r in reports if r.peak_reserved_bytes is not None]
        device_peak = device_peaks[device][1] if device_peaks[device] is not None else None
        peak_vram = max(peaks + ([device_peak] if device_peak is not None else []), default=None)
        # vram_limit 0 means "stream every layer", not a cap of 0 bytes.
        caps = [c.config.vram_limit for c in self.components.values() if c.config.vram_limit]
        cap_bytes = int(min(caps) * vram.GIB) if caps else None
        within = None
        if cap_bytes is not None:
            verdicts = [r.within_cap for r in reports if r.within_cap is not None]
            within = all(verdicts) and (peak_vram is None or peak_vram <= cap_bytes)
        devices = self._device_uses(reports, device_peaks) if len(device_peaks) > 1 else []
        if devices:
            busiest = max(devices, key=lambda d: d.peak_vram_bytes or 0)
            peak_vram, cap_bytes = busiest.peak_vram_bytes, busiest.vram_limit_bytes
            verdicts = [d.within_cap for d in devices if d.within_cap is not None]
            within = all(verdicts) if verdicts else None
        step_seconds = None
        if run.step_times and run.denoise_t0 is not None:
            step_seconds = (run.step_times[-1] - run.denoise_t0) / len(run.step_times)
        counters = manager.counters
        return RunSummary(
            model=self.family.key, device=vram.config.device_name(device), seconds=seconds,
            phase_seconds=dict(run.phase_seconds), steps=len(run.step_times),
            seconds_per_step=step_seconds, peak_ram_bytes=monitor.peak_rss(), peak_vram_bytes=peak_vram,
            vram_limit_bytes=cap_bytes, within_cap=within,
            bytes_to_device=counters.bytes_to_device - counters0.bytes_to_device,
            bytes_read_from_disk=counters.bytes_read_from_disk - counters0.bytes_read_from_disk,
            devices=devices,
        )

    def _device_uses(self, reports, device_peaks) -> list[DeviceUse]:
        """Each device's peak (its reports' and its allocator's) against its cap: the smallest
        among the models' parts computing there, as the core's budget takes it."""
        uses = []
        for device, measured in device_peaks.items():
            name = vram.config.device_name(device)
            mine = [r for r in reports if r.device == name]
            peaks = [r.peak_reserved_bytes for r in mine if r.peak_reserved_bytes is not None]
            if measured is not None:
                peaks.append(measured[1])
            peak = max(peaks, default=None)
            caps = [part.cap_bytes for c in self.components.values() for part in vram.managed(c.module).parts
                    if part.budget_key == name and part.cap_bytes]
            cap = min(caps) if caps else None
            within = None
            if cap is not None:
                within = all(r.within_cap is not False for r in mine) and (peak is None or peak <= cap)
            uses.append(DeviceUse(name, peak, cap, within))
        return uses

    # -- introspection and teardown --------------------------------------------------------------
    def describe_configs(self) -> dict[str, dict[str, Any]]:
        """Each component's config as plain data (dtypes as names)."""
        out = {}
        for name, component in self.components.items():
            out[name] = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                         for k, v in component.config.to_dict().items()}
        return out

    def close(self) -> None:
        """Release every weight the core holds for this pipeline; the object is unusable after.
        Waits for a generation in progress to end (cancel it first to stop it sooner)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self.pipe is None:
            return
        self.offload_all()
        self.speed.close()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for component in self.components.values():
            if vram.is_managed(component.module):
                vram.release(component.module)
        self.components.clear()
        self.pipe = None
        gc.collect()

    def __enter__(self) -> "ManagedPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _size_multiple(pipe) -> int:
    """What width and height must be multiples of: the VAE's downscale times the latent
    patch (packed 2x2 latents count as a patch of 2), at least what the pipeline checks."""
    name = type(pipe).__name__
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8))
    if name in _PACKED_LATENTS:
        multiple = spatial * 2
    else:
        patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
        multiple = spatial * int((patch[-1] if isinstance(patch, (tuple, list)) else patch) or 1)
    return max(multiple, _PIPELINE_MULTIPLE.get(name, 1))


def _apart(device: torch.device, home: torch.device) -> bool:
    """Whether a model computing on ``device`` needs its inputs carried from the execution
    device ``home`` and its output back: another accelerator of the same kind."""
    is_host, is_standin = vram.config.is_host, vram.config.is_standin
    return device != home and not is_host(device) and not is_host(home) and is_standin(device) == is_standin(home)


def _split_configs(configs, family: Family) -> dict[str, Any]:
    if isinstance(configs, vram.VramConfig) or (isinstance(configs, Mapping) and _CONFIG_KEYS & set(configs)):
        return {"default": configs}
    if not isinstance(configs, Mapping):
        raise ValueError(f"configs must be a vram config or a dict of them per component, got {type(configs).__name__}")
    loading.check_config_keys(configs, family)
    return dict(configs)


_converting = threading.Lock()


def _convert_on_first_use(family: Family, source: str, models_dir, progress) -> None:
    """A converted variant's folder, made from its original when it is not there yet."""
    if family.converted_from is None:
        return
    from .convert import convert

    folder, _ = locate(family.key, models_dir)
    with _converting:  # two loads of one variant in this process convert it once
        if (folder / "model_index.json").is_file():
            return
        original, _ = resolve_model(family.converted_from, source=source, models_dir=models_dir, progress=progress)
        log.info("%s: converting %s into %s (once)", family.key, original, folder)
        converting = None
        if progress is not None:
            def converting(name: str, done: int, total: int) -> None:
                progress(f"converting {name}", done, total)
        convert(original, folder, dtype=family.converted_dtype, progress=converting)


def load_pipeline(model: str | Path, configs: Any, *, source: str = "modelscope", models_dir: str | Path | None = None,
                  progress: Callable[[str, int, int], None] | None = None,
                  family: str | None = None, placement: loading.ModelPlacement | None = None) -> ManagedPipeline:
    """Load ``model`` (a registry key such as "flux.1-schnell", or a local diffusers folder)
    with ``configs``: one vram config for every component, or a dict by component name
    ("text_encoder_2"), role ("text_encoders", "denoiser", "vae") or "default".

    ``source``: "modelscope" (default), "huggingface" or "local" (``models_dir/<key>`` must
    hold the files). Files are downloaded once into ``models_dir`` and checked; nothing is
    ever written into a model folder afterwards. ``family`` names the registry entry whose
    defaults a local folder should use, when its pipeline class is ambiguous. A converted
    registry variant ("flux.1-dev-fp8") is made on first use from its original (downloaded
    first if needed), with ``progress("converting <component>", done, total)``.

    The models may compute on several accelerators (each config's computation device):
    diffusers' pipeline makes its tensors on its execution device (``loading.execution_device``),
    so a model computing on another takes its inputs from there and hands its output back
    (the core's ``io_device``), and the VAE, whose decode is no forward, must compute there.
    ``placement`` (``presets.placement.Placement``) splits a component that no device holds
    over runs of its blocks, with a cap per device.
    """
    if not is_local(model):
        _convert_on_first_use(get_family(str(model)), source, models_dir, progress)
    folder, fam = resolve_model(model, source=source, models_dir=models_dir, progress=progress)
    if family is not None:
        fam = get_family(family)
    per_component = _split_configs(configs, fam)
    configs_by_name = {c.name: loading.config_for(per_component, c) for c in fam.components}
    home = loading.execution_device(fam, configs_by_name)
    for name in fam.components_in("vae_decoding"):
        where = configs_by_name[name].computation.device
        if _apart(where, home):
            raise ValueError(f"configs: {name} computes on {vram.config.device_name(where)}, but decodes what the "
                             f"pipeline makes on its execution device, {vram.config.device_name(home)}; put it there")
    loading.check_folder(folder, fam)
    index = loading.read_model_index(folder)

    import diffusers
    pipeline_class = getattr(diffusers, fam.pipeline_class)
    components: dict[str, loading.LoadedComponent] = {}
    parts: dict[str, Any] = {}
    try:
        for component in fam.components:
            config = configs_by_name[component.name]
            split = caps = None
            if placement is not None:
                split = functools.partial(placement.device_map_for, component.name)
                caps = placement.caps_for(component.name)
            loaded = loading.load_component(folder, component.name, component.phase, index[component.name],
                                            config, fam.variant, label=f"{fam.key}/{component.name}", split=split,
                                            io_device=home if _apart(config.computation.device, home) else None,
                                            vram_limit=caps)
            components[component.name] = loaded
            parts[component.name] = loaded.module
        modules, options = pipeline_class._get_signature_keys(pipeline_class)
        for name, entry in index.items():
            if name.startswith("_") or name in parts or name not in set(modules) | set(options):
                continue
            if isinstance(entry, list):  # a component: [library, class], or [null, null] for none
                parts[name] = loading.load_plain_component(folder, name, entry) if all(entry) else None
            else:                        # a pipeline option saved in the index (e.g. boundary_ratio)
                parts[name] = entry
        pipe = pipeline_class(**parts)
    except BaseException:
        for loaded in components.values():
            vram.release(loaded.module)
        raise
    pipe.set_progress_bar_config(disable=True)
    log.info("%s loaded from %s: %s", fam.key, folder,
             ", ".join(f"{n} ({c.config.offload})" for n, c in components.items()))
    return ManagedPipeline(fam, folder, pipe, components)
