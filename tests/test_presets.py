"""presets/: preset files, the hardware probe, footprints, the decision tree, the planner's
GPU plans, spreading over GPUs, the fallback and the command line."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from pipelines import get_family
from presets import PresetError, list_presets, load_preset, preset_configs
from presets.fallback import generate_with_fallback
from presets.footprint import footprint
from presets.planner import Calibration, Job, predict, spread
from presets.probe import GPU, Hardware, probe
from presets.tree import TREE_ORDER, decide, next_preset
from test_pipelines import request_for

G = 1024**3
ROOT = Path(__file__).resolve().parents[1]


def machine(vram_gb: int, ram_gb: int) -> Hardware:
    gpus = (GPU(0, "Simulated GPU", vram_gb * G, int(vram_gb * G * 0.95)),) if vram_gb else ()
    return Hardware(gpus, "ok" if vram_gb else "simulated: no GPU", ram_gb * G, int(ram_gb * G * 0.9), 500 * G, "/")


def job_for(key: str, **overrides) -> Job:
    family = get_family(key)
    d = family.defaults
    fields = dict(width=d["width"], height=d["height"], frames=d.get("frames", 1),
                  cfg=family.guidance_is_cfg and d["guidance"] > 1)
    return Job(**{**fields, **overrides})


def choose(key: str, vram_gb: int, ram_gb: int, **job):
    family = get_family(key)
    return decide(machine(vram_gb, ram_gb), family, footprint(family), job_for(key, **job), baseline_ram=1 * G)


# -- the tree -------------------------------------------------------------------------------

@pytest.mark.parametrize("key, vram_gb, ram_gb, expected", [
    ("qwen-image", 80, 128, "basic"),         # 54 GiB of bf16 fits an 80 GB card
    ("qwen-image", 24, 128, "dynamic"),       # the 38 GiB transformer does not fit 24 GB; RAM holds all
    ("qwen-image", 24, 64, "fp8_offload"),    # RAM holds it in fp8 only; the fp8 transformer fits 24 GB
    ("qwen-image", 12, 32, "disk"),           # neither
    ("flux.1-dev", 48, 64, "basic"),
    ("flux.1-dev", 24, 64, "dynamic"),        # 22 GiB transformer + activations > 23 GB free
    ("flux.1-dev", 8, 16, "disk"),
    ("z-image-turbo", 16, 32, "cpu_offload"),  # the 11.5 GiB transformer fits, the whole model does not
    ("sdxl", 8, 16, "basic"),
    ("wan2.1-t2v-14b", 24, 64, "dynamic"),
    ("wan2.1-t2v-1.3b", 6, 16, "disk"),
    ("sdxl", 0, 32, "basic"),                 # no GPU: the CPU, float32
    ("flux.1-dev", 0, 16, "disk"),
])
def test_tree_picks_the_expected_preset(key, vram_gb, ram_gb, expected):
    decision = choose(key, vram_gb, ram_gb)
    assert decision.preset == expected, decision.describe()
    assert decision.explanation[-1].startswith(f"-> {expected}")


def test_tree_over_the_grid_is_monotone_and_only_picks_what_fits():
    # 7 cards x 4 RAM sizes x 6 models x 2 sizes: more memory never picks a slower preset, and
    # what is picked fits by the planner's own numbers (or is the most frugal, said so).
    cards, rams = (6, 8, 12, 16, 24, 48, 80), (16, 32, 64, 128)
    for key in ("qwen-image", "flux.1-dev", "z-image-turbo", "sdxl", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        for size in (512, 1024):
            rank = {}
            for vram_gb in cards:
                for ram_gb in rams:
                    decision = choose(key, vram_gb, ram_gb, width=size, height=size)
                    rank[vram_gb, ram_gb] = TREE_ORDER.index(decision.preset)
                    chosen = decision.predictions[decision.preset]
                    fits = chosen.peak_ram_bytes <= int(ram_gb * G * 0.9 * 0.9) + G
                    assert fits or "nothing fits" in decision.describe(), decision.describe()
                    if decision.vram_limit is not None:
                        assert 0 < decision.vram_limit <= vram_gb * 0.95
            for (vram_gb, ram_gb), r in rank.items():
                for (v2, r2), other in rank.items():
                    if v2 >= vram_gb and r2 >= ram_gb:
                        assert other <= r, (key, size, (vram_gb, ram_gb), (v2, r2))


def test_explanation_lists_the_branches_with_numbers():
    text = choose("qwen-image", 12, 64).describe()
    assert "GPU 0 Simulated GPU: 11.4 GiB free; vram_limit 10.75 GiB (free minus 0.5 GiB, rounded down to a quarter)" in text
    assert "basic: needs" in text and "not enough VRAM" in text and "GiB RAM" in text
    assert text.splitlines()[-1] == "-> disk, vram_limit 10.75 GiB"


def test_bigger_jobs_need_more():
    family = get_family("flux.1-dev")
    sizes = footprint(family)
    small = predict(family, sizes, Job(512, 512), "basic", on_gpu=True)
    large = predict(family, sizes, Job(1024, 1024, batch=2), "basic", on_gpu=True)
    tiled = predict(family, sizes, Job(2048, 2048, vae_tiling=True), "basic", on_gpu=True)
    untiled = predict(family, sizes, Job(2048, 2048), "basic", on_gpu=True)
    assert large.peak_vram_bytes > small.peak_vram_bytes
    assert untiled.phases["vae_decoding"]["vram"] > 3 * tiled.phases["vae_decoding"]["vram"]
    capped = predict(family, sizes, Job(1024, 1024), "dynamic", on_gpu=True, vram_limit=6)
    assert capped.peak_vram_reserved_bytes <= 6 * G and not capped.above_cap  # the cap bounds what torch reserves
    assert capped.peak_vram_bytes == capped.peak_vram_reserved_bytes + capped.parts["cuda_context"]
    disk = predict(family, sizes, Job(1024, 1024), "disk", on_gpu=True, vram_limit=6)
    assert disk.parts["weights_in_ram"] < 0.5 * G < capped.parts["weights_in_ram"]  # the VAE only


def test_next_preset_follows_the_tree():
    assert [next_preset(p) for p in TREE_ORDER] == ["cpu_offload", "dynamic", "fp8_offload", "disk", None]


# -- probe ----------------------------------------------------------------------------------

class FakeNVML(types.SimpleNamespace):
    """pynvml's calls the probe makes, over a list of (name, total, free) and a failure mode."""

    def __init__(self, devices, fail_on=None):
        super().__init__(devices=devices, fail_on=fail_on, shut=False)

    def _maybe_fail(self, call):
        if self.fail_on == call:
            raise RuntimeError(f"NVMLError: {call} failed")

    def nvmlInit(self):
        self._maybe_fail("init")

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        self._maybe_fail("count")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return self.devices[handle][0].encode()

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._maybe_fail("memory")
        _, total, free = self.devices[handle]
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * G),
                types.SimpleNamespace(pid=1, usedGpuMemory=G)]


