"""A multi_gpu decision run end to end on simulated GPUs: the stand-in accelerators
``standin`` (GPU 0), ``standin:1``, ``standin:2``, each with its own copy engine, allocator,
cap and ledger. No real GPU has run any of this.

The pipeline is the tiny FLUX one with a transformer large enough to be the model's bulk
(6 blocks, 18 MB in bf16, beside tiny text encoders and VAE), as in the real FLUX.1-dev: a
GPU that holds the rest cannot hold it, two or three together can, its blocks split in runs.
The stand-ins play CUDA: bfloat16, the dtype the planner sizes GPUs in.

What must hold: the output equals the single-device run bit for bit; no device's ledger
passes its own cap; activations cross only at the placement's boundaries (counted); running
out of memory on one GPU falls back with a message naming it.
"""

import dataclasses

import numpy as np
import pytest
import torch

import families
import presets.files
import vram
from pipelines import load_pipeline
from pipelines.loading import blocks_of, family_of_folder
from presets import preset_configs
from presets.auto import execute, job_of, plan_run
from presets.fallback import generate_with_fallback, named_gpu
from presets.footprint import footprint
from presets.placement import MULTI_GPU, plan_placement
from presets.planner import GIB, Calibration, activation_bytes
from presets.probe import GPU, Hardware
from presets.session import Session
from test_pipelines import request_for
from ui.present import plan_markdown
from vram import standin
from vram.config import standin_device
from vram.hooks import Crossings

BF16 = torch.bfloat16
REQUEST, EXTRA = request_for("flux")


@pytest.fixture(scope="module")
def big_flux(tmp_path_factory):
    """The folder, its family and footprint, the transformer's bf16 bytes and the largest
    activation the planner predicts (every component's is about the same at 32 x 32)."""
    folder = families.build_big_flux(tmp_path_factory.mktemp("multi") / "flux", hidden=256, double=2, single=4)
    family = family_of_folder(folder)
    sizes = footprint(family, folder)
    transformer = next(c for c in sizes.components if c.name == "transformer")
    job = job_of(family, REQUEST.resolved(family))
    acts = max(activation_bytes(family, c, job, BF16) for c in sizes.components)
    return folder, family, sizes, job, transformer.parameters * 2, acts


@pytest.fixture(autouse=True)
def standins_play_cuda(monkeypatch):
    """Presets fill {device} with GPU 0's stand-in and {dtype} with bfloat16, as on CUDA."""
    monkeypatch.setattr(presets.files, "default_compute", lambda: (standin_device(0), BF16))


@pytest.fixture(scope="module")
def reference(big_flux):
    """The single-device run: basic on one stand-in."""
    with load_pipeline(big_flux[0], preset_configs("basic", device="standin", dtype="bfloat16")) as pipe:
        before = vram.get_manager().counters.activation_moves
        images = pipe.generate(REQUEST, pipeline_kwargs=EXTRA).images
        assert vram.get_manager().counters.activation_moves == before   # one device: nothing crosses
    return images


def two_gpus(big_flux) -> tuple[Hardware, float]:
    """Two simulated cards on which basic does not fit (0.7 of the transformer free beside the
    margin), and the cap for each that holds the model split: 0.9 of the transformer besides
    the activations (GiB)."""
    _, _, _, _, transformer, acts = big_flux
    free = int(0.5 * GIB + 0.7 * transformer)
    cards = tuple(GPU(i, f"Simulated GPU {i}", 2 * GIB, free) for i in range(2))
    return Hardware(cards, "ok", 64 * GIB, 32 * GIB, 100 * GIB, "/"), (0.9 * transformer + acts) / GIB


def on_standins(plan):
    return dataclasses.replace(plan, device="standin")


def ledger_peaks(devices):
    manager = vram.get_manager()
    return {device: manager.peak_scope(device) for device in devices}


