"""DiffSynth's dicts parse verbatim; the typed config round-trips."""

import pytest
import torch

from vram.config import Placement, VramConfig

# The four configs of DiffSynth-Studio's VRAM guide, with "cuda" as on a GPU machine.
GUIDE = {
    "cpu_offload": {"offload_dtype": torch.bfloat16, "offload_device": "cpu", "onload_dtype": torch.bfloat16,
                    "onload_device": "cuda", "preparing_dtype": torch.bfloat16, "preparing_device": "cuda",
                    "computation_dtype": torch.bfloat16, "computation_device": "cuda"},
    "fp8": {"offload_dtype": torch.float8_e4m3fn, "offload_device": "cpu", "onload_dtype": torch.float8_e4m3fn,
            "onload_device": "cuda", "preparing_dtype": torch.float8_e4m3fn, "preparing_device": "cuda",
            "computation_dtype": torch.bfloat16, "computation_device": "cuda"},
    "dynamic": {"offload_dtype": torch.float8_e4m3fn, "offload_device": "cpu", "onload_dtype": torch.float8_e4m3fn,
                "onload_device": "cpu", "preparing_dtype": torch.float8_e4m3fn, "preparing_device": "cuda",
                "computation_dtype": torch.bfloat16, "computation_device": "cuda"},
    "disk": {"offload_dtype": "disk", "offload_device": "disk", "onload_dtype": "disk", "onload_device": "disk",
             "preparing_dtype": torch.float8_e4m3fn, "preparing_device": "cuda",
             "computation_dtype": torch.bfloat16, "computation_device": "cuda"},
}


def on_this_machine(config):
    if torch.cuda.is_available():
        return config
    return {k: ("cpu" if v == "cuda" else v) for k, v in config.items()}


@pytest.mark.parametrize("name", sorted(GUIDE))
def test_guide_configs_parse_and_round_trip(name):
    parsed = VramConfig.from_dict(on_this_machine(GUIDE[name]), vram_limit=10)
    assert parsed.vram_limit == 10
    assert parsed.uses_disk == (name == "disk")
    again = VramConfig.from_dict({k: v for k, v in parsed.to_dict().items() if v is not None})
    assert again == parsed


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="computation_device: device 'cuda' asked for, but CUDA is not available"):
        VramConfig.from_dict(GUIDE["dynamic"])


def test_missing_states_default_to_the_computation_placement():
    config = VramConfig.from_dict({"computation_device": "cpu", "computation_dtype": "bf16"})
    assert config.offload == config.onload == config.preparing == Placement(torch.device("cpu"), torch.bfloat16)
    assert config.vram_limit is None and config.prefetch == 2


def test_explicit_vram_limit_overrides_the_config():
    config = VramConfig.from_dict({"computation_device": "cpu", "vram_limit": 3})
    assert VramConfig.coerce(config, vram_limit=5).vram_limit == 5
    assert VramConfig.coerce({"computation_device": "cpu", "vram_limit": 3}).vram_limit == 3