def test_probe_reads_every_gpu_through_nvml(tmp_path):
    fake = FakeNVML([("RTX 4070", 12 * G, 10 * G), ("RTX 3060", 12 * G, 11 * G)])
    hardware = probe(tmp_path / "not-yet", nvml=fake)
    assert [g.name for g in hardware.gpus] == ["RTX 4070", "RTX 3060"]
    assert hardware.gpus[0].free_bytes == 10 * G and hardware.gpus[0].process_bytes == 3 * G
    assert hardware.gpu_status == "ok" and fake.shut
    assert hardware.ram_total_bytes > 0 and 0 < hardware.ram_available_bytes <= hardware.ram_total_bytes
    assert hardware.disk_free_bytes > 0  # the nearest existing parent of the models folder
    assert "GPU 1: RTX 3060, 11.0 GiB free of 12.0 GiB" in hardware.describe()


@pytest.mark.parametrize("fail_on", ["init", "count", "memory"])
def test_probe_survives_nvml_failures(fail_on):
    hardware = probe(nvml=FakeNVML([("RTX", 8 * G, 8 * G)], fail_on=fail_on))
    assert hardware.gpus == () and "NVML" in hardware.gpu_status and "failed" in hardware.gpu_status
    assert "no NVIDIA GPU" in hardware.describe()


