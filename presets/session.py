"""A long-lived session for an app: the models it may run, plans before a run, and runs that
reuse the loaded pipeline.

    session = Session(models_dir="models")
    plan = session.plan("sdxl", GenerationRequest(prompt="a fox"), preset="auto")
    print(plan.describe())                      # the tree, and every preset's predicted peaks
    outcome = session.generate(session.prepare(plan), on_event=print)   # loads, or reuses
    session.close()

Everything a user types is checked here, before anything loads, and refused with a
``RequestError`` naming the field: the model (a registry key, or a folder *inside* the
models directory: no other path is reachable), the preset, ``vram_limit`` (a finite number
of GiB, at most the card's memory), the job's settings, and whether the job could fit this
machine at all.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping

import torch

import vram
from pipelines import Event, Family, FAMILIES, GenerationRequest, ModelFilesError, RequestError, registry
from pipelines.convert import describe as describe_conversion
from pipelines.loading import check_config_keys, config_for, family_of_folder
from pipelines.sources import default_models_dir, locate
from vram import monitor

from .auto import AutoOutcome, RunPlan, execute, plan_run, usable_hardware
from .cache import PipelineCache
from .fallback import attempt_configs
from .files import PresetError, Preset, list_presets, load_preset
from .placement import MULTI_GPU
from .planner import GIB, Calibration, Prediction, predict
from .probe import Hardware
from .tree import Decision, cap_from_free, decide

log = logging.getLogger(__name__)

AUTO = "auto"
CUSTOM = "custom"


@dataclass(frozen=True)
class ModelChoice:
    """A model the session may run. ``model`` is what pipelines take (a registry key or an
    absolute folder); ``name`` is what the user picked."""

    name: str
    model: str
    family: Family
    folder: Path
    local: bool

    @property
    def downloaded(self) -> bool:
        return (self.folder / "model_index.json").is_file()

    @property
    def conversion(self) -> str | None:
        """What a converted copy is ("FLUX.1-dev (12B), fp8 e4m3 (scaled), 14 shards"); None
        for any other folder."""
        return describe_conversion(self.folder)

    @property
    def label(self) -> str:
        if self.local:
            return f"{self.name} (local folder, {self.conversion or self.family.title})"
        if self.family.bundled is not None:
            return f"{self.name}: {self.family.title}, built in"
        if self.family.converted_from is not None and not self.downloaded:
            return f"{self.name}: {self.family.title} (made from {self.family.converted_from} on first use)"
        return f"{self.name}: {self.family.title}" + ("" if self.downloaded else " (not downloaded yet)")


@dataclass(frozen=True)
class SessionPlan:
    """A checked job, the machine, the tree's decision and every preset's predicted peaks."""

    choice: ModelChoice
    request: GenerationRequest                 # resolved: every default filled in
    preset_asked: str                          # "auto", a preset name or "custom"
    run_plan: RunPlan                          # the preset and cap the run will use
    decision: Decision                         # always made (for the explanation), even for a named preset
    predictions: dict[str, Prediction]         # every preset, plus "custom" when given
    configs: dict[str, dict] | None = None     # the user's own configs ("custom")
    table_cap: float | None = None             # GiB: the cap the predictions table assumes

    @property
    def preset(self) -> str:
        return self.run_plan.preset

    @property
    def vram_limit(self) -> float | None:
        return self.run_plan.vram_limit

    @property
    def hardware(self) -> Hardware:
        return self.run_plan.hardware

    @property
    def prediction(self) -> Prediction:
        return self.predictions[self.preset]

    def describe(self) -> str:
        lines = list(self.decision.explanation)
        if self.preset_asked != AUTO:
            lines.append(f"you chose {self.preset}" + (
                f", vram_limit {self.vram_limit:.1f} GiB" if self.vram_limit is not None else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the API: bytes and GiB."""
        hardware = self.hardware
        return {
            "model": self.choice.name, "family": self.choice.family.key, "downloaded": self.choice.downloaded,
            "preset_asked": self.preset_asked, "preset": self.preset, "vram_limit_gib": self.vram_limit,
            "device": self.run_plan.device,
            "request": self.request.as_metadata(),
            "hardware": {"gpus": [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes,
                                   "free_bytes": g.free_bytes} for g in hardware.gpus],
                         "gpu_status": hardware.gpu_status, "ram_total_bytes": hardware.ram_total_bytes,
                         "ram_available_bytes": hardware.ram_available_bytes,
                         "disk_free_bytes": hardware.disk_free_bytes},
            "explanation": list(self.decision.explanation),
            "predictions": {name: {"peak_vram_bytes": p.peak_vram_bytes, "peak_ram_bytes": p.peak_ram_bytes,
                                   "vram_limit_gib": p.vram_limit} for name, p in self.predictions.items()},
        }


