"""diffusers' own pipeline code runs unchanged on a managed model."""

import copy

import pytest
import torch

import vram


def tiny_ddpm():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))


@pytest.mark.parametrize("config", [
    # streamed through float64 staging copies (exact casts), nothing kept
    {"offload_device": "cpu", "offload_dtype": torch.float32, "preparing_device": "cpu",
     "preparing_dtype": torch.float64, "computation_device": "cpu", "computation_dtype": torch.float32},
    {"offload_device": "cpu", "offload_dtype": torch.float32, "computation_device": "cpu",
     "computation_dtype": torch.float32, "prefetch": 0},
])
def test_ddpm_pipeline_output_is_unchanged(config):
    plain = tiny_ddpm()
    managed = copy.deepcopy(plain)
    vram.enable_vram_management(managed.unet, config, vram_limit=0)
    vram.onload(managed.unet)
    assert managed._execution_device == torch.device("cpu")
    assert managed.unet.dtype == torch.float32
    expected = plain(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                     output_type="np").images
    got = managed(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                  output_type="np").images
    assert (got == expected).all()
    assert vram.last_report().model == "UNet2DModel"
    vram.offload(managed.unet)
    vram.disable_vram_management(managed.unet)