def test_probe_without_the_nvml_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    hardware = probe()
    assert hardware.gpus == () and "nvidia-ml-py" in hardware.gpu_status


def test_probe_on_this_machine_and_read_speed(tmp_path):
    sample = tmp_path / "sample.bin"
    sample.write_bytes(os.urandom(4 * 2**20))
    hardware = probe(tmp_path, measure_read_speed_of=str(sample))
    assert hardware.disk_read_bytes_per_s > 0
    if not torch.cuda.is_available():
        assert not hardware.has_gpu


# -- footprint ------------------------------------------------------------------------------

def test_footprint_from_headers_matches_the_files(tiny_family):
    folder = tiny_family("flux")
    sizes = footprint(get_family("flux.1-dev"), folder)
    assert sizes.from_headers
    from pipelines.loading import weight_files
    for component in sizes.components:
        files = weight_files(folder / component.name)
        assert component.file_bytes <= sum(p.stat().st_size for p in files)
        assert component.parameters * 4 == component.file_bytes  # the tiny models are float32
        assert 0 < component.largest_tensor <= component.parameters
    transformer = sizes.component("transformer")
    assert transformer.width == 32 and 0 < transformer.kept_parameters < transformer.parameters


def test_footprint_before_download_uses_the_registry(tmp_path):
    sizes = footprint(get_family("qwen-image"), tmp_path / "absent")
    assert not sizes.from_headers
    assert sizes.component("transformer").parameters == 20_430_000_000


# -- spreading over GPUs --------------------------------------------------------------------

def test_components_spread_over_simulated_gpus_by_free_memory():
    sizes = footprint(get_family("flux.1-dev"))   # 22 GiB transformer, 9 GiB T5, small rest
    two = [GPU(0, "A", 24 * G, 23 * G), GPU(1, "B", 16 * G, 15 * G)]
    placement = spread(sizes, two)
    assert placement["transformer"] == 0 and placement["text_encoder_2"] == 1
    assert spread(sizes, [GPU(0, "A", 16 * G, 15 * G), GPU(1, "B", 16 * G, 15 * G)]) is None


# -- preset files ---------------------------------------------------------------------------

def test_builtin_presets_fill_in_the_machine():
    assert list_presets()[:5] == ["basic", "cpu_offload", "fp8_offload", "dynamic", "disk"]
    disk = preset_configs("disk", vram_limit=3)
    assert disk["default"].uses_disk and disk["default"].vram_limit == 3
    assert not disk["vae"].uses_disk
    assert preset_configs("basic", vram_limit=3)["default"].vram_limit is None  # basic takes no cap
    assert preset_configs("fp8_offload")["default"].offload.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"description": "x"}', "needs a 'components' object"),
    ('{"components": {"default": {"offload_dtype": "int7", "offload_device": "cpu"}}}',
     r"components.default: offload_dtype: unknown dtype 'int7'"),
    ('{"components": {"default": {"computation_device": "tpu"}}}', r"components.default: computation_device"),
    ('{"components": {"default": {"colour": "blue"}}}', r"unknown key 'colour'"),
    ('{"components": {"vae": 3}}', r"components.vae must be an object"),
])
def test_bad_user_preset_files_name_file_and_field(tmp_path, monkeypatch, content, message):
    monkeypatch.setenv("LOWVRAM_PRESETS_DIR", str(tmp_path))
    (tmp_path / "mine.json").write_text(content)
    assert "mine" in list_presets()
    with pytest.raises(PresetError, match=message) as error:
        load_preset("mine")
    assert "mine.json" in str(error.value)


def test_user_presets_add_and_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_PRESETS_DIR", str(tmp_path))
    (tmp_path / "tight.json").write_text(json.dumps({
        "description": "stream everything", "uses_vram_limit": True,
        "components": {"default": {"offload_device": "cpu", "offload_dtype": "{dtype}",
                                   "computation_device": "{device}", "computation_dtype": "{dtype}",
                                   "prefetch": 1}}}))
    assert preset_configs("tight", vram_limit=1)["default"].prefetch == 1
    with pytest.raises(PresetError, match="unknown preset 'nope'"):
        load_preset("nope")
    with pytest.raises(PresetError, match="not a preset name"):
        load_preset("../etc/passwd")