def test_the_tree_splits_flux_over_two_standins_and_the_run_equals_one_device(big_flux, reference, tmp_path):
    folder = big_flux[0]
    hardware, cap = two_gpus(big_flux)
    plan = plan_run(folder, REQUEST, hardware=hardware, vram_limit=cap, calibration=Calibration(tmp_path / "c.json"))
    assert plan.preset == MULTI_GPU, plan.decision.describe()
    placement = plan.placement
    assert set(placement.splits) == {"transformer"} and [i for i, _ in placement.splits["transformer"].runs] == [0, 1]
    assert placement.whole["vae"] == placement.whole["text_encoder"]   # the VAE decodes where the pipeline computes
    peaks = ledger_peaks(["standin", "standin:1"])
    outcome = execute(on_standins(plan), folder, REQUEST, pipeline_kwargs=EXTRA,
                      calibration=Calibration(tmp_path / "c.json"))
    ledger = {device: scope.close() for device, scope in peaks.items()}
    assert outcome.outcome.preset == MULTI_GPU and outcome.outcome.messages == []
    assert np.array_equal(outcome.result.images, reference)
    summary = outcome.result.summary
    caps = {placement.on("standin").device(g.index): g.cap_bytes for g in placement.gpus}
    assert [use.device for use in summary.devices] == ["standin", "standin:1"]
    for use in summary.devices:
        assert use.vram_limit_bytes == caps[use.device] and use.within_cap, use
        assert 0 < use.peak_vram_bytes <= use.vram_limit_bytes
        assert 0 < ledger[use.device] <= caps[use.device]                 # the core's own charges
    assert summary.within_cap and "peak VRAM per device: standin " in summary.describe()
    # The prediction: each GPU's share against its cap, and the measured error of each.
    prediction = outcome.prediction
    assert prediction.preset == MULTI_GPU and set(prediction.per_gpu) == {0, 1}
    assert all(reserved <= cap_bytes for reserved, cap_bytes in prediction.per_gpu.values())
    assert set(outcome.errors) == {"ram", "vram standin", "vram standin:1"}


def test_three_standins_each_keep_to_their_own_cap(big_flux, reference):
    folder, family, sizes, job, transformer, acts = big_flux
    cards = tuple(GPU(i, f"Simulated GPU {i}", GIB, GIB) for i in range(3))
    caps = {0: (0.55 * transformer + acts) / GIB, 1: (0.45 * transformer + acts) / GIB,
            2: (0.5 * transformer + acts) / GIB}
    placement = plan_placement(family, sizes, job, cards, vram_limit=caps)
    assert len(placement.splits["transformer"].runs) == 3, placement.describe()
    devices = ["standin", "standin:1", "standin:2"]
    peaks = ledger_peaks(devices)
    outcome = generate_with_fallback(folder, REQUEST, MULTI_GPU, device="standin", pipeline_kwargs=EXTRA,
                                     placement=placement)
    ledger = {device: scope.close() for device, scope in peaks.items()}
    assert outcome.preset == MULTI_GPU and np.array_equal(outcome.result.images, reference)
    uses = {use.device: use for use in outcome.result.summary.devices}
    assert list(uses) == devices
    for index, device in enumerate(devices):
        cap = int(caps[index] * GIB)
        assert uses[device].vram_limit_bytes == cap and uses[device].within_cap
        assert ledger[device] <= cap
        assert standin.engine(standin_device(index)).cap is None   # released with the pipeline


def test_activations_cross_only_at_the_planned_boundaries(big_flux, reference, monkeypatch):
    """Every move happens where the computation changes device: at the first block of each
    run, back at the first group after the blocks, into and out of the text encoder on the
    other GPU; none inside a run. The same moves every step."""
    folder, family, sizes, job, transformer, acts = big_flux
    cards = tuple(GPU(i, f"Simulated GPU {i}", GIB, GIB) for i in range(2))
    cap = (0.9 * transformer + acts) / GIB
    placement = plan_placement(family, sizes, job, cards, vram_limit=cap).on("standin")
    entries = []
    enter, returning = Crossings.enter, Crossings.returning

    def moves():
        return vram.get_manager().counters.activation_moves

    def counted_enter(self, group, args, kwargs):
        before, here = moves(), getattr(self._local, "here", self.home)
        out = enter(self, group, args, kwargs)
        entries.append((self.record.name, group.name, here, group.device, moves() - before))
        return out

    def counted_returning(self, module, args, output):
        before, here = moves(), getattr(self._local, "here", None)
        out = returning(self, module, args, output)
        entries.append((self.record.name, "(output)", here, self.home, moves() - before))
        return out
    monkeypatch.setattr(Crossings, "enter", counted_enter)
    monkeypatch.setattr(Crossings, "returning", counted_returning)
    start = moves()
    outcome = generate_with_fallback(folder, REQUEST, MULTI_GPU, device="standin", pipeline_kwargs=EXTRA,
                                     placement=placement)
    assert np.array_equal(outcome.result.images, reference)
    assert sum(moved for *_, moved in entries) == moves() - start
    for model, group, here, there, moved in entries:
        assert (moved > 0) == (here != there), (model, group, here, there, moved)
    # The transformer changes device where its device_map (cut from its real blocks) starts
    # GPU 1's run, and comes back at the first group after the blocks, once per step.
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
    device_map = placement.device_map_for("transformer", *blocks_of(model, "block"))
    first_on_1 = next(name for name, device in device_map.items() if device == "standin:1")
    crossings = [(group, vram.config.device_name(there)) for model, group, here, there, moved in entries
                 if model.endswith("/transformer") and moved]
    assert crossings == [(first_on_1, "standin:1"), ("norm_out", "standin")] * REQUEST.steps
    # The T5 encoder on GPU 1: its input across, its output back, once each.
    text = [(group, moved) for model, group, *_, moved in entries if model.endswith("/text_encoder_2") and moved]
    assert text == [("shared+encoder.embed_tokens", 1), ("(output)", 1)]


