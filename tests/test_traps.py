import pytest
"""What forward code and pipelines read from a managed model looks like the plain model."""

import copy

import torch

import vram
from models import CASES, Zoo, save_weights

pytestmark = pytest.mark.standin  # each test runs on the CPU and on the stand-in accelerator

FP8_CPU = {"offload_device": "cpu", "offload_dtype": torch.float8_e4m3fn,
           "onload_device": "cpu", "onload_dtype": torch.float8_e4m3fn,
           "preparing_device": "cpu", "preparing_dtype": torch.float8_e4m3fn,
           "computation_device": "cpu", "computation_dtype": torch.bfloat16}


def test_weights_report_the_computation_dtype_and_device():
    model = CASES["zimage"].make()
    vram.enable_vram_management(model, FP8_CPU)
    assert model.t_embedder.mlp[0].weight.dtype == torch.bfloat16  # Z-Image reads this in forward
    assert model.dtype == torch.bfloat16  # ModelMixin.dtype: the first parameter's
    assert model.device == torch.device("cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype in (torch.bfloat16, torch.float32) for p in model.parameters())
    vram.disable_vram_management(model)


def test_wan_time_embedder_and_t5_wo_checks_see_their_kept_dtype():
    wan = CASES["wan"].make()
    vram.enable_vram_management(wan, FP8_CPU)
    # Wan keeps time_embedder in fp32 and reads next(self.time_embedder.parameters()).dtype
    assert next(wan.condition_embedder.time_embedder.parameters()).dtype == torch.float32
    t5 = CASES["t5"].make()
    vram.enable_vram_management(t5, FP8_CPU)
    wo = t5.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32  # T5 casts hidden states to wo.weight.dtype
    with torch.no_grad():
        out = t5(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert torch.isfinite(out).all()
    vram.disable_vram_management(wan)
    vram.disable_vram_management(t5)


def test_state_dict_keys_values_and_ties(tmp_path):
    plain = Zoo()
    save_weights(plain, tmp_path)
    with vram.empty_weights():
        model = Zoo()
    disk = dict(FP8_CPU, offload_device="disk", offload_dtype="disk", onload_device="disk", onload_dtype="disk",
                preparing_dtype=torch.float32, computation_dtype=torch.float32)
    vram.enable_vram_management(model, disk, weights=tmp_path)
    assert model.head.weight is model.embed.weight  # tied weights stay tied
    got, expected = model.state_dict(), plain.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    vram.disable_vram_management(model)
    assert model.head.weight is model.embed.weight


def test_to_and_half_leave_managed_weights_alone():
    model = Zoo()
    vram.enable_vram_management(model, {"computation_device": "cpu", "computation_dtype": torch.float32,
                                        "offload_device": "cpu", "offload_dtype": torch.bfloat16})
    record = vram.managed(model)
    before = sum(record.resident_bytes().values())
    model.to("cpu")
    model.to(torch.float64)
    assert record.resident_bytes() and sum(record.resident_bytes().values()) == before
    assert model.proj.weight.dtype == torch.float32
    assert model.proj.weight.stride() == (0, 0)  # still a placeholder, nothing materialised
    assert model.offset.dtype == torch.float64  # buffers do follow .to()
    vram.disable_vram_management(model)


def test_inference_mode_and_no_grad_both_work():
    case = CASES["gpt2"]
    plain = case.make()
    model = copy.deepcopy(plain)
    vram.enable_vram_management(model, {"offload_device": "cpu", "offload_dtype": torch.float32,
                                        "preparing_device": "cpu", "preparing_dtype": torch.float64,
                                        "computation_device": "cpu", "computation_dtype": torch.float32},
                                vram_limit=0)
    ids = case.inputs(torch.float32)
    with torch.inference_mode():
        a = case.run(model, ids)
        expected = case.run(plain, ids)
    with torch.no_grad():
        b = case.run(model, ids)
    assert torch.equal(a, expected) and torch.equal(b, expected)
    vram.disable_vram_management(model)


def test_stats_report_layer_states_and_counters(tmp_path):
    model = Zoo()
    vram.enable_vram_management(model, FP8_CPU, name="zoo-stats")
    model.to(torch.bfloat16)  # buffers follow the builder's .to(); managed weights do not move
    with torch.no_grad():
        CASES["zoo"].run(model, CASES["zoo"].inputs(torch.bfloat16))
    stats = vram.stats()
    entry = stats["models"]["zoo-stats"]
    assert entry["state"] == "offload"
    # Zoo names no blocks: one group per top-level child (the tied embed/head share one), and
    # one for the root's loose parameters.
    assert set(entry["groups"]) >= {"embed+head", "conv3", "proj", "(root)"}
    assert entry["resident"]["host"]["base"] > 0
    summary = entry["summary"]
    assert summary["stored_bytes"]["cpu/float8_e4m3fn"] > 0 and summary["largest_group_bytes"] > 0
    assert summary["parameters"] == sum(p.numel() for p in Zoo().parameters())
    assert {"bytes_to_device", "bytes_read_from_disk", "transfer_wait_s", "evictions"} <= set(stats["counters"])
    report = vram.last_report()
    assert report.model == "zoo-stats" and report.cap_bytes is None and report.seconds > 0
    vram.disable_vram_management(model)


def test_onload_and_offload_keep_float32_layers_exact(tmp_path):
    # Regression: switching model states once moved every layer to the model's placement,
    # so Wan's float32 time_embedder went through bf16 on the first offload.
    wan = CASES["wan"].make()
    files = save_weights(wan, tmp_path)
    bf16 = {"offload_device": "cpu", "offload_dtype": torch.bfloat16, "onload_device": "cpu",
            "onload_dtype": torch.bfloat16, "computation_device": "cpu", "computation_dtype": torch.bfloat16}
    with vram.empty_weights():
        managed = CASES["wan"].make()
    vram.enable_vram_management(managed, bf16, weights=files)
    key = "condition_embedder.time_embedder.linear_1.weight"
    for switch in (vram.onload, vram.offload, vram.onload):
        switch(managed)
        stored = managed.state_dict()[key]
        assert stored.dtype == torch.float32 and torch.equal(stored, wan.state_dict()[key])
    vram.release(managed)