def test_zero_free_ram_still_decides():
    hardware = Hardware((), "none", 16 * G, 0, 10 * G, "/")
    family = get_family("sdxl")
    decision = decide(hardware, family, footprint(family), job_for("sdxl"), baseline_ram=G)
    assert decision.preset == "disk" and "nothing fits" in decision.describe()


# -- calibration ----------------------------------------------------------------------------

def test_calibration_scales_later_predictions(tmp_path):
    calibration = Calibration(tmp_path / "calibration.json")
    family = get_family("sdxl")
    sizes = footprint(family)
    plain = predict(family, sizes, Job(1024, 1024), "basic", on_gpu=False, dtype=torch.float32, baseline_ram=G)
    error = calibration.record("basic", "ram", plain.peak_ram_bytes, G + int((plain.peak_ram_bytes - G) * 1.2), G)
    assert error == pytest.approx(0.2 * (plain.peak_ram_bytes - G) / plain.peak_ram_bytes, rel=1e-3)
    again = Calibration(tmp_path / "calibration.json")  # kept in the file
    scaled = predict(family, sizes, Job(1024, 1024), "basic", on_gpu=False, dtype=torch.float32, baseline_ram=G,
                     calibration=again)
    assert scaled.peak_ram_bytes - G == pytest.approx((plain.peak_ram_bytes - G) * 1.2, rel=1e-3)


# -- fallback -------------------------------------------------------------------------------

def oom_at_first_step(message: str):
    """An on_event that raises a CUDA out-of-memory at the first step of the first run only."""
    raised = []

    def on_event(event):
        if event.kind == "step" and not raised:
            raised.append(event)
            raise torch.OutOfMemoryError(message)
    return on_event