def test_out_of_memory_on_one_gpu_falls_back_naming_it(big_flux, reference):
    """GPU 1's cap shrunk under the plan (as when another process took memory there after the
    plan was made): loading the T5 encoder there runs out; the run steps down to the single-GPU
    tree below basic, on GPU 0, and says which GPU ran out."""
    folder, family, sizes, job, transformer, acts = big_flux
    cards = tuple(GPU(i, f"Simulated GPU {i}", GIB, GIB) for i in range(2))
    placement = plan_placement(family, sizes, job, cards, vram_limit=(0.9 * transformer + acts) / GIB)
    assert placement.whole["text_encoder_2"] == 1
    t5_bytes = next(c.parameters for c in sizes.components if c.name == "text_encoder_2") * 2
    squeezed = dataclasses.replace(placement.gpu(1), cap_bytes=t5_bytes // 2)
    placement = dataclasses.replace(placement, gpus=(placement.gpu(0), squeezed))
    heard = []
    outcome = generate_with_fallback(folder, REQUEST, MULTI_GPU, device="standin", pipeline_kwargs=EXTRA,
                                     placement=placement, on_message=heard.append)
    assert outcome.preset == "cpu_offload" and heard == outcome.messages and len(heard) == 1
    assert heard[0].startswith("multi_gpu ran out of memory on standin:1 (GPU 1) (OutOfMemoryError: "), heard[0]
    assert heard[0].endswith("retrying once with cpu_offload")
    assert np.array_equal(outcome.result.images, reference)
    assert vram.get_manager().models() == []


@pytest.mark.parametrize("message, gpu", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 23.6 GiB", "cuda:1 (GPU 1)"),
    ("flux.1-dev/transformer@cuda:2: 0.5 GiB more on cuda:2 would pass its budget", "cuda:2 (GPU 2)"),
    ("stand-in accelerator standin: tried to allocate 10 bytes", "standin:0 (GPU 0)"),
    ("stand-in accelerator standin:3: tried to allocate 10 bytes", "standin:3 (GPU 3)"),
    ("out of memory", None),
])
def test_the_gpu_an_out_of_memory_names(message, gpu):
    assert named_gpu(torch.OutOfMemoryError(message)) == gpu


def test_the_app_session_plans_shows_and_runs_the_placement(big_flux, monkeypatch, tmp_path):
    """Through the app's session: the plan view lists the placement, the predictions table has
    multi_gpu, a run loads the placement and the next one reuses it. (The session passes no
    pipeline arguments: the reference runs with the family's own max_sequence_length.)"""
    folder = big_flux[0]
    with load_pipeline(folder, preset_configs("basic", device="standin", dtype="bfloat16")) as pipe:
        reference = pipe.generate(REQUEST).images
    hardware, cap = two_gpus(big_flux)
    monkeypatch.setattr("presets.session.usable_hardware", lambda folder, nvml=None: hardware)
    session = Session(models_dir=folder.parent, calibration=Calibration(tmp_path / "c.json"))
    try:
        plan = session.plan(folder.name, REQUEST, vram_limit=cap)
        assert plan.preset == MULTI_GPU and MULTI_GPU in plan.predictions
        view = plan_markdown(plan)
        assert f"the decision tree chose **{MULTI_GPU}**" in view
        assert "- multi_gpu: 2 GPUs" in view and "-   transformer: blocks 0" in view and "-   GPU 1: " in view
        plan = dataclasses.replace(plan, run_plan=on_standins(plan.run_plan))
        for loads in (True, False):
            plan = session.prepare(plan)
            outcome = session.generate(plan)
            assert (outcome.preset, outcome.loaded) == (MULTI_GPU, loads)
            assert np.array_equal(outcome.result.images, reference)
        assert session.configs_for(plan)["transformer"]["computation_device"] == "standin"
        assert session.configs_for(plan)["text_encoder_2"]["computation_device"] == "standin:1"
    finally:
        session.close()


def test_a_vae_off_the_execution_device_is_refused(big_flux):
    """Decode is a method, not a forward: nothing would carry the latents to another GPU."""
    configs = {"default": preset_configs("basic", device="standin", dtype="bfloat16")["default"],
               "vae": preset_configs("basic", device="standin:1", dtype="bfloat16")["default"]}
    with pytest.raises(ValueError, match="vae computes on standin:1, but decodes what the pipeline makes on its "
                                         "execution device, standin; put it there"):
        load_pipeline(big_flux[0], configs)
    assert vram.get_manager().models() == []