@dataclass
class RunOutcome:
    """A finished run: the result, what it ran under, and the prediction it is measured against."""

    result: Any                                # pipelines.Result
    preset: str
    vram_limit: float | None
    plan: SessionPlan
    prediction: Prediction
    messages: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)   # measured / predicted - 1
    loaded: bool = True                        # False: the kept pipeline was reused


class Session:
    """Models, plans and runs for one process. ``models_dir`` bounds the local folders a user
    can name; ``source`` is where registry models download from."""

    def __init__(self, models_dir: str | Path | None = None, *, source: str = "modelscope",
                 calibration: Calibration | None = None, cache: PipelineCache | None = None, nvml=None):
        self.models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
        self.source = source
        self.calibration = calibration or Calibration()
        self.cache = cache or PipelineCache()
        self.nvml = nvml

    # -- models --------------------------------------------------------------------------------
    def local_models(self) -> list[str]:
        """Folders directly inside the models directory that hold a diffusers pipeline
        (registry downloads excluded: they are listed by key)."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir()
                      if p.is_dir() and p.name not in FAMILIES and (p / "model_index.json").is_file())

    def models(self, first: str | None = None) -> list[ModelChoice]:
        """Every model the user may pick: ``first`` (default: the default model) first, then
        local folders, then the registry."""
        choices = []
        for name in self.local_models():
            try:
                choices.append(self.resolve_model(name))
            except RequestError as error:
                log.warning("skipping %s: %s", name, error)
        choices += [self.resolve_model(key) for key in FAMILIES]
        first = first or self.default_model()
        return sorted(choices, key=lambda c: c.name != first)

    def default_model(self) -> str:
        """The registry's built-in default (``pipelines.registry.DEFAULT_MODEL``) when it
        exists; else the first local folder; else a downloaded registry model; else the
        smallest one."""
        builtin = getattr(registry, "DEFAULT_MODEL", None)
        if builtin in FAMILIES:
            return builtin
        local = self.local_models()
        if local:
            return local[0]
        downloaded = [key for key in FAMILIES if (self.models_dir / key / "model_index.json").is_file()]
        if downloaded:
            return downloaded[0]
        return min(FAMILIES, key=lambda key: sum(c.parameters for c in FAMILIES[key].components))

    def resolve_model(self, name: Any) -> ModelChoice:
        """A registry key, or a folder inside the models directory (by its name, or its full
        path); anything else, ``..`` above all, is refused."""
        if not isinstance(name, str) or not name.strip():
            raise RequestError("model: empty; pick a model from the list")
        name = name.strip()
        if name in FAMILIES:
            folder, family = locate(name, self.models_dir)  # a bundled model's own folder, else the download's
            return ModelChoice(name, name, family, folder, local=False)
        root = self.models_dir.resolve()
        path = PurePath(name)
        if path.is_absolute():
            try:
                path = Path(path).relative_to(root)
            except ValueError:
                raise RequestError(f"model: {name!r} is outside the models directory ({root}); pick a model "
                                   f"from the list or put its folder there") from None
        if ".." in path.parts or not path.parts:
            raise RequestError(f"model: {name!r} is outside the models directory ({root}); pick a model "
                               f"from the list or put its folder there")
        folder = root / path
        if len(name) > 1024:
            raise RequestError(f"model: a name of {len(name)} characters is not a model; pick one from the list")
        try:
            inside = folder.resolve().is_relative_to(root)  # a symlink in the folder may point anywhere
            has_index = (folder / "model_index.json").is_file()
        except OSError as error:
            raise RequestError(f"model: {name[:80]!r} cannot be a model folder ({error.strerror})") from None
        if not inside:
            raise RequestError(f"model: {name!r} leads outside the models directory ({root}); pick a model "
                               f"from the list or put its folder there")
        if not has_index:
            close = ", ".join(self.local_models() + list(FAMILIES))
            raise RequestError(f"unknown model {name!r}: not a registry model, nor a model folder in {root}; "
                               f"known models: {close}")
        try:
            family = family_of_folder(folder)
        except ModelFilesError as error:
            raise RequestError(f"model: {error}") from None
        return ModelChoice(str(path), str(folder), family, folder, local=True)

    # -- checks ----------------------------------------------------------------------------------
    @staticmethod
    def check_preset(preset: Any, configs: Any = None) -> str:
        if preset in (None, ""):
            return AUTO
        if preset == AUTO:
            return preset
        if preset == CUSTOM:
            if configs is None:
                raise RequestError("preset: 'custom' needs your configs (the advanced panel, or `configs`)")
            return preset
        try:
            load_preset(preset)
        except PresetError as error:
            raise RequestError(f"preset: {error}; or 'auto' to let the decision tree choose") from None
        return preset

    @staticmethod
    def check_vram_limit(value: Any, hardware: Hardware) -> float | None:
        """None, or a finite number of GiB >= 0 that the computation device can hold (the
        largest GPU; on a machine without one, its RAM, which is the device then)."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise RequestError(f"vram_limit: must be a finite number of GiB >= 0 (or empty for the tree's "
                               f"choice), got {value!r}")
        if hardware.gpus:
            card = max(g.total_bytes for g in hardware.gpus)
            where = f"the GPU's memory ({card / GIB:.1f} GiB)"
        else:
            card = hardware.ram_total_bytes
            where = f"this machine's RAM ({card / GIB:.1f} GiB; without a GPU the CPU is the device)"
        if value * GIB > card:
            raise RequestError(f"vram_limit: {value:g} GiB is above {where}")
        return float(value)

    def parse_configs(self, configs: Any, family: Family) -> dict[str, dict]:
        """The user's own configs (JSON text or a dict: per component, role or "default",
        each DiffSynth's 8 keys plus extras), checked and returned as plain dicts."""
        if isinstance(configs, str):
            try:
                configs = json.loads(configs)
            except json.JSONDecodeError as error:
                raise RequestError(f"configs: not valid JSON ({error})") from None
        if not isinstance(configs, Mapping) or not configs:
            raise RequestError("configs: give an object of configs per component, e.g. {\"default\": {...}}")
        try:
            check_config_keys(configs, family)
            for component in family.components:
                config_for(configs, component)
        except ValueError as error:
            raise RequestError(f"configs: {error}") from None
        return {str(k): dict(v) for k, v in configs.items()}

    # -- planning --------------------------------------------------------------------------------
    def plan(self, model: Any, request: GenerationRequest, *, preset: Any = AUTO, vram_limit: Any = None,
             configs: Any = None) -> SessionPlan:
        """Check everything, probe the machine, decide and predict; nothing loads."""
        choice = self.resolve_model(model)
        preset = self.check_preset(preset, configs)
        custom = self.parse_configs(configs, choice.family) if preset == CUSTOM else None
        resolved = request.resolved(choice.family)
        hardware, kept_host_bytes = self._without_kept_pipeline(usable_hardware(choice.folder, nvml=self.nvml))
        limit = self.check_vram_limit(vram_limit, hardware)
        if custom is not None:
            limits = [c["vram_limit"] for c in custom.values() if c.get("vram_limit") is not None]
            limit = self.check_vram_limit(min(limits), hardware) if limits else None
        run_plan = plan_run(choice.model, resolved, preset=preset, vram_limit=limit, models_dir=self.models_dir,
                            calibration=self.calibration, hardware=hardware,
                            baseline_ram=max(0, monitor.current_rss() - kept_host_bytes))
        decision = run_plan.decision or decide(hardware, choice.family, run_plan.sizes, run_plan.job,
                                               baseline_ram=run_plan.baseline_ram, vram_limit=limit,
                                               calibration=self.calibration)
        # The table's cap is the tree's: the user's, else free VRAM minus the margin (0 on a CPU).
        cap = limit if limit is not None else (
            cap_from_free(max(g.free_bytes for g in hardware.gpus)) if hardware.gpus else 0.0)
        plan = SessionPlan(choice, resolved, preset, run_plan, decision, {}, custom, cap)
        plan = replace(plan, predictions=self._predictions(plan, run_plan, fresh_decision=True))
        self._check_fits(plan)
        return plan

    def _without_kept_pipeline(self, hardware: Hardware) -> tuple[Hardware, int]:
        """The machine as the next run will find it: the kept pipeline is either reused or
        closed first, so the VRAM its weights hold counts as free, and the RAM they hold is
        left out of the baseline (else a kept ``basic`` pipeline would push the tree to a lower
        preset, which closes it, and the next plan back up: a reload every run). Returns the
        adjusted hardware and the kept host bytes."""
        if self.cache.info is None:
            return hardware, 0
        held = _held_bytes()
        gpus = tuple(replace(g, free_bytes=min(g.total_bytes, g.free_bytes + held.get(f"cuda:{g.index}", 0)))
                     for g in hardware.gpus)
        return replace(hardware, gpus=gpus), held.get("host", 0) + held.get("cpu", 0)

    def _predictions(self, plan: SessionPlan, run_plan: RunPlan, *, fresh_decision: bool) -> dict[str, Prediction]:
        """Every preset's peaks under the table's cap (the decision's own, when it was just made
        with this baseline), plus the user's configs."""
        predictions = dict(plan.decision.predictions) if fresh_decision else {}
        for name in list_presets():
            if name not in predictions:
                predictions[name] = self._predict(run_plan, name, plan.table_cap)
        if run_plan.placement is not None and MULTI_GPU not in predictions:
            predictions[MULTI_GPU] = run_plan.placement.prediction(self._predict(run_plan, "basic", None))
        if plan.configs is not None:
            limits = [c["vram_limit"] for c in plan.configs.values() if c.get("vram_limit") is not None]
            predictions[CUSTOM] = self._predict(run_plan, _custom_preset(plan.configs), min(limits) if limits else None)
        return predictions

    def _predict(self, run_plan: RunPlan, preset: Preset | str, vram_limit: float | None) -> Prediction:
        return predict(run_plan.family, run_plan.sizes, run_plan.job, preset, on_gpu=run_plan.on_gpu,
                       dtype=torch.bfloat16 if run_plan.on_gpu else torch.float32, vram_limit=vram_limit,
                       baseline_ram=run_plan.baseline_ram, calibration=self.calibration)

    def _check_fits(self, plan: SessionPlan) -> None:
        """Refuse a job that cannot fit this machine under any preset: the most frugal one
        (disk, streaming every layer) still needs its activations and the VAE's decode."""
        if "disk" not in list_presets():
            return
        run_plan = plan.run_plan
        frugal = self._predict(run_plan, "disk", 0.0)
        hardware = plan.hardware
        request = plan.request
        size = f"{request.width}x{request.height}" + (f"x{request.frames} frames" if request.frames else "")
        hint = "lower the size" + ("" if request.vae_tiling else " or turn on VAE tiling")
        if frugal.peak_ram_bytes > hardware.ram_total_bytes:
            raise RequestError(f"width/height: {size} needs about {frugal.peak_ram_bytes / GIB:.1f} GiB of RAM even "
                               f"under the disk preset, more than this machine's {hardware.ram_total_bytes / GIB:.1f} "
                               f"GiB; {hint}")
        if hardware.gpus:
            need = frugal.peak_vram_bytes or 0   # the streaming window, activations and the CUDA context
            card = max(g.total_bytes for g in hardware.gpus)
            if need > card:
                raise RequestError(f"width/height: {size} needs about {need / GIB:.1f} GiB on the GPU even under the "
                                   f"disk preset, more than its {card / GIB:.1f} GiB; {hint}")

    def configs_for(self, plan: SessionPlan) -> dict[str, dict]:
        """The 8-key config of every component the run will use, as plain data (dtypes by
        name): the user's own for "custom", else the preset's on this machine."""
        family = plan.choice.family
        _, per_component, _ = self._load_args(plan)
        out = {}
        for component in family.components:
            config = config_for(per_component, component).to_dict()
            out[component.name] = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                                   for k, v in config.items()}
        return out

    # -- running ---------------------------------------------------------------------------------
    def _load_args(self, plan: SessionPlan) -> tuple[str, dict, dict]:
        """(model, configs, load options) of the pipeline the run's first attempt loads, as
        ``presets.fallback`` builds them."""
        choice = plan.choice
        options = {} if choice.local else {"source": self.source, "models_dir": self.models_dir}
        model = choice.model if choice.local else choice.family.key
        if plan.configs is not None:
            return model, {k: vram.VramConfig.from_dict(v) for k, v in plan.configs.items()}, options
        configs, _, extra = attempt_configs(plan.preset, vram_limit=plan.vram_limit, device=plan.run_plan.device,
                                            dtype=plan.run_plan.dtype, placement=plan.run_plan.placement)
        return model, configs, {**options, **extra}

    def prepare(self, plan: SessionPlan) -> SessionPlan:
        """Just before a run (on the thread that will run it): close the kept pipeline if the
        run will not reuse it, and re-measure the RAM baseline the predictions stand on. A
        reused pipeline's weights are already in the RSS: the baseline leaves them out, as the
        planner counts them."""
        model, configs, options = self._load_args(plan)
        reused = self.cache.holds(model, configs, options)
        if not reused:
            self.cache.close()
        rss = monitor.current_rss()
        # What the kept pipeline holds in RAM, as the core counts it (its arenas, whole pages),
        # else as the planner predicts it.
        held = _held_bytes()
        kept = max(plan.prediction.parts.get("weights_in_ram", 0), held.get("host", 0) + held.get("cpu", 0)) \
            if reused else 0
        run_plan = replace(plan.run_plan, baseline_ram=max(0, rss - kept))
        plan = replace(plan, run_plan=run_plan)
        return replace(plan, predictions=self._predictions(plan, run_plan, fresh_decision=False))

    def generate(self, plan: SessionPlan, *, on_event: Callable[[Event], None] | None = None, cancel=None,
                 on_message: Callable[[str], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> RunOutcome:
        """Run ``plan`` (after ``prepare``) on the kept pipeline, loading it when model or
        configs changed. Named presets and "auto" step down once on out-of-memory; "custom"
        does not."""
        loads_before = self.cache.loads
        if plan.configs is not None:
            outcome = self._generate_custom(plan, on_event, cancel)
        else:
            auto: AutoOutcome = execute(plan.run_plan, plan.choice.model, plan.request, source=self.source,
                                        models_dir=self.models_dir, on_event=on_event, cancel=cancel,
                                        on_message=on_message, calibration=self.calibration, loader=self.cache,
                                        progress=progress)
            outcome = RunOutcome(auto.result, auto.outcome.preset, auto.outcome.vram_limit, plan, auto.prediction,
                                 list(auto.outcome.messages), auto.errors)
        outcome.loaded = self.cache.loads > loads_before
        return outcome

    def _generate_custom(self, plan: SessionPlan, on_event, cancel) -> RunOutcome:
        model, configs, options = self._load_args(plan)
        pipe = self.cache.acquire(model, configs, **options)
        try:
            result = pipe.generate(plan.request, on_event=on_event, cancel=cancel)
        except BaseException as error:
            self.cache.release(pipe, error)
            raise
        self.cache.release(pipe, None)
        prediction = plan.predictions[CUSTOM]
        summary = result.summary
        errors = {"ram": summary.peak_ram_bytes / prediction.peak_ram_bytes - 1}
        if prediction.peak_vram_reserved_bytes and summary.peak_vram_bytes:
            errors["vram"] = summary.peak_vram_bytes / prediction.peak_vram_reserved_bytes - 1
        limit = min((c.vram_limit for c in configs.values() if c.vram_limit is not None), default=None)
        return RunOutcome(result, CUSTOM, limit, plan, prediction, [], errors)

    def unload(self) -> bool:
        """Close the kept pipeline; True when one was loaded."""
        had = self.cache.info is not None
        self.cache.close()
        return had

    def close(self) -> None:
        self.cache.close()


def _custom_preset(configs: dict[str, dict]) -> Preset:
    """The user's configs as a preset the planner can read."""
    return Preset(CUSTOM, "your own configs", configs, any(c.get("vram_limit") is not None for c in configs.values()),
                  Path("<custom>"))


def _held_bytes() -> dict[str, int]:
    """Bytes the core holds per ledger device ("host" for RAM copies, "cpu"/"cuda:N" for
    copies staged on a computation device)."""
    return {device: entry["resident_bytes"] for device, entry in vram.stats()["devices"].items()}