def test_out_of_memory_falls_back_to_the_next_preset(tiny_family):
    request, extra = request_for("sdxl")
    on_event = oom_at_first_step("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    heard = []
    outcome = generate_with_fallback(tiny_family("sdxl"), request, "basic", on_event=on_event,
                                     pipeline_kwargs=extra, on_message=heard.append)
    assert outcome.preset == "cpu_offload" and outcome.result.summary.steps == 2
    assert heard == outcome.messages and len(heard) == 1
    assert "basic ran out of memory (OutOfMemoryError: CUDA out of memory" in heard[0]
    assert "retrying once with cpu_offload" in heard[0]


def test_a_second_out_of_memory_is_raised(tiny_family):
    request, extra = request_for("sdxl")

    def always(event):
        if event.kind == "step":
            raise MemoryError("simulated")
    with pytest.raises(MemoryError):
        generate_with_fallback(tiny_family("sdxl"), request, "dynamic", on_event=always, pipeline_kwargs=extra)


def test_ram_about_to_run_out_stops_the_run(tiny_family):
    request, extra = request_for("sdxl")
    heard = []
    # A floor above all RAM: the guard trips on every attempt; the second is raised.
    with pytest.raises(MemoryError, match="system RAM is about to run out"):
        generate_with_fallback(tiny_family("sdxl"), request, "basic", pipeline_kwargs=extra,
                               ram_floor=2**62, on_message=heard.append)
    assert "retrying once with cpu_offload" in heard[0]


# -- the command line -----------------------------------------------------------------------

def test_decide_prints_machine_tree_and_table(tiny_family):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "presets.decide", "--model", "flux.1-dev", "--width", "768",
                           "--height", "768"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "RAM:" in out and "model FLUX.1-dev" in out and "\n-> " in out
    assert all(name in out for name in ("basic", "cpu_offload", "fp8_offload", "dynamic", "disk"))
    done = subprocess.run([sys.executable, "-m", "presets.decide", "--model", str(tiny_family("sdxl"))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "sizes from the files" in done.stdout
    done = subprocess.run([sys.executable, "-m", "presets.decide", "--model", "nope"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown model 'nope'" in done.stderr




# -- auto: decide, run, record --------------------------------------------------------------

def test_auto_decides_runs_and_records_the_error(tiny_family, tmp_path):
    from presets.auto import run
    request, extra = request_for("sdxl")
    calibration = Calibration(tmp_path / "calibration.json")
    outcome = run(tiny_family("sdxl"), request, pipeline_kwargs=extra, calibration=calibration)
    assert outcome.decision is not None and outcome.outcome.preset == outcome.decision.preset
    assert outcome.result.summary.steps == 2
    assert abs(outcome.errors["ram"]) <= 0.15  # the planner on this machine, this run
    assert json.loads((tmp_path / "calibration.json").read_text())["records"][0]["preset"] == outcome.outcome.preset
    named = run(tiny_family("sdxl"), request, preset="disk", vram_limit=0, pipeline_kwargs=extra,
                calibration=calibration)
    assert named.decision is None and named.outcome.preset == "disk"


def test_step_down_follows_what_ran_out():
    from presets.fallback import step_down
    oom = torch.OutOfMemoryError("CUDA out of memory")
    assert [step_down(p, oom) for p in ("basic", "cpu_offload", "fp8_offload", "dynamic")] == \
        ["cpu_offload", "dynamic", "dynamic", "disk"]
    assert step_down("dynamic", MemoryError()) == "fp8_offload" and step_down("disk", MemoryError()) is None


def test_fallback_into_a_capped_preset_gets_a_cap(tiny_family):
    request, extra = request_for("sdxl")
    outcome = generate_with_fallback(tiny_family("sdxl"), request, "cpu_offload",
                                     on_event=oom_at_first_step("simulated"),
                                     pipeline_kwargs=extra)
    assert outcome.preset == "dynamic" and outcome.vram_limit == 0.0  # on the CPU: stream every layer


def test_calibration_learns_from_raw_predictions(tiny_family, tmp_path):
    # Recording against an already-scaled prediction makes the factor chase its own
    # corrections (x2, then /2, ...): what is recorded must be measured / raw prediction.
    # The recorded call is captured, not the file: a run whose RSS does not grow past the
    # baseline (memory reused from the allocator) records nothing, which is right too.
    from presets.auto import run
    request, extra = request_for("sdxl")
    calibration = Calibration(tmp_path / "c.json")
    calibration.records = [{"preset": "basic", "kind": "ram", "ratio": 2.0}]
    calls = []
    calibration.record = lambda *args, **kwargs: calls.append(args) or 0.0
    outcome = run(tiny_family("sdxl"), request, preset="basic", pipeline_kwargs=extra, calibration=calibration)
    baseline = outcome.prediction.parts["baseline_ram"]
    scaled_part = outcome.prediction.peak_ram_bytes - baseline
    (preset, kind, predicted, measured, recorded_baseline), = [c for c in calls if c[1] == "ram"]
    assert (preset, recorded_baseline, measured) == ("basic", baseline, outcome.result.summary.peak_ram_bytes)
    assert predicted - baseline == pytest.approx(scaled_part / 2.0, abs=1)


def test_calibration_skips_runs_that_did_not_grow(tmp_path):
    calibration = Calibration(tmp_path / "c.json")
    assert calibration.record("basic", "ram", 2000, 1000, baseline=1000) == 0.0 and calibration.records == []
    assert calibration.record("basic", "ram", 2000, 1500, baseline=1000) == pytest.approx(-0.25)
    assert calibration.factor("basic", "ram") == 0.5


@pytest.mark.parametrize("components, message", [
    ({"vae": {"computation_device": "cpu"}}, "needs a 'default' config"),
    ({"default": {"computation_device": "cpu"}, "denoisr": {"computation_device": "cpu"}},
     r"components.denoisr: not a component"),
])
def test_preset_component_keys_are_checked(tmp_path, monkeypatch, components, message):
    monkeypatch.setenv("LOWVRAM_PRESETS_DIR", str(tmp_path))
    (tmp_path / "odd.json").write_text(json.dumps({"components": components}))
    with pytest.raises(PresetError, match=message):
        load_preset("odd")
